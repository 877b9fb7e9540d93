"""Symmetric int8 (±127), fp16 and fp32 storage of memory keys and values, in plain numpy.

Layout follows KIVI (see onnx-runtime-notes §5): keys get one scale per channel (taken over the
tokens), values one scale per token (taken over the channels). Keys have a few outlier channels;
per-channel scales keep those outliers from crushing the precision of every other channel.

Every array here is one layer of one memory segment:
    key_t  [kv_heads, head_dim, n]   K pre-transposed, so q @ key_t needs no transpose at run time
    value  [kv_heads, n, head_dim]
"""
from __future__ import annotations

import numpy as np

PRECISIONS = ("int8", "fp16", "fp32")
STORED_DTYPES = {"int8": np.dtype(np.int8), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}

_QMAX = 127.0
# An all-zero channel would give scale 0 and 0/0 = NaN; any positive scale stores it exactly as 0.
_MIN_SCALE = np.float32(np.finfo(np.float32).tiny)
_FP16_MAX = float(np.finfo(np.float16).max)


def _quantize(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization with one scale per slice, reducing over `axis`."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=axis, keepdims=True, initial=0.0)  # initial=0 lets n=0 through
    scale = np.maximum(amax / np.float32(_QMAX), _MIN_SCALE).astype(np.float32)
    q = np.clip(np.rint(x / scale), -_QMAX, _QMAX).astype(np.int8)
    return q, scale


def quantize_keys(key_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel int8 keys. key_t [kv, hd, n] float32 -> (q int8 [kv, hd, n], scale float32 [kv, hd, 1])."""
    _check_rank(key_t, "key_t")
    return _quantize(key_t, axis=2)  # max |x| over the tokens of each channel


def quantize_values(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token int8 values. value [kv, n, hd] float32 -> (q int8 [kv, n, hd], scale float32 [kv, n, 1])."""
    _check_rank(value, "value")
    return _quantize(value, axis=2)  # max |x| over the channels of each token


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q.astype(float32) * scale, with scale broadcasting over the reduced axis."""
    return q.astype(np.float32) * scale.astype(np.float32, copy=False)


def encode(
    key_t: np.ndarray, value: np.ndarray, precision: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Convert one segment to its stored form: (key_stored, value_stored, key_scale, value_scale).

    Scales are None unless precision is "int8". Raises ValueError on non-finite input, or on values
    that fp16 cannot hold, so that a broken compile never writes silent garbage into a memory.
    """
    _check_precision(precision)
    _check_rank(key_t, "key_t")
    _check_rank(value, "value")
    for name, x in (("key_t", key_t), ("value", value)):
        if x.size and not np.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or inf; the memory cannot store it")
    if precision == "int8":
        key_q, key_scale = quantize_keys(key_t)
        value_q, value_scale = quantize_values(value)
        return key_q, value_q, key_scale, value_scale
    if precision == "fp16":
        for name, x in (("key_t", key_t), ("value", value)):
            if x.size and float(np.abs(x).max()) > _FP16_MAX:
                raise ValueError(f"{name} exceeds the fp16 range (|x| > {_FP16_MAX:g}); use int8 or fp32")
        return key_t.astype(np.float16), value.astype(np.float16), None, None
    return (np.ascontiguousarray(key_t, dtype=np.float32),
            np.ascontiguousarray(value, dtype=np.float32), None, None)


def decode(
    key_stored: np.ndarray,
    value_stored: np.ndarray,
    key_scale: np.ndarray | None = None,
    value_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored form -> float32 (key_t [kv, hd, n], value [kv, n, hd]).

    key_scale may be [kv, hd, 1] (one segment) or [kv, hd, n] (segments already expanded).
    """
    if key_stored.dtype == np.int8:
        if key_scale is None or value_scale is None:
            raise ValueError("int8 keys and values need their scales to decode")
        return dequantize(key_stored, key_scale), dequantize(value_stored, value_scale)
    return key_stored.astype(np.float32), value_stored.astype(np.float32)


def roundtrip(key_t: np.ndarray, value: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """decode(encode(...)): exactly what a memory file of this precision will give back at run time."""
    return decode(*encode(key_t, value, precision))


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _check_rank(x: np.ndarray, name: str) -> None:
    if np.ndim(x) != 3:
        raise ValueError(f"{name} must be 3-D [kv_heads, ., .], got shape {np.shape(x)}")
