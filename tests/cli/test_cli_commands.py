"""`emloc-edge` happy paths: compile, inspect, append, help, version."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from emloc_edge import __version__
from emloc_edge.memory import TaskMemory

from support import SUMMARY_KEYS, FAST, cli, text_demos, image_folder, strict_json, listing  # noqa: E402


def test_compile_json_summary(llama_memory, llama_dir: Path):
    path, s = llama_memory
    assert SUMMARY_KEYS <= set(s), SUMMARY_KEYS - set(s)
    memory = TaskMemory.load(path)
    assert s["file_bytes"] == path.stat().st_size
    assert s["model"] == llama_dir.name
    assert s["num_layers"] == memory.meta.num_layers == 4
    kept = s["kept_tokens_per_layer"]
    assert isinstance(kept, list) and len(kept) == s["num_layers"] and all(type(k) is int for k in kept)
    assert kept == memory.meta.kept_tokens_per_layer
    assert 0 < min(kept) and max(kept) <= s["context_tokens"] == memory.meta.context_tokens
    assert s["compression"] == pytest.approx(sum(kept) / len(kept) / s["context_tokens"])
    assert 0 < s["compression"] < 1, "the default delta prunes something"
    assert s["position_offset"] == memory.meta.position_offset > 0
    assert (s["precision"], s["delta"], s["ratios"]) == ("int8", 0.005, [0.1, 0.2, 0.3, 0.5])  # the default policy's own
    assert (s["chunks"], s["demos"]) == (2, 6)  # the default: the first token's segment, then the whole context
    assert s["format_version"] == 1
    assert Path(s["output"]) == path


def test_compile_text_summary(llama_dir: Path, tmp_path: Path, out_dir: Path):
    demos = text_demos(tmp_path / "demos", n=4)
    out = out_dir / "t.emloc"
    result = cli("compile", demos, "--model", llama_dir, "-o", out, *FAST)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    memory = TaskMemory.load(out)
    m = memory.meta
    text = result.stdout
    assert f"compiled 4 demos in 1 chunk + the first token's own segment with {llama_dir.name}" in text
    assert [c.demos for c in m.chunks] == [0, 4], "the default's two records: the first token, then the whole context"
    kept = m.kept_tokens_per_layer
    assert f"{m.context_tokens} context tokens -> {sum(kept) / len(kept):.1f} kept per layer" in text
    assert f"min {min(kept)}, max {max(kept)}" in text
    assert f"compression {100 * m.compression:.1f}% of the context, int8" in text
    size = out.stat().st_size
    assert f"-> {out} ({size / 1024:.1f} KB)" in text
    assert listing(out_dir) == {"t.emloc"}, "no temp files next to the memory"
    assert result.stderr == "", "-q: no progress bar"


def test_compile_without_quiet_shows_progress_on_stderr_only(llama_dir: Path, tmp_path: Path, out_dir: Path):
    demos = text_demos(tmp_path / "demos", n=2)
    result = cli("compile", demos, "--model", llama_dir, "-o", out_dir / "p.emloc", "--chunk-size", "2", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    strict_json(result.stdout)
    assert result.stderr == "", "--json implies no progress bar"
    result = cli("compile", demos, "--model", llama_dir, "-o", out_dir / "p.emloc", "--chunk-size", "2")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "chunk 1/1 (2 demos)" in result.stderr
    assert "chunk 1/1" not in result.stdout and result.stdout.startswith(
        "compiled 2 demos in 1 chunk + the first token's own segment")


def test_delta_inf_json_is_strict(llama_dir: Path, tmp_path: Path, out_dir: Path):
    demos = text_demos(tmp_path / "demos", n=4)
    out = out_dir / "inf.emloc"
    result = cli("compile", demos, "--model", llama_dir, "-o", out, "--delta", "inf", "--json", *FAST)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout
    s = strict_json(result.stdout)
    assert s["delta"] == "inf"
    assert s["file_bytes"] == out.stat().st_size
    assert math.isinf(TaskMemory.load(out).meta.hyperparameters["delta"])
    s2 = strict_json(cli("inspect", out, "--json").stdout)
    assert s2["delta"] == "inf"


def test_inspect_json_matches_compile(llama_memory):
    path, compiled = llama_memory
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    s = strict_json(result.stdout)
    assert SUMMARY_KEYS <= set(s)
    assert set(s) == set(compiled) - {"output", "seconds"}
    assert {k: s[k] for k in s} == {k: compiled[k] for k in s}
    assert s["file_bytes"] == path.stat().st_size


def test_inspect_text(llama_memory, llama_dir: Path):
    path, s = llama_memory
    result = cli("inspect", path)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip() for line in result.stdout.splitlines()}
    assert rows["file"].startswith(str(path)) and "format v1" in rows["file"]
    assert rows["model"] == f"{llama_dir.name} (llama, 4 layers)"
    assert rows["demos"] == "6 in 1 chunk + the first token's own segment"
    assert rows["kept per layer"] == " ".join(map(str, s["kept_tokens_per_layer"]))
    assert rows["position offset"] == str(s["position_offset"])
    assert rows["precision"] == "int8"
    assert "chunk size 2" in rows["settings"]


def test_append_with_output_grows_a_copy(llama_dir: Path, memory_copy: Path, tmp_path: Path, out_dir: Path):
    before = memory_copy.read_bytes()
    old = TaskMemory.load(memory_copy).meta
    more = text_demos(tmp_path / "more", n=3, seed=5)
    out = out_dir / "grown.emloc"
    result = cli("compile", more, "--model", llama_dir, "--append", memory_copy, "-o", out, "--json", "-q")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    s = strict_json(result.stdout)
    assert memory_copy.read_bytes() == before, "the --append file must stay as it was when -o is given"
    assert (s["chunks"], s["demos"]) == (len(old.chunks) + 1, old.demos + 3)  # the memory's policy: one chunk
    assert s["context_tokens"] > old.context_tokens
    assert s["position_offset"] > old.position_offset
    assert all(new > o for new, o in zip(s["kept_tokens_per_layer"], old.kept_tokens_per_layer))
    assert s["file_bytes"] == out.stat().st_size > len(before)
    assert listing(out_dir) == {"mem.emloc", "grown.emloc"}


def test_append_without_output_rewrites_in_place(llama_dir: Path, memory_copy: Path, tmp_path: Path, out_dir: Path):
    before = memory_copy.read_bytes()
    old = TaskMemory.load(memory_copy).meta
    more = text_demos(tmp_path / "more", n=2, seed=6)
    result = cli("compile", more, "--model", llama_dir, "--append", memory_copy, "-q")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert memory_copy.read_bytes() != before
    new = TaskMemory.load(memory_copy).meta
    assert (len(new.chunks), new.demos) == (len(old.chunks) + 1, old.demos + 2)
    assert new.chunks[: len(old.chunks)] == old.chunks
    assert f"-> {memory_copy} (" in result.stdout
    assert listing(out_dir) == {"mem.emloc"}, "no temp file or task.emloc next to the memory"


def test_imagefolder_layout_on_qwen2_vl(qwen2_vl_dir: Path, make_images, tmp_path: Path, out_dir: Path):
    demos = image_folder(tmp_path / "imgs", make_images, per_class=2)
    out = out_dir / "vl.emloc"
    result = cli("compile", demos, "--model", qwen2_vl_dir, "--question", "which animal?", "-o", out, "--json", *FAST)
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    s = strict_json(result.stdout)
    assert (s["demos"], s["chunks"], s["model"]) == (4, 2, qwen2_vl_dir.name)
    assert s["model_family"] == "qwen2_vl"
    assert s["position_offset"] < s["context_tokens"], "M-RoPE: images advance positions by less than their tokens"
    assert s["file_bytes"] == out.stat().st_size
    assert listing(out_dir) == {"vl.emloc"}


def test_model_from_environment(llama_dir: Path, tmp_path: Path, out_dir: Path, monkeypatch):
    monkeypatch.setenv("EMLOC_EDGE_MODEL", str(llama_dir))
    out = out_dir / "env.emloc"
    result = cli("compile", text_demos(tmp_path / "d", n=2), "-o", out, "--json", *FAST)
    assert result.exit_code == 0, (result.output, result.exception)
    assert strict_json(result.stdout)["model"] == llama_dir.name and out.is_file()


@pytest.mark.parametrize("command, options", [
    ([], ["compile", "inspect", "--version", "--help"]),
    (["compile"], ["DEMOS_DIR", "--model", "EMLOC_EDGE_MODEL", "--output", "--delta", "--ratios", "--chunk-size",
                   "--precision", "--append", "--question", "--quiet", "--json"]),
    (["inspect"], ["MEMORY_FILE", "--json"]),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(command, options, flag):
    result = cli(*command, flag)
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.stdout, option


def test_version():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"emloc-edge, version {__version__}"


@pytest.mark.parametrize("policy", ["emloc-context", "emloc", "emloc-paper", "uniform"])
def test_compile_policy_and_device(llama_dir: Path, tmp_path: Path, out_dir: Path, policy: str):
    demos = text_demos(tmp_path / "demos", n=4)
    out = out_dir / "t.emloc"
    result = cli("compile", demos, "--model", llama_dir, "-o", out, "--policy", policy, "--device", "cpu", *FAST)
    assert result.exit_code == 0, (result.output, result.exception)
    assert TaskMemory.load(out).meta.hyperparameters["policy"] == policy


def test_compile_unknown_policy_is_a_usage_error(llama_dir: Path, tmp_path: Path):
    demos = text_demos(tmp_path / "demos", n=2)
    result = cli("compile", demos, "--model", llama_dir, "--policy", "nope", *FAST)
    assert result.exit_code == 2 and "--policy" in result.stderr


@pytest.mark.parametrize("demos_per_record, text", [
    ([2, 2, 2], "3 chunks"), ([6], "1 chunk"), ([0, 6], "1 chunk + the first token's own segment"),
    ([0, 6, 2], "2 chunks + the first token's own segment"), ([0, 0, 3], "1 chunk + 2 segments without demos"),
])
def test_chunk_records_without_demos_are_not_counted_as_chunks(demos_per_record, text):
    from emloc_edge.cli import _chunks

    assert _chunks({"chunks": len(demos_per_record), "chunk_details": [{"demos": d} for d in demos_per_record]}) == text
