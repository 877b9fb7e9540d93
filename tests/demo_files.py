"""Files for the demos tests: images (incl. EXIF and decompression bombs), JSONL, one-line error checks."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from emloc_edge.errors import BadInputError


# ------------------------------------------------------------------------------------------- helpers
def make_image(path: Path, size=(8, 6), color=(200, 30, 30), fmt=None, exif_orientation=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    im.save(path, format=fmt, **kwargs)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, width=30000, height=30000) -> Path:
    """A tiny file whose header claims a huge 1-bit image (900 Mpx): a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))
    return path


def raises_one_line(match: str, func, *args, **kwargs) -> str:
    with pytest.raises(BadInputError) as ei:
        func(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert "Traceback" not in msg
    assert match in msg, f"{match!r} not in {msg!r}"
    return msg
