"""The task-memory file: the one contract between the compiler (torch) and the runtime (numpy only).

A memory is built chunk by chunk: each chunk of demonstrations appends one *segment* of kept tokens to
every layer, a different count per layer. Old segments are never touched, so appending a chunk leaves
every earlier byte bit-identical (which is why int8 key scales are per channel *per segment*).

On disk, a safetensors container: tensors `layers.{i}.{part}` for part in _PARTS (shapes: LayerMemory);
header `__metadata__` = format, format_version, meta (JSON of MemoryMeta) and payload_sha256.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from emloc_edge.errors import MemoryFileError, ModelMismatchError
from emloc_edge.memory import quantize, validate
from emloc_edge.memory.validate import FORMAT_NAME, FORMAT_VERSION, SUPPORTED_VERSIONS, FieldError  # noqa: F401 (re-exported)

_PARTS = validate.PARTS["int8"]  # tensor `layers.{i}.{part}`; fp16/fp32 memories have no scales


@dataclass
class ChunkRecord:
    """One compressed chunk of demonstrations."""
    demos: int                          # demonstrations in the chunk
    tokens: int                         # context tokens of the chunk before pruning (L_k)
    kept_per_layer: list[int]           # tokens kept per layer, len = num_layers
    ratio_per_layer: list[float]        # accepted keep ratio per layer (1.0 = kept all)
    js_per_layer: list[float | None]    # JS when the ratio was accepted; None if it fell back to 1.0
    final_js: float                     # JS of the whole chunk after every layer decided


@dataclass
class MemoryMeta:
    model_name: str
    model_family: str                   # adapter name, e.g. "qwen2_vl", "llama"
    model_fingerprint: str              # hex sha256 of the model
    num_layers: int
    num_kv_heads: int
    head_dim: int
    precision: str                      # "int8" | "fp16" | "fp32"
    position_offset: int                # position the query starts at (after the whole context)
    position_dims: int                  # 3 for M-RoPE, 1 otherwise
    context_tokens: int                 # original (unpruned) context length; the compiler sets it
    hyperparameters: dict               # {"delta": float, "ratios": [...], "chunk_size": int, ...}
    template: dict                      # template pieces the runtime needs to render a query
    image_preprocessing: dict | None
    chunks: list[ChunkRecord] = field(default_factory=list)
    created_by: str = ""

    @property
    def demos(self) -> int:
        return sum(c.demos for c in self.chunks)

    @property
    def kept_tokens_per_layer(self) -> list[int]:
        return [sum(int(c.kept_per_layer[i]) for c in self.chunks) for i in range(self.num_layers)]

    @property
    def compression(self) -> float:
        """Mean kept tokens per layer / original context tokens (1.0 = nothing pruned)."""
        return float(np.mean(self.kept_tokens_per_layer)) / self.context_tokens if self.context_tokens else 1.0

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        # JSON has no inf/nan, but δ = ±inf is legal (prune to the smallest ratio / keep everything)
        if "delta" in d["hyperparameters"]:
            d["hyperparameters"]["delta"] = _float_out(d["hyperparameters"]["delta"])
        d["chunks"] = [_chunk_json(c) for c in self.chunks]
        return json.dumps(d, sort_keys=True, allow_nan=False, default=_numpy_scalar)


@dataclass
class LayerMemory:
    """All segments of one layer, concatenated along the tokens."""
    key_t: np.ndarray                   # [kv, hd, n]  int8 | float16 | float32, RoPE already applied
    value: np.ndarray                   # [kv, n, hd]
    token_index: np.ndarray             # [kv, n] int32: index of each kept token in the original context
    key_scale: np.ndarray | None        # int8 only: [kv, hd, segments] float32
    value_scale: np.ndarray | None      # int8 only: [kv, n, 1] float32
    segment_lengths: tuple[int, ...]    # from meta.chunks[k].kept_per_layer[layer]; not stored

    def expanded_key_scale(self) -> np.ndarray | None:
        """int8 key scales repeated over each segment's tokens: [kv, hd, n] float32 (None if not int8)."""
        if self.key_scale is None:
            return None
        return np.repeat(self.key_scale, self.segment_lengths, axis=2)  # [kv, hd, S] -> [kv, hd, n]

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """(key_t float32 [kv, hd, n], value float32 [kv, n, hd]); equals quantize.roundtrip per segment."""
        return quantize.decode(self.key_t, self.value, self.expanded_key_scale(), self.value_scale)


@dataclass
class TaskMemory:
    meta: MemoryMeta
    layers: list[LayerMemory]

    @classmethod
    def empty(cls, meta: MemoryMeta) -> TaskMemory:
        """A memory with no chunks yet (every layer has n = 0). `meta.chunks` must be empty."""
        validate.check_meta(json.loads(meta.to_json()))
        if meta.chunks:
            raise ValueError("TaskMemory.empty() needs meta.chunks == []; add chunks with add_chunk()")
        zeros = {name: np.zeros(shape, dtype) for name, (dtype, shape) in validate.expected_tensors(meta).items()}
        return cls(meta, _layers_from_tensors(meta, zeros))

    def add_chunk(
        self, keys: list[np.ndarray], values: list[np.ndarray], token_index: list[np.ndarray], record: ChunkRecord
    ) -> None:
        """Append one segment to every layer and `record` to meta.chunks.
        keys[l], values[l]: [kv, n_l, hd] float32 (K not transposed); token_index[l]: [kv, n_l] ints;
        n_l must equal record.kept_per_layer[l]. All layers are checked and encoded before any changes,
        so a ValueError leaves the memory as it was.
        """
        m = self.meta
        validate.check_chunk(checked := _chunk_json(record), "record", m.num_layers)
        if not len(keys) == len(values) == len(token_index) == m.num_layers:
            raise ValueError(f"add_chunk needs {m.num_layers} keys, values and token_index arrays, "
                             f"got {len(keys)}, {len(values)}, {len(token_index)}")
        new_layers = []
        for i, (layer, k, v, idx) in enumerate(zip(self.layers, keys, values, token_index)):
            n_l = int(record.kept_per_layer[i])
            want = (m.num_kv_heads, n_l, m.head_dim)
            if np.shape(k) != want or np.shape(v) != want or np.shape(idx) != want[:2]:
                raise ValueError(f"layer {i}: keys {np.shape(k)}, values {np.shape(v)}, token_index "
                                 f"{np.shape(idx)} do not match [kv, kept, hd] = {want}")
            idx = np.asarray(idx)
            if not np.issubdtype(idx.dtype, np.integer) or (idx.size and not 0 <= idx.min() <= idx.max() < 2**31):
                raise ValueError(f"layer {i}: token_index must hold integers in [0, 2**31)")
            key_t = np.asarray(k, dtype=np.float32).transpose(0, 2, 1)  # [kv, n_l, hd] -> [kv, hd, n_l]
            ks, vs, kscale, vscale = quantize.encode(key_t, np.asarray(v, dtype=np.float32), m.precision)
            new_layers.append(LayerMemory(
                key_t=np.concatenate([layer.key_t, ks], axis=2),          # [kv, hd, n_old + n_l]
                value=np.concatenate([layer.value, vs], axis=1),          # [kv, n_old + n_l, hd]
                token_index=np.concatenate([layer.token_index, idx.astype(np.int32)], axis=1),  # [kv, n_old + n_l]
                key_scale=None if kscale is None else np.concatenate([layer.key_scale, kscale], axis=2),
                value_scale=None if vscale is None else np.concatenate([layer.value_scale, vscale], axis=1),
                segment_lengths=layer.segment_lengths + (n_l,),
            ))
        self.layers = new_layers
        m.chunks.append(_chunk_from_json(checked))  # a plain-Python copy: the caller may reuse `record`

    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors exactly as the file stores them, by name."""
        return {f"layers.{i}.{part}": np.ascontiguousarray(getattr(layer, part))
                for i, layer in enumerate(self.layers) for part in _PARTS if getattr(layer, part) is not None}

    def save(self, path: str | os.PathLike) -> int:
        """Write atomically (temp file in the same folder, then os.replace); return the bytes written.
        On any failure the temp file is removed and whatever was at `path` before stays untouched. A temp
        file a killed save left behind (`.NAME.XXXXXXXX.tmp`, no longer locked) is removed by the next save."""
        path = os.fspath(path)
        tensors, meta_json = self.tensors(), self.meta.to_json()
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": meta_json,
                  "payload_sha256": payload_sha256(meta_json, tensors)}
        folder, prefix = os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}."
        remove_stale_temps(folder, prefix)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
        try:
            _lock(fd)  # held while the file is written: a concurrent save sees it is not stale
            save_file(tensors, tmp, metadata=header)
            with open(tmp, "r+b") as f:  # on disk before the rename makes it visible
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600, but a memory is meant to be shared and read
            size = os.path.getsize(tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return size

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskMemory:
        """Read and validate a memory file; every problem is a one-line MemoryFileError naming the file.
        The order of the checks is in validate.py: nothing is allocated from a size the file does not back."""
        path = os.fspath(path)
        try:
            if not os.path.isfile(path):
                raise MemoryFileError(f"{path}: no such memory file" if not os.path.exists(path) else
                                      f"{path}: is a folder, not a memory file")
            raw = validate.read_raw_header(path, os.path.getsize(path))
            with safe_open(path, framework="np") as f:
                header = f.metadata() or {}
                validate.check_header(header, path)  # before reading tensors: a wrong file may be huge
                tensors = {name: f.get_tensor(name) for name in raw}
        except MemoryFileError as e:
            raise e if str(e).startswith(f"{path}: ") else MemoryFileError(f"{path}: {e}") from None
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise MemoryFileError(f"{path}: not a readable safetensors file ({reason}); "
                                  "it is truncated or not an emloc-edge memory") from None
        digest = payload_sha256(header["meta"], tensors)
        if digest != header["payload_sha256"]:
            raise MemoryFileError(f"{path}: checksum mismatch (payload sha256 {digest[:12]}..., header says "
                                  f"{header['payload_sha256'][:12]!r}...); the file is corrupt")
        try:  # the checksum matched, but the writer may still be buggy or another program
            meta = _meta_from_json(header["meta"])
            validate.check_tensors(meta, {name: (t.dtype, t.shape) for name, t in tensors.items()})
            validate.check_values(tensors)
            return cls(meta, _layers_from_tensors(meta, tensors))
        except FieldError as e:
            raise MemoryFileError(f"{path}: {e}") from None

    def summary(self, file_bytes: int | None = None) -> dict:
        """JSON-able description (a non-finite delta is written as a string, as in the file)."""
        m, hp = self.meta, self.meta.hyperparameters
        return {
            "format_version": FORMAT_VERSION, "model": m.model_name,
            **{k: getattr(m, k) for k in ("model_family", "model_fingerprint", "num_layers", "num_kv_heads",
                                          "head_dim", "context_tokens", "kept_tokens_per_layer", "compression",
                                          "position_offset", "position_dims", "precision")},
            "delta": _float_out(hp["delta"]), "ratios": list(hp["ratios"]), "chunk_size": hp["chunk_size"],
            "policy": hp.get("policy"),  # None in files written before policies were recorded
            "forced": hp.get("forced"),  # None: the policy's own forced tokens (the whole answer span)
            "chunks": len(m.chunks), "chunk_details": json.loads(m.to_json())["chunks"],
            "demos": m.demos, "file_bytes": file_bytes,
        }

    def check_model(self, fingerprint: str, path: str | os.PathLike, model_name: str | None = None) -> None:
        """Raise ModelMismatchError unless the memory was compiled for the model with this fingerprint."""
        m = self.meta
        if fingerprint != m.model_fingerprint:
            given = f"{model_name} " if model_name else ""
            raise ModelMismatchError(
                f"{os.fspath(path)}: memory was compiled for {m.model_name} ({m.model_fingerprint[:12]}), "
                f"not for the given model {given}({fingerprint[:12]}); recompile the memory for this model")


def remove_stale_temps(folder: str, prefix: str) -> list[str]:
    """Remove `prefix` + 8 characters + `.tmp` files (our save's temp names) that no live save holds locked."""
    if fcntl is None:  # no advisory locks (Windows): leave them, a crash there is rare enough
        return []
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp") and len(name) == len(prefix) + 12):
            continue
        full = os.path.join(folder, name)
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer is alive
            os.unlink(full)
            removed.append(full)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def payload_sha256(meta_json: str, tensors: dict[str, np.ndarray]) -> str:
    """sha256 over the meta JSON, then each tensor's name, dtype, shape and little-endian bytes, by name."""
    h = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype.name}\0{','.join(map(str, t.shape))}\0".encode())
        h.update(np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def _layers_from_tensors(meta: MemoryMeta, tensors: dict[str, np.ndarray]) -> list[LayerMemory]:
    """The layers of a memory whose tensors passed validate.check_tensors."""
    return [LayerMemory(**{part: tensors.get(f"layers.{i}.{part}") for part in _PARTS},
                        segment_lengths=tuple(int(c.kept_per_layer[i]) for c in meta.chunks))
            for i in range(meta.num_layers)]


def _meta_from_json(text: str) -> MemoryMeta:
    d = validate.parse_meta(text)  # after this, every float string is one of "inf" / "-inf" / "nan"
    d["hyperparameters"]["delta"] = float(d["hyperparameters"]["delta"])
    return MemoryMeta(**{**d, "chunks": [_chunk_from_json(c) for c in d["chunks"]]})


def _chunk_from_json(c: dict) -> ChunkRecord:
    """Inverse of _chunk_json, for a dict that passed check_chunk ("inf" strings become floats)."""
    ratios, js = [float(r) for r in c["ratio_per_layer"]], [None if j is None else float(j) for j in c["js_per_layer"]]
    return ChunkRecord(**{**c, "ratio_per_layer": ratios, "js_per_layer": js, "final_js": float(c["final_js"])})


def _chunk_json(c: ChunkRecord) -> dict:
    """The JSON form of a ChunkRecord: plain Python numbers, non-finite floats as strings."""
    d = json.loads(json.dumps(dataclasses.asdict(c), default=_numpy_scalar))  # numpy scalars -> Python
    return {name: _float_out(x) for name, x in d.items()}


def _numpy_scalar(x: object) -> object:
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _float_out(x: object) -> object:
    """Non-finite floats (also inside lists) become "inf" / "-inf" / "nan", which JSON lacks; the rest passes."""
    if isinstance(x, list):
        return [_float_out(v) for v in x]
    if isinstance(x, (float, np.floating)) and not np.isfinite(x):
        return str(float(x))
    return x

