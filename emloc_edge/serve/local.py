"""The in-process backend: one `EdgeModel`, each request on a worker thread (ONNX Runtime releases the GIL).

Generation runs token by token so a request stops at its deadline, and a stream that loses its client
is closed at the next token; `active` counts requests in flight (GET /health shows it)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from collections.abc import AsyncIterator, Iterator

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ..runtime.model import EdgeModel
from ..runtime.session import MemorySession
from .config import ServeConfig
from .errors import TimeoutError_
from .protocol import Completion, Query, StreamEnd, finish_reason
from .registry import MemoryRegistry


class LocalBackend:
    kind = "local"

    def __init__(self, config: ServeConfig, model: EdgeModel | None = None) -> None:
        self.config = config
        self.registry = MemoryRegistry(config.memories)
        self.model = model or EdgeModel.open(config.model_dir, provider=config.provider, threads=config.threads,
                                             memory_inputs=config.memory_inputs, cache_bytes=config.cache_bytes)
        self._active = 0
        self._lock = threading.Lock()

    # --- what the app calls ---------------------------------------------------------------------------
    async def complete(self, query: Query, session: MemorySession | None = None) -> Completion:
        """The answer; `session`: one already bound to the query's memory (else bound here, from the cache)."""
        with self._tracked():
            return await run_in_threadpool(self._complete, query, session)

    async def stream(self, query: Query, session: MemorySession | None = None) -> AsyncIterator[str | StreamEnd]:
        """Text pieces; the first is produced before this returns, so a bad request fails as an HTTP error
        rather than inside a started stream."""
        self._enter()
        try:
            pieces = self._pieces(query, session)
            first = await run_in_threadpool(next, pieces, None)
        except BaseException:
            self._leave()
            raise
        return self._rest(first, pieces)

    def health(self) -> dict:
        return {"status": "ok", "backend": self.kind, "model": self.model.folder.manifest["model_name"],
                "active_requests": self._active, "memories_bound": len(self.model.cache),
                "memory_cache_bytes": self.model.cache.nbytes}

    # --- work on the threads --------------------------------------------------------------------------
    def session(self, name: str) -> MemorySession:
        """A session on the memory called `name` (UnknownMemoryError, ModelMismatchError, MemoryFileError)."""
        return self.model.bind(self.registry.path(name))

    def _complete(self, query: Query, session: MemorySession | None) -> Completion:
        deadline = time.monotonic() + self.config.request_timeout_s
        session = session or self.session(query.name)
        inputs = session.query(query.image, query.question)
        ids: list[int] = []
        for token in session.tokens(inputs, query.max_tokens):
            ids.append(token)
            if time.monotonic() > deadline:
                raise TimeoutError_(f"request took over {self.config.request_timeout_s:g} s")
        prompt_tokens = int(inputs.embeds.shape[1])
        return Completion(session.text(ids), ids, prompt_tokens, finish_reason(len(ids), query.max_tokens))

    def _pieces(self, query: Query, session: MemorySession | None) -> Iterator[str | StreamEnd]:
        """The answer's text pieces (as MemorySession.stream), then a StreamEnd with the finish reason."""
        deadline = time.monotonic() + self.config.request_timeout_s
        session = session or self.session(query.name)
        inputs = session.query(query.image, query.question)
        generated: list[int] = []

        def tokens() -> Iterator[int]:
            for token in session.tokens(inputs, query.max_tokens):
                generated.append(token)
                yield token

        for piece in session.text_pieces(tokens()):
            yield piece
            if time.monotonic() > deadline:
                return
        yield StreamEnd(finish_reason(len(generated), query.max_tokens))

    async def _rest(self, first: str | StreamEnd | None,
                    pieces: Iterator[str | StreamEnd]) -> AsyncIterator[str | StreamEnd]:
        try:
            if first is None:
                return
            yield first
            async for piece in iterate_in_threadpool(pieces):
                yield piece
        finally:
            pieces.close()  # the client may be gone: drop the decode state now
            self._leave()

    # --- bookkeeping ----------------------------------------------------------------------------------
    def _enter(self) -> None:
        with self._lock:
            self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    @contextmanager
    def _tracked(self) -> Iterator[None]:
        self._enter()
        try:
            yield
        finally:
            self._leave()
