"""Re-encoding a task memory: the same kept tokens stored at another precision."""
from __future__ import annotations

import dataclasses

import numpy as np

from .format import TaskMemory


def with_precision(memory: TaskMemory, precision: str) -> TaskMemory:
    """A copy of `memory` whose K/V are re-encoded at `precision`, chunk by chunk.

    Decoding an int8 memory and re-encoding it at fp32 is exact; the other way quantizes each chunk's
    segment as the compiler would have. Pruning decisions, positions and records are unchanged.
    """
    meta = dataclasses.replace(memory.meta, precision=precision, chunks=[])
    out = TaskMemory.empty(meta)
    decoded = [layer.dequantized() for layer in memory.layers]  # per layer ([kv, hd, n], [kv, n, hd])
    starts = [0] * len(memory.layers)
    for k, record in enumerate(memory.meta.chunks):
        keys, values, index = [], [], []
        for i, (layer, (key_t, value)) in enumerate(zip(memory.layers, decoded)):
            lo, hi = starts[i], starts[i] + layer.segment_lengths[k]
            keys.append(np.ascontiguousarray(key_t[..., lo:hi].transpose(0, 2, 1)))  # [kv, n_k, hd]
            values.append(np.ascontiguousarray(value[:, lo:hi]))
            index.append(np.ascontiguousarray(layer.token_index[:, lo:hi]))
            starts[i] = hi
        out.add_chunk(keys, values, index, record)
    return out
