"""The OpenAI chat-completions wire format: requests parsed into a `Query`, answers into response bodies.

A memory *is* the conversation so far, so a request is one query: the last user message (its text parts
joined, at most one image). System messages and earlier turns are not used; decoding is greedy, so
sampling options (temperature, top_p, ...) are accepted and ignored."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadInputError
from .config import ServeConfig
from .images import decode_data_url


class _ImageURL(BaseModel):
    url: str
    detail: str | None = None


class _Part(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[_Part] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # sampling options and the like: ignored
    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


@dataclass(frozen=True)
class Query:
    """One request, checked: what a backend needs to answer it."""
    name: str  # the memory (file stem)
    question: str | None
    image: Any  # an RGB PIL image or None
    max_tokens: int
    stream: bool
    request_id: str


def parse_request(data: object, config: ServeConfig, request_id: str) -> Query:
    """A checked Query, or BadInputError (400) / PayloadTooLargeError (413) / UnsupportedMediaError (415)."""
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise BadInputError(f"{where}: {first['msg']}") from None
    limit = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
    if limit > config.max_tokens:
        raise BadInputError(f"max_tokens: {limit} is over this server's limit of {config.max_tokens}")
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise BadInputError("messages: no user message to answer")
    texts, images = _parts(users[-1].content)
    if len(images) > 1:
        raise BadInputError(f"messages: {len(images)} images in the user message; a query takes at most one")
    image = decode_data_url(images[0], config.max_image_pixels) if images else None
    question = "\n".join(texts) or None
    if image is None and not question:
        raise BadInputError("messages: the user message has neither text nor an image")
    return Query(req.model, question, image, limit, req.stream, request_id)


def _parts(content: str | list[_Part] | None) -> tuple[list[str], list[str]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    texts = [p.text for p in content if p.type == "text" and p.text]
    images = []
    for p in content:
        if p.type == "image_url":
            if p.image_url is None:
                raise BadInputError("messages: an image_url part without image_url.url")
            images.append(p.image_url.url)
    return texts, images


# --- responses ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a backend's stream of text pieces: why generation stopped."""

    finish_reason: str  # "stop" | "length"


def finish_reason(generated: int, max_tokens: int) -> str:
    """"length" when generation was cut at max_tokens, else "stop" (an end-of-turn token)."""
    return "length" if generated >= max_tokens else "stop"


def completion_body(query: Query, done: Completion) -> dict:
    return {
        "id": f"chatcmpl-{query.request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": query.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "finish_reason": done.finish_reason, "logprobs": None, "token_ids": done.token_ids}],
        "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.token_ids),
                  "total_tokens": done.prompt_tokens + len(done.token_ids)},
    }


def chunk_body(query: Query, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": f"chatcmpl-{query.request_id}", "object": "chat.completion.chunk", "created": created,
            "model": query.name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                               "logprobs": None}]}
