"""The Ray Serve deployment: one local Ray (2 CPUs, no dashboard) for the module, 2 replicas multiplexing
the memories; answers equal EdgeSession's, and killing a replica mid-run leaves the next requests served
while Ray restarts it. Ray is part of the [serve] extra: if it is missing, these tests fail (not skip)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from conftest import free_port
from serve_client import body, reference, sse_pieces, streamed_reference

MAX = 6


@pytest.fixture(scope="module")
def ray_url(text_task):
    import ray
    from ray import serve

    from emloc_edge.serve.config import ServeConfig
    from emloc_edge.serve.ray_app import APP_NAME, build_application

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(str(text_task.model), str(text_task.memories), default_max_tokens=MAX, threads=1)
    serve.run(build_application(config, replicas=2, replica_cpus=0.5), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "MemoryReplica" in a["name"]]


def test_ray_answers_equal_edge_session(ray_url, text_task):
    want, streamed = reference(text_task, MAX), streamed_reference(text_task, MAX)
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        for (name, image, question), answer in want.items():
            r = client.post("/v1/chat/completions", json=body(name, question, image, MAX))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == answer.token_ids
            with client.stream("POST", "/v1/chat/completions", json=body(name, question, image, MAX, True)) as r:
                assert r.status_code == 200
                assert "".join(sse_pieces(r)[0]) == streamed[(name, image, question)]
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == set(text_task.names)
        r = client.post("/v1/chat/completions", json=body("nosuch", "q"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(_replicas()) == 2


def test_killed_replica_next_requests_succeed(ray_url, text_task):
    import ray

    want = reference(text_task, MAX)
    queries = list(want)
    results: list[tuple[float, int, str | None]] = []  # (sent at, status, text)
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=ray_url, timeout=60) as client:
            for i in range(400):  # bounded: ends by count or when told
                if stop.is_set():
                    return
                name, image, question = queries[i % len(queries)]
                sent = time.monotonic()
                try:
                    r = client.post("/v1/chat/completions", json=body(name, question, image, MAX))
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
                    results.append((sent, r.status_code, text, queries[i % len(queries)]))
                except httpx.HTTPError:
                    results.append((sent, -1, None, queries[i % len(queries)]))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(2)
    victim = _replicas()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed = time.monotonic()
    time.sleep(4)
    stop.set()
    thread.join(60)
    after = [r for r in results if r[0] > killed + 1.0]  # sent once the kill was seen by the router
    assert len(after) >= 5, f"too few requests after the kill: {len(after)}"
    assert all(status == 200 and text == want[q].text for _, status, text, q in after), after[:5]
    deadline = time.monotonic() + 60
    while (victim in _replicas() or len(_replicas()) < 2) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_replicas()) == 2 and victim not in _replicas(), "Ray did not replace the killed replica"
    failed = [r[1] for r in results if r[1] != 200]
    print(f"\nray fault: {len(results)} requests, {len(failed)} failed {failed}, {len(after)} sent >1 s after the "
          f"kill all answered; replica replaced {time.monotonic() - killed:.1f} s after the kill")
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        name, image, question = queries[0]
        assert client.post("/v1/chat/completions", json=body(name, question, image, MAX)).status_code == 200
