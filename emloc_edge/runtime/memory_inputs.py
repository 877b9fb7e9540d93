"""A task memory as inputs of the decoder-step graphs (numpy only: this is the runtime side).

The graphs' per-layer input names and axes are declared here, once: the export (export/decoder_step.py)
builds its graph inputs and the manifest's "inputs" from `memory_input_names` / `MEMORY_INPUT_AXES`, and
the feeds below use the same names. Two graphs take the memory:

    variant "decoder_step"    (alias "fp32"):  mem_key_t.{i} f32 [kv, hd, n_i], mem_value.{i} f32 [kv, n_i, hd]
    variant "decoder_step_q8" (alias "q8"):    mem_key_t.{i} int8 [kv, hd, n_i], mem_value.{i} int8 [kv, n_i, hd],
                                               mem_key_scale.{i} f32 [kv, hd, S_i]  (one K scale per channel per segment),
                                               mem_key_segment.{i} int32 [n_i]     (each token's segment),
                                               mem_value_scale.{i} f32 [kv, n_i]   (one V scale per token)

fp16 and fp32 memories feed the fp32 graph; an int8 memory feeds the q8 graph exactly as the file stores it
(a chunk is one segment; appending a chunk never rewrites older bytes), or, dequantized at load, the fp32
graph. The q8 graph expands the segment scales per token inside each step, so the bound memory stays int8
(file payload + 4 bytes per token per layer for the segment index) and its logits equal the dequantized
path's.
"""
from __future__ import annotations

import numpy as np

from ..errors import BadInputError, ModelLoadError
from ..memory.format import MemoryMeta, TaskMemory

FLOAT, INT8 = "decoder_step", "decoder_step_q8"  # variants = the graphs they feed
_ALIASES = {FLOAT: FLOAT, INT8: INT8, "fp32": FLOAT, "q8": INT8}
CHOICES = ("auto", "int8", "float")  # EdgeSession(memory_inputs=...)

# Per-layer graph inputs, in the order DecoderStep.forward takes them: base name -> axes. Axis names:
# kv, hd (geometry), n (the layer's memory tokens), S (its segments), t (the recent cache, common to all layers).
MEMORY_INPUT_AXES = {
    FLOAT: {"mem_key_t": ("kv", "hd", "n"), "mem_value": ("kv", "n", "hd"),
            "rec_key": ("kv", "t", "hd"), "rec_value": ("kv", "t", "hd")},
    INT8: {"mem_key_t": ("kv", "hd", "n"), "mem_value": ("kv", "n", "hd"), "mem_key_scale": ("kv", "hd", "S"),
           "mem_key_segment": ("n",), "mem_value_scale": ("kv", "n"),
           "rec_key": ("kv", "t", "hd"), "rec_value": ("kv", "t", "hd")},
}


def memory_input_names(layer: int, quantized: bool) -> list[str]:
    """Graph inputs of one layer, in the order DecoderStep.forward takes them."""
    return [f"{base}.{layer}" for base in MEMORY_INPUT_AXES[INT8 if quantized else FLOAT]]


def variant_for(precision: str) -> str:
    """The graph that takes a memory of this precision without conversion."""
    return INT8 if precision == "int8" else FLOAT


def choose_variant(manifest: dict, meta: MemoryMeta, requested: str, where: object) -> str:
    """The decoder graph an EdgeSession runs: int8 memories on the q8 graph (auto, int8), the rest on the
    float graph; `float` dequantizes an int8 memory once at load. An export older than the exact q8 inputs
    (manifest format_version 1) runs int8 memories on the float graph under auto and refuses int8."""
    if requested not in CHOICES:
        raise BadInputError(f"memory_inputs must be one of {', '.join(CHOICES)}, got {requested!r}",
                            parameters="memory_inputs")
    precision = meta.precision
    if requested == "int8" and precision != "int8":
        raise BadInputError(f"{where}: a {precision} memory has no int8 inputs (memory_inputs='int8')",
                            parameters="memory_inputs")
    if requested == "float" or precision != "int8":
        return FLOAT
    if _has_q8_inputs(manifest, meta.num_layers):
        return INT8
    if requested == "auto":
        return FLOAT
    raise ModelLoadError(f"{where}: this export's {INT8} graph predates exact int8 memory inputs "
                         f"(manifest format_version {manifest.get('format_version')}); re-export the model "
                         "or use memory_inputs='float'")


def _has_q8_inputs(manifest: dict, num_layers: int) -> bool:
    inputs = manifest.get("graphs", {}).get(INT8, {}).get("inputs")
    wanted = [name for i in range(num_layers) for name in memory_input_names(i, True)]
    return isinstance(inputs, list) and set(wanted) <= set(inputs)


def segment_index(segment_lengths: tuple[int, ...] | list[int]) -> np.ndarray:
    """Each token's segment: int32 [n], 0 for the first segment's tokens, 1 for the next, ..."""
    lengths = [int(x) for x in segment_lengths]
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)  # [S] -> [n]


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
        names = memory_input_names(i, variant == INT8)[:-2]  # the memory's; rec_key/rec_value are the session's
        if variant == FLOAT:
            key_t, value = layer.dequantized()  # float32 [kv, hd, n], [kv, n, hd]
            tensors = [key_t.astype(np.float32, copy=False), value.astype(np.float32, copy=False)]
        else:
            tensors = _q8_layer(layer)
        feeds.update({name: np.ascontiguousarray(t) for name, t in zip(names, tensors)})
    return feeds


def _q8_layer(layer) -> list[np.ndarray]:
    """[key_t int8 [kv, hd, n], value int8 [kv, n, hd], key_scale [kv, hd, S], segment int32 [n], value_scale [kv, n]]."""
    kv, n, _ = layer.value.shape
    key_scale = np.asarray(layer.key_scale, dtype=np.float32)  # [kv, hd, S]
    if key_scale.shape[2] == 0:  # no chunk yet (n = 0): one unused scale keeps every dim >= 1
        key_scale = np.ones(key_scale.shape[:2] + (1,), dtype=np.float32)
    value_scale = np.asarray(layer.value_scale, dtype=np.float32).reshape(kv, n)  # [kv, n, 1] -> [kv, n]
    return [layer.key_t, layer.value, key_scale, segment_index(layer.segment_lengths), value_scale]


__all__ = ["CHOICES", "FLOAT", "INT8", "MEMORY_INPUT_AXES", "choose_variant", "memory_feeds", "memory_input_names",
           "segment_index", "variant_for"]
