"""Helpers of the serving tests: request bodies, data URLs, SSE parsing, the EdgeSession reference."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx

from emloc_edge.runtime.session import EdgeSession


def data_url(path: Path, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def body(name: str, question: str | None, image: Path | None = None, max_tokens: int = 6, stream: bool = False) -> dict:
    parts = [{"type": "text", "text": question}] if question else []
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    content = parts if image is not None else question
    return {"model": name, "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream}


def sse_pieces(response: httpx.Response) -> tuple[list[str], list[dict]]:
    """(content pieces, chunk objects) of an SSE stream; checks the framing and the final [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return [c["choices"][0]["delta"].get("content", "") for c in chunks], chunks


def _sessions(task, max_tokens: int) -> dict:
    return {name: EdgeSession(task.model, task.memories / f"{name}.emloc", provider="cpu", max_new_tokens=max_tokens)
            for name in task.names}


def reference(task, max_tokens: int) -> dict:
    """EdgeSession's answer to each of the task's queries: {(name, image, question): Answer}."""
    sessions = _sessions(task, max_tokens)
    return {q: sessions[q[0]].answer(q[1], q[2]) for q in task.queries}


def streamed_reference(task, max_tokens: int) -> dict:
    """EdgeSession.stream's text of each query, pieces joined: {(name, image, question): str}."""
    sessions = _sessions(task, max_tokens)
    return {q: "".join(sessions[q[0]].stream(q[1], q[2])) for q in task.queries}
