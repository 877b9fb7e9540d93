"""The tiny VLM's vision exporter (see `vision.py`): `ImageTokens` as one graph over a batch of images::

    pixel_values [N, 3, S, S] --EfficientNet-Lite0--> [N, 1280, s, s] --pool--> [N, T, 1280]
        --standardise, Linear 1280->C, ArgMax, Gather codebook [C, D]--> image_features [N, T, D]

S is fixed (the encoder pads for one size); N is dynamic. The runtime feeds `preprocess_square` pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .vision import OUTPUT_NAME, register_vision, write_onnx_traced

#: Images in the example batch: >= 2, so the batch dim is not specialised to 1.
_EXAMPLE_IMAGES = 2


@register_vision("tiny_vlm")
@torch.no_grad()
def export_tiny_vlm_vision(adapter: Any, path: Path, opset: int) -> dict[str, Any]:
    """Write `adapter.vision` to `path`; return ``{"image_size", "image_tokens", "inputs", "outputs"}``."""
    size, tokens = int(adapter.config["image_size"]), adapter.image_tokens
    hidden = int(adapter.vision.projector.codebook.shape[1])
    pixels = torch.randn(_EXAMPLE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
    axes = {"pixel_values": {0: "images"}, OUTPUT_NAME: {0: "images"}}
    write_onnx_traced(adapter.vision.eval(), (pixels,), path, ["pixel_values"], axes, opset)
    return {
        "image_size": size,
        "image_tokens": tokens,
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["images", 3, size, size]}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["images", tokens, hidden]}],
    }
