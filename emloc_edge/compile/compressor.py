"""The chunk loop: demonstrations -> rendered chunks -> EMLoC-compressed task memory."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from .. import __version__
from ..errors import BadInputError, ModelMismatchError
from ..memory import PRECISIONS, ChunkRecord, MemoryMeta, TaskMemory
from ..models.base import ModelAdapter, Sequence
from ..models.chat import Piece
from ..models.decoder import LayerKV
from ..textout import comma_list
from .chunk import ChunkResult, TrialStats, compress_chunk
from .demos import Demo
from .device import DeviceDecoder, resolve_device, to_device
from .query import memory_kv
from .policy import DEFAULT_POLICY, FORCES, POLICIES, LayerBudgetPolicy, default_ratios, make_policy, validate_ratios


@dataclass
class CompileOptions:
    """EMLoC hyperparameters (delta 0.005 nats, 4 demos a chunk: the paper's values; ratios: the policy's own,
    `default_ratios`: the paper's 0.1/0.2/0.5, or 0.1/0.2/0.3/0.5 for the default policy).
    The default policy ("emloc-context") searches the whole context as one chunk; chunk_size then only
    sizes the budget shares of its non-default budget "chunk"."""

    delta: float = 0.005  # JS tolerance on the final output; < 0 prunes nothing, inf always takes the smallest ratio
    ratios: tuple[float, ...] | None = None  # candidate keep ratios (None: the policy's own, `keep_ratios`)
    chunk_size: int = 4  # demonstrations per chunk (policies of scope "chunk")
    precision: str = "int8"  # how the memory file stores K/V: int8 | fp16 | fp32
    policy: str = DEFAULT_POLICY  # a name in POLICIES: "emloc-context", "emloc", "emloc-paper" or "uniform" (ratios[0] everywhere)
    forced: str | None = None  # answer-span tokens every layer keeps, one of FORCES (None: the policy's own, "answer")

    def __post_init__(self) -> None:
        if math.isnan(self.delta):
            raise BadInputError("delta must be a number, got nan", parameters="delta")
        if self.ratios is not None:
            self.ratios = validate_ratios(tuple(float(r) for r in self.ratios))
        if self.chunk_size < 1:
            raise BadInputError(f"chunk_size must be at least 1, got {self.chunk_size}", parameters="chunk_size")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
                                parameters="precision")
        if self.policy not in POLICIES:
            raise BadInputError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.forced is not None and self.forced not in FORCES:
            raise BadInputError(f"forced must be one of {', '.join(FORCES)}, got {self.forced!r}", parameters="forced")

    @property
    def keep_ratios(self) -> tuple[float, ...]:
        """The candidate keep ratios: as given, else the policy's own (kept None so that a copy of these
        options for another policy, as `eval` makes, takes that policy's own)."""
        return self.ratios if self.ratios is not None else default_ratios(self.policy)

    def make_policy(self) -> LayerBudgetPolicy:
        policy = make_policy(self.policy, self.delta, self.keep_ratios)
        if self.forced is not None:
            policy.forces = self.forced
        return policy

    def hyperparameters(self) -> dict:
        given = {"forced": self.forced} if self.forced is not None else {}  # absent: the policy's own (older files too)
        return {"delta": self.delta, "ratios": list(self.keep_ratios), "chunk_size": self.chunk_size,
                "policy": self.policy, **given}


class Progress(Protocol):
    def chunk(self, index: int, total: int, demos: int, layers: int) -> None: ...
    def layer(self) -> None: ...


class _Silent:
    def chunk(self, index: int, total: int, demos: int, layers: int) -> None:
        pass

    def layer(self) -> None:
        pass


@dataclass
class Compressor:
    adapter: ModelAdapter
    options: CompileOptions = field(default_factory=CompileOptions)
    device: str = "auto"  # where the decoder runs: auto | cpu | cuda

    def __post_init__(self) -> None:
        self.torch_device = resolve_device(self.device)
        self.decoder = DeviceDecoder(self.adapter, self.torch_device)
        self.stats = TrialStats()  # trials of the last compile, summed over its chunks

    @torch.no_grad()
    def compile(self, demos: list[Demo], existing: TaskMemory | None = None, progress: Progress | None = None) -> TaskMemory:
        """Compress `demos` into a new memory, or as further chunks of `existing` (left untouched)."""
        progress = progress or _Silent()
        if not demos:
            raise BadInputError("no demonstrations to compile")
        memory = self._start(existing)
        questions = {d.question for d in demos}
        if existing is None and len(questions) == 1:  # what `run IMAGE` asks when no question is given
            memory.meta.template["default_question"] = questions.pop()
        policy = self.options.make_policy()
        size = self.options.chunk_size if policy.scope == "chunk" else len(demos)  # "context": one chunk, one search
        chunks = [demos[i : i + size] for i in range(0, len(demos), size)]
        first = existing is None
        rendered = [self._render_chunk(c, with_system=first and k == 0) for k, c in enumerate(chunks)]
        if first:
            pieces = [p for r in rendered for p in r.pieces]
            self.adapter.chat.check_concatenation(pieces, self.adapter.chat.messages(demos))
        self._check_positions(memory, [r.sequence for r in rendered])

        dev = self.torch_device
        working = [LayerKV(m.key.to(dev), m.value.to(dev)) for m in memory_kv(memory)]
        offset, tokens_before = memory.meta.position_offset, memory.meta.context_tokens
        policy.resume([c.ratio_per_layer for c in memory.meta.chunks])
        # Judged as stored: candidates go through the file's precision. Otherwise decided in fp32 and
        # stored after, so later chunks condition on the memory as computed.
        judge_precision = memory.meta.precision if policy.judges_stored else "fp32"
        self.stats = TrialStats()
        for k, part in enumerate(rendered):
            progress.chunk(k, len(chunks), len(chunks[k]), self.adapter.geometry.num_layers)
            chunk = to_device(self.adapter.embed([part.sequence]), dev)
            rows, blind_to = _calibration(rendered, k, policy.calibration, policy.calibration_rows)
            calib = to_device(self.adapter.embed(rows), dev)
            first_demo = k * size  # demos are numbered across the compile, so origins never collide
            result = compress_chunk(
                self.decoder, working, chunk, calib,
                offset, policy, judge_precision, demos=len(chunks[k]), on_settle=progress.layer,
                # origins only where a calibration row is blind to its own copy: else nothing reads them
                token_origin=None if blind_to is None else torch.tensor(part.token_origin, device=dev) + first_demo,
                calib_blind_to=None if blind_to is None else torch.tensor(blind_to, device=dev) + first_demo,
                segment=_segments(part, self.options.chunk_size, policy, dev),
                keep_first=(sink := policy.sink_segment and first and k == 0),
            )
            self.stats.add(result.stats)
            for keys, values, index, record in _stored_segments(result, sink):
                memory.add_chunk(keys, values, [i + tokens_before for i in index], record)  # index within the context
            working = result.memory
            offset += result.span
            tokens_before += result.record.tokens
        memory.meta.position_offset = offset
        memory.meta.context_tokens = tokens_before
        return memory

    # --- steps ------------------------------------------------------------------------------------
    def _start(self, existing: TaskMemory | None) -> TaskMemory:
        a, g = self.adapter, self.adapter.geometry
        if existing is not None:
            if existing.meta.model_fingerprint != a.fingerprint():
                raise ModelMismatchError(f"the memory was built with {existing.meta.model_name}, not {a.name}")
            if existing.meta.hyperparameters != self.options.hyperparameters() or existing.meta.precision != self.options.precision:
                raise BadInputError(
                    "appending needs the memory's own settings: "
                    f"{_settings(existing.meta.hyperparameters, existing.meta.precision)}"
                )
            return copy.deepcopy(existing)  # the caller's memory stays as it was
        meta = MemoryMeta(
            model_name=a.name, model_family=a.family, model_fingerprint=a.fingerprint(),
            num_layers=g.num_layers, num_kv_heads=g.num_kv_heads, head_dim=g.head_dim,
            precision=self.options.precision, position_offset=0, position_dims=g.position_dims,
            context_tokens=0, hyperparameters=self.options.hyperparameters(), template=a.template_pieces(),
            image_preprocessing=a.image_preprocessing(), chunks=[], created_by=f"emloc-edge {__version__}",
        )
        return TaskMemory.empty(meta)

    def _render_chunk(self, demos: list[Demo], with_system: bool) -> "RenderedChunk":
        chat, adapter = self.adapter.chat, self.adapter
        pieces = [
            chat.demo_piece(d.question, d.answer, d.image is not None, with_system=with_system and i == 0)
            for i, d in enumerate(demos)
        ]
        images = [[d.image] if d.image is not None else [] for d in demos]
        parts = [adapter.sequence(p, imgs) for p, imgs in zip(pieces, images)]
        chunk = Sequence(
            [t for s in parts for t in s.input_ids],
            [a for s in parts for a in s.answer_mask],
            [p for s in parts for p in s.images],
        )
        # Calibration copies are rendered without the system turn, even the first demo's.
        calib = [
            adapter.sequence(chat.demo_piece(d.question, d.answer, d.image is not None, with_system=False), imgs)
            for d, imgs in zip(demos, images)
        ]
        origin = [i for i, s in enumerate(parts) for _ in s.input_ids]
        return RenderedChunk(chunk, calib, pieces, origin)

    def _check_positions(self, memory: TaskMemory, chunks: list[Sequence]) -> None:
        needed = memory.meta.position_offset + sum(self.adapter.position_span(s) for s in chunks)
        limit = self.adapter.geometry.max_positions
        if needed >= limit:
            raise BadInputError(
                f"the demonstrations need {needed} positions but {self.adapter.name} has {limit}; "
                "use fewer or shorter demonstrations"
            )


@dataclass
class RenderedChunk:
    """A chunk of demonstrations rendered for the compiler."""

    sequence: Sequence  # the chunk as the context holds it
    calibration: list[Sequence]  # each demo re-read on its own (no system turn)
    pieces: list[Piece]  # the chunk's text, one piece per demo
    token_origin: list[int]  # per token of `sequence`: the demo (index within the chunk) it belongs to


def _calibration(rendered: list[RenderedChunk], k: int, which: str, rows: int) -> tuple[list[Sequence], list[int] | None]:
    """Calibration rows for chunk k, and the demo (within the chunk) each row must not see, if any:
    its own demos re-read ("own"); the next chunk's, which it has not seen ("next"; the last chunk
    takes the previous one's); or up to `rows` of its own demos, evenly spaced, each blind to its own
    copy ("held-out": each row is then a new item for the rest of the chunk)."""
    own = rendered[k].calibration
    if which == "held-out":
        picked = _evenly_spaced(len(own), rows)
        return [own[i] for i in picked], picked
    if which == "own" or len(rendered) == 1:
        return own, None
    return (rendered[k + 1] if k + 1 < len(rendered) else rendered[k - 1]).calibration, None


def _segments(part: RenderedChunk, chunk_size: int, policy: LayerBudgetPolicy, device) -> torch.Tensor | None:
    """[L] the budget segment of each token: every chunk_size demos of a whole-context chunk keep their
    own share of a layer (policy.budget "chunk"); None: one pool."""
    if policy.scope != "context" or policy.budget != "chunk":
        return None
    return torch.tensor(part.token_origin, device=device) // chunk_size


def _stored_segments(result: ChunkResult, sink: bool) -> list[tuple[list, list, list, ChunkRecord]]:
    """(keys, values, token_index, record) per stored segment: the chunk as one, or with `sink` as two,
    the context's first token alone (every head of every layer keeps it, so the split is the same in
    all heads) and then the rest. Each segment gets its own int8 K scales: every query pays the first
    token most of its attention, and per-channel scales shared with the whole context rounded it
    enough to move the first answer token by KL 1.7e-3 (its own scales: 3e-4; warehouse-text)."""
    r = result.record
    if not sink:
        return [(result.keys, result.values, result.token_index, r)]
    assert all((index[:, 0] == 0).all() for index in result.token_index), "the first token is forced in every head"
    layers = len(r.kept_per_layer)
    first = ChunkRecord(demos=0, tokens=1, kept_per_layer=[1] * layers, ratio_per_layer=[1.0] * layers,
                        js_per_layer=[None] * layers, final_js=0.0)
    rest = replace(r, tokens=r.tokens - 1, kept_per_layer=[n - 1 for n in r.kept_per_layer])
    parts = (result.keys, result.values, result.token_index)
    return [(*([x[:, :1] for x in part] for part in parts), first),
            (*([x[:, 1:] for x in part] for part in parts), rest)]


def _evenly_spaced(total: int, count: int) -> list[int]:
    """min(count, total) distinct indices of range(total), spread evenly from the first."""
    count = min(count, total)
    return sorted({i * total // count for i in range(count)})


def _settings(h: dict, precision: str) -> str:
    return f"delta={h['delta']}, ratios={comma_list(h['ratios'])}, chunk_size={h['chunk_size']}, precision={precision}"
