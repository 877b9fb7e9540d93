"""Peers through NVIDIA kvpress (the presses' reference implementation), on our tasks, with our prompts.

kvpress 0.5.5 pins transformers<5.3, so this runs in an environment of its own:

    bash benchmarks/kvpress_env.sh                     # creates .kvpress-venv (torch CPU, kvpress, model parts)
    .kvpress-venv/bin/python benchmarks/kvpress_peers.py --model smollm2 --demos examples/warehouse-text \
        --queries examples/warehouse-text/queries.jsonl --json benchmarks/results/kvpress-warehouse-text.json
    .kvpress-venv/bin/python benchmarks/kvpress_peers.py --model default --demos demos \
        --queries examples/fashion-bins/test --limit 300 --presses snapkv,adakv,streaming_llm,pyramidkv

The demonstrations are rendered exactly as the compiler renders them (the project's adapter, imported
from this checkout), prefilled once with a press active (the question unseen, as a task memory is
compiled), and every query is answered greedily (8 tokens, first line compared) from a copy of the
compressed cache, at positions after the whole context, as the runtime does. `none` is the full
context on the same code path: it must match `compile_benchmark.py`'s full-context accuracy.

Kept fraction = kept KV pairs / (layers · KV heads · context tokens). AdaKV and KVzip choose per head
and mask (kvpress's attention patch) rather than drop, so theirs counts the unmasked pairs; the dense
kept fraction pads each layer's heads to its largest, the size a per-layer dense cache needs. KVzip
reconstructs the context from token ids, so it runs on text models only.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import kvpress
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.compile_benchmark import (
    add_task_arguments,
    answer_line,
    model_path,
    task_items,
)
from emloc_edge.models.chat import Piece
from emloc_edge.models.loading import load_model


def make_press(name: str, kept: float):
    """A kvpress press by short name, removing 1 - kept of the context's KV pairs."""
    ratio = 1.0 - kept
    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "adakv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio)),
        "kvzip": lambda: kvpress.KVzipPress(compression_ratio=ratio),
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
    }
    return presses[name]()


class Context:
    """The demonstrations as one rendered conversation: token ids, input embeddings, positions."""

    def __init__(self, adapter, demos) -> None:
        text = adapter.chat.render(adapter.chat.messages(demos))
        images = [d.image for d in demos if d.image is not None]
        batch = adapter.embed([adapter.sequence(Piece(text, None), images)])
        self.input_ids = batch.input_ids  # [1, T]
        self.inputs_embeds = batch.inputs_embeds  # [1, T, D]
        self.position_ids = batch.position_ids[0]  # [1, T] (1-D RoPE)
        self.tokens = self.input_ids.shape[1]
        self.span = int(batch.next_position[0])  # positions the context occupies
        self.has_images = bool(images)


@torch.no_grad()
def compress(model, context: Context, press) -> tuple[DynamicCache, float, float]:
    """Prefill the context with `press` active: (its cache, kept fraction, dense kept fraction). The dense
    fraction is what a per-layer dense cache (a task memory, or any runtime without per-head masks)
    must hold: every head of a layer padded to that layer's largest head."""
    cache = DynamicCache()
    inputs = ({"inputs_embeds": context.inputs_embeds} if context.has_images else {"input_ids": context.input_ids})
    if press is None:
        model.model(**inputs, position_ids=context.position_ids, past_key_values=cache, use_cache=True)
    else:
        with press(model):
            model.model(**inputs, position_ids=context.position_ids, past_key_values=cache, use_cache=True)
    layers = model.model.layers
    kv_heads = model.config.num_key_value_heads
    kept, dense = 0, 0
    for i, layer in enumerate(layers):
        n = cache.layers[i].keys.shape[2]  # keys [1, kv, n, hd]
        per_head = torch.full((kv_heads,), n)
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:  # (batch, head, position) of each masked pair
            per_head -= torch.bincount(masked[1], minlength=kv_heads)
        kept += int(per_head.sum())
        dense += kv_heads * int(per_head.max())
    total = len(layers) * kv_heads * context.tokens
    return cache, kept / total, dense / total


@torch.no_grad()
def answer(adapter, model, cache: DynamicCache, context: Context, question: str, image, max_new_tokens: int = 8) -> str:
    """Greedy answer of one query from a copy of the compressed cache (its first line)."""
    cache = copy.deepcopy(cache)
    piece = adapter.chat.query_piece(question, image is not None)
    batch = adapter.embed([adapter.sequence(piece, [image] if image is not None else [])])
    embeds, positions = batch.inputs_embeds, batch.position_ids[0] + context.span  # [1, q, D], [1, q]
    next_position = context.span + int(batch.next_position[0])
    stop = {adapter.chat.end_of_turn_id, adapter.tokenizer.eos_token_id}
    if len({layer.keys.shape[2] for layer in cache.layers}) > 1:
        # Layers of different lengths (PyramidKV): HF sizes a multi-token step's mask by layer 0, so feed
        # the query one token at a time (a one-token step needs no mask).
        for i in range(embeds.shape[1] - 1):
            model.model(inputs_embeds=embeds[:, i : i + 1], position_ids=positions[:, i : i + 1],
                        past_key_values=cache, use_cache=True)
        embeds, positions = embeds[:, -1:], positions[:, -1:]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits  # [1, 1, vocab]: only the last position's
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        embeds = model.get_input_embeddings()(torch.tensor([[token]]))
        positions = torch.tensor([[next_position]])
        next_position += 1
    return answer_line(adapter.tokenizer, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_arguments(ap)
    ap.add_argument("--presses", default="snapkv,adakv,kvzip,streaming_llm,pyramidkv")
    ap.add_argument("--kept", default="0.25,0.5", help="comma list of kept fractions (1 - compression_ratio)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    adapter = load_model(model_path(args.model))
    model = adapter.model.eval()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        adapter.tokenizer.save_pretrained(tokenizer_dir)  # KVzip reloads the tokenizer by the config's path
        model.config.name_or_path = tokenizer_dir
        demos, queries = task_items(args)
        context = Context(adapter, demos)
        head = {"model": adapter.name, "demos": len(demos), "queries": len(queries), "context_tokens": context.tokens,
                "kvpress": getattr(kvpress, "__version__", "0.5.5")}
        print(json.dumps(head), flush=True)
        rows = []
        runs = [("none", 1.0)] + [(p, float(k)) for p in args.presses.split(",") for k in args.kept.split(",")]
        for name, kept in runs:
            if name == "kvzip" and context.has_images:
                continue
            start = time.perf_counter()
            cache, kept_fraction, dense = compress(model, context, None if name == "none" else make_press(name, kept))
            compress_s = time.perf_counter() - start
            right = [answer(adapter, model, cache, context, q.question, q.image) == q.answer for q in queries]
            row = {"press": name, "target_kept": kept, "kept_fraction": round(kept_fraction, 4),
                   "dense_kept_fraction": round(dense, 4),
                   "accuracy": round(sum(right) / len(queries), 3), "compress_s": round(compress_s, 2)}
            print(json.dumps(row), flush=True)
            rows.append({**row, "correct_items": right})  # per query, for paired comparisons
    if args.json:
        args.json.write_text(json.dumps({**head, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
