"""Validation of a task-memory file: nothing from a header is trusted, or allocated for, before it passes.

Order of checks at load (format.TaskMemory.load):
    read_raw_header    the safetensors header, read by hand: its length, JSON, and every tensor's dtype, shape
                       and byte range bounded by the file's actual size (before anything is allocated)
    check_header       format name, version, meta and payload_sha256 entries
    (checksum)         format.payload_sha256
    parse_meta         the meta JSON (depth and number size bounded), every field typed and in range
    check_tensors      dtype and shape of every tensor against the meta (num_layers bounded by the tensor count)
    check_values       K/V and scales finite, scales > 0, token_index >= 0
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

from emloc_edge.errors import MemoryFileError
from emloc_edge.memory.quantize import PRECISIONS, STORED_DTYPES

FORMAT_NAME = "emloc-memory"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_HEADER_BYTES = 100 * 2**20  # a header this large would describe ~10^6 tensors: no memory has that
MAX_INT = 2**31 - 1  # every count and position in a memory fits int32 (token_index is int32)
MAX_JSON_DEPTH = 32  # MemoryMeta nests 4 deep; hyperparameters are free-form, but not this deep
PARTS = {"int8": ("key_t", "value", "token_index", "key_scale", "value_scale"),
         "fp16": ("key_t", "value", "token_index"), "fp32": ("key_t", "value", "token_index")}
#: safetensors dtype -> (numpy dtype, bytes per element); others (BF16, F8_*, ...) numpy cannot read.
_DTYPES = {"BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2),
           "U16": ("uint16", 2), "F16": ("float16", 2), "I32": ("int32", 4), "U32": ("uint32", 4),
           "F32": ("float32", 4), "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8)}


class FieldError(ValueError):
    """A meta field or tensor is wrong; load() prefixes the file path, add_chunk/empty raise it as is."""


# ---- the raw safetensors header ----

def read_raw_header(path: str, file_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (numpy dtype name, shape) from the file's header, every field bounded by the file."""
    bad = lambda why: MemoryFileError(f"{path}: not a readable safetensors file ({why}); "  # noqa: E731
                                      "it is truncated or not an emloc-edge memory")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > file_size - 8 or n > MAX_HEADER_BYTES:
            raise bad(f"header length {n} exceeds the file's {file_size} bytes")
        text = f.read(n)
    try:
        header = loads_bounded(text.decode("utf-8"))
    except (UnicodeDecodeError, FieldError) as e:
        raise bad(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_bytes, out, ends = file_size - 8 - n, {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("__metadata__ is not an object of strings")
            continue
        dtype, shape, (start, end) = _tensor_entry(name, entry, data_bytes, bad)
        ends.append((start, end))
        out[name] = (dtype, shape)
    return out


def _tensor_entry(name: str, entry: object, data_bytes: int, bad):
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {name[:40]!r} has a malformed entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise MemoryFileError(f"tensor {name[:40]!r} has dtype {str(dtype)[:20]!r}, which no emloc-edge memory holds")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d, MAX_INT) for d in shape)):
        raise bad(f"tensor {name[:40]!r} has a malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o, data_bytes) for o in offsets)):
        raise bad(f"tensor {name[:40]!r} has data offsets outside the file")
    start, end = offsets
    if end < start or math.prod(shape) * _DTYPES[dtype][1] != end - start:
        raise bad(f"tensor {name[:40]!r} has a byte range that does not fit its shape")
    return _DTYPES[dtype][0], tuple(shape), (start, end)


def _is_int(x: object, high: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= high


def loads_bounded(text: str) -> object:
    """json.loads with RecursionError, the int-digits ValueError and deep nesting as FieldError.

    Deep nesting that json.loads survives would still break dataclasses.asdict (Python recursion) when
    the meta is written back, so the depth is bounded too."""
    try:  # NaN / Infinity / 1e999: never written (allow_nan=False), and they would break writing the meta back
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError, as is a 5,000-digit int
        raise FieldError(f"{str(e).splitlines()[0][:80] if str(e) else type(e).__name__}") from None
    stack = [(obj, 1)]
    while stack:  # iterative: the depth check itself must not recurse
        x, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise FieldError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)
    return obj


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:20]} is out of range")
    return x


def check_header(header: dict, path: str) -> None:
    if header.get("format") != FORMAT_NAME:
        raise MemoryFileError(f"{path}: not an emloc-edge memory (header format is {header.get('format')!r:.60}, "
                              f"expected {FORMAT_NAME!r})")
    version = header.get("format_version", "")
    if not version.isdigit() or len(version) > 4 or int(version) not in SUPPORTED_VERSIONS:
        raise MemoryFileError(f"{path}: memory format version {version!r:.20} is not supported (this emloc-edge reads "
                              f"version {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade or recompile the memory")
    for key in ("meta", "payload_sha256"):
        if key not in header:
            raise MemoryFileError(f"{path}: header has no {key!r} entry; the file is corrupt")


# ---- the meta JSON ----

_NUM, _INT, _STR = (int, float), (int,), (str,)
_META_TYPES = {
    "model_name": _STR, "model_family": _STR, "model_fingerprint": _STR, "num_layers": _INT,
    "num_kv_heads": _INT, "head_dim": _INT, "precision": _STR, "position_offset": _INT,
    "position_dims": _INT, "context_tokens": _INT, "hyperparameters": (dict,), "template": (dict,),
    "image_preprocessing": (dict, type(None)), "chunks": (list,), "created_by": _STR,
}
_HYPER_TYPES = {"delta": _NUM + _STR, "ratios": (list,), "chunk_size": _INT}  # other keys are free
_CHUNK_TYPES = {"demos": _INT, "tokens": _INT, "kept_per_layer": (list,), "ratio_per_layer": (list,),
                "js_per_layer": (list,), "final_js": _NUM + _STR}
_CHUNK_ITEM_TYPES = {"kept_per_layer": _INT, "ratio_per_layer": _NUM + _STR,
                     "js_per_layer": _NUM + _STR + (type(None),)}
_LOW = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "position_dims": 1, "position_offset": 0,
        "context_tokens": 0}


def parse_meta(text: str) -> dict:
    """The meta JSON as a checked dict (see check_meta)."""
    try:
        d = loads_bounded(text)
    except FieldError as e:
        raise FieldError(f"meta is not valid JSON ({e})") from None
    check_meta(d)
    return d


def check_meta(d: object) -> None:
    """Check the JSON form of MemoryMeta: every field present, of the right type and in range."""
    _check_fields(d, _META_TYPES, "meta", exact=True)
    for name, low in _LOW.items():
        if not low <= d[name] <= MAX_INT:
            raise FieldError(f"meta.{name} must be in [{low}, {MAX_INT}], got {_short(d[name])}")
    if d["precision"] not in PRECISIONS:
        raise FieldError(f"meta.precision must be one of {', '.join(PRECISIONS)}, got {d['precision']!r:.40}")
    hp = d["hyperparameters"]
    _check_fields(hp, _HYPER_TYPES, "meta.hyperparameters", exact=False)
    for r in hp["ratios"]:
        _check_type(r, _NUM, "meta.hyperparameters.ratios[]")
        if not 0 < r <= 1:
            raise FieldError(f"meta.hyperparameters.ratios[] must be in (0, 1], got {_short(r)}")
    if not 1 <= hp["chunk_size"] <= MAX_INT:
        raise FieldError(f"meta.hyperparameters.chunk_size must be in [1, {MAX_INT}], got {_short(hp['chunk_size'])}")
    _check_float_str(hp["delta"], "meta.hyperparameters.delta")
    for k, c in enumerate(d["chunks"]):
        check_chunk(c, f"meta.chunks[{k}]", d["num_layers"])


def check_chunk(c: object, where: str, num_layers: int) -> None:
    _check_fields(c, _CHUNK_TYPES, where, exact=True)
    for name, item_types in _CHUNK_ITEM_TYPES.items():
        if len(c[name]) != num_layers:
            raise FieldError(f"{where}.{name} has {len(c[name])} entries, expected num_layers = {num_layers}")
        for x in c[name]:
            _check_type(x, item_types, f"{where}.{name}[]")
            _check_float_str(x, f"{where}.{name}[]")
    _check_float_str(c["final_js"], f"{where}.final_js")
    if not (0 <= c["demos"] <= MAX_INT and 0 <= c["tokens"] <= MAX_INT
            and all(0 <= k <= c["tokens"] for k in c["kept_per_layer"])):
        raise FieldError(f"{where}: demos, tokens and kept_per_layer must be in [0, {MAX_INT}], and kept <= tokens")


def _check_fields(d: object, types: dict[str, tuple], where: str, exact: bool) -> None:
    if not isinstance(d, dict):
        raise FieldError(f"{where} must be a JSON object, got {type(d).__name__}")
    for name, typ in types.items():
        if name not in d:
            raise FieldError(f"{where} field {name!r} is missing")
        _check_type(d[name], typ, f"{where}.{name}")
    if exact and set(d) - set(types):
        raise FieldError(f"{where} has unexpected field(s) {', '.join(sorted(set(d) - set(types)))[:80]}")


def _check_type(x: object, types: tuple, where: str) -> None:
    if isinstance(x, bool) or not isinstance(x, types):  # JSON true/false is never a valid value here
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise FieldError(f"{where} must be {names}, got {type(x).__name__} {_short(x)}")


def _check_float_str(x: object, where: str) -> None:
    """Reject float strings other than the three that format._float_out writes."""
    if isinstance(x, str) and x not in ("inf", "-inf", "nan"):
        raise FieldError(f"{where} must be a number or 'inf' / '-inf' / 'nan', got {_short(x)}")


def _short(x: object) -> str:
    """repr cut to 40 characters (a huge int is not even turned into digits)."""
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 64:
        return f"an integer of {x.bit_length()} bits"
    return f"{x!r:.40}"


# ---- the tensors ----

def expected_tensors(meta) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor the file must hold, from the (already checked) meta."""
    kv, hd, segs, dtype = meta.num_kv_heads, meta.head_dim, len(meta.chunks), STORED_DTYPES[meta.precision]
    f32, out = np.dtype(np.float32), {}
    for i, n in enumerate(meta.kept_tokens_per_layer):
        out[f"layers.{i}.key_t"] = (dtype, (kv, hd, n))
        out[f"layers.{i}.value"] = (dtype, (kv, n, hd))
        out[f"layers.{i}.token_index"] = (np.dtype(np.int32), (kv, n))
        if meta.precision == "int8":
            out[f"layers.{i}.key_scale"] = (f32, (kv, hd, segs))
            out[f"layers.{i}.value_scale"] = (f32, (kv, n, 1))
    return out


def check_tensors(meta, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    """Dtypes and shapes (name -> (dtype, shape), from the header or the arrays) against the meta."""
    parts = PARTS[meta.precision]
    if meta.num_layers > len(tensors):  # bounds num_layers (and so `expected`) before anything is built from it
        raise FieldError(f"meta.num_layers = {meta.num_layers} needs {meta.num_layers * len(parts)} tensors, "
                         f"the file holds {len(tensors)}")
    expected = expected_tensors(meta)
    for name, (dtype, shape) in expected.items():
        if name not in tensors:
            raise FieldError(f"tensor {name!r} is missing")
        got_dtype, got_shape = tensors[name]
        if np.dtype(got_dtype) != dtype:
            raise FieldError(f"tensor {name!r} has dtype {np.dtype(got_dtype)}, expected {dtype} "
                             f"for precision {meta.precision}")
        if tuple(got_shape) != shape:
            raise FieldError(f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)} "
                             "from num_kv_heads, head_dim and the chunks' kept_per_layer")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise FieldError(f"unexpected tensor(s) {', '.join(extra[:3])[:120]}")


def check_values(tensors: dict[str, np.ndarray]) -> None:
    """K/V finite, scales finite and > 0, token_index >= 0: a memory that passes never answers garbage."""
    for name in sorted(tensors):
        t, part = tensors[name], name.rsplit(".", 1)[-1]
        if part == "token_index":
            if t.size and int(t.min()) < 0:
                raise FieldError(f"tensor {name!r} holds a negative token index ({int(t.min())})")
        elif part.endswith("scale"):
            if t.size and not (np.isfinite(t).all() and float(t.min()) > 0):
                raise FieldError(f"tensor {name!r} holds a scale that is not a positive finite number")
        elif t.dtype.kind == "f" and t.size and not np.isfinite(t).all():
            raise FieldError(f"tensor {name!r} holds NaN or inf")
