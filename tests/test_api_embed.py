"""The embedding API: lazy imports, errors that name parameters, the export-bug error, and stream() == answer()."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

import emloc_edge
from emloc_edge import cli
from emloc_edge.errors import BadInputError, EmlocError, ExportValidationError
from emloc_edge.runtime.textstream import stream_text

PACKAGE = Path(emloc_edge.__file__).parent
STREAM_EXAMPLES = 300  # token-sequence cases of the stream property (reported in the closing note)
SESSION_EXAMPLES = 40  # end-to-end queries on the tiny export


def test_edge_session_imports_from_the_package_without_torch():
    code = ("import sys, emloc_edge; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules; "
            "from emloc_edge import EdgeSession as A; from emloc_edge.runtime import EdgeSession as B; "
            "from emloc_edge.runtime.session import EdgeSession as C; assert A is B is C; "
            "assert 'torch' not in sys.modules, 'the runtime must not import torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _raised_strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield node.lineno, sub.value


def test_library_errors_name_parameters_not_flags():
    """Only cli.py speaks of flags; `pip install --no-deps` (pip's own flag) is the one exception."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for line, text in _raised_strings(ast.parse(path.read_text())):
            if re.search(r"(^|[\s(`'\"])(--[a-z]|-[a-zA-Z](\s|$|/))", text) and "pip install" not in text:
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {text!r}")
    assert not offenders, offenders


@pytest.mark.parametrize("parameters, flags", [
    ("max_new_tokens", "(--max-new-tokens)"), (("delta", "chunk_size"), "(--delta, --chunk-size)"),
    ("output", "(-o/--output)"), ("some_new_one", "(--some-new-one)"), ((), None),
])
def test_cli_adds_the_flag_of_each_named_parameter(parameters, flags):
    line = cli._one_line(BadInputError("it is wrong", parameters=parameters))
    assert line == ("it is wrong" if flags is None else f"it is wrong {flags}")


def test_session_errors_name_the_parameter():
    from emloc_edge.runtime.session import select_providers

    with pytest.raises(BadInputError, match=r"^provider must be") as e:
        select_providers("tpu")
    assert e.value.parameters == ("provider",)


def test_export_validation_error_has_its_own_exit_code(monkeypatch, tmp_path):
    import emloc_edge.export.api as api

    def failing_export(*args, **kwargs):
        raise ExportValidationError(f"{tmp_path}: ONNX decoder step differs from PyTorch", parameters="validate")

    monkeypatch.setattr(api, "export_model", failing_export)
    r = CliRunner().invoke(cli.main, ["export", "--model", str(tmp_path), "-o", str(tmp_path / "out")])
    assert r.exit_code == cli.EXIT_EXPORT_BUG == 3, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "(--no-validate)" in r.stderr
    assert not issubclass(ExportValidationError, BadInputError) and issubclass(ExportValidationError, EmlocError)


# ------------------------------------------------------------------------------ stream() == answer().text
@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory):
    """(fp32 memory path, fp32 export folder) of the tiny random Llama (byte-level BPE: partial UTF-8 happens)."""
    from emloc_edge.compile.compressor import CompileOptions, Compressor
    from emloc_edge.export.api import export_model
    from emloc_edge.models.loading import load_model
    from test_compile import make_demos

    tmp = tmp_path_factory.mktemp("stream")
    adapter = load_model(tiny_model_dir("llama"))
    memory = Compressor(adapter, CompileOptions(delta=-1.0, chunk_size=2, precision="fp32")).compile(
        make_demos("llama", 3, tmp / "demos"))
    memory.save(tmp / "m.emloc")
    export_model(adapter, tmp / "model", weights="fp32", validate=False)
    return tmp / "m.emloc", tmp / "model"


@settings(max_examples=STREAM_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_text_joins_to_the_stripped_decode(tiny_export, data):
    """Any token sequence (lone byte tokens, spaces, specials): the pieces join to decode(all).strip()."""
    from tokenizers import Tokenizer

    tokenizer = _tokenizer(tiny_export[1], Tokenizer)
    ids = data.draw(st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=24))
    decode = lambda xs: tokenizer.decode(xs, skip_special_tokens=True)  # noqa: E731
    pieces = list(stream_text(decode, iter(ids)))
    assert "".join(pieces) == decode(ids).strip()
    assert all(pieces)


_TOKENIZERS: dict = {}


def _tokenizer(folder: Path, cls):
    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = cls.from_file(str(folder / "tokenizer.json"))
    return _TOKENIZERS[folder]


@settings(max_examples=SESSION_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30),
       max_new=st.integers(1, 12))
def test_session_stream_equals_answer_text(tiny_export, question, max_new):
    session = _session(*tiny_export)
    whole = session.answer(None, question, max_new_tokens=max_new)
    assert "".join(session.stream(None, question, max_new_tokens=max_new)) == whole.text


_SESSIONS: dict = {}


def _session(memory: Path, model: Path):
    from emloc_edge.runtime import EdgeSession

    if model not in _SESSIONS:
        _SESSIONS[model] = EdgeSession(model, memory, provider="cpu")
    return _SESSIONS[model]


def test_session_and_run_refuse_a_memory_whose_geometry_disagrees(tiny_export, tmp_path):
    """Resealed with position_dims = 3 for a 1-D RoPE model: refused at load, not an ONNX Runtime error later."""
    import json

    from emloc_edge.errors import ModelMismatchError
    from emloc_edge.memory import TaskMemory
    from emloc_edge.runtime import EdgeSession
    from test_fuzz_memory import write_raw

    memory_path, model = tiny_export
    memory = TaskMemory.load(memory_path)
    meta = json.loads(memory.meta.to_json())
    meta["position_dims"] = 3
    crafted = tmp_path / "crafted.emloc"
    write_raw(crafted, memory.tensors(), json.dumps(meta))
    with pytest.raises(ModelMismatchError, match="position_dims"):
        EdgeSession(model, crafted, provider="cpu")
    r = CliRunner().invoke(cli.main, ["run", "--prompt", "hi", "--memory", str(crafted), "--model", str(model)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "position_dims" in r.stderr, r.output


def test_compile_refuses_a_demo_over_the_token_cap(tiny_model_dir, tmp_path):
    import json

    from emloc_edge.compile.demos import MAX_DEMO_TOKENS

    demos = tmp_path / "demos"
    demos.mkdir()
    long_question = " ".join(["word"] * (MAX_DEMO_TOKENS + 10))  # ~10 KB: under the byte cap, over the token cap
    (demos / "demos.jsonl").write_text(json.dumps({"question": long_question, "answer": "A"}) + "\n")
    out = tmp_path / "m.emloc"
    r = CliRunner().invoke(cli.main, ["compile", str(demos), "--model", str(tiny_model_dir("llama")), "-o", str(out), "-q"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and f"at most {MAX_DEMO_TOKENS}" in r.stderr, r.output
    assert not out.exists()
