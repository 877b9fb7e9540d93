"""`EdgeSession`: answer queries with a task memory under ONNX Runtime (numpy, onnxruntime,
tokenizers, pillow, safetensors only — no torch, no transformers).

    query text (+ image) ─► tokens ─► embeddings (+ vision features) ─► decoder step ─► logits
                                                     memory (bound once) ─┘   ▲      │ argmax
                                           recent cache: query + generated K/V ┘ ◄────┘ new K/V
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterator

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ..errors import BadInputError
from ..memory import TaskMemory
from .embeddings import load_embeddings
from .image_inputs import image_strategy
from .memory_inputs import memory_feeds
from .model_folder import ModelFolder
from .query import QueryInputs, render_query


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    ttft_ms: float  # time to first token: query rendering, vision, prefill
    tokens_per_s: float  # decode speed after the first token
    image: str | None = None


def select_providers(choice: str = "auto") -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU (auto or cuda), else the CPU."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BadInputError("--provider cuda: CUDA is not available (needs onnxruntime-gpu and a GPU)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice != "auto":
        raise BadInputError(f"--provider must be auto, cpu or cuda, got {choice!r}")
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


@dataclass
class EdgeSession:
    """A loaded exported model and one task memory, answering queries with the memory as context.

    The memory is read, validated, checked against the model's fingerprint and placed on the device
    once; every query and decode step reuses it. One session may be used from several threads at
    once: the ONNX Runtime sessions, the bound memory, the embedding table and the tokenizer are only
    read, and each call keeps its own decode state (recent cache, I/O binding).
    """

    model_dir: str | Path
    memory_path: str | Path
    provider: str = "auto"
    threads: int = 0  # intra-op threads; 0 lets ONNX Runtime choose
    max_new_tokens: int = 32
    memory_inputs: str = "auto"  # "int8": int8 graph, scales folded; "float": dequantized once at load; auto: int8 where exact

    def __post_init__(self) -> None:
        self.folder = ModelFolder.open(self.model_dir)
        self.memory = TaskMemory.load(self.memory_path)
        self.folder.check_memory(self.memory, Path(self.memory_path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        self.providers = select_providers(self.provider)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        variant = self._memory_variant()
        self.decoder = ort.InferenceSession(str(self.folder.graph(variant)), options, providers=self.providers)
        self.vision = (
            ort.InferenceSession(str(self.folder.graph("vision")), options, providers=self.providers)
            if self.folder.has_vision else None
        )
        settings = self.memory.meta.image_preprocessing
        self.image_inputs = (  # how this model's images become LM inputs (image_inputs.py)
            image_strategy(settings, self.folder.manifest["graphs"]["vision"], self.memory.meta.model_family)
            if self.vision is not None and settings else None
        )
        self.tokenizer = Tokenizer.from_file(str(self.folder.path / self.folder.manifest["tokenizer"]))
        self.embed_tokens = load_embeddings(self.folder.path, self.folder.manifest)  # [V, D] rows on demand
        # The memory goes to the device once; each call binds these values by reference.
        self.bound_memory = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            for name, value in memory_feeds(self.memory, variant).items()
        }
        g = self.folder.geometry
        self.num_layers, self.kv_heads, self.head_dim = g["num_layers"], g["num_kv_heads"], g["head_dim"]
        self.stop_ids = set(self.memory.meta.template["stop_token_ids"])
        self.output_names = ["logits"] + [f"new_{kind}.{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def _memory_variant(self) -> str:
        """The int8 graph needs one K scale per channel per layer; a memory of several chunks has one per
        chunk, and merging them re-rounds K (measured on SmolLM2: logits move 0.18, 1 answer in 40
        changes). So auto takes it only where it is exact and otherwise dequantizes once at load."""
        if self.memory_inputs not in ("auto", "int8", "float"):
            raise BadInputError(f"--memory-inputs must be auto, int8 or float, got {self.memory_inputs!r}")
        int8 = self.memory.meta.precision == "int8"
        if self.memory_inputs == "int8" and not int8:
            raise BadInputError(f"{self.memory_path}: a {self.memory.meta.precision} memory has no int8 inputs")
        exact = int8 and len(self.memory.meta.chunks) <= 1
        use_int8 = self.memory_inputs == "int8" or (self.memory_inputs == "auto" and exact)
        return "decoder_step_q8" if use_int8 else "decoder_step"

    # --- public API -------------------------------------------------------------------------------
    def ask(self, image: str | Path | None = None, question: str | None = None, max_new_tokens: int | None = None) -> str:
        """The answer text for one query (an image and/or a question)."""
        return self.answer(image, question, max_new_tokens).text

    def stream(self, image: str | Path | None = None, question: str | None = None,
               max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield the answer text piece by piece as tokens are generated."""
        ids: list[int] = []
        shown = ""
        for token in self._generate(self._inputs(image, question), max_new_tokens):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            yield text[len(shown):]
            shown = text

    def answer(self, image: str | Path | None = None, question: str | None = None,
               max_new_tokens: int | None = None) -> Answer:
        """Answer with token ids and timings."""
        start = time.perf_counter()
        ids: list[int] = []
        first = None
        for token in self._generate(self._inputs(image, question), max_new_tokens):
            first = first or time.perf_counter()
            ids.append(token)
        end = time.perf_counter()
        first = first or end
        rate = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0.0
        return Answer(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids,
                      ttft_ms=1000 * (first - start), tokens_per_s=rate, image=str(image) if image else None)

    # --- decoding ---------------------------------------------------------------------------------
    def _inputs(self, image, question) -> QueryInputs:
        return render_query(self, image, question)

    def continuation_logits(self, image: str | Path | None, question: str | None, token_ids: list[int]) -> np.ndarray:
        """Next-token logits after the query and after each of `token_ids` fed in turn: [len + 1, vocab]."""
        decoder = self._decode(self._inputs(image, question))
        rows = [next(decoder)]
        rows += [decoder.send(token) for token in token_ids]
        decoder.close()
        return np.stack(rows)

    def _generate(self, query: QueryInputs, max_new_tokens: int | None) -> Iterator[int]:
        """Greedy decoding: prefill the query, then one token at a time until an end-of-turn token."""
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if limit < 1:
            raise BadInputError(f"--max-new-tokens must be at least 1, got {limit}")
        decoder = self._decode(query)
        logits = next(decoder)
        for i in range(limit):
            token = int(np.argmax(logits))
            if token in self.stop_ids:
                break
            yield token
            if i + 1 < limit:
                logits = decoder.send(token)
        decoder.close()

    def _decode(self, query: QueryInputs) -> Generator[np.ndarray, int, None]:
        """Coroutine over the decoder graph: yields next-token logits [vocab]; send() it the next token."""
        binding = self.decoder.io_binding()  # per call: IOBinding is not shared between threads
        for name, value in self.bound_memory.items():
            binding.bind_ortvalue_input(name, value)
        empty = np.zeros((self.kv_heads, 0, self.head_dim), np.float32)
        recent = [(empty, empty)] * self.num_layers  # per layer ([kv, t, hd], [kv, t, hd])
        embeds, positions = query.embeds, query.positions
        next_position = int(positions.max()) + 1
        while True:
            logits, new_kv = self._step(binding, embeds, positions, recent)
            recent = [(np.concatenate([k, nk], 1), np.concatenate([v, nv], 1)) for (k, v), (nk, nv) in zip(recent, new_kv)]
            token = yield logits[0]
            embeds = np.asarray(self.embed_tokens[[token]], dtype=np.float32)[None]  # [1, 1, D]
            positions = np.full((positions.shape[0], 1), next_position, dtype=np.int64)  # all M-RoPE axes alike
            next_position += 1

    def _step(self, binding, embeds: np.ndarray, positions: np.ndarray, recent):
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        for i, (k, v) in enumerate(recent):
            binding.bind_cpu_input(f"rec_key.{i}", np.ascontiguousarray(k))
            binding.bind_cpu_input(f"rec_value.{i}", np.ascontiguousarray(v))
        binding.clear_binding_outputs()  # copy_outputs_to_cpu returns them in binding order
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()
        new_kv = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]
        return out[0], new_kv
