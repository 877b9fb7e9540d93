"""Property/fuzz tests of the demos reader: any crafted folder gives demos or one BadInputError line.

Families (cases per run = max_examples):
    JSONL        demos.jsonl lines: any JSON (deep, 5,000-digit numbers, lone surrogates), raw bytes, huge lines,
                 image paths with NUL bytes, symlink loops, links outside, 5,000-character paths
    IMAGEFOLDER  class folders with links outside / looping, hidden and non-image files, any task.json
    LENGTH       the token cap compile applies once the tokenizer is known
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from emloc_edge.compile import demos as demos_module
from emloc_edge.compile.demos import MAX_DEMO_TOKENS, MAX_LINE_BYTES, Demo, check_demo_lengths, load_demos
from emloc_edge.errors import BadInputError
from demo_files import make_image

JSONL_EXAMPLES, FOLDER_EXAMPLES, LENGTH_EXAMPLES = 300, 150, 100
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

texts = st.text(max_size=12) | st.sampled_from(["\ud800", "a\udfffb", "\x00", " ", "q?", "\u2028", "é" * 3])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
image_paths = st.sampled_from([
    "img.png", "sub/img.png", "../outside.png", "link_out.png", "loop.png", "sub/loop2.png", "a\x00b.png",
    "x" * 5000 + ".png", "sub/" * 1200 + "img.png", "/etc/passwd", "missing.png", "notes.png", "", " ", ".",
    "sub", "dirlink", "broken.png", "new\nline.png", "sep\u2028.png",
]) | texts
raw_lines = st.sampled_from([
    "[" * 5000 + "]" * 5000, '{"question": "q", "answer": ' + "1" * 5000 + "}", "{" * 50 + "}" * 50,
    '{"answer": ' + "[" * 20 + "]" * 20 + ', "question": "q"}', '{"question": "\\ud800", "answer": "a"}',
    '{"question": "q", "answer": "\\udfff"}', "NaN", "\ufeff{}", "\x00", "1e999999",
])


@st.composite
def jsonl_lines(draw) -> list[bytes]:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["demo", "demo", "demo", "json", "raw", "bytes"]))
        if kind == "demo":
            obj = {k: draw(st.sampled_from([None, "q?", "a"]) | texts | json_values)
                   for k in draw(st.sets(st.sampled_from(["question", "answer", "image", "extra"])))}
            if "image" in obj and draw(st.booleans()):
                obj["image"] = draw(image_paths)
            if draw(st.integers(0, 20)) == 0:
                obj["answer"] = "a" * draw(st.sampled_from([MAX_LINE_BYTES, demos_module.MAX_DEMO_TEXT_BYTES + 1]))
            lines.append(json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass"))
        elif kind == "json":
            lines.append(json.dumps(draw(json_values)).encode())
        elif kind == "raw":
            lines.append(draw(raw_lines).encode("utf-8", "surrogatepass"))
        else:
            lines.append(draw(st.binary(max_size=40)))
    return lines


def _layout(root: Path) -> None:
    """The files image paths in the strategies point at: good, broken, looping and outside ones."""
    (root / "demos" / "sub").mkdir(parents=True)
    make_image(root / "demos" / "img.png")
    make_image(root / "demos" / "sub" / "img.png")
    make_image(root / "outside.png")
    (root / "demos" / "notes.png").write_text("not an image")
    (root / "demos" / "broken.png").write_bytes(make_png_bytes()[:40])
    os.symlink(root / "outside.png", root / "demos" / "link_out.png")
    os.symlink("loop.png", root / "demos" / "loop.png")
    os.symlink("loop3.png", root / "demos" / "sub" / "loop2.png")
    os.symlink("loop2.png", root / "demos" / "sub" / "loop3.png")
    os.symlink(root, root / "demos" / "dirlink")


def make_png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def assert_demos_or_one_line(path: Path, **kwargs) -> list[Demo] | None:
    try:
        out = load_demos(path, **kwargs)
    except BadInputError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and msg.strip() and len(msg) < 1200, msg
        event("refused: " + " ".join(msg.split(": ", 1)[-1].split()[:3]))  # --hypothesis-show-statistics
        return None
    event("accepted")
    assert out and all(isinstance(d, Demo) for d in out)
    root = path.resolve()
    for d in out:  # what is accepted is text the tokenizer can take and images inside the folder
        d.question.encode("utf-8"), d.answer.encode("utf-8")
        assert d.image is None or d.image.is_relative_to(root)
    return out


@settings(max_examples=JSONL_EXAMPLES, **FUZZ)
@given(lines=jsonl_lines(), question=st.none() | st.just("default?"), task=st.none() | json_values | raw_lines,
       needs=st.sampled_from([None, True, False]))
def test_crafted_jsonl_gives_demos_or_one_line(lines, question, task, needs):
    with tempfile.TemporaryDirectory(prefix="fuzzdemos") as tmp:
        root = Path(tmp)
        _layout(root)
        (root / "demos" / "demos.jsonl").write_bytes(b"\n".join(lines))
        if task is not None:
            text = task if isinstance(task, str) and task[:1] in "[{\ufeff1N\x00" else json.dumps({"question": task})
            (root / "demos" / "task.json").write_bytes(text.encode("utf-8", "surrogatepass"))
        assert_demos_or_one_line(root / "demos", question=question, needs_images=needs)


entries = st.sampled_from(["good", "good", "link_out", "loop", "hidden", "notes", "subdir", "broken", "dirlink_out"])


@settings(max_examples=FOLDER_EXAMPLES, **FUZZ)
@given(classes=st.dictionaries(st.text(st.characters(exclude_characters="/\x00"), min_size=1, max_size=8)
                               | st.sampled_from(["\udcff", "a\udce9", " ", "...", "two\nlines", "x\u2029y"]),
                               st.lists(entries, max_size=3), min_size=1, max_size=3),
       class_link=st.sampled_from([None, "outside", "loop"]), task=st.none() | json_values | raw_lines,
       question=st.none() | st.just("which?") | st.just("\ud800"))
def test_crafted_image_folder_gives_demos_or_one_line(classes, class_link, task, question):
    with tempfile.TemporaryDirectory(prefix="fuzzfolder") as tmp:
        root = Path(tmp)
        make_image(root / "outside" / "o.png")
        demos = root / "demos"
        demos.mkdir()
        for name, files in classes.items():
            try:  # a non-UTF-8 name (b"\xff" -> "\udcff") is made as bytes, as another program would
                os.makedirs(os.fsencode(demos / name), exist_ok=True)
            except (OSError, UnicodeEncodeError):  # a name no file system holds is not a demos folder
                continue
            for i, kind in enumerate(files):
                _entry(demos / name, i, kind, root)
        if class_link == "outside":
            os.symlink(root / "outside", demos / "linked_class")
        elif class_link == "loop":
            os.symlink("looped", demos / "looped")
        if task is not None:
            text = task if isinstance(task, str) and task[:1] in "[{\ufeff1N\x00" else json.dumps({"question": task})
            (demos / "task.json").write_bytes(text.encode("utf-8", "surrogatepass"))
        out = assert_demos_or_one_line(demos, question=question)
        if out is not None:
            assert class_link != "outside" and all(d.image.is_relative_to(demos.resolve()) for d in out)


def _entry(folder: Path, i: int, kind: str, root: Path) -> None:
    target = folder / f"{i}.png"
    if kind == "good":
        make_image(target)
    elif kind == "link_out":
        os.symlink(root / "outside" / "o.png", target)
    elif kind == "loop":
        os.symlink(target.name, target)
    elif kind == "hidden":
        (folder / f".{i}.txt").write_text("x")
    elif kind == "notes":
        (folder / f"{i}.txt").write_text("x")
    elif kind == "subdir":
        (folder / f"d{i}").mkdir()
    elif kind == "broken":
        target.write_bytes(make_png_bytes()[:30])
    else:
        os.symlink(root / "outside", folder / f"{i}.jpg")


@settings(max_examples=LENGTH_EXAMPLES, **FUZZ)
@given(question=st.text(max_size=40), answer=st.text(min_size=1, max_size=40), repeat=st.integers(1, 3000))
def test_demo_token_cap(question, answer, repeat):
    """check_demo_lengths refuses exactly the demos over MAX_DEMO_TOKENS (whitespace 'tokenizer' here)."""
    count = lambda text: len(text.split())  # noqa: E731
    demo = Demo(question * repeat, answer)
    n = count(demo.question) + count(demo.answer)
    bad_text = any("\x00" in t or not _utf8(t) or len(t.encode("utf-8", "surrogatepass")) > demos_module.MAX_DEMO_TEXT_BYTES
                   for t in (demo.question, demo.answer))
    if n > MAX_DEMO_TOKENS or bad_text:
        with pytest.raises(BadInputError):
            check_demo_lengths([demo], count, "demos")
    else:
        check_demo_lengths([demo], count, "demos")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ---- the instances the issue lists, each once, by name ----

def _jsonl(tmp_path: Path, *lines: str) -> Path:
    d = tmp_path / "demos"
    d.mkdir(exist_ok=True)
    (d / "demos.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    return d


@pytest.mark.parametrize("line, named", [
    ("[" * 100000 + "]" * 100000, "JSON"),
    ('{"question": "q", "answer": "a", "n": ' + "1" * 5000 + "}", "JSON"),
    ('{"question": "\\ud800", "answer": "a"}', "lone surrogate"),
    ('{"question": "q", "answer": "\\udfff"}', "lone surrogate"),
    ('{"image": "a\\u0000b.png", "question": "q", "answer": "a"}', "NUL"),
    ('{"image": "' + "x" * 5000 + '.png", "question": "q", "answer": "a"}', "demos.jsonl:1"),
    ('{"question": "q", "answer": "' + "a" * (2 * 2**20) + '"}', "bytes"),
])
def test_listed_jsonl_instances(tmp_path, line, named):
    with pytest.raises(BadInputError, match=named) as e:
        load_demos(_jsonl(tmp_path, line))
    assert len(str(e.value).splitlines()) == 1


def test_listed_symlink_instances(tmp_path):
    d = _jsonl(tmp_path, '{"image": "loop.png", "question": "q", "answer": "a"}')
    os.symlink("loop.png", d / "loop.png")
    with pytest.raises(BadInputError, match="demos.jsonl:1"):
        load_demos(d)
    folder = tmp_path / "folder"
    make_image(tmp_path / "out.png")
    (folder / "cat").mkdir(parents=True)
    os.symlink(tmp_path / "out.png", folder / "cat" / "1.png")
    with pytest.raises(BadInputError, match="outside the demos folder"):
        load_demos(folder, question="q")
    os.unlink(folder / "cat" / "1.png")
    os.symlink("1.png", folder / "cat" / "1.png")
    with pytest.raises(BadInputError, match="cannot be resolved"):
        load_demos(folder, question="q")


def test_deep_task_json_and_long_folder_path(tmp_path):
    d = _jsonl(tmp_path, '{"question": "q", "answer": "a"}')
    (d / "task.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BadInputError, match="task.json"):
        load_demos(d)
    with pytest.raises(BadInputError):
        load_demos(tmp_path / ("x" * 5000))
