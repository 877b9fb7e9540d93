"""`emloc_edge.evaluate`: each condition's context, answered on held-out text items by the exported
model under ONNX Runtime (the default backend) or by the PyTorch reference, and scored.

One evaluation of the default conditions on the tiny random Llama (8 demos in chunks of 2, 4 test items,
fp32 export) is shared by most tests. A random model answers gibberish, so accuracy is checked against
plain transformers and against items whose answers are known, not against chance. The CLI is tested
in test_eval_cli.py.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cli"))
from support import text_rows  # noqa: E402

from emloc_edge.compile.compressor import CompileOptions  # noqa: E402
from emloc_edge.compile.demos import Demo, load_demos  # noqa: E402
from emloc_edge.errors import BadInputError  # noqa: E402
from emloc_edge.evaluate import conditions as conditions_module, default_names, evaluate  # noqa: E402
from emloc_edge.evaluate import exports  # noqa: E402
from emloc_edge.models.loading import load_model  # noqa: E402

CHUNK, NEW_TOKENS = 2, 6
MAIN = CompileOptions().policy


@pytest.fixture(scope="module", autouse=True)
def _isolated_home(eval_home):  # conftest.py: exports cached under a per-module $EMLOC_EDGE_HOME
    return eval_home


@pytest.fixture(scope="module")
def adapter(llama_dir: Path):
    return load_model(llama_dir)


@pytest.fixture(scope="module")
def report(folders, adapter):
    demos, test = folders
    return evaluate(demos, test, adapter, chunk_size=CHUNK, max_new_tokens=NEW_TOKENS, weights="fp32", provider="cpu")


@pytest.fixture(scope="module")
def torch_report(folders, adapter):
    demos, test = folders
    return evaluate(demos, test, adapter, chunk_size=CHUNK, max_new_tokens=NEW_TOKENS, backend="torch")


def _hf_greedy(adapter, messages: list[dict]) -> str:
    """Plain transformers: greedy `generate` on the rendered conversation, decoded like the runtime."""
    tok = adapter.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = adapter.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=[adapter.chat.end_of_turn_id, tok.eos_token_id], pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _user(adapter, question: str) -> dict:
    return {"role": "user", "content": adapter.user_content(question, False)}


# ------------------------------------------------------------------------------------- conditions
def test_reports_every_condition_in_order_with_consistent_counts(report, folders, adapter):
    demos = load_demos(folders[0])
    assert [c.name for c in report.conditions] == default_names(MAIN)
    assert (report.demos, report.test_items, report.distinct_answers) == (8, 4, 4)
    assert report.chance == 0.25
    ids = adapter.tokenizer(adapter.chat.render(adapter.chat.messages(demos)), add_special_tokens=False)["input_ids"]
    assert report.context_tokens == len(ids)
    answers = [item["answer"].strip() for item in report.items]
    full = report.condition("full-context")
    for c in report.conditions:
        assert c.total == 4 and len(c.predictions) == 4
        assert c.correct_items == [p == a for p, a in zip(c.predictions, answers)]
        assert c.correct == sum(c.correct_items) and c.accuracy == c.correct / c.total
        assert c.ms_per_query > 0 and math.isfinite(c.js_to_full_context)
        assert c.ttft_ms > 0 and c.tokens_per_s >= 0 and c.weights == "fp32"  # measured on ONNX Runtime
        assert c.mean_kept_tokens_per_layer == pytest.approx(sum(c.kept_tokens_per_layer) / 4)
        fraction = c.mean_kept_tokens_per_layer / report.context_tokens if c.memory_bytes else 0.0
        assert c.kept_fraction == pytest.approx(fraction)
        assert c.size_vs_full_context == pytest.approx(c.memory_bytes / full.memory_bytes)
        if c is full:
            assert c.lost_to_full_context is None and c.p_vs_full_context is None
        else:  # paired with full-context item by item
            pairs = list(zip(full.correct_items, c.correct_items))
            assert c.lost_to_full_context == sum(f and not o for f, o in pairs)
            assert c.won_over_full_context == sum(o and not f for f, o in pairs)
            assert c.correct - full.correct == c.won_over_full_context - c.lost_to_full_context
            assert 0.0 < c.p_vs_full_context <= 1.0
    assert report.runtime["backend"] == "ort" and report.runtime["weights"] == "fp32"
    assert report.runtime["provider"] == "cpu"


def test_full_context_answers_equal_plain_transformers_generate(report, folders, adapter):
    demos, full = load_demos(folders[0]), report.condition("full-context")
    conversation = adapter.chat.messages(demos)
    expected = [_hf_greedy(adapter, conversation + [_user(adapter, item["question"])]) for item in report.items]
    assert full.predictions == expected
    assert full.kept_tokens_per_layer == [report.context_tokens] * 4 and full.kept_fraction == 1.0
    assert full.precision == "fp32" and full.size_vs_full_context == 1.0
    assert abs(full.js_to_full_context) < 1e-7  # its own distributions


def test_zero_shot_is_the_query_alone_with_an_empty_memory(report, adapter):
    zero = report.condition("zero-shot")
    expected = [_hf_greedy(adapter, [_user(adapter, item["question"])]) for item in report.items]
    assert zero.predictions == expected
    assert zero.memory_bytes == 0 and zero.kept_tokens_per_layer == [0] * 4 and zero.settings is None
    assert zero.precision is None and zero.line is None
    assert zero.compile_seconds == 0 and zero.js_to_full_context > 1e-3


def test_backends_give_identical_answers_on_fp32_memories_with_fp32_weights(report, torch_report):
    """The deployed path (exported fp32 model under ONNX Runtime) answers as the PyTorch reference does."""
    assert torch_report.runtime["backend"] == "torch"
    fp32 = [c.name for c in report.conditions if c.precision in (None, "fp32")]
    assert fp32 == ["zero-shot", "full-context", f"{MAIN}-fp32"]
    for name in fp32:
        ort, ref = report.condition(name), torch_report.condition(name)
        assert ort.predictions == ref.predictions, name
        assert ort.kept_tokens_per_layer == ref.kept_tokens_per_layer
        assert ort.js_to_full_context == pytest.approx(ref.js_to_full_context, abs=1e-5)
        assert ref.ttft_ms is None and ref.tokens_per_s is None  # speed columns are the ORT path's


def test_uniform_baseline_has_main_int8_size_with_one_ratio_everywhere(report):
    emloc, uniform = report.condition(f"{MAIN}-int8"), report.condition("uniform-int8")
    assert len(set(emloc.kept_tokens_per_layer)) > 1, "precondition: EMLoC prunes layers differently"
    assert len(set(uniform.kept_tokens_per_layer)) == 1  # the same ratio in every layer of every chunk
    chunks = report.demos // CHUNK  # floor(ratio · L) per chunk loses less than one token a chunk
    assert abs(uniform.mean_kept_tokens_per_layer - emloc.mean_kept_tokens_per_layer) <= chunks
    assert uniform.settings["policy"] == "uniform" and uniform.settings["precision"] == "int8"
    assert uniform.settings["ratios"] == [pytest.approx(emloc.kept_fraction)]
    assert uniform.memory_bytes == pytest.approx(emloc.memory_bytes, rel=0.05)
    assert emloc.settings["policy"] == MAIN and emloc.settings["delta"] == CompileOptions().delta
    assert (emloc.line, uniform.line) == (f"{MAIN}-int8", "uniform-int8")


def test_memory_sizes_shrink_with_pruning_and_int8(report):
    size = {c.name: c.memory_bytes for c in report.conditions}
    assert size["full-context"] > size[f"{MAIN}-fp32"] > size[f"{MAIN}-int8"] > size["zero-shot"] == 0
    fp32, int8 = report.condition(f"{MAIN}-fp32"), report.condition(f"{MAIN}-int8")
    assert fp32.kept_fraction < 1 and int8.kept_fraction < 1
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert all(c.compile_seconds > 0 for c in report.conditions if c.name != "zero-shot")


def test_exact_match_strips_answers_and_only_asked_conditions_are_reported(report, adapter):
    """Items whose answer is what full context says (padded with spaces) are scored correct."""
    full = report.condition("full-context")
    items = [Demo(item["question"], f"  {p} ") for item, p in zip(report.items, full.predictions)]
    items[1] = Demo(items[1].question, "not what it says")
    demos = [Demo(r["question"], r["answer"]) for r in text_rows(8)]
    again = evaluate(demos, items, adapter, conditions="full-context", chunk_size=CHUNK, max_new_tokens=NEW_TOKENS,
                     limit=3, weights="fp32")
    assert [c.name for c in again.conditions] == ["full-context"] and again.test_items == 3
    assert again.conditions[0].correct_items == [True, False, True] and again.conditions[0].accuracy == 2 / 3


# ----------------------------------------------------------------------------------- sweep, policy
def test_sweep_adds_a_setting_per_policy_and_compiles_identical_settings_once(folders, adapter, monkeypatch, tmp_path):
    calls = []
    real = conditions_module.compile_demos
    monkeypatch.setattr(conditions_module, "compile_demos", lambda *a: calls.append(a[2]) or real(*a))
    delta = CompileOptions().delta
    r = evaluate(*folders, adapter, conditions=f"{MAIN}-int8,uniform-int8", sweep=[f"delta={delta},1", "ratio=0.3"],
                 chunk_size=CHUNK, max_new_tokens=2, limit=2, backend="torch")
    names = [c.name for c in r.conditions]
    assert names == [f"{MAIN}-int8", f"{MAIN}-int8@delta={delta:g}", f"{MAIN}-int8@delta=1", "uniform-int8",
                     "uniform-int8@ratio=0.3"]
    base, same, loose = (r.condition(n) for n in names[:3])
    assert same.predictions == base.predictions and same.memory_bytes == base.memory_bytes
    assert same.compile_seconds == base.compile_seconds  # one compile, one memory file
    assert loose.kept_fraction < base.kept_fraction and loose.settings["delta"] == 1.0
    assert r.condition("uniform-int8@ratio=0.3").settings["ratios"] == [0.3]
    assert {c.line for c in r.conditions} == {f"{MAIN}-int8", "uniform-int8"}
    # full-context (the reference), MAIN-int8, MAIN-int8 at delta 1, uniform sized like MAIN-int8, uniform 0.3
    assert len(calls) == 5
    r.write_plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_any_registered_policy_names_a_condition(folders, adapter):
    """--policy picks the main policy; every registered policy works as POLICY-PRECISION."""
    from emloc_edge.compile.policy import POLICIES

    asked = [f"{p}-fp16" for p in POLICIES]
    r = evaluate(*folders, adapter, conditions=asked, policy="uniform", chunk_size=CHUNK, max_new_tokens=2, limit=1,
                 backend="torch", device="cpu")
    assert [c.name for c in r.conditions] == asked and r.settings["policy"] == "uniform"
    assert r.runtime["weights"] == "fp32" and r.runtime["compile_device"] == "cpu"
    for c in r.conditions:
        assert c.settings["policy"] == c.name.rpartition("-")[0] and c.precision == "fp16"


@pytest.mark.parametrize("kwargs, words", [
    ({"sweep": ["ratio=0.2"], "conditions": "emloc-int8"}, ("sweep ratio", "no asked condition")),
    ({"sweep": ["size=0.2"]}, ("sweep", "size")),
    ({"sweep": ["ratio=0,0.5"]}, ("sweep ratio", "(0, 1]")),
    ({"sweep": ["delta"]}, ("sweep", "KNOB=")),
    ({"policy": "nope"}, ("policy", "nope")),
    ({"forced": "nope"}, ("forced", "nope")),
    ({"conditions": "nope-int8"}, ("conditions", "nope-int8")),
    ({"conditions": "uniform-int8@delta=0.1"}, ("uniform", "ratio")),
    ({"backend": "tensorrt"}, ("backend", "tensorrt")),
    ({"weights": "int2"}, ("weights", "int2")),
    ({"provider": "tpu"}, ("provider", "tpu")),
    ({"device": "tpu"}, ("device", "tpu")),
])
def test_bad_options_fail_before_the_model_loads(folders, tmp_path, kwargs, words):
    def never():
        raise AssertionError("the model was loaded")

    with pytest.raises(BadInputError) as e:
        evaluate(*folders, never, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


# ------------------------------------------------------------------------------------------ exports
def test_export_is_cached_per_weights_and_quantized_from_fp32(report, adapter, monkeypatch):
    """The fp32 export made by `report` is found again; int8 is quantized from it, not traced again."""
    fp32 = exports.find_export(adapter, "fp32")
    assert fp32 is not None and fp32 == exports.cache_dir(adapter, "fp32")
    assert exports.cached_export(adapter, "fp32") == fp32  # found, not exported again
    import emloc_edge.export.api as export_api

    assert exports.default_weights() in export_api.WEIGHTS
    monkeypatch.setattr(export_api, "export_model", lambda *a, **k: pytest.fail("traced again"))
    int8 = exports.cached_export(adapter, "int8")
    assert int8 == exports.cache_dir(adapter, "int8") != fp32
    assert exports.find_export(adapter, "int8") == int8


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_bad_input(folders, adapter):
    with pytest.raises(BadInputError, match="cuda|CUDA"):
        evaluate(*folders, adapter, conditions="zero-shot", device="cuda", limit=1, backend="torch")


def test_backends_agree_on_image_items_with_a_vision_model(tiny_vlm_dir, make_images, tmp_path):
    """Zero-shot and full context on image queries (the first-turn template with an image slot) answer
    alike under ONNX Runtime and PyTorch on the tiny VLM."""
    from test_tiny_vlm import image_demos

    adapter = load_model(tiny_vlm_dir(image_tokens=4))
    demos = image_demos(tmp_path / "demos", 4, make_images)
    tests = image_demos(tmp_path / "test", 2, make_images, seed=5)
    runs = [evaluate(demos, tests, adapter, conditions="zero-shot,full-context", chunk_size=2, max_new_tokens=4,
                     backend=b, weights="fp32") for b in ("ort", "torch")]
    for name in ("zero-shot", "full-context"):
        assert runs[0].condition(name).predictions == runs[1].condition(name).predictions, name
    assert runs[0].condition("zero-shot").js_to_full_context == pytest.approx(
        runs[1].condition("zero-shot").js_to_full_context, abs=1e-5)


def test_forced_reaches_every_compile(folders, adapter):
    """eval's forced is compile's: each condition's memory records it, and the report's settings name it."""
    r = evaluate(*folders, adapter, conditions=["emloc-context-fp32", "uniform-fp32"], forced="content",
                 chunk_size=CHUNK, max_new_tokens=2, limit=1, backend="torch", device="cpu")
    assert r.settings["forced"] == "content"
    assert all(c.settings["forced"] == "content" for c in r.conditions)
    assert "forced content" in r.table().splitlines()[-1]
