"""`emloc-edge eval`: flags, outputs and bad inputs (the API is tested in test_eval.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cli"))
from support import assert_bad_input, cli, strict_json, write_jsonl  # noqa: E402

from emloc_edge.compile.compressor import CompileOptions  # noqa: E402

CHUNK = 2
MAIN = CompileOptions().policy
CONDITION_FIELDS = {
    "name", "line", "correct", "total", "accuracy", "memory_bytes", "precision", "size_vs_full_context", "weights",
    "kept_tokens_per_layer", "mean_kept_tokens_per_layer", "kept_fraction", "ms_per_query", "ttft_ms", "tokens_per_s",
    "js_to_full_context", "compile_seconds", "settings", "predictions", "correct_items", "lost_to_full_context",
    "won_over_full_context", "p_vs_full_context",
}
REPORT_FIELDS = {"model", "demos", "test_items", "context_tokens", "distinct_answers", "chance", "runtime", "settings",
                 "conditions", "items"}


@pytest.fixture(scope="module", autouse=True)
def _isolated_home(eval_home):  # conftest.py: exports cached under a per-module $EMLOC_EDGE_HOME
    return eval_home


def test_cli_writes_json_and_plot_and_honours_limit_and_conditions(folders, llama_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    result = cli("eval", *folders, "--model", llama_dir, "--json", out / "r.json", "--plot", out / "r.png",
                 "--limit", 2, "--conditions", f"{MAIN}-int8,zero-shot", "--chunk-size", CHUNK,
                 "--max-new-tokens", 3, "--weights", "fp32", "--provider", "cpu", "--threads", 1, "-q")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert result.stderr == ""  # -q: no progress bar
    assert {p.name for p in out.iterdir()} == {"r.json", "r.png"}  # no temp files left
    data = strict_json((out / "r.json").read_text())
    assert set(data) == REPORT_FIELDS
    assert [c["name"] for c in data["conditions"]] == ["zero-shot", f"{MAIN}-int8"]  # report order
    assert all(set(c) == CONDITION_FIELDS for c in data["conditions"])
    assert all(c["lost_to_full_context"] is None for c in data["conditions"])  # full-context not asked: unpaired
    assert data["test_items"] == 2 and len(data["items"]) == 2
    assert all(c["total"] == 2 and len(c["predictions"]) == 2 for c in data["conditions"])
    defaults = CompileOptions()
    assert data["settings"] == {"delta": defaults.delta, "ratios": list(defaults.keep_ratios), "chunk_size": CHUNK,
                                "policy": MAIN, "forced": None, "max_new_tokens": 3, "limit": 2, "reference": "full-context"}
    assert {k: data["runtime"][k] for k in ("backend", "weights", "provider", "threads")} == {
        "backend": "ort", "weights": "fp32", "provider": "cpu", "threads": 1}
    assert data["model"] == llama_dir.name and data["chance"] == 0.25
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["condition", "accuracy", "vs", "full", "memory"]
    assert [line.split()[0] for line in lines[1:3]] == ["zero-shot", f"{MAIN}-int8"]
    assert lines[3].startswith("chance 0.250") and "ort backend, fp32 weights, cpu provider" in lines[3]
    assert len(lines) == 4


def test_cli_sweep_and_torch_backend(folders, llama_dir: Path):
    result = cli("eval", *folders, "--model", llama_dir, "--json", "-", "--limit", 1, "--backend", "torch",
                 "--conditions", "uniform-int8", "--sweep", "ratio=0.3,0.6", "--chunk-size", CHUNK,
                 "--max-new-tokens", 2, "-q")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    data = strict_json(result.stdout)
    assert [c["name"] for c in data["conditions"]] == ["uniform-int8", "uniform-int8@ratio=0.3",
                                                       "uniform-int8@ratio=0.6"]
    assert data["runtime"]["backend"] == "torch" and all(c["ttft_ms"] is None for c in data["conditions"])


def test_cli_json_to_stdout_shows_progress_on_stderr(folders, llama_dir: Path):
    result = cli("eval", *folders, "--model", llama_dir, "--json", "-", "--limit", 1, "--conditions", "zero-shot",
                 "--max-new-tokens", 2, "--backend", "torch")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    data = strict_json(result.stdout)
    assert [c["name"] for c in data["conditions"]] == ["zero-shot"] and data["test_items"] == 1
    assert "zero-shot" in result.stderr  # the tqdm bar, labelled with the stage


def test_cli_missing_test_dir_fails_before_the_model_loads(folders, tmp_path: Path):
    missing = tmp_path / "no-such-tests"
    result = cli("eval", folders[0], missing, "--model", tmp_path / "no-such-model", "-q")
    assert_bad_input(result, missing, "not found")


@pytest.mark.parametrize("args, words", [
    (("--conditions", "zero-shot,few-shot"), ("few-shot", "--conditions")),
    (("--sweep", "size=1"), ("--sweep", "size")),
    (("--conditions", "zero-shot", "--sweep", "delta=0.1"), ("sweep delta", "no asked condition", "--sweep")),
    (("--policy", "nope"), ("--policy", "nope")),
])
def test_cli_bad_condition_options(folders, tmp_path: Path, args, words):
    assert_bad_input(cli("eval", *folders, "--model", tmp_path / "no-such-model", *args), *words)


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
