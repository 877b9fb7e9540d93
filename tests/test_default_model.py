"""The embedded default model (emloc-tiny-vlm): its folder management (cheap, always run) and, with
the real parts installed (`scripts/env.sh` and CI install them), its trained projector and in-context
learning on the bundled fashion-bins task."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emloc_edge.errors import ModelLoadError
from emloc_edge.models import default_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))
from make_demo_task import BINS  # noqa: E402  (class -> bin code of the bundled task)



def _fake_build(calls: list):
    def build(out, projector=default_model.PROJECTOR_FILE, seed=0):
        calls.append(Path(out))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text("{}")
        (Path(out) / "projector.safetensors").write_bytes(Path(projector).read_bytes())
        return Path(out)
    return build


def test_default_folder_is_built_once_and_rebuilt_for_another_projector(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLOC_EDGE_HOME", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(default_model, "build_default_model", _fake_build(calls))
    folder = default_model.ensure_default_model(progress=lambda m: None)
    assert folder == tmp_path / "models" / "emloc-tiny-vlm" and calls == [folder]
    default_model.ensure_default_model(progress=lambda m: None)
    assert len(calls) == 1  # up to date: not rebuilt
    (folder / "projector.safetensors").write_bytes(b"an older projector")
    default_model.ensure_default_model(progress=lambda m: None)
    assert len(calls) == 2  # a new release's projector replaces the built one


def test_default_export_folder_is_named_by_the_projector(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLOC_EDGE_HOME", str(tmp_path))
    digest = default_model.projector_digest()
    assert default_model.default_export_dir() == tmp_path / "exported" / f"emloc-tiny-vlm-{digest[:12]}"


def test_caption_words_must_be_single_tokens():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] if text == " one" else [1, 2]}

    assert default_model.caption_token_ids(Tok(), [" one"]) == [1]
    with pytest.raises(ModelLoadError, match="' two words' is 2 tokens"):
        default_model.caption_token_ids(Tok(), [" two words"])


# --- real parts -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(default_vlm):
    """The real default model (conftest: built once per session), with the threads real work gets."""
    from real_parts import real_work_threads

    with real_work_threads():
        yield default_vlm


def _task(name: str):
    from emloc_edge.compile.demos import load_demos

    return load_demos(ROOT / name)


@pytest.mark.real_weights
def test_trained_projector_names_the_bundled_demos(tiny_vlm):
    """The shipped head picks the caption word of each demo image's Fashion-MNIST class (0.73 on
    validation images at training time); a random head would be near 0.1."""
    class_of_bin = {code: i for i, code in enumerate(BINS.values())}  # BINS is in Fashion-MNIST class order
    demos = _task("demos")
    pixels = torch.from_numpy(np.stack([tiny_vlm.pixels(d.image) for d in demos]))  # [N, 3, S, S]: one batch
    with torch.no_grad():
        words = tiny_vlm.vision.projector.scores(tiny_vlm.vision.encoder(pixels))[:, 0].argmax(-1).tolist()  # [N]
    accuracy = np.mean([w == class_of_bin[d.answer] for w, d in zip(words, demos)])
    assert accuracy >= 0.6, accuracy


@pytest.fixture(scope="module")
def full_context(tiny_vlm, tmp_path_factory):
    """All 100 bundled demonstrations in context (nothing pruned, fp32), saved, and PyTorch's greedy answer
    tokens for 30 held-out images (3 per bin): compiled and decoded once for the tests below."""
    from emloc_edge.compile.compressor import CompileOptions, Compressor
    from emloc_edge.compile.query import greedy_answer, memory_kv

    demos, test = _task("demos"), _task("examples/fashion-bins/test")[:30]
    full = Compressor(tiny_vlm, CompileOptions(delta=-1.0, precision="fp32")).compile(demos)
    path = tmp_path_factory.mktemp("full_context") / "full.emloc"
    full.save(path)
    kv = memory_kv(full)
    tokens = [list(greedy_answer(tiny_vlm, kv, full.meta.position_offset, d.question, d.image, max_new_tokens=4))
              for d in test]
    return full, path, test, tokens


@pytest.mark.real_weights
def test_full_context_learns_the_bins_in_context_and_zero_shot_cannot(tiny_vlm, full_context):
    """All 100 demonstrations in context: far above chance (0.1) on held-out images; without them no
    bin code can be guessed."""
    from emloc_edge.compile.query import greedy_answer
    from emloc_edge.models.decoder import LayerKV

    full, _, test, tokens = full_context
    assert full.meta.template["default_question"] == "Which bin does this item go to?"
    answers = [tiny_vlm.tokenizer.decode(t).strip() for t in tokens]
    accuracy = np.mean([a == d.answer for a, d in zip(answers, test)])
    assert accuracy >= 0.3, (accuracy, answers)
    g = tiny_vlm.geometry
    empty = [LayerKV.empty(g.num_kv_heads, g.head_dim) for _ in range(g.num_layers)]  # no demonstrations
    zero = [tiny_vlm.tokenizer.decode(greedy_answer(tiny_vlm, empty, 0, d.question, d.image, max_new_tokens=4,
                                                    first_turn=True)).strip() for d in test[:5]]
    assert not any(a == d.answer for a, d in zip(zero, test)), zero


@pytest.mark.real_weights
def test_int8_export_answers_as_pytorch_does(full_context, default_vlm_export):
    """The quickstart's path: the default (int8-weight) export under ONNX Runtime answers the held-out
    images with the tokens of PyTorch's fp32 greedy decoding over the same memory (measured: 30 of 30
    identical, also on a 30-demo memory); int8 weights may move a near tie, so 27 of 30 are required."""
    from emloc_edge.runtime.session import EdgeSession

    _, path, test, tokens = full_context
    session = EdgeSession(default_vlm_export, path, provider="cpu", max_new_tokens=4)
    got = [session.answer(d.image, d.question).token_ids for d in test]
    assert sum(g == t for g, t in zip(got, tokens)) >= 27, (got, tokens)


@pytest.mark.real_weights
def test_default_compile_keeps_under_a_quarter_and_answers_as_the_full_context(tiny_vlm, full_context):
    """The default compile of the bundled demonstrations (issue 8's size goal: <= 25% kept at the full
    context's accuracy) keeps under a quarter of the context, and its int8 memory answers 20 validation
    images as the full context does (measured: 22.0% kept; every answer the same on 300 test items)."""
    from emloc_edge.compile.compressor import CompileOptions, Compressor
    from emloc_edge.compile.query import greedy_answer, memory_kv

    full = full_context[0]
    memory = Compressor(tiny_vlm, CompileOptions()).compile(_task("demos"))
    assert memory.meta.precision == "int8" and memory.meta.hyperparameters["policy"] == "emloc-context"
    assert memory.meta.compression <= 0.25, memory.meta.kept_tokens_per_layer
    val = _task("examples/fashion-bins/val")[:20]
    answers = {}
    for name, m in (("full", full), ("default", memory)):
        kv = memory_kv(m)
        answers[name] = [tiny_vlm.tokenizer.decode(greedy_answer(tiny_vlm, kv, m.meta.position_offset, d.question,
                                                                 d.image, max_new_tokens=4)).strip() for d in val]
    same = sum(a == b for a, b in zip(answers["full"], answers["default"]))
    assert same >= 19, answers
