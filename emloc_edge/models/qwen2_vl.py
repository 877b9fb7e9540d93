"""Qwen2-VL and Qwen2.5-VL through stock transformers: M-RoPE positions, ViT features scattered into
`<|image_pad|>` slots. Pixels come from `Qwen2VLImageProcessorPil` (no torchvision needed)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..runtime.image import load_image
from .base import Batch, Geometry, ModelAdapter, Sequence, TextStack, config_geometry
from .registry import register
from .text_lm import pad_ids

# Settings of Qwen2VLImageProcessor that decide pixels and token counts; stored in the memory file.
_PREPROCESSING_KEYS = (
    "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
    "image_mean", "image_std", "rescale_factor", "resample",
)


@register
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    has_vision = True

    def __init__(self, model, tokenizer, source: Path, name: str) -> None:
        super().__init__(model, tokenizer, source, name)
        self.processor = _load_image_processor(source)
        config = model.config
        self.image_token_id = config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self._pixels: dict[Path, tuple[np.ndarray, np.ndarray]] = {}  # path -> (pixel_values, grid_thw [3])
        self._features: dict[Path, torch.Tensor] = {}  # path -> [n_tokens, D], ViT run once per image

    @property
    def geometry(self) -> Geometry:
        return config_geometry(self.model.config.text_config, position_dims=3)

    def text_stack(self) -> TextStack:
        lm = self.model.model.language_model
        return TextStack(lm.embed_tokens, lm.layers, lm.norm, self.model.lm_head, lm.rotary_emb)

    def user_content(self, question: str, has_image: bool) -> object:
        text = [{"type": "text", "text": question}]
        return ([{"type": "image"}] + text) if has_image else text

    def image_preprocessing(self) -> dict:
        settings = {k: _jsonable(getattr(self.processor, k, None)) for k in _PREPROCESSING_KEYS}
        size = getattr(self.processor, "size", None) or {}
        settings["min_pixels"] = settings["min_pixels"] or size.get("shortest_edge")
        settings["max_pixels"] = settings["max_pixels"] or size.get("longest_edge")
        return {"processor": "qwen2_vl", "image_token": self.image_token, **settings}

    # --- images ---------------------------------------------------------------------------------
    def _preprocess(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if path not in self._pixels:
            out = self.processor(images=[load_image(path)], return_tensors="np")
            self._pixels[path] = (out["pixel_values"], out["image_grid_thw"][0])
        return self._pixels[path]

    def image_tokens(self, path: Path) -> int:
        """LLM tokens one image takes: (t·h·w) patches merged merge² to one."""
        grid = self._preprocess(path)[1]
        return int(np.prod(grid)) // self.processor.merge_size**2

    @torch.no_grad()
    def _image_features(self, path: Path) -> torch.Tensor:
        if path not in self._features:
            pixels, grid = self._preprocess(path)
            out = self.model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(grid[None]))
            self._features[path] = out.pooler_output[0]  # [n_tokens, D]
        return self._features[path]

    # --- tokens ---------------------------------------------------------------------------------
    def expand_images(self, ids: list[int], answer: list[bool], images: list[Path]) -> tuple[list[int], list[bool]]:
        """Repeat each `<|image_pad|>` as many times as its image has LLM tokens."""
        if len(images) != ids.count(self.image_token_id):
            raise ModelLoadError(f"{len(images)} images for {ids.count(self.image_token_id)} image slots")
        counts = iter([self.image_tokens(p) for p in images])
        out_ids: list[int] = []
        out_answer: list[bool] = []
        for i, a in zip(ids, answer):
            n = next(counts) if i == self.image_token_id else 1
            out_ids += [i] * n
            out_answer += [a] * n
        return out_ids, out_answer

    def position_span(self, sequence: Sequence) -> int:
        """max M-RoPE position + 1: an image of h×w merged tokens advances text positions by max(h, w)."""
        ids = torch.tensor([sequence.input_ids])
        grids = [self._preprocess(p)[1] for p in sequence.images]
        positions, _ = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=(ids == self.image_token_id).int(),
            image_grid_thw=torch.from_numpy(np.stack(grids)) if grids else None,
        )
        return int(positions.max()) + 1

    @torch.no_grad()
    def embed(self, sequences: list[Sequence]) -> Batch:
        ids, valid = pad_ids([s.input_ids for s in sequences], self.tokenizer.pad_token_id or 0)
        answer, _ = pad_ids([[int(a) for a in s.answer_mask] for s in sequences], 0)
        embeds = self.text_stack().embed_tokens(ids)  # [B, T, D]
        images = [p for s in sequences for p in s.images]
        grids = None
        if images:
            features = torch.cat([self._image_features(p) for p in images]).to(embeds.dtype)
            slots = ids == self.image_token_id  # [B, T]
            embeds = embeds.masked_scatter(slots[..., None], features)
            grids = torch.from_numpy(np.stack([self._preprocess(p)[1] for p in images]))
        positions, _ = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=(ids == self.image_token_id).int(),
            image_grid_thw=grids,
            attention_mask=valid.long(),
        )  # [3, B, T]
        span = (positions.masked_fill(~valid[None], 0).amax(dim=(0, 2)) + 1)  # [B]
        return Batch(ids, embeds, positions, valid, answer.bool(), span)


@register
class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


def _load_image_processor(source: Path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = source if source.is_dir() else source.parent
    # transformers warns on stderr about the slow/fast processor choice; keep error output one line.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if (folder / "preprocessor_config.json").exists():
        return Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    return Qwen2VLImageProcessorPil()


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [float(v) for v in value]
    if hasattr(value, "value"):  # PIL resampling enum
        return int(value.value)
    return value
