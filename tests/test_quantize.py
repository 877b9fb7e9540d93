"""int8 / fp16 / fp32 encoding of K and V: error bounds, outliers, empty segments, bad values."""
from __future__ import annotations

import numpy as np
import pytest

from emloc_edge.memory import PRECISIONS, dequantize, encode, quantize_keys, quantize_values, roundtrip
from emloc_edge.memory.quantize import STORED_DTYPES

KV, HD = 2, 8


def test_int8_keys_per_channel_bound_with_outlier_channels():
    rng = np.random.default_rng(1)
    key_t = rng.normal(size=(KV, HD, 50)).astype(np.float32)  # [kv, hd, n]
    key_t[:, 3, :] *= 40.0                                     # outlier channel in every head
    q, scale = quantize_keys(key_t)
    assert q.dtype == np.int8 and scale.shape == (KV, HD, 1) and scale.dtype == np.float32
    assert np.abs(q).max() <= 127
    err = np.abs(key_t - dequantize(q, scale))
    assert (err <= scale / 2 + 1e-6).all()
    # per-channel scales: the outlier channel must not coarsen the other channels
    normal = np.delete(err, 3, axis=1)
    assert normal.max() < scale[:, 3].min() / 20


def test_int8_values_per_token_bound_with_outlier_tokens():
    rng = np.random.default_rng(2)
    value = rng.normal(size=(KV, 51, HD)).astype(np.float32)  # [kv, n, hd]
    value[:, ::17, :] *= 15.0
    q, scale = quantize_values(value)
    assert q.dtype == np.int8 and scale.shape == (KV, 51, 1)
    err = np.abs(value - dequantize(q, scale))
    assert (err <= scale / 2 + 1e-6).all()
    assert np.delete(err, np.s_[::17], axis=1).max() < scale[:, ::17].min() / 10


def test_int8_zero_channel_and_empty_segment():
    key_t = np.zeros((KV, HD, 4), np.float32)
    key_t[0, 0] = [1.0, -2.0, 0.5, 0.0]
    q, scale = quantize_keys(key_t)
    assert (scale > 0).all() and np.isfinite(scale).all()
    np.testing.assert_array_equal(dequantize(q, scale)[:, 1:], 0.0)
    q, scale = quantize_keys(np.zeros((KV, HD, 0), np.float32))
    assert q.shape == (KV, HD, 0) and scale.shape == (KV, HD, 1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_encode_dtypes_and_roundtrip(precision):
    rng = np.random.default_rng(3)
    key_t, value = rng.normal(size=(KV, HD, 6)).astype(np.float32), rng.normal(size=(KV, 6, HD)).astype(np.float32)
    ks, vs, kscale, vscale = encode(key_t, value, precision)
    assert ks.dtype == vs.dtype == STORED_DTYPES[precision]
    assert (kscale is None) == (vscale is None) == (precision != "int8")
    k2, v2 = roundtrip(key_t, value, precision)
    assert k2.dtype == v2.dtype == np.float32
    tol = {"int8": 0.02, "fp16": 2e-3, "fp32": 0.0}[precision]
    np.testing.assert_allclose(k2, key_t, atol=tol)
    np.testing.assert_allclose(v2, value, atol=tol)


def test_encode_rejects_nan_and_fp16_overflow():
    key_t, value = np.zeros((KV, HD, 2), np.float32), np.zeros((KV, 2, HD), np.float32)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.where(np.arange(2) == 0, np.nan, key_t), value, "int8")
    with pytest.raises(ValueError, match="fp16"):
        encode(key_t + 70000.0, value, "fp16")
    with pytest.raises(ValueError, match="precision"):
        encode(key_t, value, "int4")


# ---- build, save, load ----
