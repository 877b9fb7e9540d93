"""Render a query exactly as the compiler would have: template pieces from the memory file, tokens
from tokenizer.json, image tokens from the vision graph (`session.image_inputs`, the strategy of the memory's
image processor, see image_inputs.py), (M-)RoPE positions after the memory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from ..errors import BadInputError
from .image import load_image
from .model_folder import is_unicode
from .positions import mrope_positions, text_positions

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage

ImageInput = Union[str, Path, "_PILImage.Image", None]  # a file, or an already decoded RGB image


@dataclass
class QueryInputs:
    embeds: np.ndarray  # [1, T, D] float32
    positions: np.ndarray  # [P, T] int64, absolute (P = 3 for M-RoPE, else 1)


def render_query(session, image: ImageInput, question: str | None) -> QueryInputs:
    meta = session.memory.meta
    template = meta.template
    if image is not None and template.get("query_image") is None:
        raise BadInputError(f"{image}: {meta.model_name} is a text-only model; ask a question without an image")
    if image is None and not question:
        raise BadInputError("nothing to ask: give an image or a question")
    if image is not None and not question:  # the question every demonstration asked, if they shared one
        question = template.get("default_question")
    if question and not is_unicode(question):
        raise BadInputError("question is not valid Unicode (it holds a lone surrogate)", parameters="question")
    prefix, suffix = template["query_image"] if image is not None else template["query_text"]
    ids = session.tokenizer.encode(prefix + (question or "") + suffix, add_special_tokens=False).ids
    ids = np.asarray(ids, dtype=np.int64)
    if image is None:
        embeds = np.asarray(session.embed_tokens[ids], dtype=np.float32)  # [T, D]
        positions = text_positions(len(ids), meta.position_offset) if meta.position_dims == 1 else (
            mrope_positions(ids, -1, [], 1, meta.position_offset))
        return QueryInputs(embeds[None], positions)

    image_token_id = session.tokenizer.token_to_id(meta.image_preprocessing["image_token"])
    slots = np.flatnonzero(ids == image_token_id)
    if len(slots) != 1:
        raise BadInputError(f"{image}: the query template has {len(slots)} image slots, expected one")
    features, info = session.image_inputs.encode(_opened(image), session.vision)  # [count, D]
    slot, count = int(slots[0]), len(features)
    ids = np.concatenate([ids[:slot], np.full(count, image_token_id, np.int64), ids[slot + 1 :]])  # one slot per image token
    embeds = np.asarray(session.embed_tokens[ids], dtype=np.float32)  # [T, D]
    embeds[slot : slot + count] = features  # [count, D]
    positions = session.image_inputs.positions(ids, image_token_id, info, meta.position_offset)  # [P, T]
    return QueryInputs(embeds[None], positions)


def _opened(image: ImageInput) -> "_PILImage.Image":
    return load_image(Path(image)) if isinstance(image, (str, Path)) else image
