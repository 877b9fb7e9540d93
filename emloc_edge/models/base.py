"""The narrow interface every model family implements, and the data it hands to the compressor.

An adapter knows three things about its family: how a conversation becomes tokens (+ images),
how tokens become input embeddings and position ids, and where the text decoder's parts are.
Everything else (chunking, scoring, pruning, the memory file) is family-agnostic.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import ModelLoadError
from .chat import ChatTemplate, Message, Piece


@dataclass(frozen=True)
class Geometry:
    """Shapes of the text decoder, read once from the HF config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    position_dims: int  # 3 for M-RoPE (temporal, height, width), 1 for plain RoPE

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class TextStack:
    """The pieces of the text decoder the explicit forward in `decoder.py` runs."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module


@dataclass
class Sequence:
    """One rendered token sequence before embedding: ids, its images, and which tokens are answers."""

    input_ids: list[int]
    answer_mask: list[bool]  # True on answer-span tokens (last generation-prompt token .. end-of-turn)
    images: list[Path] = field(default_factory=list)  # in order of their placeholders


@dataclass
class Batch:
    """Sequences embedded and positioned, right-padded to a common length T."""

    input_ids: torch.Tensor  # [B, T] long
    inputs_embeds: torch.Tensor  # [B, T, D]
    position_ids: torch.Tensor  # [P, B, T] long, local positions starting at 0 (P = position_dims)
    attention_mask: torch.Tensor  # [B, T] bool, False on padding
    answer_mask: torch.Tensor  # [B, T] bool
    next_position: torch.Tensor  # [B] long: max local position + 1 (the span the row advances positions by)


class ModelAdapter(ABC):
    """One model family. Subclasses register themselves in `registry.py` by `family` name."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF `config.model_type` values this adapter serves
    has_vision: ClassVar[bool] = False  # takes images; loads through AutoModelForImageTextToText

    def __init__(self, model: nn.Module, tokenizer, source: Path, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.name = name
        self.chat = ChatTemplate(tokenizer, self.user_content)
        self._fingerprint: str | None = None

    # --- what each family defines -------------------------------------------------------------
    @property
    @abstractmethod
    def geometry(self) -> Geometry: ...

    @abstractmethod
    def text_stack(self) -> TextStack: ...

    @abstractmethod
    def user_content(self, question: str, has_image: bool) -> object:
        """The `content` of a user chat message in the form this family's chat template expects."""

    @abstractmethod
    def embed(self, sequences: list[Sequence]) -> Batch:
        """Token embeddings (image features scattered in) and local position ids for a batch."""

    def position_span(self, sequence: Sequence) -> int:
        """Positions a sequence advances the context by (its token count, unless images use M-RoPE)."""
        return len(sequence.input_ids)

    def image_preprocessing(self) -> dict | None:
        """Settings the runtime needs to preprocess images exactly as the compiler did (None: text-only)."""
        return None

    # --- shared ---------------------------------------------------------------------------------
    def sequence(self, piece: Piece, images: list[Path]) -> Sequence:
        """Tokens of a rendered piece, image placeholders expanded to their token counts."""
        ids, answer = self.chat.encode(piece)
        ids, answer = self.expand_images(ids, answer, images)
        return Sequence(ids, answer, list(images))

    def expand_images(self, ids: list[int], answer: list[bool], images: list[Path]) -> tuple[list[int], list[bool]]:
        """Families with image placeholders repeat them per image token; text-only ones take no images."""
        if images:
            raise ModelLoadError(f"{self.name} is a text-only model and cannot take images")
        return ids, answer

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, head_dim] for absolute positions [P, B, T]."""
        rotary = self.text_stack().rotary_emb
        if self.geometry.position_dims == 1:
            return rotary(hidden, position_ids[0])
        return rotary(hidden, position_ids)

    def template_pieces(self) -> dict:
        """What a runtime needs to render a query and stop: stored in memory files and model manifests."""
        text_prefix, text_suffix = self.chat.query_template(has_image=False)
        eos = self.tokenizer.eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        return {
            "query_text": [text_prefix, text_suffix],
            "query_image": list(self.chat.query_template(has_image=True)) if self.has_vision else None,
            "end_of_turn": self.chat.end_of_turn,
            "stop_token_ids": sorted({self.chat.end_of_turn_id, *eos}),
        }

    def fingerprint(self) -> str:
        """sha256 over the decoder geometry, the tokenizer and a few weight tensors.

        Identifies the weights a memory was computed with; the exported model folder carries the same
        value, so the runtime can refuse a memory built for another model. Tensors are hashed as fp32
        so the value does not depend on the dtype the model was loaded in.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.family.encode())
            h.update(json.dumps(self.geometry.__dict__, sort_keys=True).encode())
            h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
            stack = self.text_stack()
            for t in (stack.embed_tokens.weight, stack.layers[-1].self_attn.o_proj.weight, stack.norm.weight):
                h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def config_geometry(text_config, position_dims: int) -> Geometry:
    """Geometry from a Llama/Qwen2-style text config; fails with a clear error if a field is missing."""
    try:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return Geometry(
            num_layers=text_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            max_positions=text_config.max_position_embeddings,
            position_dims=position_dims,
        )
    except AttributeError as e:
        raise ModelLoadError(f"model config lacks a decoder field: {e}") from None


__all__ = ["Batch", "Geometry", "Message", "ModelAdapter", "Sequence", "TextStack", "config_geometry"]
