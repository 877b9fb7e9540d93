"""The default model: a tiny LLaVA-style VLM composed from offline parts (see `default_model.py`).

    MODEL_DIR/
      config.json                 {"model_type": "emloc_tiny_vlm", "image_tokens", "image_size", ...}
      language_model/             a plain HF causal LM folder (SmolLM2-135M-Instruct), chat template
                                  with image parts: each image renders as one `image_token`
      vision_encoder.safetensors  EfficientNet-Lite0 weights (frozen, ImageNet)
      projector.safetensors       the trained projector

An image becomes `image_tokens` LM input embeddings written over as many copies of `image_token`;
positions are the plain 1-D RoPE positions of a text model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..runtime.image import load_image, preprocess_square
from .base import Batch, Sequence
from .registry import register
from .text_lm import TextDecoderAdapter, pad_ids
from .tiny_vlm_vision import ImageEncoder, ImageTokens, Projector

MODEL_TYPE = "emloc_tiny_vlm"
_CONFIG_KEYS = ("image_token", "image_tokens", "image_size", "image_mean", "image_std", "resample")


@register
class TinyVLMAdapter(TextDecoderAdapter):
    """The language model's geometry and layers are a plain Llama's (inherited); images are its own."""

    family = "tiny_vlm"
    model_types = (MODEL_TYPE,)
    has_vision = True

    def __init__(self, model, tokenizer, source: Path, name: str, config: dict, vision: ImageTokens) -> None:
        super().__init__(model, tokenizer, source, name)
        self.config = config
        self.vision = vision.eval()
        self.image_token = config["image_token"]
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_tokens = int(config["image_tokens"])
        self._features: dict[Path, torch.Tensor] = {}  # path -> [T, D], encoder run once per image

    @classmethod
    def from_folder(cls, path: Path, dtype: torch.dtype = torch.float32) -> "TinyVLMAdapter":
        import transformers
        from safetensors.torch import load_file

        config = json.loads((path / "config.json").read_text())
        missing = [k for k in (*_CONFIG_KEYS, "language_model") if k not in config]
        if missing:
            raise ModelLoadError(f"{path / 'config.json'}: missing field {missing[0]!r}")
        lm_dir = path / config["language_model"]
        model = transformers.AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
        encoder = ImageEncoder(int(config["image_tokens"]), int(config["image_size"]))
        encoder.net.load_state_dict(load_file(path / "vision_encoder.safetensors"))
        state = load_file(path / "projector.safetensors")
        projector = Projector(int(config["image_tokens"]), model.config.hidden_size, state["codebook"].shape[0])
        projector.load_state_dict(state)
        return cls(model, tokenizer, path, path.name, config, ImageTokens(encoder, projector))

    def user_content(self, question: str, has_image: bool) -> object:
        # The image goes after the question, right before the answer turn: a small LM copies an
        # answer from its demonstrations more reliably when the token to match is close to it.
        text = [{"type": "text", "text": question}]
        return (text + [{"type": "image"}]) if has_image else text

    def image_preprocessing(self) -> dict:
        return {"processor": "square", **{k: self.config[k] for k in _CONFIG_KEYS}}

    # --- images ---------------------------------------------------------------------------------
    def pixels(self, path: Path) -> np.ndarray:
        """[3, S, S] float32: the same function the runtime calls."""
        return preprocess_square(load_image(path), self.image_preprocessing())

    @torch.no_grad()
    def _image_features(self, path: Path) -> torch.Tensor:
        if path not in self._features:
            self._features[path] = self.vision(torch.from_numpy(self.pixels(path))[None])[0]  # [T, D]
        return self._features[path]

    def expand_images(self, ids: list[int], answer: list[bool], images: list[Path]) -> tuple[list[int], list[bool]]:
        """Each image slot becomes `image_tokens` copies of the image token."""
        if len(images) != ids.count(self.image_token_id):
            raise ModelLoadError(f"{len(images)} images for {ids.count(self.image_token_id)} image slots")
        out_ids: list[int] = []
        out_answer: list[bool] = []
        for i, a in zip(ids, answer):
            n = self.image_tokens if i == self.image_token_id else 1
            out_ids += [i] * n
            out_answer += [a] * n
        return out_ids, out_answer

    @torch.no_grad()
    def embed(self, sequences: list[Sequence]) -> Batch:
        ids, valid = pad_ids([s.input_ids for s in sequences], self.chat.end_of_turn_id)
        answer, _ = pad_ids([[int(a) for a in s.answer_mask] for s in sequences], 0)
        embeds = self.text_stack().embed_tokens(ids)  # [B, T, D]
        images = [p for s in sequences for p in s.images]
        if images:
            features = torch.cat([self._image_features(p) for p in images]).to(embeds.dtype)  # [n·T_img, D]
            embeds = embeds.masked_scatter((ids == self.image_token_id)[..., None], features)
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)  # [B, T]
        return Batch(ids, embeds, positions[None], valid, answer.bool(), valid.sum(1))

    def fingerprint(self) -> str:
        """The language model's fingerprint extended with the image side: another projector, another model."""
        if self._fingerprint is None:
            h = hashlib.sha256(super().fingerprint().encode())
            h.update(json.dumps({k: self.config[k] for k in _CONFIG_KEYS}, sort_keys=True).encode())
            for t in self.vision.projector.state_dict().values():
                h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
            h.update(self.vision.encoder.net._conv_head.weight.detach().float().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
