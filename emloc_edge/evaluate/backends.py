"""What answers the queries: the exported model under ONNX Runtime (what a user deploys), or the PyTorch
reference path. One small class per backend, selected by name from BACKENDS.

Both give, per test item, the greedy answer, its wall time and the first answer token's
log-probabilities (for the JS column). Under ONNX Runtime those come from `EdgeSession.answer` (timed:
ms/query, TTFT, tokens/s) and `EdgeSession.continuation_logits` (not timed), so JS compares each memory
with full context on the deployed model and weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Protocol

import numpy as np
import torch

from ..compile.demos import Demo
from ..compile.query import greedy_answer_and_logits, memory_kv, query_logits
from .conditions import Context


@dataclass
class Reply:
    text: str  # decoded, stripped
    ms: float  # wall time of the whole answer
    ttft_ms: float | None  # time to first token (None: not measured by this backend)
    tokens_per_s: float | None  # decode speed after the first token
    logprobs: torch.Tensor  # [V] log-probabilities of the first answer token


class Backend(Protocol):
    name: ClassVar[str]

    @classmethod
    def open(cls, adapter, *, weights: str, provider: str, threads: int, device: str | None,
             progress: Callable[[str], None]) -> "Backend":
        """Ready to answer (the ORT backend exports the model first, once per weights setting)."""

    def describe(self) -> dict:
        """backend, weights, provider (and what else the report should name)."""

    def replies(self, ctx: Context, items: list[Demo], max_new_tokens: int) -> Iterator[Reply]: ...

    def logprobs(self, ctx: Context, items: list[Demo]) -> list[torch.Tensor]:
        """First-answer-token log-probabilities [V] per item, without generating."""


class TorchBackend:
    """The PyTorch reference path (the compiler's own decoder), on the adapter's device."""

    name: ClassVar[str] = "torch"

    def __init__(self, adapter, device: str | None = None) -> None:
        self.adapter, self.device = adapter, device

    @classmethod
    def open(cls, adapter, *, device: str | None = None, **_) -> "TorchBackend":
        return cls(adapter, device)  # the adapter's own weights: no export

    def describe(self) -> dict:
        dtype = str(next(self.adapter.model.parameters()).dtype).removeprefix("torch.")
        dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
        # compile/query.py answers with the adapter's own decoder, on the CPU; --device moves compile only
        return {"backend": self.name, "weights": dtype, "provider": None, "device": "cpu"}

    def replies(self, ctx: Context, items: list[Demo], max_new_tokens: int) -> Iterator[Reply]:
        kv, offset = memory_kv(ctx.memory), ctx.memory.meta.position_offset  # per layer [kv, n, hd]
        for item in items:
            started = time.perf_counter()
            ids, logits = greedy_answer_and_logits(self.adapter, kv, offset, item.question, item.image,
                                                   max_new_tokens=max_new_tokens, first_turn=ctx.first_turn)
            ms = 1000 * (time.perf_counter() - started)
            text = self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
            yield Reply(text, ms, None, None, logits.float().log_softmax(-1))

    def logprobs(self, ctx: Context, items: list[Demo]) -> list[torch.Tensor]:
        kv, offset = memory_kv(ctx.memory), ctx.memory.meta.position_offset
        return [query_logits(self.adapter, kv, offset, i.question, i.image, first_turn=ctx.first_turn)
                .float().log_softmax(-1) for i in items]


class OrtBackend:
    """The exported model under ONNX Runtime: loaded once, each memory file bound in turn."""

    name: ClassVar[str] = "ort"

    def __init__(self, model_dir: Path, weights: str, provider: str = "auto", threads: int = 0) -> None:
        self.model_dir, self.weights, self.provider, self.threads = Path(model_dir), weights, provider, threads
        self.model = _open_model(self.model_dir, provider, threads)  # None: a session per memory
        self.used_provider: str | None = None

    @classmethod
    def open(cls, adapter, *, weights: str, provider: str = "auto", threads: int = 0,
             progress: Callable[[str], None] = lambda _: None, **_) -> "OrtBackend":
        from .exports import cached_export

        return cls(cached_export(adapter, weights, progress), weights, provider, threads)

    def describe(self) -> dict:
        return {"backend": self.name, "weights": self.weights, "provider": self.used_provider or self.provider,
                "threads": self.threads, "model_dir": str(self.model_dir)}

    def _session(self, ctx: Context, max_new_tokens: int = 1):
        from ..runtime.session import EdgeSession

        if self.model is not None:
            session = self.model.bind(ctx.path, max_new_tokens=max_new_tokens)
        else:
            session = EdgeSession(self.model_dir, ctx.path, provider=self.provider, threads=self.threads,
                                  max_new_tokens=max_new_tokens)
        self.used_provider = getattr(session, "device", None) or self.used_provider
        return session

    def replies(self, ctx: Context, items: list[Demo], max_new_tokens: int) -> Iterator[Reply]:
        session = self._session(ctx, max_new_tokens)
        for item in items:
            started = time.perf_counter()
            a = session.answer(item.image, item.question, max_new_tokens)
            ms = 1000 * (time.perf_counter() - started)
            yield Reply(a.text, ms, a.ttft_ms, a.tokens_per_s, _first_logprobs(session, item))

    def logprobs(self, ctx: Context, items: list[Demo]) -> list[torch.Tensor]:
        session = self._session(ctx)
        return [_first_logprobs(session, item) for item in items]


def _first_logprobs(session, item: Demo) -> torch.Tensor:
    logits = session.continuation_logits(item.image, item.question, [])[0]  # [V]
    return torch.from_numpy(np.asarray(logits, dtype=np.float32)).log_softmax(-1)


def _open_model(model_dir: Path, provider: str, threads: int):
    """The loaded model every memory binds to (`EdgeModel.open(...).bind(memory)`: graphs loaded once),
    where the runtime has one; else None, and each memory opens its own `EdgeSession`."""
    try:
        from ..runtime.model import EdgeModel
    except ImportError:
        return None
    return EdgeModel.open(model_dir, provider=provider, threads=threads)


BACKENDS: dict[str, type] = {b.name: b for b in (OrtBackend, TorchBackend)}
