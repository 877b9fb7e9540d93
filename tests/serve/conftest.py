"""Fixtures of the serving tests: tiny random models exported once, memories folders, live servers.

- ``text_task`` / ``vision_task``: SimpleNamespace(model, memories, names, queries) — an fp32 export of the
  tiny llama / tiny VLM and a folder of memories of it (float, int8 one chunk = q8 graph, int8 chunked);
  ``queries`` are (memory name, image path or None, question) triples.
- ``foreign_memory``: a memory of another tiny llama (other weights), for the 409 case.
- ``live_server``: factory app -> base URL of a uvicorn server on 127.0.0.1 in a thread (module scope).
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.export.api import export_model
from emloc_edge.models.loading import load_model
from test_compile import make_demos
from test_tiny_vlm import QUESTION, image_demos

MEMORIES = {  # name -> compile options; the three variants a server meets
    "full": dict(delta=-1.0, chunk_size=2, precision="fp32"),
    "int8one": dict(delta=0.005, chunk_size=6, precision="int8", policy="emloc"),  # chunk-wise: one chunk
    "int8chunks": dict(delta=0.005, chunk_size=2, precision="int8", policy="emloc"),
}


def _task(adapter, demos, tmp: Path, queries) -> SimpleNamespace:
    memories = tmp / "memories"
    memories.mkdir()
    for i, (name, options) in enumerate(MEMORIES.items()):
        Compressor(adapter, CompileOptions(**options)).compile(demos[i:] + demos[:i]).save(memories / f"{name}.emloc")
    export_model(adapter, tmp / "model", weights="fp32")
    return SimpleNamespace(model=tmp / "model", memories=memories, names=list(MEMORIES), queries=queries)


@pytest.fixture(scope="session")
def text_task(llama_dir, tmp_path_factory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("serve_text")
    adapter = load_model(llama_dir)
    demos = make_demos("llama", 6, tmp / "demos")
    questions = ["which bin for the red apple item?", "which bin for a blue hammer?", "héllo wörld ✓ bin?"]
    queries = [(name, None, q) for name in MEMORIES for q in questions]
    return _task(adapter, demos, tmp, queries)


@pytest.fixture(scope="session")
def vision_task(tiny_vlm_dir, make_images, tmp_path_factory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("serve_vision")
    adapter = load_model(tiny_vlm_dir(image_tokens=4))
    demos = image_demos(tmp / "demos", 6, make_images)
    images = make_images(tmp / "query", 2, 7)
    queries = [(name, image, QUESTION) for name in MEMORIES for image in images] + [("full", None, QUESTION)]
    return _task(adapter, demos, tmp, queries)


@pytest.fixture(scope="session")
def foreign_memory(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve_foreign")
    other = load_model(tiny_model_dir("llama", seed=3))
    path = tmp / "foreign.emloc"
    Compressor(other, CompileOptions(delta=-1.0, chunk_size=2, precision="fp32")).compile(
        make_demos("llama", 2, tmp / "demos")).save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a thread, stopped (gracefully) at teardown."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live_server():
    servers: list[LiveServer] = []

    def start(app) -> str:
        servers.append(LiveServer(app))
        return servers[-1].url

    yield start
    for s in servers:
        s.stop()
