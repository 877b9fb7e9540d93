"""Read a folder of demonstrations (image + question + answer, or text-only question + answer).

Only the standard library, Pillow and numpy are imported here (no torch), so the demo folder can be checked
before any model is loaded. Every problem is raised as :class:`~emloc_edge.errors.BadInputError` with a
one-line message that names the file (and, for JSONL, the line number), e.g.::

    demos/demos.jsonl:7: not valid JSON (Expecting ',' delimiter)

Two folder layouts are accepted:

(a) **JSONL** -- ``DEMOS_DIR/demos.jsonl``, one JSON object per line::

        {"image": "imgs/cat1.jpg", "question": "What animal is this?", "answer": "cat"}
        {"question": "Which bin does 'banana' go to?", "answer": "B3"}          # text-only

    ``image`` is optional (absent or null = text-only demo) and is a path relative to ``DEMOS_DIR``
    that must stay inside it. ``question`` may be omitted when a default question is given (the
    ``question`` argument, else ``DEMOS_DIR/task.json``). Blank lines are skipped. Demos keep file order.

(b) **ImageFolder** -- ``DEMOS_DIR/<answer>/<image file>``: the class folder name is the answer; the
    question is the ``question`` argument, else ``{"question": ...}`` from ``DEMOS_DIR/task.json``.
    Hidden files and folders (names starting with ``.``) are skipped; any other non-image file in a
    class folder is an error. Order is deterministic and *interleaved*: classes are sorted by name,
    images within a class are sorted by file name, and the demos are taken round-robin over the classes
    (1st image of every class, then the 2nd of every class, ...). Any run of consecutive demos -- e.g.
    one chunk of the task memory -- therefore covers several answers instead of a single class.

If ``demos.jsonl`` exists, layout (a) is used and sub-folders are ignored (they typically hold images).

Limits (refused up front, before any model loads): a JSONL line of at most :data:`MAX_LINE_BYTES`, a question
plus answer of at most :data:`MAX_DEMO_TEXT_BYTES` UTF-8 bytes, JSON nested at most :data:`MAX_JSON_DEPTH` deep;
once the tokenizer is known, ``compile`` refuses a demo whose question plus answer is longer than
:data:`MAX_DEMO_TOKENS` tokens (:func:`check_demo_lengths`). Images, also symlinked ones, must lie inside the
demos folder in both layouts.

Question precedence: an explicit ``question`` argument wins over ``task.json`` (which is only a default)
for ImageFolder demos and for JSONL lines without a ``question``; a ``question`` written on a JSONL line
is always used as is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emloc_edge.errors import BadInputError
from emloc_edge.runtime.image import MAX_IMAGE_PIXELS as _DEFAULT_MAX_PIXELS
from emloc_edge.runtime.image import load_image

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage

__all__ = ["Demo", "load_demos", "check_demo_lengths", "open_image", "DEMOS_FILE", "TASK_FILE", "MAX_IMAGE_PIXELS",
           "IMAGE_EXTENSIONS", "MAX_DEMO_TOKENS"]

DEMOS_FILE = "demos.jsonl"
TASK_FILE = "task.json"
#: Longest demo (question + answer, image tokens not counted) compile accepts, in tokens of the model.
MAX_DEMO_TOKENS = 2048
#: Byte caps checked before tokenizing: no token is 32 bytes long, so these never refuse a demo within MAX_DEMO_TOKENS.
MAX_DEMO_TEXT_BYTES = 32 * MAX_DEMO_TOKENS
MAX_LINE_BYTES = 4 * MAX_DEMO_TEXT_BYTES  # a JSONL line: question, answer, image path and JSON escapes
MAX_JSON_DEPTH = 16  # a demo line is one flat object
#: Largest image (width * height) accepted; larger files are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = _DEFAULT_MAX_PIXELS  # Pillow's default warning threshold; tests lower it here
#: File extensions recognised as images in the ImageFolder layout (any other non-hidden file is an error).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)


@dataclass(frozen=True)
class Demo:
    """One demonstration. ``image`` is an absolute path, already validated as a readable image."""

    question: str
    answer: str
    image: Path | None = None


# --------------------------------------------------------------------------------------------- images
def _where(path: Path) -> str:
    return str(path)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _loads(text: str, where: str, position: bool = True) -> object:
    """json.loads where every failure (bad syntax, a 5,000-digit number, deep nesting) is one BadInputError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno} column {e.colno}" if position else ""
        raise BadInputError(f"{where}: not valid JSON ({e.msg}{at})") from None
    except (ValueError, RecursionError) as e:
        raise BadInputError(f"{where}: not usable JSON ({_one_line(e)[:80] or type(e).__name__})") from None
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadInputError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(x, (dict, list)):
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return obj


def _check_text(value: str, what: str, where: str) -> None:
    """Refuse text the tokenizer cannot take: lone surrogates (not UTF-8) and NUL bytes; and over-long text."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadInputError(f"{where}: {what} is not valid Unicode (it holds a lone surrogate)") from None
    if "\x00" in value:
        raise BadInputError(f"{where}: {what} holds a NUL character")
    if size > MAX_DEMO_TEXT_BYTES:
        raise BadInputError(f"{where}: {what} is {size} bytes long; a demo may have at most {MAX_DEMO_TEXT_BYTES} "
                            f"bytes (and {MAX_DEMO_TOKENS} tokens) of text")


def open_image(path: Path) -> "_PILImage.Image":
    """Open ``path`` as a fully decoded RGB image with its EXIF orientation applied (transparency
    composited on white).

    Raises :class:`BadInputError` (one line, naming the file) if the file is missing, not a regular file,
    unreadable, not an image, truncated/corrupt, or larger than :data:`MAX_IMAGE_PIXELS` pixels
    (decompression-bomb guard). The runtime reads images through the same function
    (:func:`emloc_edge.runtime.image.load_image`), so compile and query see identical pixels.
    """
    return load_image(path, max_pixels=MAX_IMAGE_PIXELS)  # this module's limit, read at call time


def _check_image(path: Path, shown: Path) -> None:
    """Validate an image (fully decodes it once); errors name ``shown`` (the path as the user wrote it)."""
    try:
        open_image(path).close()
    except BadInputError as e:
        msg = str(e)
        prefix = f"{path}: "
        raise BadInputError(f"{shown}: {msg[len(prefix):]}" if msg.startswith(prefix) else msg) from None


# ------------------------------------------------------------------------------------------ task.json
def _read_task_question(shown_dir: Path, root: Path) -> str | None:
    """The default question from ``task.json`` (None if the file is absent or has no "question")."""
    task = root / TASK_FILE
    if not task.exists():
        return None
    where = _where(shown_dir / TASK_FILE)
    if not task.is_file():
        raise BadInputError(f"{where}: not a file")
    try:
        text = task.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{where}: not valid UTF-8 text") from None
    except OSError as e:
        raise BadInputError(f"{where}: cannot read ({_one_line(e.strerror or e)})") from None
    if len(text) > MAX_LINE_BYTES:
        raise BadInputError(f"{where}: {len(text)} characters long; a task file may have at most {MAX_LINE_BYTES}")
    obj = _loads(text, where)
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: must be a JSON object like {{\"question\": \"...\"}}, got {_json_type(obj)}")
    if "question" not in obj:
        return None
    q = obj["question"]
    if not isinstance(q, str):
        raise BadInputError(f"{where}: \"question\" must be a string, got {_json_type(q)}")
    if not q.strip():
        raise BadInputError(f"{where}: \"question\" is empty")
    _check_text(q, "\"question\"", where)
    return q


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__
    )


# -------------------------------------------------------------------------------------------- layouts
def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _string_field(obj: dict, field: str, loc: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise BadInputError(f"{loc}: field \"{field}\" must be a string, got {_json_type(value)}")
    if not value.strip():
        raise BadInputError(f"{loc}: field \"{field}\" is empty")
    _check_text(value, f"field \"{field}\"", loc)
    return value


def _load_jsonl(shown_dir: Path, root: Path, default_question: str | None,
                needs_images: bool | None) -> list[Demo]:
    where = _where(shown_dir / DEMOS_FILE)
    path = root / DEMOS_FILE
    if not path.is_file():
        raise BadInputError(f"{where}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadInputError(f"{where}: cannot read ({_one_line(e.strerror or e)})") from None
    demos: list[Demo] = []
    # Split on \n only (not on the other characters str.splitlines treats as line breaks) so that line
    # numbers match what editors and `sed -n Np` show.
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        loc = f"{where}:{lineno}"
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInputError(f"{loc}: not valid UTF-8 text") from None
        if lineno == 1:
            line = line.lstrip("\ufeff")  # tolerate a byte-order mark
        if not line.strip():
            continue
        if len(bline) > MAX_LINE_BYTES:
            raise BadInputError(f"{loc}: line is {len(bline)} bytes long; a demo line may have at most {MAX_LINE_BYTES}")
        obj = _loads(line, loc, position=False)
        if not isinstance(obj, dict):
            raise BadInputError(
                f"{loc}: expected a JSON object like {{\"question\": ..., \"answer\": ...}}, got {_json_type(obj)}"
            )
        demos.append(_jsonl_demo(obj, loc, shown_dir, root, default_question, needs_images))
    if not demos:
        raise BadInputError(f"{where}: no demonstrations (the file is empty or has only blank lines)")
    return demos


def _image_inside(root: Path, path: Path, shown: Path, what: str) -> Path:
    """The resolved, checked image at `path`; it must lie inside `root` (symlinks too, in both layouts)."""
    try:
        img = path.resolve()
        inside = _inside(img, root)
        found = img.exists()
    except (OSError, RuntimeError) as e:  # symlink loop (RuntimeError before 3.13), a name too long, ...
        raise BadInputError(f"{what[:200]}: cannot be resolved ({_one_line(getattr(e, 'strerror', None) or e)[:80]})") from None
    if not inside:
        raise BadInputError(f"{what[:200]}: points outside the demos folder")
    if not found:
        raise BadInputError(f"{what[:200]}: image not found ({str(shown)[:200]})")
    _check_image(img, shown)
    return img


def _jsonl_demo(obj: dict, loc: str, shown_dir: Path, root: Path, default_question: str | None,
                needs_images: bool | None) -> Demo:
    """One JSONL object as a Demo; `loc` (file:line) names it in errors."""
    if "answer" not in obj:
        raise BadInputError(f"{loc}: missing field \"answer\"")
    answer = _string_field(obj, "answer", loc)
    if "question" in obj:
        question = _string_field(obj, "question", loc)
    elif default_question is not None:
        question = default_question
    else:
        raise BadInputError(
            f"{loc}: missing field \"question\" (and no default question given nor in {TASK_FILE})", parameters="question"
        )
    if obj.get("image") is None:
        if needs_images is True:
            raise BadInputError(f"{loc}: this demo has no \"image\", but the model is a vision-language model that "
                                "needs an image for every demo")
        return Demo(question=question, answer=answer, image=None)
    rel = _string_field(obj, "image", loc)
    if needs_images is False:
        raise BadInputError(
            f"{loc}: this demo has an image, but the model is text-only and cannot use images "
            "(remove the \"image\" fields or use a vision-language model)"
        )
    if Path(rel).is_absolute():
        raise BadInputError(f"{loc}: image path {rel[:200]!r} must be relative to the demos folder")
    try:
        image = _image_inside(root, root / rel, shown_dir / rel, f"image path {rel[:200]!r}")
    except BadInputError as e:
        raise BadInputError(f"{loc}: {e}") from None
    return Demo(question=question, answer=answer, image=image)


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _load_imagefolder(shown_dir: Path, root: Path, class_dirs: list[str], question: str | None,
                      needs_images: bool | None) -> list[Demo]:
    if needs_images is False:
        raise BadInputError(
            f"{shown_dir}: this is an image folder ({DEMOS_FILE} absent, class sub-folders "
            f"{', '.join(repr(c) for c in class_dirs[:3])}{', ...' if len(class_dirs) > 3 else ''}), but the "
            "model is text-only and cannot use images"
        )
    if question is None:
        raise BadInputError(
            f"{shown_dir}: image-folder layout needs a question: give one or write "
            f"{shown_dir / TASK_FILE} as {{\"question\": \"...\"}}", parameters="question"
        )
    per_class: list[list[Demo]] = []
    for name in class_dirs:
        shown_cls = shown_dir / name
        if not name.strip():
            raise BadInputError(f"{shown_cls}: class folder name (the answer) is blank")
        _check_text(name, "class folder name (the answer)", repr(str(shown_cls))[1:-1])
        items: list[Demo] = []
        for entry in sorted(os.listdir(root / name)):
            if entry.startswith("."):
                continue
            f, shown = root / name / entry, shown_cls / entry
            if f.is_dir():
                raise BadInputError(f"{shown}: unexpected sub-folder inside class folder {name!r} (expected image files)")
            if Path(entry).suffix.lower() not in IMAGE_EXTENSIONS:
                raise BadInputError(
                    f"{shown}: not an image file (extension {Path(entry).suffix or '(none)'!r}; expected one of "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            items.append(Demo(question=question, answer=name, image=_image_inside(root, f, shown, str(shown))))
        if not items:
            raise BadInputError(f"{shown_cls}: class folder {name!r} contains no images")
        per_class.append(items)
    # Round-robin interleave over the sorted classes (see module docstring).
    demos: list[Demo] = []
    for i in range(max(len(c) for c in per_class)):
        demos.extend(c[i] for c in per_class if i < len(c))
    return demos


def load_demos(demos_dir: Path, question: str | None = None, needs_images: bool | None = None) -> list[Demo]:
    """Load and validate the demonstrations in ``demos_dir`` (layout (a) or (b), see module docstring).

    ``question``: default question (e.g. from the CLI's question option); it wins over ``task.json``.
    ``needs_images``: ``True`` for a vision-language model (every demo must have an image), ``False`` for a
    text-only model (no demo may have one), ``None`` to accept both.

    Returns the demos in a deterministic order; image paths are absolute and every image has been opened
    and fully decoded once. Raises :class:`BadInputError` with a one-line message naming the file.
    """
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise BadInputError("question is empty", parameters="question")
    if question is not None:
        _check_text(question, "the question", "question")
    try:
        return _load_demos(Path(demos_dir), question, needs_images)
    except BadInputError:
        raise
    except (OSError, RuntimeError, ValueError) as e:  # a path too long, a NUL byte, a symlink loop, ...
        where = getattr(e, "filename", None) or demos_dir
        reason = getattr(e, "strerror", None) or _one_line(e) or type(e).__name__
        raise BadInputError(f"{str(where)[:300]}: cannot read the demos ({_one_line(reason)[:120]})") from None


def check_demo_lengths(demos: list[Demo], count_tokens, where: object = None) -> None:
    """Refuse a demo whose question + answer exceed MAX_DEMO_TOKENS tokens (`count_tokens(text) -> int`),
    or whose text the tokenizer cannot take; called by compile once the model's tokenizer is known."""
    for i, d in enumerate(demos):
        loc = f"{where}: demo {i + 1}" if where is not None else f"demo {i + 1}"
        for what, text in (("question", d.question), ("answer", d.answer)):
            _check_text(text, what, loc)
        n = count_tokens(d.question) + count_tokens(d.answer)
        if n > MAX_DEMO_TOKENS:
            raise BadInputError(f"{loc}: question and answer are {n} tokens long; a demo may have at most "
                                f"{MAX_DEMO_TOKENS} (split it, or shorten it)")


def _load_demos(shown_dir: Path, question: str | None, needs_images: bool | None) -> list[Demo]:
    if not shown_dir.exists():
        raise BadInputError(f"{shown_dir}: demos folder not found")
    if not shown_dir.is_dir():
        raise BadInputError(f"{shown_dir}: not a directory (expected a demos folder)")
    root = shown_dir.resolve()
    try:
        entries = sorted(os.listdir(root))
    except OSError as e:
        raise BadInputError(f"{shown_dir}: cannot list the demos folder ({_one_line(e.strerror or e)})") from None

    # task.json is validated even when `question` overrides it, so a broken file never goes unnoticed.
    task_q = _read_task_question(shown_dir, root)
    default_q = question if question is not None else task_q

    if DEMOS_FILE in entries:
        return _load_jsonl(shown_dir, root, default_q, needs_images)
    class_dirs = [e for e in entries if not e.startswith(".") and (root / e).is_dir()]
    if not class_dirs:
        raise BadInputError(
            f"{shown_dir}: no demonstrations: expected {DEMOS_FILE} or class sub-folders (<answer>/<image file>)"
        )
    return _load_imagefolder(shown_dir, root, class_dirs, default_q, needs_images)
