"""Serving benchmark: the HTTP server (one process) and the Ray Serve deployment (2 replicas) under C
concurrent streaming clients over several memories, against the same queries through EdgeSession directly.

Loopback only, bounded by request count and by time per level. Every server and the direct baseline run in
their own process (torch-free), so RSS is theirs alone. For each C in --clients: requests/s, p50/p99
latency (request to [DONE]), p50 TTFT (request to the first content chunk), errors (must be 0), RSS.
Also: RSS of one EdgeModel with 1 and with 10 memories bound (the 2nd..10th add about their own bytes).

    python benchmarks/serve_benchmark.py --cache-dir /tmp/emloc-serve-bench --json serve_benchmark.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROBE = r"""
import json, os, sys, time, psutil
from emloc_edge.runtime.model import EdgeModel
model_dir, folder, max_new, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
questions = json.loads(sys.argv[5])
rss = lambda: psutil.Process().memory_info().rss
out = {"rss_start": rss()}
model = EdgeModel.open(model_dir, provider="cpu", threads=1, max_new_tokens=max_new)
out["rss_model"] = rss()
paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".emloc"))[:n]
sessions = []
for i, p in enumerate(paths):
    sessions.append(model.bind(p))
    sessions[-1].answer(None, questions[0])  # the graph has run once with this memory
    out[f"rss_{i + 1}"] = rss()
out["memory_bytes"] = [s.memory.nbytes for s in sessions]
times = []
for i, q in enumerate(questions):
    start = time.perf_counter()
    sessions[i % 3].answer(None, q)
    times.append(time.perf_counter() - start)
out["direct_s"] = times
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def one(client, url: str, name: str, question: str, max_tokens: int) -> tuple[float, float, bool]:
    body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "stream": True}
    start, first = time.perf_counter(), None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return time.perf_counter() - start, 0.0, False
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {") and '"content":' in line and '"content":""' not in line:
                    first = time.perf_counter()
                if line == "data: [DONE]":
                    end = time.perf_counter()
                    return end - start, (first or end) - start, True
    except Exception:  # noqa: BLE001 - counted as an error
        pass
    return time.perf_counter() - start, 0.0, False


async def level(url: str, names: list[str], questions: list[str], clients: int, count: int, seconds: float,
                max_tokens: int) -> dict:
    import httpx

    jobs = list(range(count))
    results: list[tuple[float, float, bool]] = []
    deadline = time.perf_counter() + seconds

    async def worker(client) -> None:
        while jobs and time.perf_counter() < deadline:
            i = jobs.pop()
            results.append(await one(client, url, names[i % len(names)], questions[i % len(questions)], max_tokens))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results if r[2])
    ttft = sorted(r[1] for r in results if r[2])
    q = lambda xs, p: 1000 * xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": sum(not r[2] for r in results),
            "req_per_s": len(lat) / wall, "p50_ms": q(lat, 0.5), "p99_ms": q(lat, 0.99), "ttft_p50_ms": q(ttft, 0.5)}


def rss_tree(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)] if p.is_running())


def wait_up(url: str, proc: subprocess.Popen, seconds: float, names: list[str]) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            ok = httpx.get(f"{url}/health", timeout=2).status_code == 200
            if ok and httpx.post(f"{url}/v1/chat/completions", timeout=60, json={  # warm: every memory bound
                    "model": names[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).status_code == 200:
                for name in names[1:]:
                    httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                        "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} did not come up in {seconds:.0f} s")


def run_server(args, model_dir: Path, memories: Path, names: list[str], questions: list[str], ray: bool) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "emloc_edge.cli", "serve", str(model_dir), "--memories", str(memories),
           "--port", str(port), "--threads", "1", "--provider", "cpu"]
    cmd += ["--ray", "--replicas", "2"] if ray else []
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DISABLE_DOCKER_CPU_WARNING="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc, 180 if ray else 60, names)
        rows = []
        for c in args.clients:
            row = asyncio.run(level(url, names, questions, c, args.requests * max(1, c // 4 + 1), args.seconds,
                                    args.max_tokens))
            row["rss_mb"] = rss_tree(proc.pid) / 2**20
            rows.append(row)
            log(f"{'ray' if ray else 'local'} C={c}: {row}")
        return {"rows": rows}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/emloc-serve-bench"))
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--memories", type=int, default=3, help="memories the clients spread over")
    ap.add_argument("--requests", type=int, default=8, help="requests per level per 4 clients (bounded)")
    ap.add_argument("--seconds", type=float, default=40, help="time cap per level")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--context", type=int, default=1000, help="synthetic memory: context tokens")
    ap.add_argument("--kept", default="200,400", help="synthetic memory: kept tokens per layer (low,high)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from serve_bench_setup import build, questions as load_questions

    low, high = (int(x) for x in args.kept.split(","))
    model_dir, all_memories = build(args.cache_dir, 10, args.context, (low, high), threads=2)
    served = args.cache_dir / "served"
    served.mkdir(exist_ok=True)
    names = [f"mem{i:02d}" for i in range(args.memories)]
    for name in names:
        if not (served / f"{name}.emloc").exists():
            os.symlink(all_memories / f"{name}.emloc", served / f"{name}.emloc")
    questions = load_questions(40)
    log("direct EdgeModel/EdgeSession baseline and RSS probe")
    probe = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), str(all_memories), str(args.max_tokens), "10",
                            json.dumps(questions[:12])], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if probe.returncode:
        raise SystemExit(probe.stderr[-3000:])
    direct = json.loads(probe.stdout)
    report = {"direct": direct, "local": run_server(args, model_dir, served, names, questions, ray=False)}
    if not args.no_ray:
        report["ray"] = run_server(args, model_dir, served, names, questions, ray=True)
    print_report(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_report(report: dict, args) -> None:
    d = report["direct"]
    mb = lambda x: x / 2**20  # noqa: E731
    print(f"\nEdgeModel RSS: model {mb(d['rss_model'] - d['rss_start']):.0f} MB over the interpreter; "
          f"1 memory bound {mb(d['rss_1']):.0f} MB, 10 bound {mb(d['rss_10']):.0f} MB "
          f"(+{mb(d['rss_10'] - d['rss_1']) / 9:.1f} MB per further memory; each memory's tensors "
          f"{mb(statistics.mean(d['memory_bytes'])):.1f} MB)")
    direct_ms = 1000 * statistics.median(d["direct_s"])
    print(f"direct EdgeSession: median {direct_ms:.0f} ms per query ({args.max_tokens} tokens max), "
          f"{1000 / direct_ms:.2f} queries/s sequential\n")
    print("| server | C | requests | errors | req/s | p50 ms | p99 ms | TTFT p50 ms | p50 / direct | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in ("local", "ray"):
        for r in report.get(kind, {}).get("rows", []):
            print(f"| {kind} | {r['clients']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.2f} | "
                  f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['ttft_p50_ms']:.0f} | {r['p50_ms'] / direct_ms:.2f} | "
                  f"{r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
