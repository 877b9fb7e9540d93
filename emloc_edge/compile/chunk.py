"""One EMLoC chunk: prefill it against the memory, score its tokens, prune each layer under the policy.

    memory M (per layer, frozen) ──► prefill chunk at positions P.. ──► KV_c (per layer, L tokens)
    calibration rows (demos fed after the chunk, at positions P'..) attend to [M ; KV_c]:
        teacher log-probs at answer tokens, hidden states entering each layer, and per-head scores
    policy: for chosen layers and counts, replace KV_c by its best `count` tokens and measure JS

A trial is identified by the keep count of every layer it runs (the tokens a count keeps are fixed
by the scores), so a candidate asked for twice is measured once. JS is measured on the whole LM
head, or for policies that allow it on the teacher's relevant vocabulary (restricted_js.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..memory import ChunkRecord
from ..memory.quantize import roundtrip
from ..models.base import Batch
from ..models.decoder import LayerKV, RaggedDecoder, Scoring
from .policy import LayerBudgetPolicy
from .restricted_js import RestrictedHead
from .scoring import (
    FORCED_TOKENS,
    SCORING_TOKENS,
    TOKEN_WEIGHTS,
    gather_tokens,
    keep_count,
    keep_topk,
    keep_topk_per_segment,
    merge_evicted_values,
    smooth_scores,
)


PREFILL_BLOCK = 1024  # tokens a chunk's prefill feeds at once


@dataclass
class TrialStats:
    """How many candidates a chunk's policy asked for, and what they cost."""

    requested: int = 0  # candidates judged
    run: int = 0  # forwards actually run (requested minus identical candidates seen before)
    full_heads: int = 0  # trials measured on the whole LM head
    restricted: int = 0  # trials decided on the restricted-vocabulary JS (not exact_js)

    def add(self, other: "TrialStats") -> None:
        self.requested += other.requested
        self.run += other.run
        self.full_heads += other.full_heads
        self.restricted += other.restricted


@dataclass
class ChunkResult:
    """What a chunk adds to every layer, and how it was decided."""

    memory: list[LayerKV]  # the working memory after the chunk (what later chunks condition on)
    keys: list[np.ndarray]  # per layer [kv, n_l, hd] float32, before quantization (what the file encodes)
    values: list[np.ndarray]  # per layer [kv, n_l, hd]
    token_index: list[np.ndarray]  # per layer [kv, n_l] int32, index within the chunk
    record: ChunkRecord
    span: int  # positions the chunk occupies (the query offset advances by this)
    stats: TrialStats


@dataclass
class _Choice:
    count: int
    index: torch.Tensor  # [kv, n]
    key: torch.Tensor  # [kv, n, hd] as computed
    value: torch.Tensor
    stored: LayerKV  # memory_l extended by the kept tokens (round-tripped when judged as stored)


class ChunkSearch:
    """State of one chunk's search; implements the `ChunkSearch` protocol policies use.

    Built in `__init__`: the chunk's prefill against the frozen memory and the calibration pass (the
    teacher) are run once, and every trial afterwards starts from them."""

    decoder: RaggedDecoder
    memory: list[LayerKV]  # per layer, frozen: what earlier chunks stored
    chunk: Batch  # one row, no padding
    calib: Batch  # calibration demonstrations, one row each, right-padded
    offset: int  # position the chunk starts at
    precision: str  # candidates are round-tripped through this storage precision ("fp32": judged as computed)
    on_settle: Callable[[], None]  # progress tick per settled (or measured) layer
    exact_js: bool  # decide on the exact JS (the whole head); else on the restricted-vocabulary JS
    token_origin: torch.Tensor | None  # [L] long: the demonstration each chunk token belongs to
    calib_blind_to: torch.Tensor | None  # [B] long: the demonstration each calibration row must not see
    segment: torch.Tensor | None  # [L] long: budget segments, each keeping its own share of a layer's count
    num_layers: int
    tokens: int  # L, the chunk's tokens
    answers: int  # tokens every layer keeps (forced)
    span: int  # positions the chunk occupies
    chunk_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer ([kv, L, hd], [kv, L, hd]), rotated
    calib_positions: torch.Tensor  # [P, B, T] absolute positions of the calibration rows
    layer_inputs: list[torch.Tensor]  # h_l [B, T, D] entering layer l in the teacher pass
    head: RestrictedHead  # the LM head, with the teacher's answer distributions
    ranking: tuple[torch.Tensor, RestrictedHead] | None  # rows [k] and head single-layer trials use (None: all)
    importance: list[torch.Tensor]  # per layer [kv, L] smoothed scores (forced tokens +inf)
    mass: list[torch.Tensor]  # per layer [kv, L] the attention each token received (before weights and smoothing)
    merge_threshold: float | None  # evicted values merged into kept ones at this key cosine (None: dropped)
    working: list[LayerKV]  # per layer: memory + the chunk as settled so far (unsettled: whole)
    settled: dict[int, tuple[_Choice, float, float | None]]  # layer -> (choice, ratio, js)
    stats: TrialStats

    def __init__(
        self,
        decoder: RaggedDecoder,
        memory: list[LayerKV],
        chunk: Batch,
        calib: Batch,
        offset: int,
        precision: str,
        on_settle: Callable[[], None] = lambda: None,
        forced: torch.Tensor | None = None,  # [L] bool tokens every layer keeps (default: the chunk's answer tokens)
        exact_js: bool = True,
        scores_from: str = "answer",  # whose attention scores the chunk's tokens: "answer" or "all" calibration tokens
        token_origin: torch.Tensor | None = None,
        calib_blind_to: torch.Tensor | None = None,
        segment: torch.Tensor | None = None,
        ranking_rows: int | None = None,  # single-layer trials (try_keep) judged on this many rows, evenly spaced
        score_weight: str = "attention",  # "value-norm": a token's attention mass times its value's norm
        merge_threshold: float | None = None,  # evicted values merged into the most similar kept key's
    ) -> None:
        self.decoder, self.memory, self.chunk, self.calib = decoder, memory, chunk, calib
        self.offset, self.precision, self.on_settle, self.exact_js = offset, precision, on_settle, exact_js
        self.token_origin, self.calib_blind_to, self.segment = token_origin, calib_blind_to, segment
        self.merge_threshold = merge_threshold
        self.num_layers = decoder.geometry.num_layers
        # 1. Prefill the chunk against the frozen memory, keeping its own K/V (rotated at their positions).
        self.chunk_kv = self._prefill()
        self.tokens = chunk.input_ids.shape[1]
        forced = chunk.answer_mask[0] if forced is None else forced  # [L]
        self.answers = int(forced.sum())
        self._quotas: dict[int, list[int]] = {}  # keep count -> per-segment counts (with segments)
        if segment is not None:
            self._segment_tokens = torch.bincount(segment).tolist()
            self._segment_forced = torch.bincount(segment, weights=forced.double()).long().tolist()
        self.span = int(chunk.next_position[0])
        full = [m.extend(k, v, self._origin_of(None, k)) for m, (k, v) in zip(memory, self.chunk_kv)]

        # 2. Calibration pass: the calibration demos fed right after the chunk, attending to [memory ; chunk].
        self.calib_positions = calib.position_ids + offset + self.span
        teacher = decoder.forward(
            calib.inputs_embeds, self.calib_positions, calib.attention_mask, full, keep_inputs=True,
            scoring=Scoring(SCORING_TOKENS[scores_from](calib), [len(m) for m in memory]),
            blind_to=calib_blind_to,
        )
        self.layer_inputs = teacher.layer_inputs  # h_l entering layer l: exact while layers < l are unpruned
        head = decoder.stack.lm_head
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("an LM head with a bias")  # no supported family has one
        self.head = RestrictedHead(head.weight, decoder.stack.norm(teacher.hidden[calib.answer_mask]))
        self.mass = teacher.scores  # per layer [kv, L]
        weights = [TOKEN_WEIGHTS[score_weight](v) for _, v in self.chunk_kv]  # per layer [kv, L]
        self.importance = [smooth_scores(s * w, forced) for s, w in zip(self.mass, weights)]  # per layer [kv, L]
        self.ranking = None
        rows = calib.input_ids.shape[0]
        if ranking_rows is not None and ranking_rows < rows:
            subset = torch.linspace(0, rows - 1, ranking_rows, device=calib.answer_mask.device).round().long()  # [k]
            owner = calib.answer_mask.nonzero()[:, 0]  # [N] the row of each answer position
            self.ranking = (subset, self.head.at(torch.isin(owner, subset)))

        self.working = list(full)  # layers settle one by one; unsettled layers keep the whole chunk
        self.settled = {}
        self._choices: dict[tuple[int, int], _Choice] = {}
        self._outputs: dict[tuple, torch.Tensor] = {}  # trial key -> normed final hidden at answer positions
        self._exact: dict[tuple, float] = {}
        self.stats = TrialStats()
        self._reported: set[int] = set()  # layers already counted by on_settle

    def _prefill(self, block: int = PREFILL_BLOCK) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The chunk's K/V per layer, prefilled `block` tokens at a time (each block attends to the memory
        and the earlier blocks), so a whole-context chunk never holds a [T, T] score matrix per head."""
        c, L = self.chunk, self.chunk.input_ids.shape[1]
        keys: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        values: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        memory = list(self.memory)
        for a in range(0, L, block):
            b = min(a + block, L)
            out = self.decoder.forward(
                c.inputs_embeds[:, a:b], c.position_ids[..., a:b] + self.offset, c.attention_mask[:, a:b],
                memory, keep_kv=True,
            )
            for l, (k, v) in enumerate(out.new_kv):
                keys[l].append(k[0])
                values[l].append(v[0])
                memory[l] = memory[l].extend(k[0], v[0])
        return [(torch.cat(k, 1), torch.cat(v, 1)) for k, v in zip(keys, values)]

    # --- the protocol -----------------------------------------------------------------------------
    def keep_count(self, ratio: float) -> int:
        if self.segment is None:
            return keep_count(ratio, self.tokens, self.answers)
        # Each segment keeps its share; quotas are monotone in ratio, so a total names one split.
        quotas = [keep_count(ratio, n, a) for n, a in zip(self._segment_tokens, self._segment_forced)]
        self._quotas[sum(quotas)] = quotas
        return sum(quotas)

    def settled_count(self, layer: int) -> int:
        return self.settled[layer][0].count if layer in self.settled else self.tokens

    def try_keep(self, layer: int, count: int, delta: float | None = None) -> float:
        """JS with `layer` at `count` (higher layers as settled, lower ones whole), on the ranking rows; see `_judge`."""
        counts = {l: self.settled_count(l) for l in range(layer, self.num_layers)} | {layer: count}
        return self._judge(layer, counts, delta, self.ranking is not None)

    def try_profile(self, counts: list[int], delta: float | None = None) -> float:
        """JS with every layer at its count at once: one trial through the whole stack."""
        return self._judge(0, dict(enumerate(counts)), delta)

    def settle(self, layer: int, count: int, ratio: float, js: float | None) -> None:
        choice = self._choose(layer, count)
        self.working[layer] = choice.stored
        self.settled[layer] = (choice, ratio, js)
        for key in [k for k in self._choices if k[0] == layer and k[1] != count]:
            del self._choices[key]  # a settled layer's other candidates are never run again
        self._report(layer)

    def measured(self, layer: int) -> None:
        """The policy is done measuring `layer`, though it settles it later: progress only."""
        self._report(layer)

    # --- helpers ----------------------------------------------------------------------------------
    def _report(self, layer: int) -> None:
        if layer not in self._reported:  # each layer counts once, whether measured or settled first
            self._reported.add(layer)
            self.on_settle()

    def _choose(self, layer: int, count: int) -> _Choice:
        if count == self.tokens:  # the whole chunk: no selection, stored as computed
            k, v = self.chunk_kv[layer]
            index = torch.arange(count, device=k.device)[None].expand(k.shape[0], -1)
            stored = self.memory[layer].extend(*_roundtrip(k, v, self.precision), self._origin_of(None, k))
            return _Choice(count, index, k, v, stored)
        if (layer, count) not in self._choices:
            if self.segment is None:
                index = keep_topk(self.importance[layer], count)  # [kv, n]
            else:
                index = keep_topk_per_segment(self.importance[layer], self.segment, self._quotas[count])
            k, v = self.chunk_kv[layer]
            key, value = gather_tokens(k, index), gather_tokens(v, index)  # [kv, n, hd]
            if self.merge_threshold is not None:
                value = merge_evicted_values(k, v, index, self.mass[layer], self.merge_threshold, self.token_origin)
            stored = self.memory[layer].extend(*_roundtrip(key, value, self.precision), self._origin_of(index, k))
            self._choices[(layer, count)] = _Choice(count, index, key, value, stored)
        return self._choices[(layer, count)]

    def _origin_of(self, index: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
        """Origins [kv, n] of the chunk tokens at index [kv, n] (None: all of key's [kv, L]); None if unknown."""
        if self.token_origin is None:
            return None
        every = self.token_origin[None].expand(key.shape[0], -1)  # [kv, L]
        return every if index is None else every.gather(1, index)

    def _judge(self, start: int, counts: dict[int, int], delta: float | None, ranking: bool = False) -> float:
        """Mean JS of the trial: exact (the whole LM head) with exact_js or without `delta`, else the
        restricted-vocabulary JS (the head on the teacher's relevant tokens + a tail bucket). ranking:
        judged on the ranking rows only."""
        rows, head = self.ranking if ranking else (None, self.head)
        key = (start, tuple(counts[l] for l in range(start, self.num_layers)), ranking)
        self.stats.requested += 1
        x = self._outputs.get(key)
        if x is None:
            self.stats.run += 1
            memory = list(self.working)
            for l, c in counts.items():
                if not (l in self.settled and c == self.settled_count(l)):
                    memory[l] = self._choose(l, c).stored
            x = self._run(memory, start, rows)
            self._outputs[key] = x
        if delta is not None and head.enabled and not self.exact_js and key not in self._exact:
            self.stats.restricted += 1
            return head.estimate(x)
        self.stats.full_heads += 1
        if key not in self._exact:
            self._exact[key] = head.exact(x)
        return self._exact[key]

    def _run(self, memory: list[LayerKV], start: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Normed final hidden [N, D] at the answer positions of the calibration rows (or of `rows` [k])."""
        c, hidden, positions, blind = self.calib, self.layer_inputs[start], self.calib_positions, self.calib_blind_to
        valid, answer = c.attention_mask, c.answer_mask
        if rows is not None:
            hidden, positions, valid, answer = hidden[rows], positions[:, rows], valid[rows], answer[rows]
            blind = None if blind is None else blind[rows]
        out = self.decoder.forward(hidden, positions, valid, memory, start_layer=start, blind_to=blind)
        return self.decoder.stack.norm(out.hidden[answer])  # [N, D]

    def result(self, demos: int) -> ChunkResult:
        missing = [l for l in range(self.num_layers) if l not in self.settled]
        if missing:
            raise RuntimeError(f"policy left layers {missing} undecided")
        choices = [self.settled[l] for l in range(self.num_layers)]
        key = (0, tuple(c.count for c, _, _ in choices), False)
        if key not in self._outputs:  # the final state was never run as one trial
            self.stats.run += 1
            self._outputs[key] = self._run(self.working, 0)
        if key not in self._exact:
            self._exact[key] = self.head.exact(self._outputs[key])
        record = ChunkRecord(
            demos=demos,
            tokens=self.tokens,
            kept_per_layer=[c.count for c, _, _ in choices],
            ratio_per_layer=[r for _, r, _ in choices],
            js_per_layer=[js for _, _, js in choices],
            final_js=self._exact[key],
        )
        return ChunkResult(
            memory=self.working,
            keys=[c.key.float().cpu().numpy() for c, _, _ in choices],
            values=[c.value.float().cpu().numpy() for c, _, _ in choices],
            token_index=[c.index.to(torch.int32).cpu().numpy() for c, _, _ in choices],
            record=record,
            span=self.span,
            stats=self.stats,
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
    token_origin: torch.Tensor | None = None,
    calib_blind_to: torch.Tensor | None = None,
    segment: torch.Tensor | None = None,
    keep_first: bool = False,
) -> ChunkResult:
    """Search the chunk as `policy` judges it (its forced tokens, JS and scores) and prune it. With
    token_origin [L] and calib_blind_to [B], calibration row b does not see the chunk tokens of
    demonstration calib_blind_to[b] (its own copy): it then reads the chunk as a held-out item would.
    With segment [L], each segment keeps its own share of every keep count (`keep_topk_per_segment`).
    keep_first: every layer also keeps the chunk's first token (the context's attention sink)."""
    forced = FORCED_TOKENS[policy.forces](chunk.answer_mask[0])  # [L] bool
    if keep_first:
        forced = forced.clone()
        forced[0] = True
    search = ChunkSearch(decoder, memory, chunk, calib, offset, precision, on_settle, forced,
                         exact_js=policy.exact_js, scores_from=policy.scores_from,
                         token_origin=token_origin, calib_blind_to=calib_blind_to, segment=segment,
                         ranking_rows=policy.ranking_rows, score_weight=policy.score_weight,
                         merge_threshold=policy.merge_threshold)
    policy.decide(search)
    return search.result(demos)


def _roundtrip(key: torch.Tensor, value: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The values the memory file will hold for these tokens (unchanged for fp32)."""
    if precision == "fp32":
        return key, value
    device = key.device
    key_t = key.float().transpose(1, 2).cpu().numpy()  # [kv, hd, n]
    stored_key_t, stored_value = roundtrip(key_t, value.float().cpu().numpy(), precision)
    key_out = torch.from_numpy(np.ascontiguousarray(stored_key_t)).transpose(1, 2).to(device)
    return key_out, torch.from_numpy(stored_value).to(device)
