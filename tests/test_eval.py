"""`emloc-edge eval` and `emloc_edge.evaluate`: each condition's context, scored on held-out text items.

One evaluation of all conditions on the tiny random Llama (8 demos in chunks of 2, 4 test items) is shared
by the API tests; the CLI tests run small subsets. A random model answers gibberish, so accuracy is
checked against plain transformers and against items whose answers are known, not against chance.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cli"))
from support import assert_bad_input, cli, strict_json, text_rows, write_jsonl  # noqa: E402

from emloc_edge.compile.demos import Demo, load_demos  # noqa: E402
from emloc_edge.evaluate import CONDITION_NAMES, evaluate  # noqa: E402
from emloc_edge.models.loading import load_model  # noqa: E402

CHUNK, NEW_TOKENS = 2, 6
CONDITION_FIELDS = {
    "name", "correct", "total", "accuracy", "memory_bytes", "kept_tokens_per_layer", "mean_kept_tokens_per_layer",
    "kept_fraction", "ms_per_query", "js_to_full_context", "compile_seconds", "settings", "predictions",
    "correct_items",
}
REPORT_FIELDS = {"model", "demos", "test_items", "context_tokens", "distinct_answers", "chance", "settings",
                 "conditions", "items"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("eval")
    return write_jsonl(base / "demos", text_rows(8)), write_jsonl(base / "test", text_rows(4, seed=3))


@pytest.fixture(scope="module")
def adapter(llama_dir: Path):
    return load_model(llama_dir)


@pytest.fixture(scope="module")
def report(folders, adapter):
    demos, test = folders
    return evaluate(demos, test, adapter, chunk_size=CHUNK, max_new_tokens=NEW_TOKENS)


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


# ---------------------------------------------------------------------------------------------- API
def test_reports_every_condition_in_order_with_consistent_counts(report, folders, adapter):
    demos = load_demos(folders[0])
    assert [c.name for c in report.conditions] == list(CONDITION_NAMES)
    assert (report.demos, report.test_items, report.distinct_answers) == (8, 4, 4)
    assert report.chance == 0.25
    ids = adapter.tokenizer(adapter.chat.render(adapter.chat.messages(demos)), add_special_tokens=False)["input_ids"]
    assert report.context_tokens == len(ids)
    answers = [item["answer"].strip() for item in report.items]
    for c in report.conditions:
        assert c.total == 4 and len(c.predictions) == 4
        assert c.correct_items == [p == a for p, a in zip(c.predictions, answers)]
        assert c.correct == sum(c.correct_items) and c.accuracy == c.correct / c.total
        assert c.ms_per_query > 0 and math.isfinite(c.js_to_full_context)
        assert c.mean_kept_tokens_per_layer == pytest.approx(sum(c.kept_tokens_per_layer) / 4)
        fraction = c.mean_kept_tokens_per_layer / report.context_tokens if c.memory_bytes else 0.0
        assert c.kept_fraction == pytest.approx(fraction)


def test_full_context_answers_equal_plain_transformers_generate(report, folders, adapter):
    demos, full = load_demos(folders[0]), report.condition("full-context")
    conversation = adapter.chat.messages(demos)
    expected = [_hf_greedy(adapter, conversation + [_user(adapter, item["question"])]) for item in report.items]
    assert full.predictions == expected
    assert full.kept_tokens_per_layer == [report.context_tokens] * 4 and full.kept_fraction == 1.0
    assert full.settings["delta"] < 0 and full.settings["precision"] == "fp32"
    assert abs(full.js_to_full_context) < 1e-7  # its own distributions


def test_zero_shot_is_the_query_alone_with_an_empty_memory(report, adapter):
    zero = report.condition("zero-shot")
    expected = [_hf_greedy(adapter, [_user(adapter, item["question"])]) for item in report.items]
    assert zero.predictions == expected
    assert zero.memory_bytes == 0 and zero.kept_tokens_per_layer == [0] * 4 and zero.settings is None
    assert zero.compile_seconds == 0 and zero.js_to_full_context > 1e-3


def test_uniform_baseline_has_emloc_int8_size_with_one_ratio_everywhere(report):
    emloc, uniform = report.condition("emloc-int8"), report.condition("uniform-int8")
    assert len(set(emloc.kept_tokens_per_layer)) > 1, "precondition: EMLoC prunes layers differently"
    assert len(set(uniform.kept_tokens_per_layer)) == 1  # the same ratio in every layer of every chunk
    chunks = report.demos // CHUNK  # floor(ratio · L) per chunk loses less than one token a chunk
    assert abs(uniform.mean_kept_tokens_per_layer - emloc.mean_kept_tokens_per_layer) <= chunks
    assert uniform.settings["policy"] == "uniform" and uniform.settings["precision"] == "int8"
    assert uniform.settings["ratios"] == [pytest.approx(emloc.kept_fraction)]
    assert uniform.memory_bytes == pytest.approx(emloc.memory_bytes, rel=0.05)
    assert emloc.settings["policy"] == "emloc" and emloc.settings["delta"] == 0.005


def test_memory_sizes_shrink_with_pruning_and_int8(report):
    size = {c.name: c.memory_bytes for c in report.conditions}
    assert size["full-context"] > size["emloc-fp32"] > size["emloc-int8"] > size["zero-shot"] == 0
    fp32, int8 = report.condition("emloc-fp32"), report.condition("emloc-int8")
    assert fp32.kept_fraction < 1 and int8.kept_fraction < 1
    assert all(c.compile_seconds > 0 for c in report.conditions if c.name != "zero-shot")


def test_exact_match_strips_answers_and_only_asked_conditions_are_reported(report, adapter):
    """Items whose answer is what full context says (padded with spaces) are scored correct."""
    full = report.condition("full-context")
    items = [Demo(item["question"], f"  {p} ") for item, p in zip(report.items, full.predictions)]
    items[1] = Demo(items[1].question, "not what it says")
    demos = [Demo(r["question"], r["answer"]) for r in text_rows(8)]
    again = evaluate(demos, items, adapter, conditions="full-context", chunk_size=CHUNK, max_new_tokens=NEW_TOKENS,
                     limit=3)
    assert [c.name for c in again.conditions] == ["full-context"] and again.test_items == 3
    assert again.conditions[0].correct_items == [True, False, True] and again.conditions[0].accuracy == 2 / 3


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_json_and_plot_and_honours_limit_and_conditions(folders, llama_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    result = cli("eval", *folders, "--model", llama_dir, "--json", out / "r.json", "--plot", out / "r.png",
                 "--limit", 2, "--conditions", "emloc-int8,zero-shot", "--chunk-size", CHUNK,
                 "--max-new-tokens", 3, "-q")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert result.stderr == ""  # -q: no progress bar
    assert {p.name for p in out.iterdir()} == {"r.json", "r.png"}  # no temp files left
    data = strict_json((out / "r.json").read_text())
    assert set(data) == REPORT_FIELDS
    assert [c["name"] for c in data["conditions"]] == ["zero-shot", "emloc-int8"]  # report order, full-context left out
    assert all(set(c) == CONDITION_FIELDS for c in data["conditions"])
    assert data["test_items"] == 2 and len(data["items"]) == 2
    assert all(c["total"] == 2 and len(c["predictions"]) == 2 for c in data["conditions"])
    assert data["settings"] == {"delta": 0.005, "ratios": [0.1, 0.2, 0.5], "chunk_size": CHUNK,
                                "max_new_tokens": 3, "limit": 2, "reference": "full-context"}
    assert data["model"] == llama_dir.name and data["chance"] == 0.25
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["condition", "accuracy"]
    assert [line.split()[0] for line in lines[1:3]] == ["zero-shot", "emloc-int8"]
    assert lines[3].startswith("chance 0.250") and len(lines) == 4


def test_cli_json_to_stdout_shows_progress_on_stderr(folders, llama_dir: Path):
    result = cli("eval", *folders, "--model", llama_dir, "--json", "-", "--limit", 1, "--conditions", "zero-shot",
                 "--max-new-tokens", 2)
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    data = strict_json(result.stdout)
    assert [c["name"] for c in data["conditions"]] == ["zero-shot"] and data["test_items"] == 1
    assert "zero-shot" in result.stderr  # the tqdm bar, labelled with the stage


def test_cli_missing_test_dir_fails_before_the_model_loads(folders, tmp_path: Path):
    missing = tmp_path / "no-such-tests"
    result = cli("eval", folders[0], missing, "--model", tmp_path / "no-such-model", "-q")
    assert_bad_input(result, missing, "not found")


def test_cli_unknown_condition(folders, tmp_path: Path):
    result = cli("eval", *folders, "--model", tmp_path / "no-such-model", "--conditions", "zero-shot,few-shot")
    assert_bad_input(result, "few-shot", "--conditions")


@pytest.mark.parametrize("option, name", [("--json", "missing/r.json"), ("--plot", "missing/r.png"),
                                          ("--plot", "r.jpg")])
def test_cli_unwritable_outputs_fail_up_front(folders, tmp_path: Path, option: str, name: str):
    result = cli("eval", *folders, "--model", tmp_path / "no-such-model", option, tmp_path / name)
    assert_bad_input(result, option, tmp_path / name)


def test_cli_empty_test_folder(folders, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_bad_input(cli("eval", folders[0], empty, "--model", tmp_path / "no-such-model"), empty)


def test_cli_image_item_for_a_text_model(folders, llama_dir: Path, tmp_path: Path, make_images):
    test = tmp_path / "image-tests"
    image = make_images(test / "imgs", 1, 0)[0]
    write_jsonl(test, [{"question": "which bin?", "answer": "A"},
                       {"image": f"imgs/{image.name}", "question": "which bin?", "answer": "B"}])
    line = assert_bad_input(cli("eval", folders[0], test, "--model", llama_dir, "-q"), test / "demos.jsonl")
    assert ":2:" in line and "text-only" in line
