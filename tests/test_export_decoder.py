"""Decoder-step ONNX graphs (ONNX Runtime) against the PyTorch reference `RaggedDecoder`, per family.

The memory is a real compiled one (pruned, ragged per layer); the "recent" cache grows from the graph's
own new K/V across steps, and the reference attends to [memory ; recent] per layer.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.query import memory_kv
from emloc_edge.errors import EmlocError, ExportValidationError
from emloc_edge.export import weights as weight_files
from emloc_edge.export.decoder_step import DATA_FILE, GRAPHS, export_decoder_step, output_names, validate_decoder_step
from emloc_edge.memory import TaskMemory
from emloc_edge.models.decoder import LayerKV, RaggedDecoder
from emloc_edge.models.loading import load_model
from emloc_edge.runtime import memory_inputs
from emloc_edge.runtime.memory_inputs import memory_feeds, segment_index
from test_compile import make_demos

ATOL = 1e-4
STEPS = [(4, 1, 2), (1,)]  # new tokens per step: T>1 at t=0, T=1 at t=4, T=2 at t=5; and T=1 at t=0


class Exported(NamedTuple):
    adapter: object
    out: Path
    manifest: dict
    memories: dict[str, TaskMemory]  # "fp32" | "fp16" | "int8" (2 segments a layer) | "int8_1seg" | "int8_4seg"


@pytest.fixture(scope="module")
def exported(all_family_dir, tmp_path_factory) -> Exported:
    family = all_family_dir.family
    adapter = load_model(all_family_dir.path)
    out = tmp_path_factory.mktemp(f"decoder_step_{family}")
    manifest = export_decoder_step(adapter, out, weights="fp32")
    demos = make_demos(family, 4, tmp_path_factory.mktemp(f"demos_{family}"))
    # chunk-wise policy: memories of 1, 2 and 4 segments (int8 scales per chunk)
    compiled = {name: Compressor(adapter, CompileOptions(delta=0.005, precision=p, chunk_size=c, policy="emloc")).compile(demos)
                for name, p, c in [("fp32", "fp32", 2), ("fp16", "fp16", 2), ("int8", "int8", 2), ("int8_1seg", "int8", 4),
                                   ("int8_4seg", "int8", 1)]}
    return Exported(adapter, out, manifest, compiled)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _decode(adapter, session, mem_feeds: dict, mem_torch: list[LayerKV], offset: int, steps, seed: int = 0) -> dict:
    """Run `steps` (new tokens per step) through ORT, appending its new K/V to the recent cache, and the
    reference over [memory ; recent]; return the max |Δ| of logits and new K/V over all steps."""
    g = adapter.geometry
    decoder = RaggedDecoder(adapter)
    names = output_names(g.num_layers)
    recent = [LayerKV.empty(g.num_kv_heads, g.head_dim) for _ in range(g.num_layers)]
    gen = torch.Generator().manual_seed(seed)
    worst, t = {"logits": 0.0, "new_kv": 0.0}, 0
    for T in steps:
        embeds = decoder.stack.embed_tokens(torch.randint(0, g.vocab_size, (1, T), generator=gen)).detach()  # [1, T, D]
        positions = (offset + t + torch.arange(T))[None].expand(g.position_dims, T)  # [P, T]
        feeds = {"inputs_embeds": embeds.numpy(), "position_ids": positions.numpy().copy(), **mem_feeds}
        for i, r in enumerate(recent):
            feeds[f"rec_key.{i}"], feeds[f"rec_value.{i}"] = r.key.numpy(), r.value.numpy()
        got = dict(zip(names, session.run(names, feeds)))
        prefix = [m.extend(r.key, r.value) for m, r in zip(mem_torch, recent)]
        ref = decoder.forward(embeds, positions[:, None, :], torch.ones(1, T, dtype=torch.bool), prefix, keep_kv=True)
        assert got["logits"].shape == (1, g.vocab_size)
        worst["logits"] = max(worst["logits"], _delta(decoder.logits(ref.hidden[0, -1])[None], got["logits"]))
        for i, (k, v) in enumerate(ref.new_kv):  # [1, kv, T, hd]
            assert got[f"new_key.{i}"].shape == (g.num_kv_heads, T, g.head_dim)
            worst["new_kv"] = max(worst["new_kv"], _delta(k[0], got[f"new_key.{i}"]), _delta(v[0], got[f"new_value.{i}"]))
        recent = [r.extend(torch.from_numpy(got[f"new_key.{i}"]), torch.from_numpy(got[f"new_value.{i}"]))
                  for i, r in enumerate(recent)]
        t += T
    return worst


def _delta(want: torch.Tensor, got: np.ndarray) -> float:
    return float(np.abs(want.numpy() - got).max())


# ---- 1. fp32 graph vs RaggedDecoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("steps", STEPS)
def test_fp32_graph_matches_ragged_decoder(exported, precision, steps):
    memory = exported.memories[precision]
    assert len(set(memory.meta.kept_tokens_per_layer)) > 1  # really ragged
    session = _session(exported.out / "decoder_step.onnx")
    worst = _decode(exported.adapter, session, memory_feeds(memory, "decoder_step"), memory_kv(memory),
                    memory.meta.position_offset, steps)
    assert worst["logits"] <= ATOL and worst["new_kv"] <= ATOL, worst


# ---- 2. q8 graph (int8 memory as stored: per-segment K scales expanded in the step) ---------------------------


@pytest.mark.parametrize("steps", STEPS)
def test_q8_graph_matches_ragged_decoder_on_the_memory_as_stored(exported, steps):
    memory = exported.memories["int8"]
    assert all(len(layer.segment_lengths) == 2 for layer in memory.layers)
    feeds = memory_feeds(memory, "decoder_step_q8")
    assert feeds["mem_key_t.0"].dtype == np.int8 and feeds["mem_value.0"].dtype == np.int8
    assert feeds["mem_key_scale.0"].shape[2] == 2 and feeds["mem_key_segment.0"].dtype == np.int32
    session = _session(exported.out / "decoder_step_q8.onnx")
    worst = _decode(exported.adapter, session, feeds, memory_kv(memory), memory.meta.position_offset, steps)
    assert worst["logits"] <= ATOL and worst["new_kv"] <= ATOL, worst


def _logits(session, g, mem_feeds: dict, offset: int, T: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    feeds = {"inputs_embeds": rng.standard_normal((1, T, g.hidden_size)).astype(np.float32),
             "position_ids": np.tile(np.arange(offset, offset + T, dtype=np.int64), (g.position_dims, 1)), **mem_feeds}
    for i in range(g.num_layers):
        feeds[f"rec_key.{i}"] = feeds[f"rec_value.{i}"] = np.zeros((g.num_kv_heads, 0, g.head_dim), np.float32)
    return session.run(["logits"], feeds)[0]


def _spread_segment_scales(memory: TaskMemory, seed: int = 3) -> TaskMemory:
    """A copy with each segment's K scales multiplied by a different factor (x0.25 .. x4), as chunks of very
    different key magnitudes store them; the int8 bytes stay, so the dequantized keys change with them."""
    rng, memory = np.random.default_rng(seed), copy.deepcopy(memory)
    for layer in memory.layers:
        layer.key_scale = (layer.key_scale * rng.choice([0.25, 1.0, 4.0], layer.key_scale.shape[2])).astype(np.float32)
    return memory


def test_q8_graph_equals_the_dequantized_float_graph_on_a_multi_chunk_memory(exported):
    """The int8 path is exact: q8 graph (int8 + segment scales) vs the fp32 graph fed the memory dequantized
    at load, on memories of 2 and of 4 chunks. Any per-layer merging of the segment scales (re-rounding K)
    moves these logits by ~1e-2, far past the bound."""
    g = exported.adapter.geometry
    q8, fp = _session(exported.out / "decoder_step_q8.onnx"), _session(exported.out / "decoder_step.onnx")
    two, four = exported.memories["int8"], exported.memories["int8_4seg"]
    for memory in (two, four, _spread_segment_scales(four)):
        assert len(memory.meta.chunks) >= 2
        offset = memory.meta.position_offset
        want = _logits(fp, g, memory_feeds(memory, "decoder_step"), offset)
        got = _logits(q8, g, memory_feeds(memory, "decoder_step_q8"), offset)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        assert rel <= 1e-5, rel


def test_q8_graph_runs_an_empty_int8_memory(exported):
    """No chunk yet (S = 0, n = 0): the feeds keep one unused scale, and both graphs answer alike."""
    g, memory = exported.adapter.geometry, exported.memories["int8"]
    empty = TaskMemory.empty(dataclasses.replace(memory.meta, chunks=[]))
    feeds = memory_feeds(empty, "decoder_step_q8")
    assert feeds["mem_key_scale.0"].shape == (g.num_kv_heads, g.head_dim, 1) and feeds["mem_key_segment.0"].shape == (0,)
    got = _logits(_session(exported.out / "decoder_step_q8.onnx"), g, feeds, 5)
    want = _logits(_session(exported.out / "decoder_step.onnx"), g, memory_feeds(empty, "decoder_step"), 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_q8_variant_needs_an_int8_memory(exported):
    with pytest.raises(EmlocError, match="no int8 tensors"):
        memory_feeds(exported.memories["fp16"], "decoder_step_q8")
    with pytest.raises(EmlocError, match="variant"):
        memory_feeds(exported.memories["int8"], "int4")
    aliased = memory_feeds(exported.memories["int8"], "q8")  # short names "fp32" / "q8" work too
    assert all(np.array_equal(v, aliased[k]) for k, v in memory_feeds(exported.memories["int8"], "decoder_step_q8").items())
    assert memory_inputs.variant_for("int8") == "decoder_step_q8" and memory_inputs.variant_for("fp16") == "decoder_step"


def test_memory_feeds_are_named_as_the_manifest_declares(exported):
    """One source of names: every memory feed is a graph input the manifest lists, each layer complete."""
    g = exported.adapter.geometry
    for variant in GRAPHS:
        inputs = exported.manifest["graphs"][variant]["inputs"]
        feeds = memory_feeds(exported.memories["int8"], variant)
        assert set(feeds) <= set(inputs)
        assert set(inputs) - set(feeds) == {"inputs_embeds", "position_ids"} | {
            f"rec_{kind}.{i}" for i in range(g.num_layers) for kind in ("key", "value")}


def test_segment_index_names_each_tokens_segment():
    np.testing.assert_array_equal(segment_index([2, 0, 3]), [0, 0, 2, 2, 2])
    assert segment_index([]).shape == (0,) and segment_index([1]).dtype == np.int32


# ---- 4. graphs, weights and validation ------------------------------------------------------------------------


def _initializers(path: Path) -> tuple[set[tuple[str, str]], int]:
    """((offset, length) of every tensor in the data file, bytes of initializers kept inline) of one graph."""
    model = onnx.load(str(path), load_external_data=False)
    external, inline = set(), 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            external.add((entries.get("offset", "0"), entries["length"]))
        else:
            inline += len(t.raw_data)
    return external, inline


def _check_shared(out: Path) -> None:
    """One data file; every graph points into it at the same tensors; the weights are stored once."""
    assert [p.name for p in out.glob("*.data")] == [DATA_FILE]
    (first, first_inline), *rest = [_initializers(out / f"{name}.onnx") for name in GRAPHS]
    for name in GRAPHS:
        assert weight_files.external_files(out / f"{name}.onnx") == {DATA_FILE}
    for external, _ in rest:
        assert external == first
    one_graph = sum(int(length) for _, length in first) + first_inline
    stored = (out / DATA_FILE).stat().st_size + first_inline + sum(inline for _, inline in rest)
    assert stored < 1.3 * one_graph, (stored, one_graph)


def test_graph_io_names_and_dims_follow_the_manifest(exported):
    g = exported.adapter.geometry
    assert exported.manifest["weights"] == "fp32" and exported.manifest["opset"] == 18
    for name, quantized in GRAPHS.items():
        entry = exported.manifest["graphs"][name]
        assert entry["weights_file"] == DATA_FILE and entry["memory"] == ("int8" if quantized else "float32")
        session = _session(exported.out / entry["file"])
        inputs = {i.name: i for i in session.get_inputs()}
        assert [i.name for i in session.get_inputs()] == entry["inputs"]
        assert [o.name for o in session.get_outputs()] == entry["outputs"]
        assert inputs["position_ids"].shape == [g.position_dims, "T"]
        assert inputs["mem_key_t.1"].shape == [g.num_kv_heads, g.head_dim, "n_1"]
        assert inputs["mem_key_t.1"].type == ("tensor(int8)" if quantized else "tensor(float)")
        assert inputs[f"rec_value.{g.num_layers - 1}"].shape == [g.num_kv_heads, "t", g.head_dim]
        if quantized:
            assert inputs["mem_key_scale.0"].shape == [g.num_kv_heads, g.head_dim, "S_0"]
            assert inputs["mem_key_segment.1"].shape == ["n_1"] and inputs["mem_key_segment.1"].type == "tensor(int32)"
            assert inputs["mem_value_scale.0"].shape == [g.num_kv_heads, "n_0"]
    _check_shared(exported.out)


def test_validate_reports_every_output_and_fails_beyond_tolerance(exported):
    deltas = validate_decoder_step(exported.adapter, exported.out)
    assert len(deltas) == 2 * (1 + 2 * exported.adapter.geometry.num_layers)
    assert max(deltas.values()) <= ATOL
    with pytest.raises(ExportValidationError, match="decoder_step_q8/logits"):
        validate_decoder_step(exported.adapter, exported.out, atol=0.0)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_share_one_data_file(exported, weights, tmp_path):
    """The quantization + sharing stage of export_decoder_step, on the fp32 graphs already exported."""
    weight_files.save_shared({name: exported.out / f"{name}.onnx" for name in GRAPHS}, tmp_path, DATA_FILE, weights)
    _check_shared(tmp_path)
    assert (tmp_path / DATA_FILE).stat().st_size < 0.35 * (exported.out / DATA_FILE).stat().st_size
    assert all(weight_files.has_quantized_weights(tmp_path / f"{name}.onnx") for name in GRAPHS)
    deltas = validate_decoder_step(exported.adapter, tmp_path)  # quantized weights: reported, never raised
    assert all(np.isfinite(d) for d in deltas.values())
    memory = exported.memories["int8"]
    for name in GRAPHS:
        g = exported.adapter.geometry
        feeds = {"inputs_embeds": np.ones((1, 2, g.hidden_size), np.float32),
                 "position_ids": np.full((g.position_dims, 2), memory.meta.position_offset, np.int64),
                 **memory_feeds(memory, name)}
        for i in range(g.num_layers):
            feeds[f"rec_key.{i}"] = feeds[f"rec_value.{i}"] = np.zeros((g.num_kv_heads, 0, g.head_dim), np.float32)
        logits = _session(tmp_path / f"{name}.onnx").run(["logits"], feeds)[0]
        assert logits.shape == (1, g.vocab_size) and np.isfinite(logits).all()


def test_export_with_int4_weights_end_to_end(llama_dir, tmp_path):
    adapter = load_model(llama_dir)
    (tmp_path / DATA_FILE).write_bytes(b"stale")  # re-export over an old folder: never appended to
    manifest = export_decoder_step(adapter, tmp_path, weights="int4")
    assert manifest["weights"] == "int4"
    _check_shared(tmp_path)
    assert all(np.isfinite(d) for d in validate_decoder_step(adapter, tmp_path).values())


# ---- 5. the runtime half stays torch-free ---------------------------------------------------------------------


def test_memory_inputs_imports_neither_torch_nor_transformers():
    source = Path(memory_inputs.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "transformers", "onnx"}
    code = ("import sys; sys.modules.update(torch=None, transformers=None); "
            "import emloc_edge.runtime.memory_inputs")
    subprocess.run([sys.executable, "-c", code], check=True)
