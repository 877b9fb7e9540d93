"""Runtime benchmark: building the two setups (random 0.5B-size model, synthetic memory, cached exports) and the correctness checks."""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from emloc_edge import __version__  # noqa: E402
from emloc_edge.compile.query import greedy_answer, memory_kv  # noqa: E402
from emloc_edge.memory.format import ChunkRecord, MemoryMeta, TaskMemory  # noqa: E402
from emloc_edge.runtime.model_folder import MANIFEST  # noqa: E402

from bench_paths import OrtPath, log  # noqa: E402

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



def logit_diffs(paths, query, adapter, memory, extra=()) -> dict:
    """max|logits - reference| after the query prefill, per path. Reference: PyTorch with the same memory as
    memory_kv() dequantizes it (per-segment K scales), which the q8 graph also applies exactly."""
    for p in [*paths, *extra]:
        p.prefill(query)
    ref = next(p for p in paths if p.key == "torch-memory").last_logits
    return {f"{p.key} vs torch-memory": float(np.abs(p.last_logits - ref).max())
            for p in [*paths, *extra] if p.key != "torch-memory"}


def greedy_check(paths, adapter, memory, queries, max_new) -> dict:
    """EdgeSession.answer() token ids vs compile.query.greedy_answer with the same memory, per query.

    `torch` is greedy_answer over memory_kv(memory), the reference; ORT paths with key "...-floatmem" run
    the fp32-memory graph."""
    offset = memory.meta.position_offset
    want = [greedy_answer(adapter, memory_kv(memory), offset, q, max_new_tokens=max_new) for q in queries]
    answers = {}
    for p in paths:
        if isinstance(p, OrtPath):
            answers[p.key] = [p.session.answer(question=q, max_new_tokens=max_new).token_ids for q in queries]
    out = {}
    for key, got in answers.items():
        agree = [a == b for a, b in zip(got, want)]
        first = next((i for i, ok in enumerate(agree) if not ok), None)
        out[key] = {
            "queries": len(queries), "agree": sum(agree),
            "first_difference": None if first is None else {
                "query": queries[first], "this": adapter.tokenizer.decode(got[first]),
                "torch": adapter.tokenizer.decode(want[first])},
        }
    return out
