"""End to end: compile -> export -> run under ONNX Runtime, against transformers' own greedy generate."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from emloc_edge.cli import main
from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.errors import ModelLoadError
from emloc_edge.export.api import export_model
from emloc_edge.models.loading import load_model
from emloc_edge.runtime.session import EdgeSession
from test_compile import _hf_inputs, _images, make_demos

MAX_NEW = 6


@pytest.fixture(scope="module")
def exported(all_family_dir, tmp_path_factory):
    """(family, adapter, demos, fp32 unpruned memory path, exported fp32 model folder)."""
    tmp = tmp_path_factory.mktemp(f"e2e_{all_family_dir.family}")
    adapter = load_model(all_family_dir.path)
    demos = make_demos(all_family_dir.family, 5, tmp / "demos")
    memory = Compressor(adapter, CompileOptions(delta=-1.0, chunk_size=2, precision="fp32")).compile(demos)
    memory.save(tmp / "full.emloc")
    export_model(adapter, tmp / "model", weights="fp32")
    return all_family_dir.family, adapter, demos, tmp / "full.emloc", tmp / "model", tmp


def _query(adapter, tmp: Path) -> tuple[Path | None, str]:
    image = _images(tmp / "query", 1, seed=7)[0] if adapter.has_vision else None
    return image, "which bin for this one?"


def test_runtime_tokens_equal_transformers_generate(exported):
    """Unpruned fp32 memory + fp32 export reproduces HF greedy decoding on the whole conversation."""
    family, adapter, demos, memory_path, model_dir, tmp = exported
    image, question = _query(adapter, tmp)
    messages = adapter.chat.messages(demos) + [{"role": "user", "content": adapter.user_content(question, image is not None)}]
    images = [d.image for d in demos if d.image is not None] + ([image] if image else [])
    inputs = _hf_inputs(adapter, messages, images, generation_prompt=True)
    with torch.no_grad():
        out = adapter.model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                     eos_token_id=adapter.chat.end_of_turn_id, pad_token_id=adapter.chat.end_of_turn_id)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    expected = expected[: expected.index(adapter.chat.end_of_turn_id)] if adapter.chat.end_of_turn_id in expected else expected
    answer = EdgeSession(model_dir, memory_path, provider="cpu", max_new_tokens=MAX_NEW).answer(image, question)
    assert answer.token_ids == expected
    assert len(expected) > 0


def test_stream_pieces_make_the_answer_and_threads_agree(exported):
    family, adapter, demos, memory_path, model_dir, tmp = exported
    image, question = _query(adapter, tmp)
    session = EdgeSession(model_dir, memory_path, provider="cpu", max_new_tokens=MAX_NEW)
    whole = session.answer(image, question)
    assert "".join(session.stream(image, question)).strip() == whole.text
    results = [None] * 4

    def ask(i):
        results[i] = session.answer(image, question).token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [whole.token_ids] * 4


def test_cli_run_json_and_memory_of_another_model(exported, tiny_model_dir):
    family, adapter, demos, memory_path, model_dir, tmp = exported
    image, question = _query(adapter, tmp)
    args = ["run", "--memory", str(memory_path), "--model", str(model_dir), "--max-new-tokens", "4", "--json"]
    args += [str(image), "--question", question] if image else ["--prompt", question]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.splitlines()[0])
    assert set(row) == {"image", "question", "answer", "token_ids", "ttft_ms", "tokens_per_s"}
    assert row["ttft_ms"] > 0

    other = load_model(tiny_model_dir(family, seed=3))
    other_memory = Compressor(other, CompileOptions(delta=-1.0, chunk_size=2, precision="fp32")).compile(demos[:2])
    other_memory.save(tmp / "other.emloc")
    bad = CliRunner().invoke(main, ["run", "--memory", str(tmp / "other.emloc"), "--model", str(model_dir), "--prompt", "x"])
    assert bad.exit_code == 2
    assert bad.output.count("\n") == 1 and "other.emloc" in bad.output and "Traceback" not in bad.output


def test_cli_run_bad_inputs(exported):
    family, adapter, demos, memory_path, model_dir, tmp = exported
    if not adapter.has_vision:  # a text-only model refuses images, naming the image
        image = _images(tmp / "refused", 1, seed=5)[0]
        r = CliRunner().invoke(main, ["run", str(image), "--memory", str(memory_path), "--model", str(model_dir)])
        assert r.exit_code == 2 and "text-only" in r.output and image.name in r.output, r.output
        return
    not_image = tmp / "notes.png"
    not_image.write_text("not a picture")
    broken = tmp / "broken_model"
    broken.mkdir(exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.name != "vision.onnx":
            (broken / f.name).write_bytes(f.read_bytes())
    cases = [
        (["run", str(tmp / "missing.png")], "missing.png"),
        (["run", str(not_image)], "notes.png"),
        (["run", "--model", str(broken), str(not_image)], "vision.onnx"),
    ]
    for args, named in cases:
        if "--model" not in args:
            args = args + ["--model", str(model_dir)]
        r = CliRunner().invoke(main, args + ["--memory", str(memory_path), "--question", "q"])
        assert r.exit_code == 2, (args, r.output)
        assert named in r.output and r.output.count("\n") == 1 and "Traceback" not in r.output


_BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} must not be imported at run time")
            return None
    sys.meta_path.insert(0, _Block())
""")


def test_run_needs_no_torch(exported, tmp_path):
    """The whole `run` in a fresh interpreter where importing torch or transformers raises."""
    family, adapter, demos, memory_path, model_dir, tmp = exported
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_TORCH)
    image, question = _query(adapter, tmp)
    query = [str(image), "--question", question] if image else ["--prompt", question]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "emloc_edge.cli", "run", "--memory", str(memory_path), "--model", str(model_dir),
           "--max-new-tokens", "3", "--json", *query]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["token_ids"]
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0, "the import blocker must be active in the subprocess"


def test_cli_run_refuses_a_corrupt_memory_and_a_decompression_bomb(exported, monkeypatch):
    family, adapter, demos, memory_path, model_dir, tmp = exported
    corrupt = tmp / "corrupt.emloc"
    data = bytearray(Path(memory_path).read_bytes())
    data[-10] ^= 0xFF  # one payload byte
    corrupt.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["run", "--memory", str(corrupt), "--model", str(model_dir), "--prompt", "q"])
    assert r.exit_code == 2 and "corrupt.emloc" in r.output and r.output.count("\n") == 1, r.output
    if not adapter.has_vision:
        return
    import emloc_edge.runtime.image as runtime_image

    monkeypatch.setattr(runtime_image, "MAX_IMAGE_PIXELS", 1000)  # the test image has 112*112 = 12544 pixels
    image = _images(tmp / "bomb", 1, seed=11)[0]
    r = CliRunner().invoke(main, ["run", str(image), "--memory", str(memory_path), "--model", str(model_dir)])
    assert r.exit_code == 2 and image.name in r.output and r.output.count("\n") == 1, r.output
    assert "Traceback" not in r.output


def test_int8_memory_stays_int8_and_answers_as_the_dequantized_memory(exported):
    """auto: every int8 memory (one chunk or several) runs on the int8 graph and stays int8 on the device;
    its logits equal those of the memory dequantized at load (memory_inputs="float") to 1e-5."""
    family, adapter, demos, memory_path, model_dir, tmp = exported
    image, question = _query(adapter, tmp)
    for size in (len(demos), 2, 1):
        memory = Compressor(adapter, CompileOptions(delta=0.005, chunk_size=size, precision="int8")).compile(demos)
        path = tmp / f"int8_{size}.emloc"
        memory.save(path)
        session = EdgeSession(model_dir, path, provider="cpu", max_new_tokens=3)
        assert Path(session.decoder._model_path).name == "decoder_step_q8.onnx"
        assert session.bound_memory["mem_key_t.0"].data_type() == "tensor(int8)"
        dequantized = EdgeSession(model_dir, path, memory_inputs="float", max_new_tokens=3)
        assert Path(dequantized.decoder._model_path).name == "decoder_step.onnx"
        answer = dequantized.answer(image, question).token_ids
        assert session.answer(image, question).token_ids == answer
        want = dequantized.continuation_logits(image, question, answer)
        got = session.continuation_logits(image, question, answer)
        assert float(abs(got - want).max() / abs(want).max()) <= 1e-5, (size, len(memory.meta.chunks))


def test_an_export_without_the_exact_q8_inputs_runs_int8_memories_dequantized(exported):
    """An export made before the q8 graph took per-segment scales (manifest format_version 1): auto falls
    back to the float graph; int8 is refused in one line naming the folder."""
    family, adapter, demos, memory_path, model_dir, tmp = exported
    old = tmp / "old_export"
    if not old.exists():
        shutil.copytree(model_dir, old)
        manifest = json.loads((old / "manifest.json").read_text())
        manifest["format_version"] = 1
        q8 = manifest["graphs"]["decoder_step_q8"]
        q8["inputs"] = [n for n in q8["inputs"] if not n.startswith("mem_key_segment.")]
        (old / "manifest.json").write_text(json.dumps(manifest))
    memory = Compressor(adapter, CompileOptions(delta=0.005, chunk_size=2, precision="int8")).compile(demos)
    path = tmp / "int8_old_export.emloc"
    memory.save(path)
    session = EdgeSession(old, path, provider="cpu", max_new_tokens=2)
    assert Path(session.decoder._model_path).name == "decoder_step.onnx"
    with pytest.raises(ModelLoadError, match="predates exact int8 memory inputs"):
        EdgeSession(old, path, provider="cpu", memory_inputs="int8")
    r = CliRunner().invoke(main, ["run", "--memory", str(path), "--model", str(old), "--prompt", "q", "--memory-inputs", "int8"])
    assert r.exit_code == 2 and "old_export" in r.output and r.output.count("\n") == 1, r.output
