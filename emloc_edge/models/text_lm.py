"""Llama / Qwen2-style text-only decoders (LlamaForCausalLM, Qwen2ForCausalLM, SmolLM2 from GGUF)."""
from __future__ import annotations


import torch

from ..errors import BadInputError
from .base import Batch, Geometry, ModelAdapter, Sequence, TextStack, config_geometry
from .registry import register


@register
class TextDecoderAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "qwen2", "mistral")

    @property
    def geometry(self) -> Geometry:
        return config_geometry(self.model.config, position_dims=1)

    def text_stack(self) -> TextStack:
        inner = self.model.model
        return TextStack(inner.embed_tokens, inner.layers, inner.norm, self.model.lm_head, inner.rotary_emb)

    def user_content(self, question: str, has_image: bool) -> object:
        if has_image:
            raise BadInputError(f"{self.name} is a text-only model and cannot take images")
        return question

    def embed(self, sequences: list[Sequence]) -> Batch:
        ids, valid = pad_ids([s.input_ids for s in sequences], self.pad_id)
        answer, _ = pad_ids([[int(a) for a in s.answer_mask] for s in sequences], 0)
        lengths = valid.sum(1)
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)  # [B, T]
        return Batch(
            input_ids=ids,
            inputs_embeds=self.text_stack().embed_tokens(ids),
            position_ids=positions[None],  # [1, B, T]
            attention_mask=valid,
            answer_mask=answer.bool(),
            next_position=lengths,
        )

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.chat.end_of_turn_id


def pad_ids(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer rows: ([B, T] long, [B, T] bool valid)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return ids, valid
