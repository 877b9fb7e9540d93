"""Opening demonstration images: RGB conversion, EXIF rotation, decompression-bomb guard, missing/empty files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from emloc_edge.compile import demos as demos_mod
from emloc_edge.compile.demos import load_demos, open_image
from emloc_edge.errors import BadInputError, EmlocError


from demo_files import bomb_png, make_image, raises_one_line, write_jsonl  # noqa: E402

# ------------------------------------------------------------------------------------- open_image
def test_open_image_returns_rgb(tmp_path):
    p = tmp_path / "gray.png"
    Image.new("L", (5, 4), 128).save(p)
    im = open_image(p)
    assert im.mode == "RGB" and im.size == (5, 4)


def test_open_image_palette_with_alpha(tmp_path):
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 3), (1, 2, 3, 0)).save(p)
    assert open_image(p).mode == "RGB"


def test_exif_rotation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    # 40 wide x 20 high, left half red, right half blue; EXIF orientation 6 = "rotate 90 CW to display"
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(p, format="JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(p) as raw:
        assert raw.size == (40, 20)  # stored un-rotated
    out = open_image(p)
    assert out.size == (20, 40)
    # after a 90 degree clockwise rotation the red (left) half is on top
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_exif_rotation_via_load_demos(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "r.jpg", size=(30, 10), fmt="JPEG", exif_orientation=8)
    write_jsonl(d / "demos.jsonl", [{"image": "r.jpg", "question": "q", "answer": "a"}])
    (demo,) = load_demos(d)
    assert open_image(demo.image).size == (10, 30)


def test_decompression_bomb_rejected(tmp_path, recwarn):
    p = bomb_png(tmp_path / "bomb.png")
    assert p.stat().st_size < 2000
    msg = raises_one_line("decompression bomb", open_image, p)
    assert str(p) in msg and "too large" in msg
    assert not [w for w in recwarn.list if issubclass(w.category, Image.DecompressionBombWarning)]


def test_bomb_between_limit_and_pillow_error_threshold(tmp_path, recwarn):
    # 10000 x 10000 = 1e8 px: above our limit, below 2x Pillow's (where Pillow only *warns*)
    p = bomb_png(tmp_path / "warnbomb.png", 10000, 10000)
    raises_one_line("decompression bomb", open_image, p)
    assert not [w for w in recwarn.list if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    p = make_image(tmp_path / "small.png", size=(20, 20))
    assert open_image(p).size == (20, 20)
    monkeypatch.setattr(demos_mod, "MAX_IMAGE_PIXELS", 399)
    raises_one_line("too large (20x20 = 400 pixels > 399", open_image, p)


def test_bomb_in_demos_folder(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "cat" / "ok.png")
    (d / "dog").mkdir()
    bomb_png(d / "dog" / "big.png")
    msg = raises_one_line("decompression bomb", load_demos, d, question="q")
    assert "big.png" in msg


def test_open_image_missing(tmp_path):
    raises_one_line("not found", open_image, tmp_path / "none.png")


def test_open_image_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    raises_one_line("not an image", open_image, p)


def test_errors_are_emloc_errors():
    assert issubclass(BadInputError, EmlocError) and issubclass(BadInputError, ValueError)


def test_module_does_not_import_torch():
    code = "import sys, emloc_edge.compile.demos; sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_examples_warehouse_text_loads():
    root = Path(__file__).resolve().parents[1] / "examples" / "warehouse-text"
    if not (root / "demos.jsonl").exists():
        pytest.skip("examples/warehouse-text not present")
    out = load_demos(root, needs_images=False)
    assert len(out) >= 48 and all(d.image is None for d in out)
