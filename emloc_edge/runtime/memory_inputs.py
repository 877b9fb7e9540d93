"""A task memory as inputs of the decoder-step graphs (numpy only: this is the runtime side).

Two graphs take the memory (see emloc_edge/export/decoder_step.py):

    variant "decoder_step"    (alias "fp32"):  mem_key_t.{i} f32 [kv, hd, n_i], mem_value.{i} f32 [kv, n_i, hd]
    variant "decoder_step_q8" (alias "q8"):    mem_key_t.{i} int8 [kv, hd, n_i], mem_value.{i} int8 [kv, n_i, hd],
                                               mem_key_scale.{i} f32 [kv, hd, 1], mem_value_scale.{i} f32 [kv, n_i]

fp16 and fp32 memories feed the fp32 graph; an int8 memory feeds the q8 graph as is (or, dequantized,
the fp32 graph). The file keeps one K scale per channel *per chunk segment* (so appending a chunk never
rewrites older bytes); the q8 graph folds one per-channel K scale per layer into q, so the int8 keys
are requantized once, at load time, to the largest segment scale of each channel.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import BadInputError
from ..memory.format import TaskMemory

FLOAT, INT8 = "decoder_step", "decoder_step_q8"  # variants = the graphs they feed
_ALIASES = {FLOAT: FLOAT, INT8: INT8, "fp32": FLOAT, "q8": INT8}


def variant_for(precision: str) -> str:
    """The graph that takes a memory of this precision without conversion."""
    return INT8 if precision == "int8" else FLOAT


def requantize_keys_per_layer(
    key_t_int8: np.ndarray, key_scale_segments: np.ndarray, segment_lengths: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """One per-channel K scale per layer from per-segment scales.

    key_t_int8 [kv, hd, n] int8; key_scale_segments [kv, hd, S] float32; segment_lengths: S ints summing to n.
    Returns (key_t int8 [kv, hd, n], scale float32 [kv, hd, 1]) with scale = the largest segment scale of
    each channel. Segments stored at that scale keep their bytes (so one segment is exact); the others are
    rounded to it: q' = round(q * s_k / s_max), |q'| <= |q| <= 127.

    Error bound, per element of channel c: |q' * s_max - q * s_k| <= s_max / 2, half a step of the channel's
    coarsest segment, i.e. no worse than quantizing the whole layer at once with per-channel scales
    (s_max = max over the layer's tokens of |k_c| / 127). Against the original float keys the total is
    <= s_k / 2 + s_max / 2 <= s_max; on an attention score q.k it is <= sum_c |q_c| * s_max_c / 2.
    """
    key_t = np.asarray(key_t_int8)
    scales = np.asarray(key_scale_segments, dtype=np.float32)
    lengths = [int(x) for x in segment_lengths]
    if key_t.dtype != np.int8 or key_t.ndim != 3:
        raise BadInputError(f"int8 keys must be an int8 [kv, hd, n] array, got {key_t.dtype} {list(key_t.shape)}")
    kv, hd, n = key_t.shape
    if scales.shape != (kv, hd, len(lengths)) or sum(lengths) != n or min(lengths, default=0) < 0:
        raise BadInputError(f"key scales {list(scales.shape)} and segment lengths {lengths} do not fit "
                            f"keys [kv, hd, n] = {[kv, hd, n]} (need [kv, hd, segments] and lengths summing to n)")
    if not lengths:  # no segment (n = 0): any positive scale will do
        return key_t.copy(), np.ones((kv, hd, 1), dtype=np.float32)
    target = scales.max(axis=2, keepdims=True)  # [kv, hd, S] -> [kv, hd, 1]
    if len(lengths) == 1:
        return key_t.copy(), target
    ratio = np.repeat(scales.astype(np.float64) / target, lengths, axis=2)  # [kv, hd, S] -> [kv, hd, n], <= 1
    requantized = np.rint(key_t.astype(np.float64) * ratio)  # [kv, hd, n], exactly q where s_k == s_max
    return requantized.astype(np.int8), target


def memory_feeds(task_memory: TaskMemory, variant: str) -> dict[str, np.ndarray]:
    """The per-layer memory inputs of the `variant` graph (decoder_step | decoder_step_q8), by input name."""
    if variant not in _ALIASES:
        raise BadInputError(f"memory variant must be one of {', '.join(_ALIASES)}, got {variant!r}")
    variant = _ALIASES[variant]
    precision = task_memory.meta.precision
    if variant == INT8 and precision != "int8":
        raise BadInputError(f"a {precision} memory has no int8 tensors for {INT8}.onnx; "
                            f"use {FLOAT}.onnx or compile the memory with precision int8", parameters="precision")
    feeds: dict[str, np.ndarray] = {}
    for i, layer in enumerate(task_memory.layers):
        if variant == FLOAT:
            key_t, value = layer.dequantized()  # float32 [kv, hd, n], [kv, n, hd]
            feeds[f"mem_key_t.{i}"] = np.ascontiguousarray(key_t, dtype=np.float32)
            feeds[f"mem_value.{i}"] = np.ascontiguousarray(value, dtype=np.float32)
            continue
        key_t, key_scale = requantize_keys_per_layer(layer.key_t, layer.key_scale, layer.segment_lengths)
        kv, n, _ = layer.value.shape
        feeds[f"mem_key_t.{i}"] = np.ascontiguousarray(key_t)
        feeds[f"mem_value.{i}"] = np.ascontiguousarray(layer.value)
        feeds[f"mem_key_scale.{i}"] = key_scale
        feeds[f"mem_value_scale.{i}"] = np.ascontiguousarray(layer.value_scale.reshape(kv, n), dtype=np.float32)  # [kv, n, 1] -> [kv, n]
    return feeds


__all__ = ["FLOAT", "INT8", "memory_feeds", "requantize_keys_per_layer", "variant_for"]
