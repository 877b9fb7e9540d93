"""Runtime benchmark: the ways of answering a query that are timed side by side (ORT, PyTorch same memory, PyTorch full context)."""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from emloc_edge.compile.query import memory_kv  # noqa: E402
from emloc_edge.memory.format import TaskMemory  # noqa: E402
from emloc_edge.models.decoder import RaggedDecoder  # noqa: E402
from emloc_edge.runtime.memory_inputs import FLOAT, INT8  # noqa: E402
from emloc_edge.runtime.session import EdgeSession  # noqa: E402





def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- setup A: a Qwen2-0.5B-like random model and a synthetic memory ---------------------------------------


@dataclass
class Path_:
    """One way of answering: prefill(query ids) -> first token; step() -> one more token."""

    key: str
    label: str
    step_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    last_logits: np.ndarray | None = None

    def prefill(self, ids: list[int]) -> int: ...
    def step(self) -> int: ...


class OrtPath(Path_):
    """EdgeSession's own decoder step (`_step`) over its bound memory; the decoder session is re-created
    with allow_spinning off (EdgeSession leaves ORT's default)."""

    def __init__(self, key, label, model_dir: Path, memory_path: Path, threads: int, spinning: bool,
                 float_memory: bool = False):
        super().__init__(key, label)
        # float_memory: the fp32-memory graph fed the memory dequantized at load (memory_inputs="float");
        # otherwise the int8 graph with the memory kept int8 on the device (EdgeSession's auto).
        inputs = "float" if float_memory else "int8"
        self.session = s = EdgeSession(model_dir, memory_path, provider="cpu", threads=threads, memory_inputs=inputs)
        graph = FLOAT if float_memory else INT8
        if not spinning or float_memory:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            if not spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            s.decoder = None
            gc.collect()
            s.decoder = ort.InferenceSession(str(s.folder.graph(graph)), options, providers=s.providers)
        self.offset = self.session.memory.meta.position_offset
        self.P = self.session.memory.meta.position_dims

    def _run(self, token_ids, positions):
        s = self.session
        embeds = np.asarray(s.embed_tokens[token_ids], dtype=np.float32)[None]  # [1, T, D]
        logits, new_kv = s._step(self.binding, embeds, positions, self.recent)
        self.recent = [(np.concatenate([k, nk], 1), np.concatenate([v, nv], 1))
                       for (k, v), (nk, nv) in zip(self.recent, new_kv)]
        self.last_logits = logits[0]
        self.token = int(np.argmax(logits[0]))
        return self.token

    def prefill(self, ids):
        s = self.session
        self.binding = s.decoder.io_binding()
        for name, value in s.bound_memory.items():
            self.binding.bind_ortvalue_input(name, value)
        empty = np.zeros((s.kv_heads, 0, s.head_dim), np.float32)
        self.recent = [(empty, empty)] * s.num_layers
        T = len(ids)
        self.next_position = self.offset + T
        positions = np.tile(np.arange(self.offset, self.offset + T, dtype=np.int64), (self.P, 1))
        return self._run(ids, positions)

    def step(self):
        positions = np.full((self.P, 1), self.next_position, dtype=np.int64)
        self.next_position += 1
        return self._run([self.token], positions)


class TorchMemoryPath(Path_):
    """RaggedDecoder over memory_kv(memory), exactly as compile.query.greedy_answer decodes."""

    def __init__(self, key, label, adapter, memory: TaskMemory):
        super().__init__(key, label)
        self.adapter, self.decoder = adapter, RaggedDecoder(adapter)
        self.memory = memory_kv(memory)
        self.offset, self.P = memory.meta.position_offset, memory.meta.position_dims

    @torch.no_grad()
    def _run(self, ids, start):
        T = len(ids)
        embeds = self.decoder.stack.embed_tokens(torch.tensor([ids]))
        pos = torch.arange(start, start + T).expand(self.P, 1, T)
        out = self.decoder.forward(embeds, pos, torch.ones(1, T, dtype=torch.bool), self.cache, keep_kv=True)
        self.cache = [m.extend(k[0], v[0]) for m, (k, v) in zip(self.cache, out.new_kv)]
        logits = self.decoder.logits(out.hidden[0, -1])
        self.last_logits = logits.numpy()
        self.token, self.next_position = int(logits.argmax()), start + T
        return self.token

    def prefill(self, ids):
        self.cache = self.memory
        return self._run(list(ids), self.offset)

    def step(self):
        return self._run([self.token], self.next_position)


class TorchFullPath(Path_):
    """Plain transformers forward with a DynamicCache holding the whole (unpruned) context."""

    def __init__(self, key, label, adapter, context_ids: list[int], query_ids: list[int], no_cache_repeats: int):
        super().__init__(key, label)
        self.model, self.context = adapter.model, len(context_ids)
        self.ttft_nocache_ms = []
        full = torch.tensor([list(context_ids) + list(query_ids)])
        for r in range(no_cache_repeats):  # what one pays per query without caching the context
            log(f"  full-context prefill of {full.shape[1]} tokens ({r + 1}/{no_cache_repeats})")
            gc.collect()
            start = time.perf_counter()
            with torch.no_grad():
                out = self.model(input_ids=full, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())
            self.ttft_nocache_ms.append(1000 * (time.perf_counter() - start))
            self.cache = out.past_key_values
            del out
        self._crop()  # keep the context only; each query prefills on top of it

    @torch.no_grad()
    def _run(self, ids):
        out = self.model(input_ids=torch.tensor([ids]), cache=self.cache, use_cache=True, logits_to_keep=1)
        self.last_logits = out.logits[0, -1].numpy()
        self.token = int(out.logits[0, -1].argmax())
        return self.token

    def _crop(self):
        extra = self.cache.get_seq_length() - self.context
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many tokens

    def prefill(self, ids):
        self._crop()
        return self._run(list(ids))

    def step(self):
        return self._run([self.token])


# ---- measuring --------------------------------------------------------------------------------------------


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return 1000 * (time.perf_counter() - start)
