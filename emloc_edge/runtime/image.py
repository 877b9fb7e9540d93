"""Image loading and Qwen2-VL pixel preprocessing for the torch-free runtime (numpy + Pillow only).

`preprocess` reproduces `transformers`' `Qwen2VLImageProcessorPil` (5.x) step for step, configured by
the settings dict the compiler stores in the task memory (`Qwen2VLAdapter.image_preprocessing()`):

    RGB (alpha composited on white) -> smart_resize to a multiple of patch*merge -> PIL resize
    -> x * rescale_factor (float64, then float32) -> (x - mean) / std (float32)
    -> patches in merge-window order, each frame repeated temporal_patch_size times

`load_image` is the one file reader shared by the compiler (`compile/demos.open_image`), the model
adapters and the runtime, so both sides see identical pixels for the same file.
"""
from __future__ import annotations

import logging
import math
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emloc_edge.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage

__all__ = ["MAX_IMAGE_PIXELS", "load_image", "to_rgb", "smart_resize", "preprocess", "preprocess_square"]

# Pillow also *logs* some problems (e.g. TIFF "More samples per pixel than can be decoded"); with no handler
# configured, Python's last-resort handler would print them on a user's stderr next to our one-line error.
logging.getLogger("PIL").addHandler(logging.NullHandler())

#: Largest image (width * height) accepted; larger files are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default warning threshold (~ 0.25 GiB at 3 bytes/pixel)
#: smart_resize refuses images more elongated than this (the HF processor raises at the same bound).
MAX_ASPECT_RATIO = 200


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------- loading
def to_rgb(image: "_PILImage.Image") -> "_PILImage.Image":
    """RGB copy of ``image``; transparency is composited onto white, as the HF processor does."""
    from PIL import Image

    # Same rule as transformers.image_transforms.convert_to_rgb: an alpha band or a palette/colour-key
    # transparency means "composite on white", not "drop alpha" (which would expose hidden RGB values).
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | Path, max_pixels: int | None = None) -> "_PILImage.Image":
    """Open ``path`` as a fully decoded RGB image with its EXIF orientation applied.

    Raises :class:`BadInputError` (one line, naming the file) if the file is missing, not a regular file,
    unreadable, not an image, truncated/corrupt, or larger than ``max_pixels`` (default
    :data:`MAX_IMAGE_PIXELS`) pixels (decompression-bomb guard; Pillow's own warning/error becomes this error).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    path = Path(path)
    where = str(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        raise BadInputError(f"{where[:300]}: unusable image path ({_one_line(getattr(e, 'strerror', None) or e)})") from None
    if not exists:
        raise BadInputError(f"{where}: image file not found")
    if not is_file:
        raise BadInputError(f"{where}: image path is not a file")
    try:
        with warnings.catch_warnings():
            # Pillow's other warnings (e.g. "Corrupt EXIF data") must not reach a user's stderr: the image
            # either decodes (and is used) or fails (and is refused). It warns DecompressionBombWarning
            # between its limit and 2x, errors above: both are an error here, and our own limit is checked
            # explicitly from the header size before decoding.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w <= 0 or h <= 0:
                    raise BadInputError(f"{where}: image has an empty size ({w}x{h})")
                if w * h > limit:
                    raise BadInputError(
                        f"{where}: image too large ({w}x{h} = {w * h} pixels > {limit}; "
                        "possible decompression bomb)"
                    )
                im.load()  # decode fully now so truncation is detected here, not later
                im = ImageOps.exif_transpose(im)
                rgb = to_rgb(im)
                rgb.load()
    except BadInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInputError(f"{where}: image too large (possible decompression bomb: {_one_line(e)})") from None
    except UnidentifiedImageError:
        raise BadInputError(f"{where}: not an image (Pillow cannot identify the format)") from None
    except PermissionError:
        raise BadInputError(f"{where}: image file is not readable (permission denied)") from None
    except OSError as e:
        # Pillow reports truncated / corrupt data as OSError ("image file is truncated", "broken data stream").
        raise BadInputError(f"{where}: image is truncated or corrupt ({_one_line(e)})") from None
    except (ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError, ZeroDivisionError,
            OverflowError, RecursionError, MemoryError) as e:  # what some plugins raise on malformed headers
        raise BadInputError(f"{where}: image is corrupt ({_one_line(e) or type(e).__name__})") from None
    return rgb


# ----------------------------------------------------------------------------------- preprocessing
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) divisible by ``factor``, area within [min_pixels, max_pixels], aspect ratio kept.

    Same arithmetic as transformers' `smart_resize` (Python `round`, i.e. round-half-to-even, included).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadInputError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_ASPECT_RATIO} "
            f"({width}x{height}); crop or pad it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _patchify(image: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """[C, H, W] -> [gh*gw, C*temporal*patch*patch], rows in merge-window order.

    The m x m patches that the vision tower's merger fuses into one LLM token are consecutive rows,
    windows in raster order; within a row the layout is (C, temporal, ph, pw) as the Conv3d expects.
    """
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    x = image.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, ph, pw]
    # A still image is one frame; the tower's temporal kernel sees it repeated `temporal` times.
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))  # [.., C, T, ph, pw]
    return x.reshape(gh * gw, c * temporal * patch * patch)


def preprocess(image: "_PILImage.Image | str | Path", settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels for one image, exactly as `Qwen2VLImageProcessorPil` configured by ``settings`` gives them.

    ``image``: a PIL image (used as is: no EXIF transpose) or a path (read with :func:`load_image`).
    ``settings``: `Qwen2VLAdapter.image_preprocessing()` (min_pixels, max_pixels, patch_size,
    temporal_patch_size, merge_size, image_mean, image_std, rescale_factor, resample).

    Returns ``(pixel_values [gh*gw, C*T*P*P] float32, grid_thw [3] int64 = [1, gh, gw])``.
    """
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            return preprocess(load_image(image), settings)
        except BadInputError as e:  # name the file in errors found after loading (aspect ratio)
            msg = str(e)
            raise BadInputError(msg if msg.startswith(f"{image}: ") else f"{image}: {msg}") from None
    patch, merge = int(settings["patch_size"]), int(settings["merge_size"])
    temporal = int(settings["temporal_patch_size"])
    rgb = to_rgb(image)
    height, width = rgb.height, rgb.width
    new_h, new_w = smart_resize(
        height, width, factor=patch * merge,
        min_pixels=int(settings["min_pixels"]), max_pixels=int(settings["max_pixels"]),
    )
    # HF resizes even when the size is unchanged; PIL's resize to the same size is then an exact copy.
    resized = rgb.resize((new_w, new_h), resample=Image.Resampling(int(settings["resample"])), reducing_gap=None)
    # Rescale in float64 then cast, like transformers' `rescale`; normalize in float32 like its `normalize`.
    x = (np.asarray(resized, dtype=np.float64) * float(settings["rescale_factor"])).astype(np.float32)  # [H, W, C]
    mean = np.asarray(settings["image_mean"], dtype=np.float32)
    std = np.asarray(settings["image_std"], dtype=np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # [C, H, W]
    pixels = np.ascontiguousarray(_patchify(x, patch, merge, temporal), dtype=np.float32)
    grid = np.array([1, new_h // patch, new_w // patch], dtype=np.int64)
    return pixels, grid


def preprocess_square(image: "_PILImage.Image | str | Path", settings: dict[str, Any]) -> np.ndarray:
    """Pixels [3, S, S] float32 for fixed-resolution encoders (the default tiny VLM): RGB, resized to
    S x S (aspect ratio not kept), scaled to [0, 1], normalised with ``image_mean`` / ``image_std``.

    ``settings``: ``image_size``, ``image_mean``, ``image_std``, ``resample`` (a PIL resampling id).
    The compiler and the runtime both call this, so pixels are identical on both sides.
    """
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = load_image(image)
    size = int(settings["image_size"])
    resized = to_rgb(image).resize((size, size), resample=Image.Resampling(int(settings["resample"])))
    x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # [S, S, 3]
    mean = np.asarray(settings["image_mean"], dtype=np.float32)
    std = np.asarray(settings["image_std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))  # [3, S, S]
