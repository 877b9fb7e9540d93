"""`data:` image URLs -> RGB images, decoded exactly as `runtime.image.load_image` decodes a file (full decode,
EXIF orientation, alpha on white), so an image sent over HTTP gives the same pixels as the same file."""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import TYPE_CHECKING

from ..errors import BadInputError
from ..runtime.image import to_rgb
from .errors import PayloadTooLargeError, UnsupportedMediaError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage

MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp", "image/tiff")


def decode_data_url(url: str, max_pixels: int) -> "_PILImage.Image":
    """The RGB image in a `data:image/...;base64,...` URL; the server fetches no other URL."""
    if not url.startswith("data:"):
        raise BadInputError("image_url: only data: URLs with base64 image bytes are accepted (the server fetches nothing)")
    header, comma, payload = url[5:].partition(",")
    media, *params = header.split(";")
    if not comma or "base64" not in params:
        raise BadInputError("image_url: a data: URL must be `data:<image type>;base64,<bytes>`")
    if media.lower() not in MEDIA_TYPES:
        raise UnsupportedMediaError(f"image_url: unsupported media type {media or '(none)'!r} "
                                    f"(accepted: {', '.join(MEDIA_TYPES)})")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError("image_url: the data: URL is not valid base64") from None
    return _decode(raw, max_pixels)


def _decode(raw: bytes, max_pixels: int) -> "_PILImage.Image":
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise PayloadTooLargeError(f"image_url: image too large ({w}x{h} = {w * h} pixels > {max_pixels})")
                if w <= 0 or h <= 0:
                    raise BadInputError(f"image_url: image has an empty size ({w}x{h})")
                im.load()  # decode fully now so truncation is detected here
                rgb = to_rgb(ImageOps.exif_transpose(im))
                rgb.load()
    except BadInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError("image_url: image too large (possible decompression bomb)") from None
    except Exception as e:  # noqa: BLE001 - Pillow reports bad data with many exception types
        raise BadInputError(f"image_url: not a decodable image ({type(e).__name__})") from None
    return rgb
