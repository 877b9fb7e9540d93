"""Fixtures of the CLI tests: each command runs in an empty folder; a memory compiled once by the CLI."""
from __future__ import annotations

from pathlib import Path

import pytest


from support import FAST, cli, listing, strict_json, text_demos  # noqa: E402


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
    """A memory compiled once by the CLI from 6 text demos (the default policy: the first token's own
    segment, then the whole context), and its --json summary."""
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
