"""Runtime image side without torch: pixels vs `Qwen2VLImageProcessorPil`, file loading, M-RoPE positions vs
`get_rope_index`, and the vision graph's grid inputs vs transformers' own `vision_utils` helpers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from emloc_edge.errors import BadInputError
from emloc_edge.models.loading import load_model
from emloc_edge.runtime.image import load_image, preprocess, smart_resize
from emloc_edge.runtime.positions import mrope_positions, text_positions, vision_rotary_inputs

TOL = 1e-5


@pytest.fixture(scope="module")
def processor(qwen2_vl_dir: Path):
    from tiny_models import load_image_processor

    return load_image_processor(qwen2_vl_dir)


@pytest.fixture(scope="module")
def settings(qwen2_vl_dir: Path) -> dict:
    return load_model(qwen2_vl_dir).image_preprocessing()


def hf_pixels(processor, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    out = processor(images=[image], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0]


def assert_same(processor, settings, image, ours=None) -> None:
    ref_px, ref_grid = hf_pixels(processor, image)
    px, grid = ours if ours is not None else preprocess(image, settings)
    assert px.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, ref_grid)
    assert px.shape == ref_px.shape
    assert np.abs(px - ref_px).max() <= TOL


# ------------------------------------------------------------------------------------ preprocessing
# (w, h): tiny, wide, tall, exactly on the 28 grid, odd, larger than max_pixels (112²), extreme aspect.
SIZES = [(1, 1), (5, 3), (300, 40), (40, 300), (56, 56), (84, 112), (57, 113), (640, 480), (1000, 7)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_rgb_sizes_match_hf(processor, settings, size):
    w, h = size
    rng = np.random.default_rng(w * 1000 + h)
    assert_same(processor, settings, Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    palette_t = Image.fromarray(rgba[..., :3]).convert("P")
    palette_t.info["transparency"] = 3
    return {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": Image.fromarray(rgba[..., :2].copy(), "LA"),
        "L": Image.fromarray(rgba[..., 0]),
        "P": Image.fromarray(rgba[..., :3]).convert("P"),
        "P+transparency": palette_t,
        "CMYK": Image.fromarray(rgba, "RGBA").convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65535, (50, 70), dtype=np.uint16)),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_modes_match_hf(processor, settings, mode, tmp_path):
    image = _mode_images()[mode]
    assert_same(processor, settings, image)
    # Through a file too, where the format keeps the mode: the runtime's loader + preprocess == HF on the file.
    ext = {"CMYK": "tif", "I;16": "png"}.get(mode, "png")
    path = tmp_path / f"img.{ext}"
    image.save(path)
    with Image.open(path) as raw:
        raw.load()
        assert_same(processor, settings, raw, ours=preprocess(path, settings))


def test_alpha_is_composited_on_white(settings):
    clear = Image.new("RGBA", (56, 56), (0, 0, 0, 0))  # fully transparent black
    white = Image.new("RGB", (56, 56), (255, 255, 255))
    np.testing.assert_array_equal(preprocess(clear, settings)[0], preprocess(white, settings)[0])


def test_exif_rotated_jpeg(processor, settings, tmp_path):
    path = tmp_path / "rot.jpg"
    arr = np.zeros((30, 90, 3), dtype=np.uint8)  # 90 wide x 30 high, left third red
    arr[:, :30, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (30, 90) and loaded.mode == "RGB"
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)
    px, grid = preprocess(path, settings)
    assert grid[1] > grid[2]  # tall after rotation
    assert_same(processor, settings, upright, ours=(px, grid))


def test_smart_resize_bounds():
    assert smart_resize(56, 56, 28, 56 * 56, 112 * 112) == (56, 56)
    h, w = smart_resize(4000, 3000, 28, 56 * 56, 112 * 112)
    assert h % 28 == w % 28 == 0 and h * w <= 112 * 112
    with pytest.raises(BadInputError, match="aspect ratio"):
        smart_resize(1, 201, 28, 56 * 56, 112 * 112)


def test_aspect_ratio_error_names_file(settings, tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (402, 2)).save(path)
    with pytest.raises(BadInputError) as e:
        preprocess(path, settings)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------- load_image
@pytest.mark.parametrize("content, expected", [
    (None, "not found"), (b"", "not an image"), (b"hello, not an image", "not an image"),
])
def test_load_image_errors_are_one_line(tmp_path, content, expected):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInputError) as e:
        load_image(path)
    msg = str(e.value)
    assert expected in msg and str(path) in msg and "\n" not in msg


def test_load_image_truncated(tmp_path):
    path = tmp_path / "t.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(BadInputError, match="truncated or corrupt") as e:
        load_image(path)
    assert str(path) in str(e.value)


def test_load_image_bomb(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(path)
    with pytest.raises(BadInputError, match="decompression bomb") as e:
        load_image(path, max_pixels=64 * 64 - 1)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, emloc_edge.runtime.image, emloc_edge.runtime.positions; "
            "sys.exit(1 if {'torch', 'transformers'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------- positions
def _sequence(image_token: int, n_tokens: list[int]) -> np.ndarray:
    """text, then per image: vision_start-like token, its image tokens, end-like token, more text."""
    ids = [1, 2, 3, 4]
    for k, n in enumerate(n_tokens):
        ids += [5] + [image_token] * n + [6] + [7] * (k + 2)
    return np.array(ids, dtype=np.int64)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_mrope_positions_match_get_rope_index(vl_family_dir, n_images):
    adapter = load_model(vl_family_dir.path)
    token = adapter.image_token_id
    merge = adapter.image_preprocessing()["merge_size"]
    grids = [np.array(g, dtype=np.int64) for g in ([1, 4, 6], [1, 8, 2])[:n_images]]
    ids = _sequence(token, [int(g.prod()) // merge**2 for g in grids])
    ref, _ = adapter.model.model.get_rope_index(
        torch.from_numpy(ids[None]), mm_token_type_ids=torch.from_numpy((ids == token)[None]).int(),
        image_grid_thw=torch.from_numpy(np.stack(grids)) if grids else None,
    )
    ref = ref[:, 0].numpy()  # [3, T]
    for start in (0, 17):
        ours = mrope_positions(ids, token, grids, merge, start)
        assert ours.dtype == np.int64 and ours.shape == (3, ids.size)
        np.testing.assert_array_equal(ours, ref + start)


def test_mrope_positions_count_mismatch():
    ids = _sequence(9, [4])
    with pytest.raises(ValueError, match="image"):
        mrope_positions(ids, 9, [], 2, 0)
    with pytest.raises(ValueError, match="needs 6"):
        mrope_positions(ids, 9, [np.array([1, 4, 6])], 2, 0)


def test_text_positions():
    np.testing.assert_array_equal(text_positions(4, 10), [[10, 11, 12, 13]])
    assert text_positions(0, 3).shape == (1, 0)


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 6, 8), (1, 22, 2), (1, 10, 14), (1, 8, 8)])
def test_vision_rotary_inputs_match_hf_helpers(grid):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    g = torch.tensor([grid])
    settings = {"merge_size": 2, "patch_size": 14, "window_size": 56}
    ours = vision_rotary_inputs(np.array(grid), settings, "qwen2_5_vl")
    np.testing.assert_array_equal(ours["patch_pos_ids"], get_vision_position_ids(g, 2).numpy())
    index, cu = get_vision_window_index(g, spatial_merge_size=2, window_size=56, patch_size=14)
    np.testing.assert_array_equal(ours["window_index"], index.numpy())
    np.testing.assert_array_equal(ours["window_index"][ours["window_reverse"]], np.arange(index.numel()))
    # Window ids change exactly at HF's cu_window_seqlens boundaries.
    boundaries = np.flatnonzero(np.diff(ours["window_ids"])) + 1
    np.testing.assert_array_equal(np.concatenate([[0], boundaries, [ours["window_ids"].size]]), cu.numpy())
    plain = vision_rotary_inputs(np.array(grid), settings, "qwen2_vl")
    assert set(plain) == {"patch_pos_ids"}
