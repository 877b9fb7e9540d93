"""Runtime benchmark, setup M: one int8 memory bound as int8 (the q8 graph) vs dequantized to fp32 at load
(the float graph), same export, same process: RAM of the bound memory, decode step, TTFT, and exactness.

RAM is measured in a fresh subprocess per variant (so neither sees the other's freed pages): VmRSS growth
from before `TaskMemory.load` to after the memory's feeds are bound as OrtValues, exactly as EdgeSession
holds them (the loaded memory + its bound inputs), next to the bytes of the bound tensors themselves.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench_paths import OrtPath, log

VARIANTS = {"int8": ("ort-int8-memory", "ORT, int8 memory inputs (decoder_step_q8)"),
            "float": ("ort-float-memory", "ORT, memory dequantized at load (decoder_step)")}

_RAM = """
import gc, json, sys
import numpy as np, onnxruntime as ort
from emloc_edge.memory import TaskMemory
from emloc_edge.runtime.memory_inputs import memory_feeds

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

gc.collect()
before = rss()
memory = TaskMemory.load(sys.argv[1])
bound = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cpu", 0)
         for name, v in memory_feeds(memory, sys.argv[2]).items()}
gc.collect()
grown = rss() - before
print(json.dumps({"rss_bytes": grown, "bound_feed_bytes": sum(a.nbytes for a in memory_feeds(memory, sys.argv[2]).values())}))
"""


def ram(memory_path: Path, variant: str) -> dict:
    """RSS growth of load + bind in a fresh process; bytes of the bound feeds."""
    proc = subprocess.run([sys.executable, "-c", _RAM, str(memory_path), variant], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"RAM probe ({variant}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exactness(paths: dict, queries: list[str], max_new: int) -> dict:
    """Max relative logit difference int8 vs float memory over the prefill and every answer token
    (teacher-forced on the float path's answer), and greedy agreement, on `queries`."""
    s8, sf = paths["int8"].session, paths["float"].session
    worst, agree = 0.0, 0
    for q in queries:
        tokens = sf.answer(question=q, max_new_tokens=max_new).token_ids
        want = sf.continuation_logits(None, q, tokens)
        got = s8.continuation_logits(None, q, tokens)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        agree += s8.answer(question=q, max_new_tokens=max_new).token_ids == tokens
    return {"queries": len(queries), "max_rel_logit_diff": worst, "greedy_equal": agree}


def run_setup_m(args, cache: Path, measure, e2e_answers, export_cached) -> dict:
    """SmolLM2 (args.m_model: folder or .gguf) + its warehouse-text int8 memory; one export (args.m_weights)."""
    from emloc_edge.compile.api import compile_memory
    from emloc_edge.memory.format import TaskMemory
    from emloc_edge.models.loading import load_model

    load0 = os.getloadavg()
    adapter = load_model(args.m_model)
    fingerprint = adapter.fingerprint()
    mem_path = Path(args.m_memory) if args.m_memory else cache / f"{Path(args.b_demos).name}-{fingerprint[:12]}-int8.emloc"
    if not mem_path.is_file():
        log(f"compiling {args.b_demos} (int8)")
        compile_memory(args.b_demos, adapter, output=mem_path, precision="int8")
    memory = TaskMemory.load(mem_path)
    out, export_s = export_cached(Path(args.m_model), cache / f"export-M-{fingerprint[:12]}-{args.m_weights}",
                                  args.m_weights, fingerprint, validate=args.m_weights == "fp32", threads=args.threads)
    queries = [json.loads(line)["question"] for line in Path(args.b_queries).read_text().splitlines() if line.strip()]
    query = adapter.sequence(adapter.chat.query_piece(queries[0], False), []).input_ids
    del adapter
    gc.collect()
    paths = {kind: OrtPath(key, label, out, mem_path, args.threads, args.allow_spinning, float_memory=kind == "float")
             for kind, (key, label) in VARIANTS.items()}
    measure(list(paths.values()), query, args)
    e2e = e2e_answers(list(paths.values()), queries[0], args.answer_tokens, 3)
    load1 = os.getloadavg()
    log("RAM probes and exactness")
    rows = {}
    for kind, p in paths.items():
        rows[kind] = {"label": p.label, "step_ms_median": _med(p.step_ms), "ttft_ms_median": _med(p.ttft_ms),
                      "step_ms_p10_p90": _spread(p.step_ms), "ttft_ms_p10_p90": _spread(p.ttft_ms),
                      "steps": len(p.step_ms), "prefills": len(p.ttft_ms), "answer": e2e.get(p.key),
                      "step_ms": p.step_ms, "ttft_ms": p.ttft_ms,
                      **ram(mem_path, "decoder_step_q8" if kind == "int8" else "decoder_step")}
    kept = memory.meta.kept_tokens_per_layer
    res = {
        "setup": "M", "description": "int8 memory inputs vs the memory dequantized at load (same export, same process)",
        "model": f"{memory.meta.model_name}, {args.m_weights} weights", "threads": args.threads,
        "memory": f"{mem_path.name}: int8, {len(memory.meta.chunks)} chunks, per-layer {min(kept)}-{max(kept)} tokens "
                  f"(mean {np.mean(kept):.0f}), file {mem_path.stat().st_size / 1e6:.2f} MB",
        "memory_file_bytes": mem_path.stat().st_size, "query_tokens": len(query), "export_seconds": export_s,
        "load_avg_start": [round(x, 2) for x in load0], "load_avg_end": [round(x, 2) for x in load1],
        "paths": rows, "exactness": exactness(paths, queries[: args.m_check_queries], args.answer_tokens),
    }
    i8, fl = rows["int8"], rows["float"]
    res["ratios"] = {"ram_int8_over_float": i8["rss_bytes"] / fl["rss_bytes"],
                     "bound_bytes_int8_over_float": i8["bound_feed_bytes"] / fl["bound_feed_bytes"],
                     "step_int8_over_float": i8["step_ms_median"] / fl["step_ms_median"],
                     "ttft_int8_over_float": i8["ttft_ms_median"] / fl["ttft_ms_median"]}
    return res


def print_setup_m(res: dict) -> None:
    print()
    print(f"=== setup M: {res['description']}")
    for k in ("model", "memory", "query_tokens", "threads", "load_avg_start", "load_avg_end"):
        print(f"    {k}: {res[k]}")
    head = (f"{'path':<48} {'RSS load+bind MB':>17} {'bound MB':>9} {'step ms (p10-p90)':>22} "
            f"{'TTFT ms (p10-p90)':>22} {'answer(): TTFT ms, tok/s':>26}")
    print(head)
    print("-" * len(head))
    for row in res["paths"].values():
        a = row["answer"]
        e2e = f"{a['ttft_ms']:.1f}, {a['tokens_per_s']:.1f}" if a else "-"
        step = f"{row['step_ms_median']:.1f} ({row['step_ms_p10_p90'][0]:.0f}-{row['step_ms_p10_p90'][1]:.0f})"
        ttft = f"{row['ttft_ms_median']:.1f} ({row['ttft_ms_p10_p90'][0]:.0f}-{row['ttft_ms_p10_p90'][1]:.0f})"
        print(f"{row['label']:<48} {row['rss_bytes'] / 1e6:>17.2f} {row['bound_feed_bytes'] / 1e6:>9.2f} "
              f"{step:>22} {ttft:>22} {e2e:>26}")
    print(f"  (medians of {res['paths']['int8']['steps']} decode steps and {res['paths']['int8']['prefills']} "
          "query prefills, interleaved; RSS measured in a fresh process per variant)")
    for name, r in res["ratios"].items():
        print(f"    {name:<32} {r:7.3f}")
    e = res["exactness"]
    print(f"  exactness over {e['queries']} held-out queries (prefill + every answer token): max |Δlogits| / max |logits| "
          f"= {e['max_rel_logit_diff']:.2e}; greedy answers equal {e['greedy_equal']}/{e['queries']}")


def _med(xs):
    return float(np.median(xs)) if xs else None


def _spread(xs):
    return (float(np.percentile(xs, 10)), float(np.percentile(xs, 90))) if xs else (float("nan"), float("nan"))


__all__ = ["print_setup_m", "run_setup_m"]
