"""`emloc-edge` command line: happy paths, and the one-line error / exit code 2 contract for bad input.

Contract under test (issue text): bad input -- a missing, unreadable or non-image file, a malformed JSON
line (named with its line number), an empty answer, an empty folder, a context longer than the model's
positions, an unknown model folder, a corrupt or truncated memory file, a memory from another model given
to ``--append`` -- gets a one-line error, exit code 2, no traceback, and no partial output file.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from emloc_edge import __version__
from emloc_edge.cli import main
from emloc_edge.memory import TaskMemory

SUMMARY_KEYS = {
    "format_version", "model", "num_layers", "context_tokens", "kept_tokens_per_layer", "compression",
    "position_offset", "precision", "delta", "ratios", "chunks", "demos", "file_bytes",
}
WORDS = "red green blue small large round square metal wooden plastic heavy light old new".split()
FAST = ["--chunk-size", "2", "-q"]


# ------------------------------------------------------------------------------------------- helpers
def cli(*args: object) -> Result:
    # catch_exceptions: an exception escaping the command is then reported by the assertions below
    # (exit code 1 and result.exception set) instead of aborting the test run.
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def write_jsonl(folder: Path, rows: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / "demos.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def text_rows(n: int, seed: int = 0, words: int = 4) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"question": f"which bin for the {' '.join(rng.choice(WORDS, size=words))} item?", "answer": "ABCD"[i % 4]}
        for i in range(n)
    ]


def text_demos(folder: Path, n: int = 4, seed: int = 0, words: int = 4) -> Path:
    return write_jsonl(folder, text_rows(n, seed, words))


def image_folder(folder: Path, make_images, per_class: int = 2) -> Path:
    """ImageFolder layout: DEMOS/<answer>/<image>."""
    for k, answer in enumerate(("cat", "dog")):
        make_images(folder / answer, per_class, k)
    return folder


def strict_json(text: str) -> dict:
    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name} in output")

    return json.loads(text, parse_constant=refuse)


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_bad_input(result: Result, *names: object, out: Path | None = None,
                     out_dir: Path | None = None, expect_in_dir: set[str] = frozenset()) -> str:
    """Exit 2, exactly one `error: ...` line on stderr naming `names`, no traceback, nothing written."""
    everything = result.output + result.stderr
    assert "Traceback" not in everything, everything
    assert result.exit_code == 2, (result.exit_code, everything, result.exception)
    assert type(result.exception) is SystemExit, repr(result.exception)  # handled, not an escaped error
    assert result.stdout == "", f"nothing belongs on stdout for an error: {result.stdout!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: "):].strip(), line
    for name in names:
        assert str(name) in line, f"{name!s} not named in {line!r}"
    if out is not None:
        assert not out.exists(), f"partial output {out} was left behind"
    if out_dir is not None:
        assert listing(out_dir) == set(expect_in_dir), f"stray files in {out_dir}: {listing(out_dir)}"
    return line


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every command in an empty folder, so a default `task.emloc` cannot land in the repo."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield
    assert listing(work) == set(), f"the command wrote into the working folder: {listing(work)}"


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def llama_memory(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A memory compiled once by the CLI from 6 text demos (3 chunks), and its --json summary."""
    base = tmp_path_factory.mktemp("llama_memory")
    demos = text_demos(base / "demos", n=6)
    out = base / "task.emloc"
    result = cli("compile", demos, "--model", llama_dir, "-o", out, "--json", *FAST)
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return out, strict_json(result.stdout)


@pytest.fixture
def memory_copy(llama_memory, out_dir: Path) -> Path:
    """A private copy of the compiled memory (tests may corrupt or append to it)."""
    path = out_dir / "mem.emloc"
    path.write_bytes(llama_memory[0].read_bytes())
    return path


@pytest.fixture
def good_demos(tmp_path: Path) -> Path:
    return text_demos(tmp_path / "good_demos", n=2, seed=7)


# --------------------------------------------------------------------------------------- happy paths
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
    assert (s["precision"], s["delta"], s["ratios"]) == ("int8", 0.005, [0.1, 0.2, 0.5])
    assert (s["chunks"], s["demos"]) == (3, 6)
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
    assert f"compiled 4 demos in 2 chunks with {llama_dir.name}" in text
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
    assert "chunk 1/1" not in result.stdout and result.stdout.startswith("compiled 2 demos in 1 chunks")


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
    assert rows["demos"] == "6 in 3 chunks"
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
    assert (s["chunks"], s["demos"]) == (len(old.chunks) + 2, old.demos + 3)  # memory's chunk size 2: 2 + 1
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


# ------------------------------------------------------------------------------- bad demonstrations
def test_missing_demos_folder(llama_dir: Path, tmp_path: Path, out_dir: Path):
    missing = tmp_path / "nope"
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", missing, "--model", llama_dir, "-o", out, *FAST), missing,
                            out=out, out_dir=out_dir)
    assert "not found" in line


def test_demos_path_is_a_file(llama_dir: Path, tmp_path: Path, out_dir: Path):
    f = tmp_path / "demos.txt"
    f.write_text("hello")
    out = out_dir / "x.emloc"
    assert_bad_input(cli("compile", f, "--model", llama_dir, "-o", out, *FAST), f, out=out, out_dir=out_dir)


def test_empty_demos_folder(llama_dir: Path, tmp_path: Path, out_dir: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", empty, "--model", llama_dir, "-o", out, *FAST), empty,
                            out=out, out_dir=out_dir)
    assert "no demonstrations" in line


def test_empty_jsonl(llama_dir: Path, tmp_path: Path, out_dir: Path):
    demos = write_jsonl(tmp_path / "d", ["", "  "])
    out = out_dir / "x.emloc"
    assert_bad_input(cli("compile", demos, "--model", llama_dir, "-o", out, *FAST), demos / "demos.jsonl",
                     out=out, out_dir=out_dir)


@pytest.mark.parametrize("bad, why", [
    ('{"question": "q?", "answer": ', "not valid JSON"),
    ('["q?", "A"]', "expected a JSON object"),
    ('{"question": "q?", "answer": ""}', 'field "answer" is empty'),
    ('{"question": "q?", "answer": "   "}', 'field "answer" is empty'),
    ('{"question": "q?"}', 'missing field "answer"'),
    ('{"question": "", "answer": "A"}', 'field "question" is empty'),
])
def test_bad_jsonl_line_is_named_with_its_number(llama_dir: Path, tmp_path: Path, out_dir: Path, bad, why):
    demos = write_jsonl(tmp_path / "d", text_rows(2) + [bad] + text_rows(1))
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", llama_dir, "-o", out, *FAST),
                            f"{demos / 'demos.jsonl'}:3:", out=out, out_dir=out_dir)
    assert why in line


def _image_row(image: str) -> dict:
    return {"image": image, "question": "which animal?", "answer": "cat"}


def test_image_does_not_exist(qwen2_vl_dir: Path, make_images, tmp_path: Path, out_dir: Path):
    folder = tmp_path / "d"
    make_images(folder, 1, 0)
    demos = write_jsonl(folder, [_image_row("img_0_000.png"), _image_row("missing.png")])
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", qwen2_vl_dir, "-o", out, *FAST),
                            f"{demos / 'demos.jsonl'}:2:", folder / "missing.png", out=out, out_dir=out_dir)
    assert "not found" in line


def test_image_file_is_not_an_image(qwen2_vl_dir: Path, tmp_path: Path, out_dir: Path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x.png").write_text("this is not a picture\n")
    demos = write_jsonl(folder, [_image_row("x.png")])
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", qwen2_vl_dir, "-o", out, *FAST),
                            f"{demos / 'demos.jsonl'}:1:", folder / "x.png", out=out, out_dir=out_dir)
    assert "not an image" in line


def test_truncated_image(qwen2_vl_dir: Path, make_images, tmp_path: Path, out_dir: Path):
    folder = tmp_path / "d"
    (png,) = make_images(folder, 1, 0)
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    demos = write_jsonl(folder, [_image_row(png.name)])
    out = out_dir / "x.emloc"
    assert_bad_input(cli("compile", demos, "--model", qwen2_vl_dir, "-o", out, *FAST),
                     f"{demos / 'demos.jsonl'}:1:", png, out=out, out_dir=out_dir)


def test_image_path_is_a_directory(qwen2_vl_dir: Path, tmp_path: Path, out_dir: Path):
    folder = tmp_path / "d"
    (folder / "dir.png").mkdir(parents=True)
    demos = write_jsonl(folder, [_image_row("dir.png")])
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", qwen2_vl_dir, "-o", out, *FAST),
                            f"{demos / 'demos.jsonl'}:1:", folder / "dir.png", out=out, out_dir=out_dir)
    assert "not a file" in line


def test_unreadable_image(qwen2_vl_dir: Path, make_images, tmp_path: Path, out_dir: Path, monkeypatch):
    """Permission denied while opening (root reads anything, so the opener is made to refuse)."""
    import PIL.Image

    folder = tmp_path / "d"
    good, locked = make_images(folder, 2, 0)
    real_open = PIL.Image.open

    def refusing_open(fp, *args, **kwargs):
        if Path(fp).name == locked.name:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", refusing_open)
    demos = write_jsonl(folder, [_image_row(good.name), _image_row(locked.name)])
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", qwen2_vl_dir, "-o", out, *FAST),
                            f"{demos / 'demos.jsonl'}:2:", locked, out=out, out_dir=out_dir)
    assert "not readable" in line


def test_imagefolder_with_a_non_image_file(qwen2_vl_dir: Path, make_images, tmp_path: Path, out_dir: Path):
    demos = image_folder(tmp_path / "imgs", make_images, per_class=1)
    (demos / "dog" / "notes.txt").write_text("hi")
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", qwen2_vl_dir, "--question", "which?", "-o", out, *FAST),
                            demos / "dog" / "notes.txt", out=out, out_dir=out_dir)
    assert "not an image file" in line


def test_imagefolder_without_question(qwen2_vl_dir: Path, make_images, tmp_path: Path, out_dir: Path):
    demos = image_folder(tmp_path / "imgs", make_images, per_class=1)
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", qwen2_vl_dir, "-o", out, *FAST), demos,
                            out=out, out_dir=out_dir)
    assert "--question" in line


def test_text_only_model_given_image_demos(llama_dir: Path, make_images, tmp_path: Path, out_dir: Path):
    folder = tmp_path / "d"
    (png,) = make_images(folder, 1, 0)
    demos = write_jsonl(folder, [_image_row(png.name)])
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", llama_dir, "-o", out, *FAST), demos,
                            out=out, out_dir=out_dir)
    assert "text-only" in line


def test_context_longer_than_the_models_positions(tiny_model_dir, tmp_path: Path, out_dir: Path):
    short = tiny_model_dir("llama", max_position_embeddings=64)
    demos = text_demos(tmp_path / "d", n=4, words=12)
    out = out_dir / "x.emloc"
    line = assert_bad_input(cli("compile", demos, "--model", short, "-o", out, *FAST), demos,
                            out=out, out_dir=out_dir)
    assert "positions" in line and "64" in line


# ------------------------------------------------------------------------------------- bad models
def _bad_model(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"model_{kind}"
    if kind == "empty":
        path.mkdir()
    elif kind == "garbage-config":
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    elif kind == "file":
        path.write_text("not a model")
    return path  # "missing": never created


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage-config", "file"])
def test_unknown_model(kind, good_demos: Path, tmp_path: Path, out_dir: Path):
    model = _bad_model(tmp_path, kind)
    out = out_dir / "x.emloc"
    assert_bad_input(cli("compile", good_demos, "--model", model, "-o", out, *FAST), model, out=out, out_dir=out_dir)


def test_model_option_is_required(good_demos: Path, monkeypatch):
    monkeypatch.delenv("EMLOC_EDGE_MODEL", raising=False)
    result = cli("compile", good_demos)
    assert result.exit_code == 2 and "--model" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("ratios", ["abc", "0.1,,0.5", ""])
def test_ratios_not_numbers_is_a_usage_error(ratios, llama_dir: Path, good_demos: Path, out_dir: Path):
    out = out_dir / "x.emloc"
    result = cli("compile", good_demos, "--model", llama_dir, "--ratios", ratios, "-o", out, *FAST)
    assert result.exit_code == 2, (result.output, result.exception)
    assert type(result.exception) is SystemExit
    assert "--ratios" in result.stderr and "Traceback" not in result.output + result.stderr
    assert result.stdout == "" and not out.exists() and listing(out_dir) == set()


@pytest.mark.parametrize("args, named", [
    (["--ratios", "0,0.5"], "ratios"),
    (["--ratios", "2"], "ratios"),
    (["--delta", "nan"], "--delta"),
])
def test_bad_option_values(args, named, llama_dir: Path, good_demos: Path, out_dir: Path):
    out = out_dir / "x.emloc"
    assert_bad_input(cli("compile", good_demos, "--model", llama_dir, *args, "-o", out, *FAST), named,
                     out=out, out_dir=out_dir)


@pytest.mark.parametrize("bad", ["0", "-1", "x"])
def test_chunk_size_must_be_a_positive_int(bad, llama_dir: Path, good_demos: Path, out_dir: Path):
    result = cli("compile", good_demos, "--model", llama_dir, "--chunk-size", bad, "-o", out_dir / "x.emloc", "-q")
    assert result.exit_code == 2 and "--chunk-size" in result.stderr and listing(out_dir) == set()


def test_output_folder_missing(llama_dir: Path, good_demos: Path, out_dir: Path):
    out = out_dir / "no_such_dir" / "x.emloc"
    line = assert_bad_input(cli("compile", good_demos, "--model", llama_dir, "-o", out, *FAST), out,
                            out=out, out_dir=out_dir)
    assert ".tmp" not in line, "the user's path is named, not the temp file"


def test_output_is_a_folder(llama_dir: Path, good_demos: Path, out_dir: Path):
    target = out_dir / "a_folder.emloc"
    target.mkdir()
    assert_bad_input(cli("compile", good_demos, "--model", llama_dir, "-o", target, *FAST), target,
                     out_dir=out_dir, expect_in_dir={"a_folder.emloc"})
    assert list(target.iterdir()) == []


# ----------------------------------------------------------------------------------- bad memories
def corrupt(path: Path) -> None:
    """Flip one byte near the end: inside the tensor payload, after the header."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


DAMAGE = {"corrupt": (corrupt, "checksum mismatch"), "truncated": (truncate, "truncated")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_inspect_damaged_memory(damage, memory_copy: Path, out_dir: Path):
    fn, why = DAMAGE[damage]
    fn(memory_copy)
    before = memory_copy.read_bytes()
    for args in (["--json"], []):
        line = assert_bad_input(cli("inspect", memory_copy, *args), memory_copy, out_dir=out_dir,
                                expect_in_dir={"mem.emloc"})
        assert why in line
    assert memory_copy.read_bytes() == before


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("with_output", [True, False])
def test_append_to_damaged_memory(damage, with_output, llama_dir: Path, memory_copy: Path, good_demos: Path,
                                  out_dir: Path):
    fn, why = DAMAGE[damage]
    fn(memory_copy)
    before = memory_copy.read_bytes()
    out = out_dir / "grown.emloc"
    args = ["-o", out] if with_output else []
    line = assert_bad_input(cli("compile", good_demos, "--model", llama_dir, "--append", memory_copy, *args, "-q"),
                            memory_copy, out=out, out_dir=out_dir, expect_in_dir={"mem.emloc"})
    assert why in line
    assert memory_copy.read_bytes() == before


def test_inspect_missing_and_non_memory_files(tmp_path: Path, out_dir: Path):
    missing = out_dir / "missing.emloc"
    assert_bad_input(cli("inspect", missing), missing, out_dir=out_dir)
    text = out_dir / "notes.emloc"
    text.write_text("hello, not a memory\n" * 10)
    assert_bad_input(cli("inspect", text), text, out_dir=out_dir, expect_in_dir={"notes.emloc"})
    assert_bad_input(cli("inspect", out_dir), out_dir, out_dir=out_dir, expect_in_dir={"notes.emloc"})


def test_append_memory_of_another_model(tiny_model_dir, llama_dir: Path, tmp_path: Path, good_demos: Path,
                                        out_dir: Path):
    other = tiny_model_dir("llama", seed=1)  # same architecture and tokenizer, other weights
    foreign = out_dir / "foreign.emloc"
    made = cli("compile", text_demos(tmp_path / "d0", n=2), "--model", other, "-o", foreign, *FAST)
    assert made.exit_code == 0, (made.output, made.exception)
    before = foreign.read_bytes()
    for args in (["-o", out_dir / "grown.emloc"], []):
        line = assert_bad_input(cli("compile", good_demos, "--model", llama_dir, "--append", foreign, *args, "-q"),
                                foreign, out=out_dir / "grown.emloc", out_dir=out_dir,
                                expect_in_dir={"foreign.emloc"})
        assert "compiled for" in line
        assert foreign.read_bytes() == before


SETTINGS = {"--delta": "0.005", "--chunk-size": "2", "--precision": "int8", "--ratios": "0.1,0.2,0.5"}


@pytest.mark.parametrize("option, value", [
    ("--delta", "0.01"), ("--chunk-size", "3"), ("--precision", "fp32"), ("--ratios", "0.2,0.5"),
])
@pytest.mark.parametrize("with_output", [True, False])
def test_append_with_conflicting_settings(option, value, with_output, llama_dir: Path, memory_copy: Path,
                                          good_demos: Path, out_dir: Path):
    before = memory_copy.read_bytes()
    out = out_dir / "grown.emloc"
    args = ["-o", out] if with_output else []
    line = assert_bad_input(
        cli("compile", good_demos, "--model", llama_dir, "--append", memory_copy, *args, option, value, "-q"),
        memory_copy, f"{option} {SETTINGS[option]}", value, out=out, out_dir=out_dir, expect_in_dir={"mem.emloc"},
    )
    assert "settings" in line
    assert not any(other in line for other in SETTINGS if other != option), "only the conflicting option is named"
    assert memory_copy.read_bytes() == before


def test_append_with_the_memorys_own_settings_is_fine(llama_dir: Path, memory_copy: Path, good_demos: Path,
                                                      out_dir: Path):
    """Repeating the memory's settings explicitly is not a conflict (guards the conflict test above)."""
    out = out_dir / "grown.emloc"
    result = cli("compile", good_demos, "--model", llama_dir, "--append", memory_copy, "-o", out,
                 "--delta", "0.005", "--ratios", "0.5,0.1,0.2", "--chunk-size", "2", "--precision", "int8", "-q")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert TaskMemory.load(out).meta.demos == 8


def test_append_file_missing(llama_dir: Path, good_demos: Path, out_dir: Path):
    missing = out_dir / "missing.emloc"
    assert_bad_input(cli("compile", good_demos, "--model", llama_dir, "--append", missing, "-q"), missing,
                     out=missing, out_dir=out_dir)


# ------------------------------------------------------------------------------ outside CliRunner
def _console(*args: object) -> list[str]:
    script = Path(sys.executable).with_name("emloc-edge")
    if script.is_file():
        return [str(script), *map(str, args)]
    return [sys.executable, "-m", "emloc_edge.cli", *map(str, args)]


@pytest.mark.parametrize("how", ["module", "script"])
def test_real_process_exit_code_and_one_line(how, memory_copy: Path, tmp_path: Path, out_dir: Path):
    """A real interpreter: the exit status is 2 and stderr is one line, with no traceback."""
    truncate(memory_copy)
    args = ["inspect", memory_copy]
    cmd = [sys.executable, "-m", "emloc_edge.cli", *map(str, args)] if how == "module" else _console(*args)
    if how == "script":
        assert cmd[0] != sys.executable, "the emloc-edge console script is not installed next to python"
    env = {k: v for k, v in os.environ.items() if k != "EMLOC_EDGE_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(memory_copy) in lines[0], lines


def test_real_process_compile_missing_folder(tmp_path: Path, llama_dir: Path, out_dir: Path):
    missing, out = tmp_path / "no_demos", out_dir / "x.emloc"
    env = {k: v for k, v in os.environ.items() if k != "EMLOC_EDGE_DEBUG"}
    proc = subprocess.run(_console("compile", missing, "--model", llama_dir, "-o", out, "-q"),
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], lines
    assert listing(out_dir) == set()


def test_debug_env_shows_the_traceback(tmp_path: Path, monkeypatch):
    """EMLOC_EDGE_DEBUG=1 re-raises, so the one-line handling above is really the handler's doing."""
    from emloc_edge.errors import MemoryFileError

    monkeypatch.setenv("EMLOC_EDGE_DEBUG", "1")
    result = cli("inspect", tmp_path / "missing.emloc")
    assert isinstance(result.exception, MemoryFileError)
