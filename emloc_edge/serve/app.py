"""The HTTP API (FastAPI), the same over any backend (local.py in-process, ray_app.py on Ray Serve):

    POST /v1/chat/completions   OpenAI chat completions; `model` = a memory's name; stream: true -> SSE
    GET  /v1/models             the memories, each with its `inspect` summary
    GET  /health                status, in-flight requests, bound memories

Every response carries `x-request-id` (the client's, or a new one) and every request is logged with it."""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadInputError, EmlocError
from .config import ServeConfig
from .errors import APIError, AuthError, PayloadTooLargeError, UnsupportedMediaError, api_error
from .protocol import Completion, Query, StreamEnd, chunk_body, completion_body, parse_request
from .registry import MemoryRegistry

log = logging.getLogger("emloc_edge.serve")


class Backend(Protocol):
    kind: str
    registry: MemoryRegistry

    async def complete(self, query: Query) -> Completion: ...
    async def stream(self, query: Query): ...  # -> AsyncIterator[str | StreamEnd], first piece already made
    def health(self) -> dict: ...


def create_app(backend: Backend, config: ServeConfig) -> FastAPI:
    app = FastAPI(title="emloc-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.add_middleware(RequestLog)
    hide = f"{config.memories}/"  # clients see memory names, not the server's paths

    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        err = api_error(exc)
        if err.status >= 500:
            log.error("%s %s: %s", _rid(request), type(exc).__name__, exc)
        err.message = err.message.replace(hide, "")
        return JSONResponse(err.body(), status_code=err.status)

    for kind in (EmlocError, APIError, Exception):  # Exception: the 500 of anything unexpected
        app.add_exception_handler(kind, any_error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return backend.health()

    @app.get("/v1/models")
    def models(request: Request) -> dict:  # sync: reading summaries is file I/O, FastAPI runs it on a thread
        _check_key(request, config)
        data = []
        for name in backend.registry.names():
            summary = backend.registry.summary(name)
            data.append({"id": name, "object": "model", "created": _created(backend.registry, name),
                         "owned_by": "emloc-edge", "summary": summary})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        _check_key(request, config)
        data = await _json_body(request, config)
        query = await run_in_threadpool(parse_request, data, config, _rid(request))  # image decoding is CPU work
        backend.registry.path(query.name)  # 404 before any work
        if not query.stream:
            return completion_body(query, await backend.complete(query))
        pieces = await backend.stream(query)
        return StreamingResponse(_sse(query, pieces), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    return app


async def _sse(query: Query, pieces):
    created = int(time.time())
    yield _event(chunk_body(query, created, {"role": "assistant", "content": ""}))
    finish = "stop"
    async for piece in pieces:
        if isinstance(piece, StreamEnd):
            finish = piece.finish_reason
        elif piece:
            yield _event(chunk_body(query, created, {"content": piece}))
    yield _event(chunk_body(query, created, {}, finish))
    yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _json_body(request: Request, config: ServeConfig) -> object:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise UnsupportedMediaError(f"content-type {kind or '(none)'!r}: send application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
        raise PayloadTooLargeError(f"request body of {declared} bytes is over the limit of {config.max_body_bytes}")
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies have no length: count while reading
        body += chunk
        if len(body) > config.max_body_bytes:
            raise PayloadTooLargeError(f"request body is over the limit of {config.max_body_bytes} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"body: not valid JSON ({e})") from None


def _check_key(request: Request, config: ServeConfig) -> None:
    if config.api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not token:
        raise AuthError("missing API key: send `Authorization: Bearer <key>`")
    if not hmac.compare_digest(token.encode(), config.api_key.encode()):
        raise AuthError("wrong API key")


def _created(registry: MemoryRegistry, name: str) -> int:
    try:
        return int(registry.path(name).stat().st_mtime)
    except (OSError, EmlocError):  # removed between listing and stat
        return 0


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


class RequestLog:
    """ASGI middleware: a request id per request (the client's `x-request-id`, or a new one), echoed in
    the response headers, and one log line per request: id, method, path, status, milliseconds."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if given and len(given) <= 64 and given.isprintable() else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        start, status = time.perf_counter(), [0]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %s %d %.1fms", rid, scope["method"], scope["path"], status[0],
                     1000 * (time.perf_counter() - start))
