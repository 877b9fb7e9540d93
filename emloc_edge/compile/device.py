"""Where the compiler runs its decoder: `device="auto"|"cpu"|"cuda"` (torch devices).

The adapter (tokenizer, embeddings, vision encoder) stays where it was loaded, on the CPU; the text
decoder's layers, final norm, LM head and rotary tables are copied to the device, and each embedded
batch is moved there. So nothing outside the compiler changes device, and tied embeddings stay usable.
"""
from __future__ import annotations

import copy

import torch

from ..errors import BadInputError
from ..models.base import Batch, ModelAdapter, TextStack
from ..models.decoder import RaggedDecoder

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """"auto": CUDA when torch sees a GPU, else the CPU."""
    if device not in DEVICES:
        raise BadInputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("device 'cuda' was asked for, but this torch build sees no CUDA GPU")
    return torch.device(device)


class DeviceDecoder(RaggedDecoder):
    """A RaggedDecoder whose layers, norm, head and rotary tables live on `device`."""

    def __init__(self, adapter: ModelAdapter, device: torch.device) -> None:
        super().__init__(adapter)
        self.device = device
        if device.type != "cpu":
            s = self.stack
            self.stack = TextStack(s.embed_tokens, *(copy.deepcopy(m).to(device) for m in (s.layers, s.norm, s.lm_head, s.rotary_emb)))

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.geometry.position_dims == 1:
            return self.stack.rotary_emb(hidden, positions[0])
        return self.stack.rotary_emb(hidden, positions)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(t.to(device) for t in (batch.input_ids, batch.inputs_embeds, batch.position_ids,
                                          batch.attention_mask, batch.answer_mask, batch.next_position)))
