"""Sessions: answer queries with a task memory under ONNX Runtime (numpy, onnxruntime, tokenizers,
pillow, safetensors only — no torch, no transformers).

    query text (+ image) ─► tokens ─► embeddings (+ vision features) ─► decoder step ─► logits
                                                     memory (bound once) ─┘   ▲      │ argmax
                                           recent cache: query + generated K/V ┘ ◄────┘ new K/V

`MemorySession` is what `EdgeModel.bind(memory)` returns (model.py): it shares the model's ONNX Runtime
sessions and holds one bound memory. `EdgeSession(model_dir, memory_path)` opens a model for one memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterable, Iterator

import numpy as np

from ..errors import BadInputError
from .bound_memory import BoundMemory
from .model import EdgeModel
from .providers import select_providers
from .query import ImageInput, QueryInputs, render_query
from .textstream import stream_text

__all__ = ["Answer", "EdgeModel", "EdgeSession", "MemorySession", "select_providers"]


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    ttft_ms: float  # time to first token: query rendering, vision, prefill
    tokens_per_s: float  # decode speed after the first token
    image: str | None = None


class MemorySession:
    """An opened model and one bound task memory, answering queries with the memory as context.

    One session may be used from several threads at once: the ONNX Runtime sessions, the bound memory,
    the embedding table and the tokenizer are only read, and each call keeps its own decode state
    (recent cache, I/O binding). Sessions are light: bind as many memories to one model as you like.
    """

    def __init__(self, model: EdgeModel, memory: BoundMemory, max_new_tokens: int = 32) -> None:
        self.model, self.memory, self.max_new_tokens = model, memory, max_new_tokens
        self.folder, self.tokenizer, self.embed_tokens, self.vision = (
            model.folder, model.tokenizer, model.embed_tokens, model.vision)
        self.providers, self.device = model.providers, model.device
        self.decoder = model.decoder(memory.variant)
        self.image_inputs = memory.image_inputs  # how this model's images become LM inputs (image_inputs.py)
        self.bound_memory = memory.values
        g = self.folder.geometry
        self.num_layers, self.kv_heads, self.head_dim = g["num_layers"], g["num_kv_heads"], g["head_dim"]
        self.stop_ids = memory.stop_ids
        self.output_names = model.output_names

    # --- public API -------------------------------------------------------------------------------
    def ask(self, image: ImageInput = None, question: str | None = None, max_new_tokens: int | None = None) -> str:
        """The answer text for one query (an image and/or a question)."""
        return self.answer(image, question, max_new_tokens).text

    def stream(self, image: ImageInput = None, question: str | None = None,
               max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield the answer text piece by piece as tokens are generated; the pieces join to `answer().text`."""
        yield from self.text_pieces(self._generate(self._inputs(image, question), max_new_tokens))

    def text(self, token_ids: list[int]) -> str:
        """The answer text of generated token ids (what `answer().text` holds)."""
        return self._detokenize(token_ids).strip()

    def text_pieces(self, token_ids: Iterable[int]) -> Iterator[str]:
        """Text pieces of a stream of generated token ids, as they come; they join to `text(all ids)`."""
        return stream_text(self._detokenize, token_ids)

    def answer(self, image: ImageInput = None, question: str | None = None,
               max_new_tokens: int | None = None) -> Answer:
        """Answer with token ids and timings."""
        start = time.perf_counter()
        ids: list[int] = []
        first = None
        for token in self.tokens(self.query(image, question), max_new_tokens):
            first = first or time.perf_counter()
            ids.append(token)
        end = time.perf_counter()
        first = first or end
        rate = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0.0
        return Answer(self.text(ids), ids,
                      ttft_ms=1000 * (first - start), tokens_per_s=rate,
                      image=str(image) if isinstance(image, (str, Path)) else None)

    def query(self, image: ImageInput = None, question: str | None = None) -> QueryInputs:
        """The rendered query (embeddings and positions after the memory); `image`: a path or an RGB PIL image."""
        return render_query(self, image, question)

    def tokens(self, query: QueryInputs, max_new_tokens: int | None = None) -> Iterator[int]:
        """The greedy answer's token ids, one at a time (stop early by not asking for more)."""
        return self._generate(query, max_new_tokens)

    # --- decoding ---------------------------------------------------------------------------------
    def _inputs(self, image, question) -> QueryInputs:
        return render_query(self, image, question)

    def _detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

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
            raise BadInputError(f"max_new_tokens must be at least 1, got {limit}", parameters="max_new_tokens")
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


class EdgeSession(MemorySession):
    """A model folder opened for one task memory: `EdgeModel.open(model_dir).bind(memory_path)`.
    To serve several memories, open the model once and bind each (model.py)."""

    def __init__(self, model_dir: str | Path, memory_path: str | Path, provider: str = "auto", threads: int = 0,
                 max_new_tokens: int = 32, memory_inputs: str = "auto") -> None:
        self.model_dir, self.memory_path, self.provider, self.threads = model_dir, memory_path, provider, threads
        self.memory_inputs = memory_inputs
        model = EdgeModel.open(model_dir, provider=provider, threads=threads, memory_inputs=memory_inputs,
                               max_new_tokens=max_new_tokens, cache_bytes=0)
        super().__init__(model, model.bind_memory(memory_path), max_new_tokens)
