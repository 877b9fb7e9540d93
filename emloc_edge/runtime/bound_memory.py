"""A task memory bound to an opened model: its decoder inputs on the device, and a byte-bounded LRU of them.

    .emloc file ──load, check fingerprint──► TaskMemory ──memory_feeds(variant)──► OrtValues on the device
                                                   (the file's tensors are dropped; only the feeds stay)

A bound memory is read-only once made, so any number of sessions and threads share one.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..memory import TaskMemory
from ..memory.format import MemoryMeta


@dataclass(frozen=True)
class BoundMemory:
    meta: MemoryMeta  # what queries need of the memory: template, positions, image settings
    variant: str  # the decoder graph it feeds (memory_inputs.FLOAT | INT8)
    values: dict[str, Any]  # input name -> OrtValue on the device, bound by reference on every call
    nbytes: int  # bytes of those values (what the cache counts)
    checksum: str  # payload sha256 of the file
    source: str  # the file it came from (for messages)
    image_inputs: Any = None  # the image strategy of the memory's processor, or None
    stop_ids: frozenset[int] = field(default_factory=frozenset)


class MemoryCache:
    """Bound memories by (checksum, variant), least recently used dropped first once over `max_bytes`.

    Dropping only forgets the entry: a session still holding a memory keeps it alive until it is done.
    The newest entry is kept even alone over the bound (the caller asked for it)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise BadInputError(f"cache_bytes must be >= 0, got {max_bytes}", parameters="cache_bytes")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], BoundMemory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> BoundMemory | None:
        with self._lock:
            bound = self._entries.get(key)
            if bound is not None:
                self._entries.move_to_end(key)
            return bound

    def put(self, key: tuple[str, str], bound: BoundMemory) -> BoundMemory:
        """Insert (or return the entry another thread inserted first) and evict down to the bound."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            self._entries[key] = bound
            while len(self._entries) > 1 and self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
            if self.max_bytes == 0:  # no caching at all
                self._entries.clear()
            return bound

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def file_checksum(path: Path) -> str | None:
    """The payload sha256 a memory file's header declares (None when it has none: load() will say why).
    Reading the header only lets a cached memory be found without reading the tensors again."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            digest = (f.metadata() or {}).get("payload_sha256")
    except Exception:  # noqa: BLE001 - any unreadable file is load()'s to report, in its words
        return None
    return digest if isinstance(digest, str) else None


def memory_checksum(memory: TaskMemory) -> str:
    """The payload sha256 a file of this memory would carry."""
    from ..memory.format import payload_sha256

    return payload_sha256(memory.meta.to_json(), memory.tensors())
