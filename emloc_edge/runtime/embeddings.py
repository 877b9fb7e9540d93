"""The token embedding table of an exported model folder, memory-mapped; rows are read on demand.

    manifest "embed_tokens"         embed_tokens.npy        [V, D] float32 (fp32 exports), or int8 (int8/int4)
    manifest "embed_tokens_scale"   embed_tokens_scale.npy  [V, D / block] float32, int8 tables only

An int8 table holds each row in blocks of `block` columns, q = round(x / s) with s = max |x| / 127 per
block: the MatMulNBits scheme of the int8 decoder weights (for a tied lm_head, the same values the head
multiplies by). It takes a quarter of the fp32 table (SmolLM2: 113 MB -> 32 MB).
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
    values = _load(folder / manifest["embed_tokens"])
    scale_file = manifest.get("embed_tokens_scale")
    scales = _load(folder / scale_file) if scale_file else None
    hidden = manifest["geometry"]["hidden_size"]
    if values.ndim != 2 or values.shape[1] != hidden:
        raise ModelLoadError(f"{folder / manifest['embed_tokens']}: shape {values.shape}, expected [vocab, {hidden}]")
    if scales is None and values.dtype not in (np.float32, np.float16):
        raise ModelLoadError(f"{folder / manifest['embed_tokens']}: dtype {values.dtype} needs embed_tokens_scale")
    if scales is not None and (values.dtype != np.int8 or scales.ndim != 2 or scales.shape[0] != values.shape[0]
                               or scales.shape[1] == 0 or hidden % scales.shape[1]):
        raise ModelLoadError(f"{folder / scale_file}: scales {scales.shape} do not fit an int8 table {values.shape}")
    return EmbeddingTable(values, scales)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable embedding table ({e})") from None
