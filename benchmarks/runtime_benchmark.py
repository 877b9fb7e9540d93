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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from emloc_edge import __version__  # noqa: E402
from emloc_edge.compile.query import greedy_answer, memory_kv  # noqa: E402
from emloc_edge.memory.format import ChunkRecord, MemoryMeta, TaskMemory  # noqa: E402
from emloc_edge.models.decoder import LayerKV, RaggedDecoder  # noqa: E402
from emloc_edge.models.loading import load_model  # noqa: E402
from emloc_edge.runtime.model_folder import MANIFEST  # noqa: E402
from emloc_edge.runtime.memory_inputs import FLOAT, INT8, memory_feeds, variant_for  # noqa: E402
from emloc_edge.runtime.session import EdgeSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ("fp32", "int8", "int4")
TARGETS = {  # name -> (numerator path, denominator path, target: ratio <= target)
    "ort_fp32_over_torch_same_memory": ("ort-fp32", "torch-memory", 1.0),
    "ort_int8_over_torch_same_memory": ("ort-int8", "torch-memory", 0.7),
    "ort_int8_over_torch_full_context": ("ort-int8", "torch-full", 0.4),
}
QWEN2_05B = dict(  # Qwen2-0.5B geometry
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
)
CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- setup A: a Qwen2-0.5B-like random model and a synthetic memory ---------------------------------------


def build_random_qwen2(out: Path, seed: int = 0) -> Path:
    """Write a random-weight Qwen2ForCausalLM folder of Qwen2-0.5B size (+ a small ChatML BPE tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log(f"building random Qwen2-0.5B-like model in {out}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["You are a helpful assistant. What is shown here? Answer in one word, please.",
              "Which bin does this item go to? The answer is B3, K7 or A2. Thank you."] * 4
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens=specials[1:], clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    config = Qwen2Config(**QWEN2_05B, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval().to(torch.float32)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp, save_jinja_files=False)
    del model
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def synthetic_memory(adapter, context: int, low: int, high: int, chunks: int, seed: int = 0) -> TaskMemory:
    """An int8 ragged memory: per layer n_i in [low, high] tokens kept out of `context`, in `chunks` segments.

    K/V are Gaussian with the per-channel mean and std of the model's own (rotated) K/V on random tokens,
    so the int8 scales and attention logits have the scale this model produces.
    """
    g = adapter.geometry
    rng = np.random.default_rng(seed)
    probe = torch.from_numpy(rng.integers(0, g.vocab_size, (1, 256))).long()
    with torch.no_grad():
        cache = adapter.model(input_ids=probe, use_cache=True, logits_to_keep=1).past_key_values
    stats = []
    for i in range(g.num_layers):
        layer = cache.layers[i]
        k, v = layer.keys[0].numpy(), layer.values[0].numpy()  # [kv, 256, hd]
        stats.append((k.mean(1, keepdims=True), k.std(1, keepdims=True), v.mean(1, keepdims=True), v.std(1, keepdims=True)))
    lengths = rng.integers(low, high + 1, g.num_layers)
    lengths = np.clip(np.rint(lengths - lengths.mean() + (low + high) / 2), low, high).astype(int)  # mean ~ midpoint
    meta = MemoryMeta(
        model_name=adapter.name, model_family=adapter.family, model_fingerprint=adapter.fingerprint(),
        num_layers=g.num_layers, num_kv_heads=g.num_kv_heads, head_dim=g.head_dim, precision="int8",
        position_offset=context, position_dims=g.position_dims, context_tokens=context,
        hyperparameters={"delta": 0.005, "ratios": [0.1, 0.2, 0.5], "chunk_size": 4, "policy": "synthetic"},
        template=adapter.template_pieces(), image_preprocessing=None, chunks=[],
        created_by=f"emloc-edge {__version__} runtime_benchmark (synthetic)",
    )
    memory = TaskMemory.empty(meta)
    per_chunk = context // chunks
    for c in range(chunks):
        tokens = per_chunk if c < chunks - 1 else context - per_chunk * (chunks - 1)
        kept = [int(n) // chunks + (1 if c < int(n) % chunks else 0) for n in lengths]
        keys, values, index = [], [], []
        for i, n in enumerate(kept):
            km, ks, vm, vs = stats[i]
            keys.append((km + ks * rng.standard_normal((g.num_kv_heads, n, g.head_dim))).astype(np.float32))
            values.append((vm + vs * rng.standard_normal((g.num_kv_heads, n, g.head_dim))).astype(np.float32))
            index.append(np.sort(np.stack([rng.choice(tokens, n, replace=False) for _ in range(g.num_kv_heads)]), 1)
                         + c * per_chunk)
        record = ChunkRecord(demos=4, tokens=tokens, kept_per_layer=kept, ratio_per_layer=[k / tokens for k in kept],
                             js_per_layer=[None] * g.num_layers, final_js=0.0)
        memory.add_chunk(keys, values, index, record)
    return memory


# ---- exports ----------------------------------------------------------------------------------------------

_EXPORT = """
import sys, json
from emloc_edge.export.api import export_model
m = export_model(sys.argv[1], sys.argv[2], weights=sys.argv[3], validate=sys.argv[4] == "1")
print(json.dumps({k: v for k, v in m.items() if k == "validation_max_abs_diff"}))
"""


def export_cached(model_dir: Path, out: Path, weights: str, fingerprint: str, validate: bool, threads: int) -> tuple[Path, float | None]:
    """Export in a subprocess (the 0.5B fp32 export peaks ~7 GB; the memory goes back to the OS after)."""
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("model_fingerprint") == fingerprint:
        log(f"reusing export {out}")
        return out, None
    log(f"exporting {model_dir.name} with {weights} weights -> {out}")
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _EXPORT, str(model_dir), str(out), weights, "1" if validate else "0"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"export of {model_dir} ({weights}) failed:\n{proc.stderr[-4000:]}")
    seconds = time.perf_counter() - start
    log(f"  exported in {seconds:.0f} s")
    if json.loads(manifest.read_text()).get("model_fingerprint") != fingerprint:
        raise SystemExit(f"{out}: exported fingerprint differs from the loaded model's")
    return out, seconds


# ---- the measured paths -----------------------------------------------------------------------------------


@dataclass
class Path_:
    """One way of answering: prefill(query ids) -> first token; step() -> one more token."""

    key: str
    label: str
    step_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    last_logits: np.ndarray | None = None

    def prefill(self, ids: list[int]) -> int: ...
    def step(self) -> int: ...


class OrtPath(Path_):
    """EdgeSession's own decoder step (`_step`) over its bound memory; the decoder session is re-created
    with allow_spinning off (EdgeSession leaves ORT's default)."""

    def __init__(self, key, label, model_dir: Path, memory_path: Path, threads: int, spinning: bool,
                 float_memory: bool = False):
        super().__init__(key, label)
        self.session = s = EdgeSession(model_dir, memory_path, provider="cpu", threads=threads)
        graph = variant_for(s.memory.meta.precision)
        if float_memory:  # diagnostics only: the fp32-memory graph fed the memory dequantized per segment
            graph = FLOAT
            s.bound_memory = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), s.device, 0)
                              for name, v in memory_feeds(s.memory, FLOAT).items()}
        if not spinning or float_memory:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            if not spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            s.decoder = None
            gc.collect()
            s.decoder = ort.InferenceSession(str(s.folder.graph(graph)), options, providers=s.providers)
        self.offset = self.session.memory.meta.position_offset
        self.P = self.session.memory.meta.position_dims

    def _run(self, token_ids, positions):
        s = self.session
        embeds = np.asarray(s.embed_tokens[token_ids], dtype=np.float32)[None]  # [1, T, D]
        logits, new_kv = s._step(self.binding, embeds, positions, self.recent)
        self.recent = [(np.concatenate([k, nk], 1), np.concatenate([v, nv], 1))
                       for (k, v), (nk, nv) in zip(self.recent, new_kv)]
        self.last_logits = logits[0]
        self.token = int(np.argmax(logits[0]))
        return self.token

    def prefill(self, ids):
        s = self.session
        self.binding = s.decoder.io_binding()
        for name, value in s.bound_memory.items():
            self.binding.bind_ortvalue_input(name, value)
        empty = np.zeros((s.kv_heads, 0, s.head_dim), np.float32)
        self.recent = [(empty, empty)] * s.num_layers
        T = len(ids)
        self.next_position = self.offset + T
        positions = np.tile(np.arange(self.offset, self.offset + T, dtype=np.int64), (self.P, 1))
        return self._run(ids, positions)

    def step(self):
        positions = np.full((self.P, 1), self.next_position, dtype=np.int64)
        self.next_position += 1
        return self._run([self.token], positions)


class TorchMemoryPath(Path_):
    """RaggedDecoder over memory_kv(memory), exactly as compile.query.greedy_answer decodes."""

    def __init__(self, key, label, adapter, memory: TaskMemory):
        super().__init__(key, label)
        self.adapter, self.decoder = adapter, RaggedDecoder(adapter)
        self.memory = memory_kv(memory)
        self.offset, self.P = memory.meta.position_offset, memory.meta.position_dims

    @torch.no_grad()
    def _run(self, ids, start):
        T = len(ids)
        embeds = self.decoder.stack.embed_tokens(torch.tensor([ids]))
        pos = torch.arange(start, start + T).expand(self.P, 1, T)
        out = self.decoder.forward(embeds, pos, torch.ones(1, T, dtype=torch.bool), self.cache, keep_kv=True)
        self.cache = [m.extend(k[0], v[0]) for m, (k, v) in zip(self.cache, out.new_kv)]
        logits = self.decoder.logits(out.hidden[0, -1])
        self.last_logits = logits.numpy()
        self.token, self.next_position = int(logits.argmax()), start + T
        return self.token

    def prefill(self, ids):
        self.cache = self.memory
        return self._run(list(ids), self.offset)

    def step(self):
        return self._run([self.token], self.next_position)


class TorchFullPath(Path_):
    """Plain transformers forward with a DynamicCache holding the whole (unpruned) context."""

    def __init__(self, key, label, adapter, context_ids: list[int], query_ids: list[int], no_cache_repeats: int):
        super().__init__(key, label)
        self.model, self.context = adapter.model, len(context_ids)
        self.ttft_nocache_ms = []
        full = torch.tensor([list(context_ids) + list(query_ids)])
        for r in range(no_cache_repeats):  # what one pays per query without caching the context
            log(f"  full-context prefill of {full.shape[1]} tokens ({r + 1}/{no_cache_repeats})")
            gc.collect()
            start = time.perf_counter()
            with torch.no_grad():
                out = self.model(input_ids=full, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())
            self.ttft_nocache_ms.append(1000 * (time.perf_counter() - start))
            self.cache = out.past_key_values
            del out
        self._crop()  # keep the context only; each query prefills on top of it

    @torch.no_grad()
    def _run(self, ids):
        out = self.model(input_ids=torch.tensor([ids]), cache=self.cache, use_cache=True, logits_to_keep=1)
        self.last_logits = out.logits[0, -1].numpy()
        self.token = int(out.logits[0, -1].argmax())
        return self.token

    def _crop(self):
        extra = self.cache.get_seq_length() - self.context
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many tokens

    def prefill(self, ids):
        self._crop()
        return self._run(list(ids))

    def step(self):
        return self._run([self.token])


# ---- measuring --------------------------------------------------------------------------------------------


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return 1000 * (time.perf_counter() - start)


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
            print(f"    {key:<26} {verdict:<8} {g['agree']:>2}/{g['queries']} queries equal "
                  f"({g['agree_with_torch_requantized_memory']}/{g['queries']} equal to PyTorch on the requantized memory)"
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


def requantized_kv(memory: TaskMemory) -> list[LayerKV]:
    """The memory exactly as the q8 graph sees it (K requantized to one scale per channel per layer), in fp32."""
    feeds, out = memory_feeds(memory, INT8), []
    for i in range(memory.meta.num_layers):
        key_t = feeds[f"mem_key_t.{i}"].astype(np.float32) * feeds[f"mem_key_scale.{i}"]  # [kv, hd, n]
        value = feeds[f"mem_value.{i}"].astype(np.float32) * feeds[f"mem_value_scale.{i}"][..., None]  # [kv, n, hd]
        out.append(LayerKV(torch.from_numpy(np.ascontiguousarray(key_t.transpose(0, 2, 1))), torch.from_numpy(value)))
    return out


def logit_diffs(paths, query, adapter, memory, extra=()) -> dict:
    """max|logits - reference| after the query prefill, per path. Reference: PyTorch with the same memory as
    memory_kv() dequantizes it (per-segment K scales); for the q8 ORT graphs also PyTorch with the memory the
    q8 graph gets (K requantized per layer at load), which separates export error from that requantization."""
    for p in [*paths, *extra]:
        p.prefill(query)
    ref = next(p for p in paths if p.key == "torch-memory").last_logits
    requant = TorchMemoryPath("torch-requant", "", adapter, memory)
    requant.memory = requantized_kv(memory)
    requant.prefill(query)
    out = {f"{p.key} vs torch-memory": float(np.abs(p.last_logits - ref).max())
           for p in [*paths, *extra] if p.key != "torch-memory"}
    out["torch-requantized-memory vs torch-memory"] = float(np.abs(requant.last_logits - ref).max())
    for p in paths:
        if isinstance(p, OrtPath):
            out[f"{p.key} vs torch-requantized-memory"] = float(np.abs(p.last_logits - requant.last_logits).max())
    return out


def greedy_check(paths, adapter, memory, queries, max_new) -> dict:
    """EdgeSession.answer() token ids vs compile.query.greedy_answer with the same memory, per query.

    `torch` is greedy_answer over memory_kv(memory), the reference; `torch_requant` is greedy_answer over the
    memory as the q8 graph gets it; ORT paths with key "...-floatmem" run the fp32-memory graph."""
    offset = memory.meta.position_offset
    want = [greedy_answer(adapter, memory_kv(memory), offset, q, max_new_tokens=max_new) for q in queries]
    requant = [greedy_answer(adapter, requantized_kv(memory), offset, q, max_new_tokens=max_new) for q in queries]
    answers = {"torch-requantized-memory": requant}
    for p in paths:
        if isinstance(p, OrtPath):
            answers[p.key] = [p.session.answer(question=q, max_new_tokens=max_new).token_ids for q in queries]
    out = {}
    for key, got in answers.items():
        agree = [a == b for a, b in zip(got, want)]
        first = next((i for i, ok in enumerate(agree) if not ok), None)
        out[key] = {
            "queries": len(queries), "agree": sum(agree),
            "agree_with_torch_requantized_memory": sum(a == b for a, b in zip(got, requant)),
            "first_difference": None if first is None else {
                "query": queries[first], "this": adapter.tokenizer.decode(got[first]),
                "torch": adapter.tokenizer.decode(want[first])},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="A,B", help="comma-separated: A (0.5B random), B (SmolLM2 real)")
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
    ap.add_argument("--validate", action="store_true", help="also validate the setup A fp32 export (B always is)")
    ap.add_argument("--allow-spinning", action="store_true", help="leave ORT intra-op spinning on")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    setups = [s.strip().upper() for s in args.setups.split(",") if s.strip()]
    if not setups or set(setups) - {"A", "B"}:
        ap.error("--setups takes A, B or A,B")
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
            res = (run_setup_a if s == "A" else run_setup_b)(args, cache)
            results["setups"][s] = res
            print_setup(res)
            sys.stdout.flush()
            if args.json:  # after each setup, so a later failure keeps the earlier numbers
                args.json.write_text(json.dumps(results, indent=2, default=float))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("summary (decode-step ratios, target, verdict):")
    for s, res in results["setups"].items():
        for name, r in res["target_ratios"].items():
            print(f"  {s}  {name:<40} {r['ratio']:6.3f}  <= {r['target']:<4}  {'PASS' if r['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
