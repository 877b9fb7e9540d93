"""`emloc-edge serve` as a user runs it: a real process (two workers, torch blocked) on a loopback port,
answers equal EdgeSession's, request logs carry ids, SIGTERM shuts it down cleanly; bad options exit 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from click.testing import CliRunner

from conftest import free_port
from emloc_edge.cli import main
from serve_client import body, reference
from test_runtime import _BLOCK_TORCH

MAX = 6


def test_serve_command_two_workers_without_torch(text_task, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = free_port()
    cmd = [sys.executable, "-m", "emloc_edge.cli", "serve", str(text_task.model), "--memories", str(text_task.memories),
           "--port", str(port), "--workers", "2", "--threads", "1", "--provider", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        want = reference(text_task, MAX)
        with httpx.Client(base_url=url, timeout=60) as client:
            for (name, image, question), answer in list(want.items())[:4]:
                r = client.post("/v1/chat/completions", json=body(name, question, image, MAX),
                                headers={"x-request-id": f"req-{name}"})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["token_ids"] == answer.token_ids
                assert r.headers["x-request-id"] == f"req-{name}"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "req-full POST /v1/chat/completions 200" in out
    assert "must not be imported" not in out


def test_serve_bad_options_exit_2(text_task, tmp_path):
    r = CliRunner().invoke(main, ["serve", str(text_task.model), "--memories", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "missing" in r.output and r.output.count("\n") == 1, r.output
    r = CliRunner().invoke(main, ["serve", str(tmp_path), "--memories", str(text_task.memories)])
    assert r.exit_code == 2 and "manifest" in r.output and r.output.count("\n") == 1, r.output
