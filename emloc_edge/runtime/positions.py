"""Position ids for the runtime (numpy only): M-RoPE ids of a token sequence, and the grid-dependent
inputs of the exported vision graph.

M-RoPE (Qwen2-VL / Qwen2.5-VL), as `model.model.get_rope_index` computes it for still images::

    text token            -> (p, p, p), then p += 1
    image, g = grid / m   -> (p + 0, p + row, p + col) for each merged token in raster order,
                             then p += max(g_h, g_w)

The Qwen vision graph (`export/vision_qwen2_vl.py`) cannot derive these per-image tensors itself: HF builds
them with Python loops over `grid_thw`, which do not trace to dynamic shapes. `vision_rotary_inputs` builds
them here instead, named like the graph inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["VisionLayout", "VISION_LAYOUTS", "mrope_positions", "text_positions", "vision_rotary_inputs"]


@dataclass(frozen=True)
class VisionLayout:
    """How a family's vision tower attends. windowed: Qwen2.5-VL window attention (outside the
    `fullatt_block_indexes` blocks), which needs the window permutation and window ids as inputs."""

    windowed: bool


#: The one place that maps a model family to its vision-graph layout (read by the exporter too).
VISION_LAYOUTS: dict[str, VisionLayout] = {
    "qwen2_vl": VisionLayout(windowed=False),
    "qwen2_5_vl": VisionLayout(windowed=True),
}


def text_positions(length: int, start: int) -> np.ndarray:
    """[1, T] int64 positions start .. start+T-1 for a plain (1-D RoPE) text decoder."""
    return np.arange(start, start + length, dtype=np.int64)[None]  # [1, T]


def _image_positions(grid: np.ndarray, merge_size: int, start: int) -> tuple[np.ndarray, int]:
    """[3, t*gh*gw] positions of one image's merged tokens and the position span it advances by."""
    t, h, w = (int(v) for v in grid)
    gh, gw = h // merge_size, w // merge_size
    # Raster order over (t, row, col), the order the merger emits merged tokens in.
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")  # each [t, gh, gw]
    ids = np.stack([tt, hh, ww]).reshape(3, -1) + start  # [3, t*gh*gw]
    return ids.astype(np.int64), max(gh, gw)


def mrope_positions(input_ids: np.ndarray, image_token_id: int, grids: list[np.ndarray],
                    merge_size: int, start: int = 0) -> np.ndarray:
    """[3, T] int64 M-RoPE position ids of ``input_ids`` [T], offset by ``start``.

    Every run of ``image_token_id`` is filled by the next images of ``grids`` (each [t, h, w] in patches),
    t*h*w / merge² tokens each, in order. Equals `get_rope_index(...)[0][:, 0] + start`.
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    out = np.empty((3, ids.size), dtype=np.int64)
    pos, i, k = int(start), 0, 0
    while i < ids.size:
        if not is_image[i]:
            out[:, i] = pos
            pos, i = pos + 1, i + 1
            continue
        if k >= len(grids):
            raise ValueError(f"image token at index {i} but only {len(grids)} image grid(s) were given")
        block, span = _image_positions(np.asarray(grids[k]), merge_size, pos)
        n = block.shape[1]
        if not is_image[i:i + n].all() or i + n > ids.size:
            raise ValueError(f"image {k} needs {n} consecutive image tokens at index {i}")
        out[:, i:i + n] = block
        pos, i, k = pos + span, i + n, k + 1
    if k != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) given but the sequence holds {k} image(s)")
    return out


# --------------------------------------------------------------------------------- vision graph inputs
def _patch_pos_ids(h: int, w: int, merge: int) -> np.ndarray:
    """[h*w, 2] (row, col) of every patch, in the merge-window order of the pixel rows."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # each [h, w]
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # [h/m, w/m, m, m] flattened
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1).astype(np.int64)  # [h*w, 2]


def _windows(h: int, w: int, merge: int, window_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Window order of the merged tokens and each merged token's window id (Qwen2.5-VL).

    Merged tokens are tiled into window_units x window_units windows (the last row/column of windows may
    be partial); windows are taken in raster order, tokens inside a window in raster order.
    Returns (window_index [M]: merged-token index at each window-order slot, window_of [M]: its window).
    """
    gh, gw = h // merge, w // merge
    nwh, nww = -(-gh // window_units), -(-gw // window_units)  # ceil: windows per column / row
    index = np.full((nwh * window_units, nww * window_units), -1, dtype=np.int64)
    index[:gh, :gw] = np.arange(gh * gw).reshape(gh, gw)
    win = index.reshape(nwh, window_units, nww, window_units).transpose(0, 2, 1, 3)  # [nwh, nww, u, u]
    win = win.reshape(nwh * nww, window_units * window_units)  # [windows, u*u], -1 = padding
    window_of = np.broadcast_to(np.arange(win.shape[0])[:, None], win.shape)
    keep = win >= 0
    return win[keep], window_of[keep].astype(np.int64)


def vision_rotary_inputs(grid_thw: np.ndarray, settings: dict[str, Any], family: str) -> dict[str, np.ndarray]:
    """The vision graph's inputs besides ``pixel_values``, for one image of ``grid_thw`` = [1, h, w].

    ``settings`` needs ``merge_size``; for windowed families also ``patch_size`` and ``window_size``
    (the vision section of the export manifest carries all three).

    Returns ``patch_pos_ids`` [N, 2] (row, col of each patch row of the pixels), and for Qwen2.5-VL
    ``window_index`` [N/m²] (merged tokens in window order), ``window_reverse`` [N/m²] (its inverse
    permutation) and ``window_ids`` [N] (window of each patch, in window order; attention in the windowed
    blocks stays within equal ids). All int64.
    """
    if family not in VISION_LAYOUTS:
        raise ValueError(f"no vision layout for family {family!r}; known: {sorted(VISION_LAYOUTS)}")
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(-1))
    merge = int(settings["merge_size"])
    if t != 1 or h % merge or w % merge:
        raise ValueError(f"grid_thw {[t, h, w]}: expected one frame with h, w multiples of {merge}")
    inputs = {"patch_pos_ids": _patch_pos_ids(h, w, merge)}
    if VISION_LAYOUTS[family].windowed:
        window_units = int(settings["window_size"]) // merge // int(settings["patch_size"])
        if window_units < 1:
            raise ValueError(f"window_size {settings['window_size']} is smaller than one merged token")
        order, window_of = _windows(h, w, merge, window_units)
        inputs["window_index"] = order
        inputs["window_reverse"] = np.argsort(order).astype(np.int64)
        inputs["window_ids"] = np.repeat(window_of, merge * merge)  # [N]: the m² patches of each token
    return inputs
