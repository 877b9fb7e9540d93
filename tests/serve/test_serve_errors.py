"""The error matrix: each bad request gets the OpenAI error shape with its status, and the server goes on."""
from __future__ import annotations

import base64
import io
import shutil

import httpx
import pytest
from PIL import Image

from emloc_edge.serve.config import ServeConfig
from emloc_edge.serve.server import build_app
from serve_client import body, data_url

KEY = "sekret-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def servers(vision_task, text_task, foreign_memory, tmp_path_factory):
    """(vision url, text url, memories folder of the vision server) with a key and small limits."""
    from conftest import LiveServer

    memories = tmp_path_factory.mktemp("error_memories")
    shutil.copy(vision_task.memories / "full.emloc", memories / "full.emloc")
    limits = dict(api_key=KEY, max_body_bytes=60_000, max_image_pixels=100 * 100, max_tokens=16, default_max_tokens=4)
    vision = LiveServer(build_app(ServeConfig(str(vision_task.model), str(memories), **limits)))
    text = LiveServer(build_app(ServeConfig(str(text_task.model), str(text_task.memories), **limits)))
    yield vision.url, text.url, memories, vision_task
    vision.stop()
    text.stop()


def _png(size: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _with_image(url: str, question: str = "which bin?") -> dict:
    return {"model": "full", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}]}


CASES = {  # id -> (server, request kwargs, status, send the key)
    "no key": ("vision", dict(json=body("full", "q")), 401, False),
    "wrong key": ("vision", dict(json=body("full", "q"), headers={"authorization": "Bearer nope"}), 401, False),
    "unknown memory": ("vision", dict(json=body("nosuch", "q")), 404, True),
    "path-like memory name": ("vision", dict(json=body("../full", "q")), 404, True),
    "not base64": ("vision", dict(json=_with_image("data:image/png;base64,@@@not base64@@@")), 400, True),
    "not an image": ("vision", dict(json=_with_image("data:image/png;base64," + base64.b64encode(b"hello").decode())), 400, True),
    "remote url": ("vision", dict(json=_with_image("https://example.invalid/cat.png")), 400, True),
    "bad json": ("vision", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, True),
    "no messages": ("vision", dict(json={"model": "full", "messages": []}), 400, True),
    "max_tokens over limit": ("vision", dict(json=body("full", "q", max_tokens=17)), 400, True),
    "two images": ("vision", dict(json={"model": "full", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png(8)}}] * 2}]}), 400, True),
    "image to a text model": ("text", dict(json=_with_image("data:image/png;base64," + _png(8))), 400, True),
    "text/plain body": ("vision", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, True),
    "pdf data url": ("vision", dict(json=_with_image("data:application/pdf;base64,JVBERi0=")), 415, True),
    "body too large": ("vision", dict(json=body("full", "x" * 70_000)), 413, True),
    "image too large": ("vision", dict(json=_with_image("data:image/png;base64," + _png(101))), 413, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_matrix(servers, case):
    vision_url, text_url, _, _ = servers
    which, kwargs, status, with_key = CASES[case]
    kwargs = {**kwargs, "headers": {**(AUTH if with_key else {}), **kwargs.get("headers", {})}}
    with httpx.Client(base_url=vision_url if which == "vision" else text_url, timeout=60) as client:
        r = client.post("/v1/chat/completions", **kwargs)
        assert r.status_code == status, (case, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert "\n" not in error["message"] and "Traceback" not in error["message"]
        assert "/tmp" not in error["message"], "server paths stay on the server"
        ok = client.post("/v1/chat/completions", json=body("full", "which bin?"), headers=AUTH)
        assert ok.status_code == 200, ok.text  # the server goes on


def test_memory_of_another_model_is_409_and_new_files_appear_live(servers, foreign_memory):
    vision_url, _, memories, task = servers
    with httpx.Client(base_url=vision_url, timeout=60, headers=AUTH) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["full"]
        shutil.copy(foreign_memory, memories / "foreign.emloc")
        shutil.copy(task.memories / "int8one.emloc", memories / "late.emloc")  # added while serving
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert set(listed) == {"full", "foreign", "late"}
        assert listed["late"]["summary"]["precision"] == "int8" and listed["late"]["summary"]["chunks"] == 1
        r = client.post("/v1/chat/completions", json=body("foreign", "q"))
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_mismatch", r.text
        assert "foreign.emloc" in r.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=body("late", "which bin?")).status_code == 200
        assert client.get("/v1/models", headers={"authorization": ""}).status_code == 401
        assert client.get("/health").json()["status"] == "ok"


def test_unknown_route_is_an_openai_error(servers):
    with httpx.Client(base_url=servers[0], timeout=10) as client:
        r = client.get("/v1/nothing", headers=AUTH)
        assert r.status_code == 404 and "error" in r.json()
