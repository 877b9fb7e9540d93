"""Weights of the exported decoder graphs: optional MatMulNBits quantization and one shared data file.

The fp32-memory and int8-memory decoder graphs hold the same weights. The first graph is saved with
its large initializers in one external-data file; every later graph's initializers that hold the same
bytes (same dtype, shape and content hash) are pointed at the first graph's (offset, length) in that
file instead of being written again. Both graphs are quantized the same deterministic way first, so
their quantized weights are byte-identical too.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import BadInputError

WEIGHT_FORMATS = ("fp32", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}
_BLOCK_SIZE = 32
_ACCURACY_LEVEL = 4  # int8 activations in the MatMulNBits kernel; without it bits=8 is 7x slower (notes §5)
_THRESHOLD = 1024  # bytes: initializers at least this large go to the shared file, smaller stay in the graph

_Key = tuple[int, tuple[int, ...], bytes]  # (ONNX dtype, dims, sha256 of the raw bytes)
_Known = dict  # _Key of an fp32 MatMul weight -> (its MatMulNBits node, [that node's weight initializers])


def quantize_weights(model: onnx.ModelProto, weights: str) -> onnx.ModelProto:
    """fp32: unchanged; int8 | int4: MatMul weights -> MatMulNBits (block 32, accuracy level 4)."""
    if weights not in WEIGHT_FORMATS:
        raise BadInputError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}", parameters="weights")
    if weights == "fp32":
        return model
    MatMulNBitsQuantizer = _quantizer_class()
    quantizer = MatMulNBitsQuantizer(model, bits=_BITS[weights], block_size=_BLOCK_SIZE,
                                     is_symmetric=True, accuracy_level=_ACCURACY_LEVEL)
    with _quiet("onnxruntime.quantization"):  # it logs every node at INFO
        quantizer.process()
    return quantizer.model.model


def save_shared(staged: dict[str, Path], out_dir: Path, data_file: str, weights: str) -> dict[str, int]:
    """Quantize each staged graph and save it as out_dir/{name}.onnx, all sharing out_dir/data_file.

    staged: graph name -> exported .onnx path (with its own external data). Returns, per graph, the bytes
    of initializers it keeps inline (small constants and any tensor the first graph lacks).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / data_file).unlink(missing_ok=True)  # onnx appends to an existing data file (notes §5)
    first, *rest = staged
    known: _Known = {}  # quantize each distinct weight once: the graphs hold the same ones
    model = _load(staged[first], weights, known)
    keys = [_key(t) for t in model.graph.initializer]  # before saving moves the bytes out
    for name in staged:
        (out_dir / f"{name}.onnx").unlink(missing_ok=True)
    onnx.save_model(model, str(out_dir / f"{first}.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data_file, size_threshold=_THRESHOLD)
    (out_dir / data_file).chmod(0o644)  # onnx creates it 0600; a model folder is meant to be read by others
    index = {k: list(t.external_data) for k, t in zip(keys, model.graph.initializer)
             if k is not None and t.data_location == TensorProto.EXTERNAL}
    inline = {first: _inline_bytes(model)}
    del model
    for name in rest:
        other = _load(staged[name], weights, known)
        for tensor in other.graph.initializer:
            entries = index.get(_key(tensor))
            if entries is not None:
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                tensor.external_data.extend(entries)  # location, offset, length in the first graph's file
        inline[name] = _inline_bytes(other)
        onnx.save_model(other, str(out_dir / f"{name}.onnx"))
    return inline


def external_files(path: Path) -> set[str]:
    """External-data file names a saved graph references."""
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def has_quantized_weights(path: Path) -> bool:
    """Whether a saved graph holds MatMulNBits (quantized) weights."""
    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type == "MatMulNBits" for node in model.graph.node)


def _load(path: Path, weights: str, known: _Known) -> onnx.ModelProto:
    """A staged graph, quantized, without the exporter's per-node debug metadata (3/4 of the graph bytes).

    `known` maps the key of an fp32 MatMul weight to the MatMulNBits node and initializers an earlier
    graph's quantization made of it; those are reused as they are (the quantizer is deterministic, so
    this is what quantizing again would give, at half the export's quantization time), then the
    quantizer handles whatever is left, and its results are added to `known`.
    """
    model = onnx.load(str(path))
    if weights != "fp32":
        weight_keys = _matmul_weight_keys(model)  # MatMul output name -> its weight's key
        _reuse_known(model, known, weight_keys)
        model = quantize_weights(model, weights)
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "MatMulNBits" and node.output[0] in weight_keys:
                known.setdefault(weight_keys[node.output[0]], (node, [inits[n] for n in node.input[1:] if n]))
    for node in model.graph.node:
        del node.metadata_props[:]
    return model


def _matmul_weight_keys(model: onnx.ModelProto) -> dict[str, _Key]:
    inits = {t.name: t for t in model.graph.initializer}
    keys = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            key = _key(inits[node.input[1]])
            if key is not None:
                keys[node.output[0]] = key
    return keys


def _reuse_known(model: onnx.ModelProto, known: _Known, keys: dict[str, _Key]) -> None:
    """Replace each MatMul whose weight is in `known` by that MatMulNBits node (same initializers)."""
    if not known:
        return
    graph = model.graph
    have = {t.name for t in graph.initializer}
    for i, node in enumerate(graph.node):
        entry = known.get(keys.get(node.output[0])) if node.op_type == "MatMul" else None
        if entry is None:
            continue
        template, tensors = entry
        q = onnx.NodeProto()
        q.CopyFrom(template)
        q.input[0], q.output[0], q.name = node.input[0], node.output[0], f"{node.name}_Q" if node.name else ""
        graph.node[i].CopyFrom(q)
        for t in tensors:
            if t.name not in have:
                graph.initializer.append(t)
                have.add(t.name)
    used = {n for node in graph.node for n in node.input}
    used |= {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _quantizer_class():
    """onnxruntime's MatMulNBitsQuantizer, imported without the INFO-level root logging its module
    configures on import (which would print every later onnx_ir pass of the process)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return MatMulNBitsQuantizer


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _key(tensor: TensorProto) -> _Key | None:
    if not tensor.HasField("raw_data"):
        return None
    raw = tensor.raw_data  # each access copies the bytes
    if len(raw) < _THRESHOLD:
        return None
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest()


def _inline_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL)
