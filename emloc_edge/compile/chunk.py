"""One EMLoC chunk: prefill it against the memory, score its tokens, prune each layer under the policy.

    memory M (per layer, frozen) ──► prefill chunk at positions P.. ──► KV_c (per layer, L tokens)
    calibration rows (the chunk's demos again, at positions P'..) attend to [M ; KV_c]:
        teacher log-probs at answer tokens, hidden states entering each layer, and per-head scores
    policy: for chosen layers and counts, replace KV_c by its best `count` tokens and measure JS
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..memory import ChunkRecord
from ..memory.quantize import roundtrip
from ..models.base import Batch
from ..models.decoder import LayerKV, RaggedDecoder, Scoring
from .divergence import js_divergence
from .policy import LayerBudgetPolicy
from .scoring import gather_tokens, keep_count, keep_topk, smooth_scores


@dataclass
class ChunkResult:
    """What a chunk adds to every layer, and how it was decided."""

    memory: list[LayerKV]  # the working memory after the chunk (as stored: quantization round-tripped)
    keys: list[np.ndarray]  # per layer [kv, n_l, hd] float32, before quantization (what the file encodes)
    values: list[np.ndarray]  # per layer [kv, n_l, hd]
    token_index: list[np.ndarray]  # per layer [kv, n_l] int32, index within the chunk
    record: ChunkRecord
    span: int  # positions the chunk occupies (the query offset advances by this)


@dataclass
class _Choice:
    count: int
    index: torch.Tensor  # [kv, n]
    key: torch.Tensor  # [kv, n, hd] as computed
    value: torch.Tensor
    stored: LayerKV  # memory_l extended by the round-tripped kept tokens


@dataclass
class ChunkSearch:
    """State of one chunk's search; implements the `ChunkSearch` protocol policies use."""

    decoder: RaggedDecoder
    memory: list[LayerKV]
    chunk: Batch  # one row, no padding
    calib: Batch  # the chunk's demonstrations, one row each, right-padded
    offset: int  # position the chunk starts at
    precision: str
    on_settle: Callable[[], None] = lambda: None  # progress tick per settled layer
    num_layers: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_layers = self.decoder.geometry.num_layers
        d = self.decoder
        # 1. Prefill the chunk against the frozen memory, keeping its own K/V (rotated at their positions).
        out = d.forward(
            self.chunk.inputs_embeds, self.chunk.position_ids + self.offset, self.chunk.attention_mask,
            self.memory, keep_kv=True,
        )
        self.chunk_kv = [(k[0], v[0]) for k, v in out.new_kv]  # per layer ([kv, L, hd], [kv, L, hd])
        self.tokens = self.chunk.input_ids.shape[1]
        self.answers = int(self.chunk.answer_mask.sum())
        self.span = int(self.chunk.next_position[0])
        full = [m.extend(k, v) for m, (k, v) in zip(self.memory, self.chunk_kv)]

        # 2. Calibration pass: the chunk's demos re-fed right after it, attending to [memory ; chunk].
        self.calib_positions = self.calib.position_ids + self.offset + self.span
        teacher = d.forward(
            self.calib.inputs_embeds, self.calib_positions, self.calib.attention_mask, full, keep_inputs=True,
            scoring=Scoring(self.calib.answer_mask, [len(m) for m in self.memory]),
        )
        self.layer_inputs = teacher.layer_inputs  # h_l entering layer l: exact while layers < l are unpruned
        self.teacher_logprobs = d.logits(teacher.hidden[self.calib.answer_mask]).float().log_softmax(-1)  # [N, V]
        answer = self.chunk.answer_mask[0]  # [L]
        self.importance = [smooth_scores(s, answer) for s in teacher.scores]  # per layer [kv, L]

        self.working = list(full)  # layers settle one by one; unsettled entries are never run
        self.settled: dict[int, tuple[_Choice, float, float | None]] = {}
        self._candidate: tuple[tuple[int, int], _Choice] | None = None

    # --- the protocol -----------------------------------------------------------------------------
    def keep_count(self, ratio: float) -> int:
        return keep_count(ratio, self.tokens, self.answers)

    def try_keep(self, layer: int, count: int) -> float:
        choice = self._choose(layer, count)
        memory = list(self.working)
        memory[layer] = choice.stored
        return self._js(memory, start_layer=layer)

    def settle(self, layer: int, count: int, ratio: float, js: float | None) -> None:
        choice = self._choose(layer, count)
        self.working[layer] = choice.stored
        self.settled[layer] = (choice, ratio, js)
        self.on_settle()

    # --- helpers ----------------------------------------------------------------------------------
    def _choose(self, layer: int, count: int) -> _Choice:
        if self._candidate is not None and self._candidate[0] == (layer, count):
            return self._candidate[1]  # settle() right after the try_keep() that passed
        index = keep_topk(self.importance[layer], count)  # [kv, n]
        k, v = self.chunk_kv[layer]
        key, value = gather_tokens(k, index), gather_tokens(v, index)  # [kv, n, hd]
        stored_k, stored_v = _roundtrip(key, value, self.precision)
        choice = _Choice(count, index, key, value, self.memory[layer].extend(stored_k, stored_v))
        self._candidate = ((layer, count), choice)
        return choice

    def _js(self, memory: list[LayerKV], start_layer: int) -> float:
        out = self.decoder.forward(
            self.layer_inputs[start_layer], self.calib_positions, self.calib.attention_mask, memory,
            start_layer=start_layer,
        )
        return js_divergence(self.decoder.logits(out.hidden[self.calib.answer_mask]), self.teacher_logprobs)

    def result(self, demos: int) -> ChunkResult:
        missing = [l for l in range(self.num_layers) if l not in self.settled]
        if missing:
            raise RuntimeError(f"policy left layers {missing} undecided")
        choices = [self.settled[l] for l in range(self.num_layers)]
        record = ChunkRecord(
            demos=demos,
            tokens=self.tokens,
            kept_per_layer=[c.count for c, _, _ in choices],
            ratio_per_layer=[r for _, r, _ in choices],
            js_per_layer=[js for _, _, js in choices],
            final_js=self._js(self.working, start_layer=0),
        )
        return ChunkResult(
            memory=self.working,
            keys=[c.key.float().numpy() for c, _, _ in choices],
            values=[c.value.float().numpy() for c, _, _ in choices],
            token_index=[c.index.to(torch.int32).numpy() for c, _, _ in choices],
            record=record,
            span=self.span,
        )


def compress_chunk(
    decoder: RaggedDecoder,
    memory: list[LayerKV],
    chunk: Batch,
    calib: Batch,
    offset: int,
    policy: LayerBudgetPolicy,
    precision: str,
    demos: int,
    on_settle: Callable[[], None] = lambda: None,
) -> ChunkResult:
    search = ChunkSearch(decoder, memory, chunk, calib, offset, precision, on_settle)
    policy.decide(search)
    return search.result(demos)


def _roundtrip(key: torch.Tensor, value: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The values the memory file will hold for these tokens, so later chunks condition on exactly them."""
    key_t = key.float().transpose(1, 2).numpy()  # [kv, hd, n]
    stored_key_t, stored_value = roundtrip(key_t, value.float().numpy(), precision)
    return torch.from_numpy(np.ascontiguousarray(stored_key_t)).transpose(1, 2), torch.from_numpy(stored_value)
