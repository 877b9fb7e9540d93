"""export_model's defaults (int8 weights, int8 embedding table), its step progress, quantize_export, and
the runtime's embedding table (runtime/embeddings.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_compile import make_demos

from emloc_edge.cli import main
from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.errors import ModelLoadError
from emloc_edge.export.api import (
    EMBED_SCALE_FILE,
    export_model,
    quantize_export,
    save_embeddings,
)
from emloc_edge.models.loading import load_model
from emloc_edge.runtime.embeddings import EmbeddingTable, load_embeddings
from emloc_edge.runtime.session import EdgeSession

STEPS = ["tracing decoder_step", "tracing decoder_step_q8", "validating the fp32 traces against PyTorch",
         "quantizing decoder weights to int8", "writing embeddings and tokenizer"]


@pytest.fixture(scope="module")
def llama_exports(llama_dir, tmp_path_factory):
    """The tiny Llama exported with the defaults (progress recorded) and with fp32 weights, and a memory."""
    tmp = tmp_path_factory.mktemp("export_api")
    adapter = load_model(llama_dir)
    steps: list[str] = []
    manifest = export_model(adapter, tmp / "int8", progress=steps.append)
    export_model(adapter, tmp / "fp32", weights="fp32")
    memory = Compressor(adapter, CompileOptions(delta=0.005, chunk_size=2, precision="int8")).compile(
        make_demos("llama", 4, tmp / "demos"))
    memory.save(tmp / "task.emloc")
    return adapter, manifest, steps, tmp


def test_default_export_is_int8_validated_with_steps_reported(llama_exports):
    adapter, manifest, steps, tmp = llama_exports
    assert manifest["weights"] == "int8"
    assert steps == STEPS
    diffs = manifest["validation_max_scaled_diff"]  # the fp32 traces, checked before quantizing
    assert len(diffs) == 2 * (1 + 2 * adapter.geometry.num_layers) and max(diffs.values()) <= 1e-3
    values = np.load(tmp / "int8" / manifest["embed_tokens"])
    assert values.dtype == np.int8 and manifest["embed_tokens_scale"] == EMBED_SCALE_FILE
    fp32 = np.load(tmp / "fp32" / "embed_tokens.npy")
    table = load_embeddings(tmp / "int8", manifest)
    assert np.all(np.abs(table[np.arange(len(table))] - fp32) <= _error_bound(fp32, np.load(tmp / "int8" / EMBED_SCALE_FILE)))


@pytest.mark.parametrize("question", ["which bin?", "which bin for the red item?", "bin?"])
def test_int8_export_answers_like_fp32_export(llama_exports, question):
    """Quantized weights and embeddings change the logits a little (a random model's top tokens can be
    near-tied, so the bound is on the logits): within 5% of their spread, and the greedy token agrees
    wherever fp32's top-1 margin exceeds twice the largest change."""
    _, _, _, tmp = llama_exports
    logits = {w: EdgeSession(tmp / w, tmp / "task.emloc", provider="cpu").continuation_logits(None, question, [])[0]
              for w in ("fp32", "int8")}
    change = float(np.abs(logits["int8"] - logits["fp32"]).max())
    assert change <= 0.05 * float(np.ptp(logits["fp32"]))
    top2 = np.sort(logits["fp32"])[-2:]
    if top2[1] - top2[0] > 2 * change:
        assert int(logits["int8"].argmax()) == int(logits["fp32"].argmax())


def test_quantize_export_writes_the_int8_table(llama_exports, tmp_path):
    tmp = llama_exports[3]
    quantized = quantize_export(tmp / "fp32", tmp_path / "q", "int8")
    assert quantized["embed_tokens_scale"] == EMBED_SCALE_FILE and "validation_max_scaled_diff" not in quantized
    for name in ("embed_tokens.npy", EMBED_SCALE_FILE):
        assert np.array_equal(np.load(tmp_path / "q" / name), np.load(tmp / "int8" / name))


def test_cli_export_prints_step_lines_and_defaults_to_int8(llama_dir, tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(llama_dir), "-o", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["weights"] == "int8" and summary["validation_max_scaled_diff"] <= 1e-3
    lines = [line for line in result.stderr.splitlines() if line.endswith(" s")]
    assert [line.split(" ...")[0] for line in lines] == ["loading the model"] + STEPS
    quiet = CliRunner().invoke(main, ["export", "--model", str(llama_dir), "-o", str(tmp_path / "m"), "-q", "--json"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def _error_bound(embed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per value: half the stored step, plus what rounding the scale to its dtype can add at the clip (127 steps)."""
    V, D = embed.shape
    exact = np.abs(embed.reshape(V, scales.shape[1], -1)).max(-1) / 127  # [V, D / block]
    stored = scales.astype(np.float32)
    bound = stored / 2 * (1 + 1e-5) + 127 * np.abs(exact - stored) + 1e-37
    return np.repeat(bound, D // scales.shape[1], axis=1)  # [V, D]


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([32, 64, 96, 40])),
              elements=st.floats(-1e5, 1e5, width=32)))
def test_int8_table_is_within_half_a_step_of_every_value(embed):
    """Any table: each dequantized value is within half a step (max |x| / 127 / 2 per block) of the value."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        fields = save_embeddings(embed, Path(tmp), "int8")
        table = load_embeddings(Path(tmp), {**fields, "geometry": {"hidden_size": embed.shape[1]}})
        got, scales = table[np.arange(embed.shape[0])], np.load(Path(tmp) / EMBED_SCALE_FILE)
    assert got.dtype == np.float32 and scales.shape == (embed.shape[0], embed.shape[1] // (32 if embed.shape[1] % 32 == 0 else embed.shape[1]))
    assert np.all(np.abs(got - embed) <= _error_bound(embed, scales))


def test_embedding_table_refuses_what_does_not_fit(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((4, 8), np.int8))
    np.save(tmp_path / "s.npy", np.ones((3, 1), np.float32))
    manifest = {"embed_tokens": "e.npy", "geometry": {"hidden_size": 8}}
    with pytest.raises(ModelLoadError, match="needs embed_tokens_scale"):
        load_embeddings(tmp_path, manifest)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_embeddings(tmp_path, {**manifest, "embed_tokens_scale": "s.npy"})
    with pytest.raises(ModelLoadError, match="expected"):
        load_embeddings(tmp_path, {**manifest, "geometry": {"hidden_size": 16}})
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_embeddings(tmp_path, {**manifest, "embed_tokens": "bad.npy"})
    fp = EmbeddingTable(np.arange(6, dtype=np.float16).reshape(3, 2), None)
    assert fp[[2]].dtype == np.float32 and fp[[2]].tolist() == [[4.0, 5.0]]
