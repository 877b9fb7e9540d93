"""The HTTP API against EdgeSession: same tokens for text and vision memories, SSE, the openai client, many
concurrent requests over several memories, a client leaving mid-stream. Real uvicorn on 127.0.0.1."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from emloc_edge.runtime.session import MemorySession
from emloc_edge.serve.config import ServeConfig
from emloc_edge.serve.server import build_app
from serve_client import body, data_url, reference, sse_pieces, streamed_reference

MAX = 6


@pytest.fixture(scope="module", params=["text", "vision"])
def served(request, live_server):
    task = request.getfixturevalue(f"{request.param}_task")
    config = ServeConfig(str(task.model), str(task.memories), max_tokens=64, default_max_tokens=MAX)
    app = build_app(config)
    return task, live_server(app), app


def test_answers_equal_edge_session_token_for_token(served):
    task, url, _ = served
    want = reference(task, MAX)
    with httpx.Client(base_url=url, timeout=60) as client:
        for (name, image, question), answer in want.items():
            r = client.post("/v1/chat/completions", json=body(name, question, image, MAX))
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["token_ids"] == answer.token_ids, (name, image, question)
            assert choice["message"] == {"role": "assistant", "content": answer.text}
            assert r.json()["usage"]["completion_tokens"] == len(answer.token_ids)
            assert r.headers["x-request-id"]
    assert any(a.token_ids for a in want.values()), "random models answering nothing would make this vacuous"


def test_sse_reassembles_to_the_answer(served):
    """SSE pieces join to EdgeSession.stream's text (the answer's text, up to surrounding whitespace; where
    a random model ends on half a UTF-8 character, stream() decides what is shown)."""
    task, url, _ = served
    want = streamed_reference(task, MAX)
    with httpx.Client(base_url=url, timeout=60) as client:
        for (name, image, question), text in want.items():
            with client.stream("POST", "/v1/chat/completions", json=body(name, question, image, MAX, stream=True)) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                pieces, chunks = sse_pieces(r)
            assert "".join(pieces) == text
            assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["model"] == name


def test_streamed_finish_reason_is_the_completions(served):
    """A stream ends with the finish reason the plain completion reports: "length" when cut at max_tokens."""
    task, url, _ = served
    seen = set()
    with httpx.Client(base_url=url, timeout=60) as client:
        for max_tokens in (1, MAX):
            for name, image, question in task.queries:
                plain = client.post("/v1/chat/completions", json=body(name, question, image, max_tokens)).json()
                with client.stream("POST", "/v1/chat/completions",
                                   json=body(name, question, image, max_tokens, stream=True)) as r:
                    _, chunks = sse_pieces(r)
                reason = plain["choices"][0]["finish_reason"]
                assert chunks[-1]["choices"][0]["finish_reason"] == reason, (name, question, max_tokens)
                assert reason == ("length" if len(plain["choices"][0]["token_ids"]) >= max_tokens else "stop")
                seen.add(reason)
    assert "length" in seen, "a cut answer must occur, or this test checks nothing"


def test_openai_client_works_unchanged(served):
    from openai import OpenAI

    task, url, _ = served
    name, image, question = task.queries[0]
    answer = reference(task, MAX)[task.queries[0]]
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    got = client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}], max_tokens=MAX)
    assert got.choices[0].message.content == answer.text
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}],
                                            max_tokens=MAX, stream=True)
    text = streamed_reference(task, MAX)[task.queries[0]]
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert {m.id for m in client.models.list()} == set(task.names)


def test_32_concurrent_requests_over_3_memories(served):
    """Each answer equals its sequential answer (no cross-talk between memories or requests); no errors."""
    task, url, _ = served
    want = reference(task, MAX)
    queries = [q for q in task.queries if q[0] in task.names[:3]]
    jobs = [(queries[i % len(queries)], i % 3 == 0) for i in range(32)]  # a third streamed

    def run(job):
        (name, image, question), stream = job
        with httpx.Client(base_url=url, timeout=120) as client:
            if not stream:
                r = client.post("/v1/chat/completions", json=body(name, question, image, MAX))
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]
            with client.stream("POST", "/v1/chat/completions", json=body(name, question, image, MAX, True)) as r:
                assert r.status_code == 200
                return "".join(sse_pieces(r)[0])

    streamed = streamed_reference(task, MAX)
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, jobs))
    assert got == [streamed[q] if stream else want[q].text for q, stream in jobs]
    assert len({q[0] for q, _ in jobs}) == 3


def test_client_leaving_mid_stream_leaks_nothing(served, monkeypatch):
    """Decoding is slowed so the stream is surely unfinished when the client goes; the server then stops
    decoding that request (no further steps), its in-flight count returns to 0, and it keeps serving."""
    task, url, app = served
    steps = []
    step = MemorySession._step

    def slow_step(self, *args):
        steps.append(time.monotonic())
        time.sleep(0.05)
        return step(self, *args)

    monkeypatch.setattr(MemorySession, "_step", slow_step)
    init = MemorySession.__init__

    def init_without_stop(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.stop_ids = frozenset()

    monkeypatch.setattr(MemorySession, "__init__", init_without_stop)
    name, image, question = task.queries[0]
    # no stop token: 60 tokens take >= 3 s, far longer than the test waits
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body(name, question, image, 60, stream=True)) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert client.get("/health").json()["active_requests"] == 1
        left = time.monotonic()
        deadline = left + 5
        while client.get("/health").json()["active_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["active_requests"] == 0
        count = len(steps)
        time.sleep(0.3)
        assert len(steps) == count < 60, "decoding went on after the client left"
        monkeypatch.undo()
        assert client.post("/v1/chat/completions", json=body(name, question, image, MAX)).status_code == 200


def test_graceful_shutdown_finishes_in_flight_requests(text_task, monkeypatch):
    """Stopping the server (what SIGTERM does) lets a request already decoding finish with all its tokens."""
    import threading

    from conftest import LiveServer

    step = MemorySession._step
    monkeypatch.setattr(MemorySession, "_step", lambda self, *a: (time.sleep(0.05), step(self, *a))[1])
    init = MemorySession.__init__

    def init_without_stop(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.stop_ids = frozenset()

    monkeypatch.setattr(MemorySession, "__init__", init_without_stop)
    server = LiveServer(build_app(ServeConfig(str(text_task.model), str(text_task.memories))))
    got = {}

    def ask():
        got["r"] = httpx.post(f"{server.url}/v1/chat/completions", json=body("full", "which bin?", None, 20), timeout=60)

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").json()["active_requests"] == 0:  # decoding has begun (>= 1 s)
        assert time.monotonic() < deadline and thread.is_alive(), got
        time.sleep(0.02)
    server.stop()
    thread.join(60)
    assert got["r"].status_code == 200 and got["r"].json()["usage"]["completion_tokens"] == 20
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
