"""A query image -> its LM input embeddings and positions, one strategy per `image_preprocessing["processor"]`:

    qwen2_vl  preprocess (patches + grid) -> vision.onnx + grid inputs -> h·w/m² tokens, M-RoPE positions
    square    preprocess_square [3, S, S] -> vision.onnx [1, 3, S, S] -> T tokens, 1-D positions

Each strategy encodes one image and positions the query's tokens; `render_query` (query.py) expands the
query's one image slot to the features' token count and writes the features there.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import BadInputError
from .image import preprocess, preprocess_square
from .positions import mrope_positions, text_positions, vision_rotary_inputs

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage


class ImageStrategy(ABC):
    """How the compiler turned an image into LM inputs, redone with numpy and the vision graph."""

    processor: ClassVar[str]

    def __init__(self, settings: dict[str, Any], section: dict[str, Any], family: str) -> None:
        self.settings = settings  # image_preprocessing of the memory
        self.section = section  # the manifest's vision graph entry
        self.family = family

    @abstractmethod
    def encode(self, image: "_PILImage.Image", vision) -> tuple[np.ndarray, Any]:
        """(features [count, D] float32, what `positions` needs of this image) for one RGB image."""

    @abstractmethod
    def positions(self, ids: np.ndarray, image_token_id: int, info: Any, offset: int) -> np.ndarray:
        """[P, T] int64 absolute positions of the query `ids` (image slot expanded), after `offset`."""


class Qwen2VLImages(ImageStrategy):
    """Qwen2-VL / Qwen2.5-VL: any size, h·w/m² tokens, M-RoPE (an image advances positions by max(h, w))."""

    processor = "qwen2_vl"

    def encode(self, image, vision):
        pixels, grid = preprocess(image, self.settings)
        extra = vision_rotary_inputs(grid, self.section, self.family)  # merge, patch and window sizes of the tower
        features = vision.run(None, {"pixel_values": pixels, **extra})[0]  # [h·w/m², D]
        return features, grid

    def positions(self, ids, image_token_id, info, offset):
        return mrope_positions(ids, image_token_id, [info], int(self.settings["merge_size"]), offset)  # [3, T]


class SquareImages(ImageStrategy):
    """Fixed-resolution encoders (the tiny VLM): S x S pixels, T tokens per image, plain 1-D positions."""

    processor = "square"

    def encode(self, image, vision):
        pixels = preprocess_square(image, self.settings)  # [3, S, S]
        features = vision.run(None, {"pixel_values": pixels[None]})[0][0]  # [T, D]
        expected = int(self.section["image_tokens"])
        if features.shape[0] != expected:
            raise BadInputError(f"vision graph gave {features.shape[0]} image tokens, the manifest says {expected}")
        return features, None

    def positions(self, ids, image_token_id, info, offset):
        return text_positions(len(ids), offset)  # [1, T]


STRATEGIES: dict[str, type[ImageStrategy]] = {cls.processor: cls for cls in (Qwen2VLImages, SquareImages)}


def image_strategy(settings: dict[str, Any], section: dict[str, Any], family: str) -> ImageStrategy:
    """The strategy named by `settings["processor"]`; one-line error for a processor this runtime lacks."""
    name = settings.get("processor")
    if name not in STRATEGIES:
        known = ", ".join(STRATEGIES)
        raise BadInputError(f"image processor {name!r} is not supported by this runtime (known: {known})")
    return STRATEGIES[name](settings, section, family)
