"""`EdgeModel`: an exported model opened once (graphs, tokenizer, embedding table, manifest), serving any
number of task memories of that model. numpy, onnxruntime, tokenizers, pillow, safetensors only.

    EdgeModel.open(model_dir) ──bind(memory)──► MemorySession   (shares the ONNX Runtime sessions;
                              ──bind(other)───► MemorySession    holds only its memory's tensors)

The decoder graphs open on first use, each once: a memory needs one variant (memory_inputs.choose_variant), so a
server of float memories never loads the int8 graph and vice versa. Bound memories are cached by the
file's payload checksum in a byte-bounded LRU (`cache_bytes`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ..memory import TaskMemory
from .bound_memory import BoundMemory, MemoryCache, file_checksum, memory_checksum
from .embeddings import EmbeddingTable, load_embeddings
from .image_inputs import image_strategy
from .memory_inputs import FLOAT, INT8, choose_variant, memory_feeds
from .model_folder import ModelFolder
from .providers import select_providers

if TYPE_CHECKING:  # pragma: no cover
    from .session import MemorySession

DEFAULT_CACHE_BYTES = 2 * 1024**3  # bound memories kept for reuse (fp32 memories are ~4x their int8 file)


@dataclass(eq=False)
class EdgeModel:
    """One exported model folder, loaded once. Thread-safe: the sessions and tables are only read; the
    lazy graph opening and the memory cache take locks."""

    folder: ModelFolder
    providers: list[str]
    options: ort.SessionOptions
    tokenizer: Tokenizer
    embed_tokens: EmbeddingTable  # [vocab, D], memory-mapped, rows dequantized on demand
    vision: ort.InferenceSession | None
    memory_inputs: str = "auto"  # default variant choice for bind (see memory_inputs.choose_variant)
    max_new_tokens: int = 32  # default of the sessions bind returns
    cache: MemoryCache = field(default_factory=lambda: MemoryCache(DEFAULT_CACHE_BYTES))
    _decoders: dict[str, ort.InferenceSession] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, model_dir: str | Path, provider: str = "auto", threads: int = 0, *, memory_inputs: str = "auto",
             max_new_tokens: int = 32, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "EdgeModel":
        """Validate and load the folder; `threads` are intra-op threads (0: ONNX Runtime decides)."""
        folder = ModelFolder.open(model_dir)
        providers = select_providers(provider)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        vision = (ort.InferenceSession(str(folder.graph("vision")), options, providers=providers)
                  if folder.has_vision else None)
        tokenizer = Tokenizer.from_file(str(folder.path / folder.manifest["tokenizer"]))
        embed = load_embeddings(folder.path, folder.manifest)  # [V, D] rows on demand
        return cls(folder, providers, options, tokenizer, embed, vision, memory_inputs=memory_inputs,
                   max_new_tokens=max_new_tokens, cache=MemoryCache(cache_bytes))

    # --- geometry -----------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def num_layers(self) -> int:
        return self.folder.geometry["num_layers"]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [f"new_{kind}.{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def decoder(self, variant: str) -> ort.InferenceSession:
        """The decoder-step graph of `variant`, opened on first use (once, whichever thread asks first)."""
        with self._lock:
            if variant not in self._decoders:
                path = self.folder.graph(variant)
                self._decoders[variant] = ort.InferenceSession(str(path), self.options, providers=self.providers)
            return self._decoders[variant]

    # --- memories -----------------------------------------------------------------------------------
    def bind(self, memory: str | Path | TaskMemory, *, max_new_tokens: int | None = None,
             memory_inputs: str | None = None) -> "MemorySession":
        """A session answering with `memory` (a .emloc path or a loaded TaskMemory) as context."""
        from .session import MemorySession

        bound = self.bind_memory(memory, memory_inputs=memory_inputs)
        return MemorySession(self, bound, self.max_new_tokens if max_new_tokens is None else max_new_tokens)

    def bind_memory(self, memory: str | Path | TaskMemory, *, memory_inputs: str | None = None) -> BoundMemory:
        """The memory's inputs on the device, from the cache when its checksum is there. A memory of
        another model is refused (ModelMismatchError, naming the file)."""
        choice = self.memory_inputs if memory_inputs is None else memory_inputs
        if isinstance(memory, TaskMemory):
            where, checksum, loaded = "<memory>", memory_checksum(memory), memory
        else:
            where, loaded = str(memory), None
            checksum = file_checksum(Path(memory))
        if checksum is not None:
            for variant in (FLOAT, INT8):  # the choice needs the memory's meta: look at what is cached
                hit = self.cache.get((checksum, variant))
                if hit is not None and choose_variant(self.folder.manifest, hit.meta, choice, where) == variant:
                    return hit
        loaded = loaded if loaded is not None else TaskMemory.load(memory)
        self.folder.check_memory(loaded, Path(where))
        bound = self._bound(loaded, choose_variant(self.folder.manifest, loaded.meta, choice, where), where,
                            checksum or memory_checksum(loaded))
        return self.cache.put((bound.checksum, bound.variant), bound)

    def _bound(self, memory: TaskMemory, variant: str, where: str, checksum: str) -> BoundMemory:
        self.decoder(variant)  # opens the graph now, so a broken export fails at bind, not at the first query
        device = self.device
        values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)
                  for name, value in memory_feeds(memory, variant).items()}
        settings = memory.meta.image_preprocessing
        images = (image_strategy(settings, self.folder.manifest["graphs"]["vision"], memory.meta.model_family)
                  if self.vision is not None and settings else None)
        nbytes = sum(int(np.prod(v.shape())) * _itemsize(v) for v in values.values())
        return BoundMemory(memory.meta, variant, values, nbytes, checksum, where, images,
                           frozenset(memory.meta.template["stop_token_ids"]))


def _itemsize(value: ort.OrtValue) -> int:
    return {"tensor(float)": 4, "tensor(int8)": 1, "tensor(float16)": 2, "tensor(int64)": 8}.get(value.data_type(), 4)
