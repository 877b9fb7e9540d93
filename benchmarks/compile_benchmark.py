"""Compile-side benchmark: EMLoC vs the full context, on the same demonstrations, in one run.

Prints
  - compile time as a ratio to one full-context prefill (plain transformers forward of the whole
    chat-templated conversation, median of --repeats);
  - memory bytes (int8 / fp16 / fp32 payload) as a ratio to the fp16 full-context KV cache;
  - mean JS divergence on held-out queries between the next-token distribution with the EMLoC
    memory and with the full context (an unpruned fp32 memory, which equals the HF forward to 1e-4),
    plus greedy-answer accuracy for both.

    python benchmarks/compile_benchmark.py --model models/smollm2-135m-instruct \
        --demos examples/warehouse-text --queries examples/warehouse-text/queries.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.demos import Demo, load_demos
from emloc_edge.compile.divergence import js_divergence
from emloc_edge.compile.query import greedy_answer, memory_kv, query_logits
from emloc_edge.models.loading import load_model


def full_prefill_seconds(adapter, demos: list[Demo], repeats: int) -> tuple[float, int]:
    """Median time of one plain-transformers forward over the whole conversation, and its token count."""
    text = adapter.chat.render(adapter.chat.messages(demos))
    ids = torch.tensor([adapter.tokenizer(text, add_special_tokens=False)["input_ids"]])
    if adapter.has_vision:
        raise SystemExit("this benchmark times text-only models (the prefill baseline feeds token ids)")
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            adapter.model(input_ids=ids, use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times), ids.shape[1]


def load_queries(path: Path) -> list[Demo]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Demo(r["question"], r["answer"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--demos", required=True, type=Path)
    ap.add_argument("--queries", required=True, type=Path)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--delta", type=float, default=0.005)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    adapter = load_model(args.model)
    demos, queries = load_demos(args.demos), load_queries(args.queries)
    g = adapter.geometry

    prefill_s, tokens = full_prefill_seconds(adapter, demos, args.repeats)
    start = time.perf_counter()
    emloc = Compressor(adapter, CompileOptions(delta=args.delta, chunk_size=args.chunk_size, precision="int8")).compile(demos)
    compile_s = time.perf_counter() - start
    full = Compressor(adapter, CompileOptions(delta=-1.0, chunk_size=args.chunk_size, precision="fp32")).compile(demos)
    assert full.meta.context_tokens == tokens, (full.meta.context_tokens, tokens)

    fp16_full_bytes = 2 * g.num_layers * g.num_kv_heads * g.head_dim * tokens * 2
    kept_elements = 2 * g.num_kv_heads * g.head_dim * sum(emloc.meta.kept_tokens_per_layer)  # K and V
    int8_kv = sum(t.nbytes for name, t in emloc.tensors().items() if not name.endswith("token_index"))
    payload = {"int8": int8_kv, "fp16": 2 * kept_elements, "fp32": 4 * kept_elements}  # int8 includes its scales
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = emloc.save(Path(tmp) / "task.emloc")  # the whole file: payload, token index, metadata

    kv_emloc, kv_full = memory_kv(emloc), memory_kv(full)
    js, right_emloc, right_full = [], 0, 0
    for q in queries:
        a = query_logits(adapter, kv_emloc, emloc.meta.position_offset, q.question)
        b = query_logits(adapter, kv_full, full.meta.position_offset, q.question)
        js.append(js_divergence(a[None], b[None].float().log_softmax(-1)))
        right_emloc += _answer(adapter, kv_emloc, emloc.meta.position_offset, q) == q.answer
        right_full += _answer(adapter, kv_full, full.meta.position_offset, q) == q.answer

    kept = emloc.meta.kept_tokens_per_layer
    result = {
        "model": adapter.name, "demos": len(demos), "chunks": len(emloc.meta.chunks), "context_tokens": tokens,
        "full_prefill_s": round(prefill_s, 3), "compile_s": round(compile_s, 2),
        "compile_over_prefill": round(compile_s / prefill_s, 1),
        "kept_mean": round(sum(kept) / len(kept), 1), "compression": round(emloc.meta.compression, 4),
        "fp16_full_kv_bytes": fp16_full_bytes,
        **{f"memory_{p}_bytes": n for p, n in payload.items()},
        **{f"memory_{p}_over_fp16_full": round(n / fp16_full_bytes, 4) for p, n in payload.items()},
        "int8_file_bytes": file_bytes, "int8_file_over_fp16_full": round(file_bytes / fp16_full_bytes, 4),
        "heldout_queries": len(queries), "heldout_mean_js": round(statistics.mean(js), 5),
        "heldout_max_js": round(max(js), 5),
        "accuracy_full_context": round(right_full / len(queries), 3),
        "accuracy_emloc": round(right_emloc / len(queries), 3),
        "threads": args.threads,
    }
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _answer(adapter, kv, offset: int, q: Demo) -> str:
    ids = greedy_answer(adapter, kv, offset, q.question, max_new_tokens=8)
    return adapter.tokenizer.decode(ids).strip().splitlines()[0] if ids else ""


if __name__ == "__main__":
    main()
