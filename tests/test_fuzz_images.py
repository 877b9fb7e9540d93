"""Property/fuzz test of the one image reader (compile and run share it): crafted image files give an RGB image
or one BadInputError line, and no warning (Pillow's "Corrupt EXIF data" and the like) ever escapes.

Family IMAGES (cases per run = IMAGE_EXAMPLES): PNG/JPEG/TIFF/WEBP/GIF/BMP files, with random or mangled EXIF,
then bytes flipped, cut or appended.
"""
from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from emloc_edge.errors import BadInputError
from emloc_edge.runtime.image import load_image

IMAGE_EXAMPLES = 300
FORMATS = ["PNG", "JPEG", "TIFF", "WEBP", "GIF", "BMP"]


def _exif(orientation: int | None, junk: bytes) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    exif[0x010F] = "a camera maker with a long name"  # a tag stored out of line: cutting it makes a short read
    return exif.tobytes() + junk


@st.composite
def crafted_images(draw) -> bytes:
    fmt = draw(st.sampled_from(FORMATS))
    size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
    im = Image.new(mode, size, draw(st.integers(0, 255)))
    buf = io.BytesIO()
    kwargs = {}
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF") and draw(st.booleans()):
        exif = draw(st.sampled_from(["valid", "junk", "cut", "cut"]))
        raw = _exif(draw(st.none() | st.integers(0, 12)), b"")
        kwargs["exif"] = {"valid": raw, "junk": b"Exif\x00\x00" + draw(st.binary(max_size=64)),
                          "cut": raw[: len(raw) - draw(st.integers(1, len(raw)))]}[exif]
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        im = im.convert("RGB")
    try:
        with warnings.catch_warnings():  # writing mangled EXIF warns too: only the reader is under test
            warnings.simplefilter("ignore")
            im.save(buf, fmt, **kwargs)
    except Exception:  # Pillow refuses to write some combinations (e.g. junk EXIF into a TIFF)
        im.save(buf, fmt)
    data = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "append"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            data = data[:i]
        else:
            data += draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


@settings(max_examples=IMAGE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=crafted_images(), ext=st.sampled_from([".png", ".jpg", ".tif", ".webp", ".gif", ".bmp"]))
def test_crafted_images_load_or_are_one_line_and_never_warn(data, ext):
    with tempfile.TemporaryDirectory(prefix="fuzzimg") as tmp:
        path = Path(tmp) / f"x{ext}"
        path.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                image = load_image(path)
            except BadInputError as e:
                assert str(e).startswith(f"{path}: ") and len(str(e).splitlines()) == 1, str(e)
            else:
                assert image.mode == "RGB" and image.width > 0 and image.height > 0
                image.close()
        assert caught == [], [str(w.message) for w in caught]


def test_corrupt_exif_warning_never_reaches_stderr(tmp_path):
    """The instance the issue lists: EXIF cut short makes Pillow warn ("Truncated File Read", "Corrupt EXIF data")."""
    raw = _exif(6, b"")
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, "WEBP", exif=raw[:-1])
    path = tmp_path / "exif.webp"
    path.write_bytes(buf.getvalue())
    code = ("import sys; from emloc_edge.runtime.image import load_image\n"
            "try:\n    load_image(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__)")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code, str(path)], capture_output=True, text=True,
                         cwd=tmp_path)  # not the checkout: `-c` puts the cwd first on sys.path
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout in ("", "BadInputError\n")


STDERR_CORPUS = 200  # seeded mutated files read in one fresh interpreter (no pytest log handlers there)


def test_pillow_logs_and_warnings_never_reach_stderr(tmp_path):
    """Pillow also logs (e.g. TIFF "More samples per pixel"); with no handler, Python prints that on stderr."""
    import numpy as np

    rng = np.random.default_rng(0)
    for k in range(STDERR_CORPUS):
        fmt = FORMATS[k % len(FORMATS)]
        buf = io.BytesIO()
        Image.new("RGB", (int(rng.integers(1, 16)), int(rng.integers(1, 16))), (k % 256, 3, 4)).save(buf, fmt)
        data = bytearray(buf.getvalue())
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        (tmp_path / f"{k}.{fmt.lower()}").write_bytes(bytes(data))
    code = ("import sys, pathlib; from emloc_edge.errors import BadInputError\n"
            "from emloc_edge.runtime.image import load_image\n"
            "for p in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n"
            "    try:\n        load_image(p)\n    except BadInputError:\n        pass\n")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr[:2000]
