"""The Qwen2-VL / Qwen2.5-VL vision exporter (see `vision.py`): one image's pixel patches -> its LLM-token features.

HF's vision forward derives rotary positions, window order and attention segments from `grid_thw` with
Python loops (`.tolist()`, `torch.split` over `cu_seqlens`), which trace to constants. `VisionEncoder`
reuses the HF block weights but takes those grid-dependent tensors as graph inputs, computed in numpy
by `runtime.positions.vision_rotary_inputs`, so one graph serves every image size::

    pixel_values [N, C*T*P*P]      patch_pos_ids [N, 2]
          | MatMul (Conv3d weight)        | x inv_freq -> cos, sin [N, hd]
          v                               v
        x [N, E] --(Qwen2.5: gather merge units by window_index)--+
          |                                                         |
    blocks: x += proj(softmax(q k^T / sqrt(hd) [+ window mask]) v); x += mlp(x)
          |          window mask = window_ids[:, None] == window_ids[None, :] (windowed blocks only)
          v
    merger -> [N/m², D] --(Qwen2.5: gather by window_reverse)--> image_features [N/m², D]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..runtime.positions import VISION_LAYOUTS, vision_rotary_inputs
from .vision import OUTPUT_NAME, register_vision, write_onnx

#: Example grid used to trace: not square and several windows wide, so no size is specialised away.
_EXAMPLE_GRID = (1, 8, 12)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class VisionEncoder(nn.Module):
    """The HF vision tower (`model.model.visual`) with grid-dependent tensors as explicit inputs."""

    def __init__(self, visual: nn.Module, windowed: bool) -> None:
        super().__init__()
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.windowed = windowed
        self.merge_unit = visual.spatial_merge_size ** 2
        # Windowed towers attend over the whole image only in these blocks (Qwen2.5-VL); others always do.
        self.full_blocks = set(visual.fullatt_block_indexes) if windowed else set(range(len(visual.blocks)))
        # The Conv3d has stride == kernel, so on flattened patch rows it is one matmul with its weight.
        conv = visual.patch_embed.proj
        self.register_buffer("patch_weight", conv.weight.detach().reshape(conv.out_channels, -1).t(), persistent=False)
        rotary = visual.rotary_pos_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float(), persistent=False)
        self.rope_scale = float(rotary.attention_scaling)

    def _attend(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                same_window: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[0]
        qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim)  # [N, 3, H, hd]
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each [H, N, hd]
        q = q * cos + _rotate_half(q) * sin  # cos, sin [N, hd] broadcast over heads
        k = k * cos + _rotate_half(k) * sin
        scores = (q @ k.transpose(1, 2)) * attn.scaling  # [H, N, N]
        if same_window is not None:
            scores = scores.masked_fill(~same_window, float("-inf"))  # every row keeps its own window
        out = torch.softmax(scores, dim=-1) @ v  # [H, N, hd]
        return attn.proj(out.transpose(0, 1).reshape(n, -1))  # [N, H*hd]

    def forward(self, pixel_values: torch.Tensor, patch_pos_ids: torch.Tensor,
                window_index: torch.Tensor | None = None, window_reverse: torch.Tensor | None = None,
                window_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = pixel_values.shape[0]
        x = pixel_values.to(self.patch_weight.dtype) @ self.patch_weight  # [N, E]
        freqs = patch_pos_ids.float()[..., None] * self.inv_freq  # [N, 2, hd/4]: row, col angles
        freqs = freqs.reshape(n, -1)  # [N, hd/2] = cat(row angles, col angles)
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, hd]
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        same_window = None
        if self.windowed:
            # Reorder whole merge units (m² consecutive patch rows) into window order.
            def to_windows(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(-1, self.merge_unit, t.shape[-1])[window_index].reshape(n, -1)  # [N, .]

            x, cos, sin = to_windows(x), to_windows(cos), to_windows(sin)
            same_window = window_ids[:, None] == window_ids[None, :]  # [N, N]
        for i, block in enumerate(self.blocks):
            mask = None if i in self.full_blocks else same_window
            x = x + self._attend(block.attn, block.norm1(x), cos, sin, mask)
            x = x + block.mlp(block.norm2(x))
        features = self.merger(x)  # [N/m², D]
        return features[window_reverse] if self.windowed else features


def _input_specs(windowed: bool, patch_dim: int) -> list[dict[str, Any]]:
    specs = [
        {"name": "pixel_values", "dtype": "float32", "shape": ["patches", patch_dim]},
        {"name": "patch_pos_ids", "dtype": "int64", "shape": ["patches", 2]},
    ]
    if windowed:
        specs += [
            {"name": "window_index", "dtype": "int64", "shape": ["tokens"]},
            {"name": "window_reverse", "dtype": "int64", "shape": ["tokens"]},
            {"name": "window_ids", "dtype": "int64", "shape": ["patches"]},
        ]
    return specs


def _settings(visual: nn.Module, windowed: bool) -> dict[str, int]:
    """What `vision_rotary_inputs` needs, stored in the manifest so the runtime reads it from there."""
    config = visual.config
    out = {"merge_size": int(config.spatial_merge_size), "patch_size": int(config.patch_size)}
    if windowed:
        out["window_size"] = int(config.window_size)
    return out


def graph_inputs(pixels: np.ndarray, grid: np.ndarray, section: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ORT feed for one image: its pixels plus the grid-dependent inputs, by graph input name."""
    return {"pixel_values": pixels.astype(np.float32, copy=False),
            **vision_rotary_inputs(grid, section, section["family"])}


@register_vision(*VISION_LAYOUTS)
@torch.no_grad()
def export_qwen2_vl_vision(adapter: Any, path: Path, opset: int) -> dict[str, Any]:
    """Write the adapter's vision tower to `path`; return the section fields
    ``{"merge_size", "patch_size"[, "window_size"], "inputs", "outputs"}``. Inputs/outputs have symbolic dims
    ``patches`` (N, a multiple of merge²) and ``tokens`` (N / merge²).
    """
    family = adapter.family
    windowed = VISION_LAYOUTS[family].windowed
    visual = adapter.model.model.visual
    encoder = VisionEncoder(visual, windowed).eval()
    section: dict[str, Any] = _settings(visual, windowed)

    t, h, w = _EXAMPLE_GRID
    patch_dim = encoder.patch_weight.shape[0]
    extra = vision_rotary_inputs(np.array(_EXAMPLE_GRID), section, family)
    pixels = torch.randn(t * h * w, patch_dim, generator=torch.Generator().manual_seed(0))  # leave global RNG alone
    args = (pixels, *(torch.from_numpy(v) for v in extra.values()))
    tokens = torch.export.Dim("tokens", min=1, max=1 << 20)
    patches = encoder.merge_unit * tokens  # N is always a whole number of merge units
    shapes: dict[str, Any] = {"pixel_values": {0: patches}, "patch_pos_ids": {0: patches}}
    if windowed:
        shapes |= {"window_index": {0: tokens}, "window_reverse": {0: tokens}, "window_ids": {0: patches}}
    specs = _input_specs(windowed, patch_dim)
    write_onnx(encoder, args, path, [s["name"] for s in specs], shapes, opset)
    section["inputs"] = specs
    hidden = int(visual.merger.mlp[-1].out_features)  # the LLM's hidden size
    section["outputs"] = [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["tokens", hidden]}]
    return section
