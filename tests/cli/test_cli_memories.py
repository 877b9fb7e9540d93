"""Damaged or mismatched memory files, and the error contract in a real interpreter outside CliRunner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emloc_edge.memory import TaskMemory

from support import FAST, cli, text_demos, listing, assert_bad_input  # noqa: E402


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


SETTINGS = {"--delta": "0.005", "--chunk-size": "2", "--precision": "int8", "--ratios": "0.1,0.2,0.3,0.5", "--forced": "default"}


@pytest.mark.parametrize("option, value", [
    ("--delta", "0.01"), ("--chunk-size", "3"), ("--precision", "fp32"), ("--ratios", "0.2,0.5"), ("--forced", "content"),
])
@pytest.mark.parametrize("with_output", [True, False])
def test_append_with_conflicting_settings(option, value, with_output, llama_dir: Path, memory_copy: Path,
                                          good_demos: Path, out_dir: Path):
    before = memory_copy.read_bytes()
    out = out_dir / "grown.emloc"
    args = ["-o", out] if with_output else []
    line = assert_bad_input(
        cli("compile", good_demos, "--model", llama_dir, "--append", memory_copy, *args, option, value, "-q"),
        memory_copy, f"{option[2:].replace('-', '_')} {SETTINGS[option]}", f"({option})", value, out=out,
        out_dir=out_dir, expect_in_dir={"mem.emloc"},
    )
    assert "settings" in line
    assert not any(other in line for other in SETTINGS if other != option), "only the conflicting option is named"
    assert memory_copy.read_bytes() == before


def test_append_with_the_memorys_own_settings_is_fine(llama_dir: Path, memory_copy: Path, good_demos: Path,
                                                      out_dir: Path):
    """Repeating the memory's settings explicitly is not a conflict (guards the conflict test above)."""
    out = out_dir / "grown.emloc"
    result = cli("compile", good_demos, "--model", llama_dir, "--append", memory_copy, "-o", out,
                 "--delta", "0.005", "--ratios", "0.5,0.1,0.3,0.2", "--chunk-size", "2", "--precision", "int8", "-q")
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    assert TaskMemory.load(out).meta.demos == 8


def test_append_file_missing(llama_dir: Path, good_demos: Path, out_dir: Path):
    missing = out_dir / "missing.emloc"
    assert_bad_input(cli("compile", good_demos, "--model", llama_dir, "--append", missing, "-q"), missing,
                     out=missing, out_dir=out_dir)

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

