"""Tests for emloc_edge.compile.demos: both folder layouts, every bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from emloc_edge.compile.demos import Demo, load_demos


from demo_files import make_image, raises_one_line, write_jsonl  # noqa: E402

# ------------------------------------------------------------------------------------ happy paths
def test_jsonl_with_images_and_text(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "imgs" / "a.png")
    make_image(d / "b.jpg", fmt="JPEG")
    write_jsonl(d / "demos.jsonl", [
        {"image": "imgs/a.png", "question": "What colour?", "answer": "red"},
        "",
        "   ",
        {"image": "b.jpg", "question": "Shape?", "answer": "square"},
        {"question": "text only?", "answer": "yes"},
        {"image": None, "question": "null image?", "answer": "ok"},
    ])
    out = load_demos(d)
    assert out == [
        Demo("What colour?", "red", (d / "imgs" / "a.png").resolve()),
        Demo("Shape?", "square", (d / "b.jpg").resolve()),
        Demo("text only?", "yes", None),
        Demo("null image?", "ok", None),
    ]
    assert all(x.image is None or x.image.is_absolute() for x in out)


def test_text_only_jsonl_for_text_model(tmp_path):
    d = tmp_path / "demos"
    write_jsonl(d / "demos.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)])
    out = load_demos(d, needs_images=False)
    assert [x.answer for x in out] == [f"a{i}" for i in range(5)]  # file order kept
    assert all(x.image is None for x in out)


def test_jsonl_default_question_from_task_json(tmp_path):
    d = tmp_path / "demos"
    (d).mkdir()
    (d / "task.json").write_text(json.dumps({"question": "Task Q?"}))
    write_jsonl(d / "demos.jsonl", [{"answer": "x"}, {"question": "own Q", "answer": "y"}])
    out = load_demos(d)
    assert [(x.question, x.answer) for x in out] == [("Task Q?", "x"), ("own Q", "y")]


def test_jsonl_question_argument_wins_over_task_json(tmp_path):
    d = tmp_path / "demos"
    d.mkdir()
    (d / "task.json").write_text(json.dumps({"question": "Task Q?"}))
    write_jsonl(d / "demos.jsonl", [{"answer": "x"}, {"question": "own Q", "answer": "y"}])
    out = load_demos(d, question="CLI Q?")
    # the argument replaces the task.json default; a question written on the line is kept
    assert [(x.question, x.answer) for x in out] == [("CLI Q?", "x"), ("own Q", "y")]


def test_imagefolder_layout_interleaved_and_sorted(tmp_path):
    d = tmp_path / "demos"
    for cls, n in [("dog", 3), ("cat", 2), ("bird", 1)]:
        for i in range(n):
            make_image(d / cls / f"{cls}{i}.png")
    (d / "cat" / ".DS_Store").write_bytes(b"junk")       # hidden files skipped
    (d / ".hidden_class").mkdir()                          # hidden folders skipped
    (d / ".hidden_class" / "x.txt").write_text("no")
    (d / "task.json").write_text(json.dumps({"question": "Which animal?"}))
    out = load_demos(d, needs_images=True)
    assert [x.image.name for x in out] == ["bird0.png", "cat0.png", "dog0.png", "cat1.png", "dog1.png", "dog2.png"]
    assert [x.answer for x in out] == ["bird", "cat", "dog", "cat", "dog", "dog"]
    assert {x.question for x in out} == {"Which animal?"}
    assert all(x.image.is_absolute() and x.image.is_file() for x in out)
    # deterministic
    assert load_demos(d) == out


def test_imagefolder_question_argument_precedence(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "yes" / "1.png")
    make_image(d / "no" / "1.png")
    (d / "task.json").write_text(json.dumps({"question": "from task.json"}))
    assert {x.question for x in load_demos(d)} == {"from task.json"}
    assert {x.question for x in load_demos(d, question="from --question")} == {"from --question"}
    (d / "task.json").unlink()
    assert {x.question for x in load_demos(d, question="only arg")} == {"only arg"}


def test_jsonl_preferred_over_class_folders(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "imgs" / "a.png")
    write_jsonl(d / "demos.jsonl", [{"image": "imgs/a.png", "question": "q", "answer": "A"}])
    out = load_demos(d)
    assert [x.answer for x in out] == ["A"]  # not "imgs"


def test_utf8_bom_and_crlf_tolerated(tmp_path):
    d = tmp_path / "demos"
    d.mkdir()
    (d / "demos.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"question": "q1", "answer": "a1"}\r\n{"question": "q2", "answer": "\xc3\xa9"}\r\n')
    assert [(x.question, x.answer) for x in load_demos(d)] == [("q1", "a1"), ("q2", "\u00e9")]


# --------------------------------------------------------------------------------- folder errors
def test_folder_missing(tmp_path):
    raises_one_line("demos folder not found", load_demos, tmp_path / "nope")


def test_folder_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    msg = raises_one_line("not a directory", load_demos, f)
    assert str(f) in msg


def test_empty_folder(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "README.md").write_text("nothing")
    msg = raises_one_line("no demonstrations", load_demos, d)
    assert "demos.jsonl" in msg and str(d) in msg


def test_empty_jsonl(tmp_path):
    d = tmp_path / "demos"
    d.mkdir()
    (d / "demos.jsonl").write_text("\n\n  \n")
    raises_one_line("no demonstrations", load_demos, d)


# ---------------------------------------------------------------------------------- JSONL errors
@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"question": "q" "answer": "a"}', "not valid JSON (Expecting ',' delimiter)"),
        ("{not json", "not valid JSON"),
        ('["q", "a"]', "expected a JSON object"),
        ('"just a string"', "got string"),
        ("42", "got number"),
        ('{"question": "q"}', 'missing field "answer"'),
        ('{"question": "q", "answer": ""}', 'field "answer" is empty'),
        ('{"question": "q", "answer": "   "}', 'field "answer" is empty'),
        ('{"question": "q", "answer": 3}', 'field "answer" must be a string, got number'),
        ('{"question": "q", "answer": null}', 'field "answer" must be a string, got null'),
        ('{"answer": "a"}', 'missing field "question"'),
        ('{"question": "", "answer": "a"}', 'field "question" is empty'),
        ('{"question": ["q"], "answer": "a"}', 'field "question" must be a string, got array'),
        ('{"question": "q", "answer": "a", "image": 5}', 'field "image" must be a string'),
        ('{"question": "q", "answer": "a", "image": ""}', 'field "image" is empty'),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, expected):
    d = tmp_path / "demos"
    write_jsonl(d / "demos.jsonl", [
        {"question": "q1", "answer": "a1"},
        "",
        {"question": "q2", "answer": "a2"},
        bad_line,                      # line 4 (blank line 2 still counts)
        {"question": "q5", "answer": "a5"},
    ])
    msg = raises_one_line(expected, load_demos, d)
    assert msg.startswith(f"{d / 'demos.jsonl'}:4: "), msg


def test_jsonl_message_uses_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("demos") / "demos.jsonl", ['{"question": "q" "answer": "a"}'])
    msg = raises_one_line("", load_demos, Path("demos"))
    assert msg == "demos/demos.jsonl:1: not valid JSON (Expecting ',' delimiter)"


def test_jsonl_invalid_utf8(tmp_path):
    d = tmp_path / "demos"
    d.mkdir()
    (d / "demos.jsonl").write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "a"}\n')
    msg = raises_one_line("not valid UTF-8", load_demos, d)
    assert ":2:" in msg


def test_jsonl_image_missing(tmp_path):
    d = tmp_path / "demos"
    write_jsonl(d / "demos.jsonl", [{"image": "imgs/nope.jpg", "question": "q", "answer": "a"}])
    msg = raises_one_line("not found", load_demos, d)
    assert msg.startswith(f"{d / 'demos.jsonl'}:1: ") and "imgs/nope.jpg" in msg


def test_jsonl_image_not_an_image(tmp_path):
    d = tmp_path / "demos"
    d.mkdir()
    (d / "fake.jpg").write_text("this is not a jpeg")
    write_jsonl(d / "demos.jsonl", [{"image": "fake.jpg", "question": "q", "answer": "a"}])
    msg = raises_one_line("not an image", load_demos, d)
    assert msg.startswith(f"{d / 'demos.jsonl'}:1: ") and "fake.jpg" in msg


def test_jsonl_image_truncated(tmp_path):
    d = tmp_path / "demos"
    p = make_image(d / "t.jpg", size=(64, 64), fmt="JPEG")
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    write_jsonl(d / "demos.jsonl", [{"image": "t.jpg", "question": "q", "answer": "a"}])
    msg = raises_one_line("truncated", load_demos, d)
    assert "t.jpg" in msg and ":1:" in msg


def test_jsonl_image_unreadable(tmp_path, monkeypatch):
    """Permission denied on open (simulated: tests often run as root, who can read any file)."""

    d = tmp_path / "demos"
    make_image(d / "locked.png")
    write_jsonl(d / "demos.jsonl", [{"image": "locked.png", "question": "q", "answer": "a"}])

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(d / "locked.png"))

    monkeypatch.setattr(Image, "open", denied)
    raises_one_line("not readable", load_demos, d)


def test_jsonl_image_is_a_directory(tmp_path):
    d = tmp_path / "demos"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "demos.jsonl", [{"image": "sub", "question": "q", "answer": "a"}])
    raises_one_line("not a file", load_demos, d)


@pytest.mark.parametrize("rel", ["../outside.png", "imgs/../../outside.png"])
def test_jsonl_image_escaping_folder_rejected(tmp_path, rel):
    d = tmp_path / "demos"
    make_image(tmp_path / "outside.png")
    (d / "imgs").mkdir(parents=True)
    write_jsonl(d / "demos.jsonl", [{"image": rel, "question": "q", "answer": "a"}])
    raises_one_line("outside the demos folder", load_demos, d)


def test_jsonl_absolute_image_rejected(tmp_path):
    d = tmp_path / "demos"
    p = make_image(d / "a.png")
    write_jsonl(d / "demos.jsonl", [{"image": str(p), "question": "q", "answer": "a"}])
    raises_one_line("must be relative", load_demos, d)


# ----------------------------------------------------------------------------- needs_images checks
def test_needs_images_true_but_text_demo(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "a.png")
    write_jsonl(d / "demos.jsonl", [
        {"image": "a.png", "question": "q", "answer": "a"},
        {"question": "q", "answer": "b"},
    ])
    assert len(load_demos(d)) == 2  # accepted when the model kind is unknown
    msg = raises_one_line("has no \"image\"", load_demos, d, needs_images=True)
    assert msg.startswith(f"{d / 'demos.jsonl'}:2: ") and "vision-language" in msg


def test_needs_images_false_but_image_demo(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "a.png")
    write_jsonl(d / "demos.jsonl", [
        {"question": "q", "answer": "b"},
        {"image": "a.png", "question": "q", "answer": "a"},
    ])
    msg = raises_one_line("text-only", load_demos, d, needs_images=False)
    assert msg.startswith(f"{d / 'demos.jsonl'}:2: ") and "image" in msg


def test_needs_images_false_with_imagefolder(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "cat" / "1.png")
    raises_one_line("text-only", load_demos, d, question="q", needs_images=False)


# ------------------------------------------------------------------------------ ImageFolder errors
def test_imagefolder_without_question(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "cat" / "1.png")
    msg = raises_one_line("needs a question", load_demos, d)
    assert "task.json" in msg and "--question" not in msg  # library errors name no CLI flag


def test_imagefolder_non_image_file(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "cat" / "1.png")
    (d / "cat" / "notes.txt").write_text("hello")
    msg = raises_one_line("not an image file", load_demos, d, question="q")
    assert str(d / "cat" / "notes.txt") in msg


def test_imagefolder_corrupt_image(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "cat" / "1.png")
    (d / "dog").mkdir()
    (d / "dog" / "2.png").write_bytes(b"\x89PNG garbage")
    msg = raises_one_line("2.png", load_demos, d, question="q")
    assert "not an image" in msg or "corrupt" in msg


def test_imagefolder_empty_class(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "cat" / "1.png")
    (d / "dog").mkdir()
    raises_one_line("contains no images", load_demos, d, question="q")


def test_imagefolder_nested_folder(tmp_path):
    d = tmp_path / "demos"
    make_image(d / "cat" / "sub" / "1.png")
    raises_one_line("unexpected sub-folder", load_demos, d, question="q")


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"question": "q"', "not valid JSON"),
        ('["q"]', "must be a JSON object"),
        ('{"question": 5}', '"question" must be a string'),
        ('{"question": "  "}', '"question" is empty'),
    ],
)
def test_task_json_malformed(tmp_path, content, expected):
    d = tmp_path / "demos"
    make_image(d / "cat" / "1.png")
    (d / "task.json").write_text(content)
    msg = raises_one_line(expected, load_demos, d)
    assert msg.startswith(f"{d / 'task.json'}: ")
    # even an explicit question does not hide a broken task.json
    raises_one_line(expected, load_demos, d, question="q")


def test_empty_question_argument(tmp_path):
    d = tmp_path / "demos"
    write_jsonl(d / "demos.jsonl", [{"question": "q", "answer": "a"}])
    raises_one_line("question is empty", load_demos, d, question="  ")
