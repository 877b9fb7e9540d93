"""Helpers shared by the CLI tests: running commands, writing demos, checking the one-line error contract."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result

from emloc_edge.cli import main



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
