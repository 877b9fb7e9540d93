"""The token embedding table of an exported model folder, memory-mapped; rows are read on demand.

    manifest "embed_tokens"         embed_tokens.npy        [V, D] float32 (fp32 exports), or int8 (int8/int4)
    manifest "embed_tokens_scale"   embed_tokens_scale.npy  [V, D / block] float16, int8 tables only

An int8 table holds each row in blocks of `block` columns, q = round(x / s) with s = max |x| / 127 per
block, dequantized as q * s: a quarter of the fp32 table (SmolLM2: 113 MB -> 30 MB). For a model loaded
from GGUF with Q8_0 embeddings (the embedded SmolLM2) this is lossless: the same blocks and scales.
(Reading the rows from a tied lm_head's MatMulNBits weight instead would save those 30 MB too, but
onnxruntime quantizes with s = max / -128, which re-rounds them: measured, 3 of 30 answers of the
embedded model changed, against 0 of 30 with this table.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelLoadError


class EmbeddingTable:
    """`table[ids]` -> float32 rows [len(ids), D], dequantized when the table is int8."""

    def __init__(self, values: np.ndarray, scales: np.ndarray | None) -> None:
        self.values, self.scales = values, scales  # [V, D]; [V, D / block] or None
        self.shape = values.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        rows = np.asarray(self.values[ids])  # [T, D]
        if self.scales is None:
            return rows.astype(np.float32, copy=False)
        scales = np.asarray(self.scales[ids], dtype=np.float32)  # [T, D / block]
        blocks = rows.reshape(*rows.shape[:-1], scales.shape[-1], -1).astype(np.float32)  # [T, D / block, block]
        return (blocks * scales[..., None]).reshape(rows.shape)  # [T, D]


def load_embeddings(folder: Path, manifest: dict) -> EmbeddingTable:
    """The folder's table, checked for the shapes and dtypes the manifest's geometry implies."""
    file = folder / manifest["embed_tokens"]
    hidden = manifest["geometry"]["hidden_size"]
    values = _load(file)
    scale_file = manifest.get("embed_tokens_scale")
    scales = _load(folder / scale_file) if scale_file else None
    if values.ndim != 2 or values.shape[1] != hidden:
        raise ModelLoadError(f"{file}: shape {values.shape}, expected [vocab, {hidden}]")
    if scales is None and values.dtype not in (np.float32, np.float16):
        raise ModelLoadError(f"{file}: dtype {values.dtype} needs embed_tokens_scale")
    if scales is not None and (values.dtype != np.int8 or scales.dtype not in (np.float16, np.float32) or scales.ndim != 2 or scales.shape[0] != values.shape[0]
                               or scales.shape[1] == 0 or hidden % scales.shape[1]):
        raise ModelLoadError(f"{folder / scale_file}: scales {scales.shape} do not fit an int8 table {values.shape}")
    return EmbeddingTable(values, scales)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable embedding table ({e})") from None
