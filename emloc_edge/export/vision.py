"""The vision graph of a vision-language model, one exporter per family behind one narrow interface::

    exporter(adapter, path, opset) -> fields     writes the graph to `path`; returns what the runtime needs of it:
                                                 "inputs", "outputs" ({"name", "dtype", "shape"}) and settings

    family                 exporter              vision.onnx
    qwen2_vl, qwen2_5_vl   vision_qwen2_vl.py    patches [N, C*T*P*P] + grid inputs -> image_features [N/m², D]
    tiny_vlm               vision_tiny_vlm.py    pixel_values [N, 3, S, S]         -> image_features [N, T, D]

`export_vision` picks the exporter by `adapter.family` and adds the fields every family shares. The runtime
side is chosen by the memory's `image_preprocessing["processor"]` (`runtime/image_inputs.py`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

VISION_FILE = "vision.onnx"
OUTPUT_NAME = "image_features"
#: Above this many weight bytes the graph stores its weights in `vision.onnx.data` (protobuf caps at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

Exporter = Callable[[Any, Path, int], dict[str, Any]]
_EXPORTERS: dict[str, Exporter] = {}


def register_vision(*families: str) -> Callable[[Exporter], Exporter]:
    """Decorator: `exporter` writes the vision graph of these model families."""
    def add(exporter: Exporter) -> Exporter:
        _EXPORTERS.update(dict.fromkeys(families, exporter))
        return exporter

    return add


def export_vision(adapter: Any, out_dir: Path, opset: int = 18) -> dict[str, Any]:
    """Write `out_dir/vision.onnx` for the adapter's vision side; return its manifest section
    ``{"file", "family", **exporter fields[, "external_data"]}``."""
    exporter = _EXPORTERS.get(adapter.family)
    if exporter is None:
        known = ", ".join(sorted(_EXPORTERS))
        raise ValueError(f"{adapter.family}: no vision graph exporter for this family (known: {known})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / VISION_FILE
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # re-saving appends to an existing external-data file
    section: dict[str, Any] = {"file": VISION_FILE, "family": adapter.family, **exporter(adapter, path, opset)}
    if data.exists():
        section["external_data"] = data.name  # ModelFolder checks it is there
    return section


def write_onnx(module: nn.Module, args: tuple, path: Path, input_names: list[str], dynamic_shapes: Any,
               opset: int) -> None:
    """torch.onnx.export (dynamo, opset `opset`) with one output, `OUTPUT_NAME`; external data only when large."""
    large = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():
        # The exporter notes that derived dims ("4*tokens") keep its own names; harmless, keep output clean.
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        torch.onnx.export(
            module, args, str(path), dynamo=True, opset_version=opset, external_data=large,
            input_names=input_names, output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )


def write_onnx_traced(module: nn.Module, args: tuple, path: Path, input_names: list[str],
                      dynamic_axes: dict[str, dict[int, str]], opset: int) -> None:
    """The TorchScript exporter (dynamo=False) for graphs without data-dependent shapes: ~1 s where dynamo
    takes ~6 s (EfficientNet-Lite0). Weights stay inside the .onnx file (< 2 GiB)."""
    from .decoder_step import quiet_torchscript_exporter

    with quiet_torchscript_exporter():
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=input_names, output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
        )


# Importing the family modules registers their exporters.
from . import vision_qwen2_vl, vision_tiny_vlm  # noqa: E402,F401
