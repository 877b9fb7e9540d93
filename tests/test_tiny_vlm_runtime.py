"""tiny_vlm end to end: vision.onnx under ONNX Runtime vs `ImageTokens` in PyTorch, and compile -> export -> run
(EdgeSession, the CLI, a subprocess without torch) against `greedy_answer` in PyTorch on the same memory.
The model has four image tokens per image, so the runtime really expands the query's one image slot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from emloc_edge.cli import main
from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.query import greedy_answer, memory_kv, query_logits
from emloc_edge.export.api import export_model
from emloc_edge.export.vision import VISION_FILE, export_vision
from emloc_edge.memory import TaskMemory
from emloc_edge.models.loading import load_model
from emloc_edge.runtime.image import preprocess_square
from emloc_edge.runtime.model_folder import ModelFolder
from emloc_edge.runtime.session import EdgeSession
from test_runtime import _BLOCK_TORCH
from test_tiny_vlm import QUESTION, image_demos

MAX_NEW = 6
TOL = 1e-5  # vision features, relative to max(1, |reference|)


@pytest.fixture(scope="module")
def e2e(tiny_vlm_dir, make_images, tmp_path_factory) -> SimpleNamespace:
    """The 4-token tiny VLM, 6 image demos compiled unpruned in fp32 (3 chunks), and its fp32 export."""
    tmp = tmp_path_factory.mktemp("tiny_vlm_e2e")
    adapter = load_model(tiny_vlm_dir(image_tokens=4))
    demos = image_demos(tmp / "demos", 6, make_images)
    memory = Compressor(adapter, CompileOptions(delta=-1.0, chunk_size=2, precision="fp32")).compile(demos)
    memory.save(tmp / "full.emloc")
    manifest = export_model(adapter, tmp / "model", weights="fp32")
    query = make_images(tmp / "query", 2, 7)
    return SimpleNamespace(adapter=adapter, demos=demos, memory=tmp / "full.emloc", model=tmp / "model",
                           manifest=manifest, query=query, tmp=tmp)


def _torch_answer(adapter, memory_path: Path, image: Path | None, max_new: int = MAX_NEW) -> list[int]:
    memory = TaskMemory.load(memory_path)
    return greedy_answer(adapter, memory_kv(memory), memory.meta.position_offset, QUESTION, image, max_new)


# ------------------------------------------------------------------------------------------ vision graph
@pytest.fixture(scope="module", params=[1, 4], ids=["1token", "4tokens"])
def vision_graph(request, e2e, tiny_vlm_dir, tmp_path_factory):
    """(adapter, manifest section, ORT session) of vision.onnx: the e2e export's, or a 1-token model's own."""
    if request.param == 4:
        adapter, folder, section = e2e.adapter, e2e.model, e2e.manifest["graphs"]["vision"]
    else:
        adapter = load_model(tiny_vlm_dir(image_tokens=1))
        folder = tmp_path_factory.mktemp("tiny_vlm_vision")
        section = export_vision(adapter, folder)
    return adapter, section, ort.InferenceSession(str(folder / section["file"]), providers=["CPUExecutionProvider"])


def test_ort_vision_matches_image_tokens(vision_graph, make_images, tmp_path):
    adapter, section, session = vision_graph
    pixels = np.stack([preprocess_square(p, adapter.image_preprocessing()) for p in make_images(tmp_path, 5, 11)])
    for batch in (pixels[:1], pixels):  # the image dim is dynamic
        (got,) = session.run(None, {"pixel_values": batch})  # [N, T, D]
        with torch.no_grad():
            want = adapter.vision(torch.from_numpy(batch)).numpy()
        assert got.shape == want.shape == (len(batch), adapter.image_tokens, adapter.geometry.hidden_size)
        assert np.abs(got - want).max() / max(1.0, float(np.abs(want).max())) <= TOL
    assert len(np.unique(got.reshape(-1, got.shape[-1]), axis=0)) >= 2, "images must not all give one word"


def test_vision_section_describes_the_graph(vision_graph):
    adapter, section, session = vision_graph
    size, tokens, hidden = adapter.config["image_size"], adapter.image_tokens, adapter.geometry.hidden_size
    assert section == {
        "file": VISION_FILE, "family": "tiny_vlm", "image_size": size, "image_tokens": tokens,
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["images", 3, size, size]}],
        "outputs": [{"name": "image_features", "dtype": "float32", "shape": ["images", tokens, hidden]}],
    }
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert session.get_inputs()[0].shape[1:] == [3, size, size] and isinstance(session.get_inputs()[0].shape[0], str)
    assert [o.name for o in session.get_outputs()] == ["image_features"]
    model = onnx.load(session._model_path)
    assert next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 18
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)  # plain ONNX ops only


# ------------------------------------------------------------------------------------------ end to end
def test_export_manifest_and_folder(e2e):
    folder = ModelFolder.open(e2e.model)
    assert folder.has_vision and folder.manifest["model_family"] == "tiny_vlm"
    assert folder.manifest["image_preprocessing"] == e2e.adapter.image_preprocessing()
    assert folder.manifest["geometry"]["position_dims"] == 1


def test_runtime_answers_equal_pytorch_greedy(e2e):
    """Unpruned fp32 memory + fp32 export: ORT greedy tokens and first logits equal PyTorch's, for image
    queries and a text query on the same memory."""
    session = EdgeSession(e2e.model, e2e.memory, provider="cpu", max_new_tokens=MAX_NEW)
    memory = TaskMemory.load(e2e.memory)
    answers = []
    for image in (*e2e.query, None):
        answer = session.answer(image, QUESTION)
        assert answer.token_ids == _torch_answer(e2e.adapter, e2e.memory, image), image
        ours = session.continuation_logits(image, QUESTION, [])[0]
        want = query_logits(e2e.adapter, memory_kv(memory), memory.meta.position_offset, QUESTION, image).numpy()
        assert np.abs(ours - want).max() <= 1e-4, (image, float(np.abs(ours - want).max()))
        answers.append(answer.token_ids)
    assert any(answers), "a random model answering nothing at all would make the comparison vacuous"


def test_int8_memory_compiles_and_answers(e2e):
    """Pruned int8 memories, of several chunks and of one, run on the int8 graph (kept int8 on the device)
    and match PyTorch on the same memory: logits within 1e-3, and token for token."""
    image = e2e.query[0]
    for size, graph in ((2, "decoder_step_q8.onnx"), (len(e2e.demos), "decoder_step_q8.onnx")):
        path = e2e.tmp / f"int8_{size}.emloc"
        options = CompileOptions(delta=0.005, chunk_size=size, precision="int8")
        Compressor(e2e.adapter, options).compile(e2e.demos).save(path)
        memory = TaskMemory.load(path)
        assert memory.meta.precision == "int8"
        session = EdgeSession(e2e.model, path, provider="cpu", max_new_tokens=MAX_NEW)
        assert Path(session.decoder._model_path).name == graph
        ours = session.continuation_logits(image, QUESTION, [])[0]
        want = query_logits(e2e.adapter, memory_kv(memory), memory.meta.position_offset, QUESTION, image).numpy()
        assert np.abs(ours - want).max() <= 1e-3
        if size == 2:
            assert session.answer(image, QUESTION).token_ids == _torch_answer(e2e.adapter, path, image)


def test_cli_run_on_images(e2e, tmp_path):
    args = ["run", *map(str, e2e.query), "--memory", str(e2e.memory), "--model", str(e2e.model),
            "--question", QUESTION, "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in e2e.query]
    assert [r["token_ids"] for r in rows] == [_torch_answer(e2e.adapter, e2e.memory, p, 4) for p in e2e.query]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    bad = CliRunner().invoke(main, ["run", str(not_image), "--memory", str(e2e.memory), "--model", str(e2e.model),
                                    "--question", QUESTION])
    assert bad.exit_code == 2 and "notes.png" in bad.output and bad.output.count("\n") == 1, bad.output


def test_run_needs_no_torch(e2e, tmp_path):
    """`run` on an image in a fresh interpreter where importing torch or transformers raises."""
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "emloc_edge.cli", "run", str(e2e.query[0]), "--question", QUESTION,
           "--memory", str(e2e.memory), "--model", str(e2e.model), "--max-new-tokens", "3", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.splitlines()[0])
    assert row["token_ids"] == _torch_answer(e2e.adapter, e2e.memory, e2e.query[0], 3)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0, "the import blocker must be active in the subprocess"


def test_unknown_image_processor_is_one_line_error():
    from demo_files import raises_one_line
    from emloc_edge.runtime.image_inputs import STRATEGIES, image_strategy

    assert set(STRATEGIES) == {"qwen2_vl", "square"}
    raises_one_line("image processor 'mystery' is not supported", image_strategy, {"processor": "mystery"}, {}, "x")


def test_run_stderr_has_no_pillow_warning_for_corrupt_exif(e2e, tmp_path):
    """An image whose EXIF is cut short: Pillow warns while reading it; `run` still prints only the answer."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 1, "a camera maker with a long name"
    image = tmp_path / "exif.webp"
    Image.open(e2e.query[0]).convert("RGB").save(image, "WEBP", exif=exif.tobytes()[:-1])
    cmd = [sys.executable, "-W", "always", "-m", "emloc_edge.cli", "run", str(image), "--question", QUESTION,
           "--memory", str(e2e.memory), "--model", str(e2e.model), "--max-new-tokens", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(done.stdout.splitlines()) == 1
