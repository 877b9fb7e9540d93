"""Decoder-step ONNX graphs (ONNX Runtime) against the PyTorch reference `RaggedDecoder`, per family.

The memory is a real compiled one (pruned, ragged per layer); the "recent" cache grows from the graph's
own new K/V across steps, and the reference attends to [memory ; recent] per layer.
"""
from __future__ import annotations

import ast
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
from emloc_edge.memory import TaskMemory, quantize_keys
from emloc_edge.models.decoder import LayerKV, RaggedDecoder
from emloc_edge.models.loading import load_model
from emloc_edge.runtime import memory_inputs
from emloc_edge.runtime.memory_inputs import memory_feeds, requantize_keys_per_layer
from test_compile import make_demos

ATOL = 1e-4
STEPS = [(4, 1, 2), (1,)]  # new tokens per step: T>1 at t=0, T=1 at t=4, T=2 at t=5; and T=1 at t=0


class Exported(NamedTuple):
    adapter: object
    out: Path
    manifest: dict
    memories: dict[str, TaskMemory]  # "fp32" | "fp16" | "int8" (2 segments a layer) | "int8_1seg"


@pytest.fixture(scope="module")
def exported(all_family_dir, tmp_path_factory) -> Exported:
    family = all_family_dir.family
    adapter = load_model(all_family_dir.path)
    out = tmp_path_factory.mktemp(f"decoder_step_{family}")
    manifest = export_decoder_step(adapter, out, weights="fp32")
    demos = make_demos(family, 4, tmp_path_factory.mktemp(f"demos_{family}"))
    compiled = {name: Compressor(adapter, CompileOptions(delta=0.005, precision=p, chunk_size=c)).compile(demos)
                for name, p, c in [("fp32", "fp32", 2), ("fp16", "fp16", 2), ("int8", "int8", 2), ("int8_1seg", "int8", 4)]}
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


def _dequantized_feeds(feeds: dict, num_layers: int) -> list[LayerKV]:
    """The memory the q8 graph sees, in float: key_t * per-channel scale, value * per-token scale."""
    out = []
    for i in range(num_layers):
        key_t = feeds[f"mem_key_t.{i}"].astype(np.float32) * feeds[f"mem_key_scale.{i}"]  # [kv, hd, n]
        value = feeds[f"mem_value.{i}"].astype(np.float32) * feeds[f"mem_value_scale.{i}"][..., None]  # [kv, n, hd]
        out.append(LayerKV(torch.from_numpy(np.ascontiguousarray(key_t.transpose(0, 2, 1))), torch.from_numpy(value)))
    return out


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


# ---- 2. q8 graph (int8 memory, scales folded) ------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
def test_q8_graph_matches_ragged_decoder_on_the_requantized_memory(exported, steps):
    memory = exported.memories["int8"]
    assert all(len(layer.segment_lengths) == 2 for layer in memory.layers)
    feeds = memory_feeds(memory, "decoder_step_q8")
    assert feeds["mem_key_t.0"].dtype == np.int8 and feeds["mem_value_scale.0"].ndim == 2
    session = _session(exported.out / "decoder_step_q8.onnx")
    g, offset = exported.adapter.geometry, memory.meta.position_offset
    worst = _decode(exported.adapter, session, feeds, _dequantized_feeds(feeds, g.num_layers), offset, steps)
    assert worst["logits"] <= ATOL and worst["new_kv"] <= ATOL, worst
    # against the memory as stored (per-segment scales): requantization moves the logits about as much as
    # int8 storage itself does (tiny models: 0.02-0.05 vs 0.05-0.08 for int8 vs fp32 memory)
    stored = _decode(exported.adapter, session, feeds, memory_kv(memory), offset, steps)
    assert stored["logits"] <= 0.1, stored


def test_q8_graph_is_exact_on_a_one_segment_memory(exported):
    memory = exported.memories["int8_1seg"]
    assert all(len(layer.segment_lengths) == 1 for layer in memory.layers)
    session = _session(exported.out / "decoder_step_q8.onnx")
    worst = _decode(exported.adapter, session, memory_feeds(memory, "decoder_step_q8"), memory_kv(memory),
                    memory.meta.position_offset, STEPS[0])
    assert worst["logits"] <= ATOL and worst["new_kv"] <= ATOL, worst


def test_q8_variant_needs_an_int8_memory(exported):
    with pytest.raises(EmlocError, match="no int8 tensors"):
        memory_feeds(exported.memories["fp16"], "decoder_step_q8")
    with pytest.raises(EmlocError, match="variant"):
        memory_feeds(exported.memories["int8"], "int4")
    aliased = memory_feeds(exported.memories["int8"], "q8")  # short names "fp32" / "q8" work too
    assert all(np.array_equal(v, aliased[k]) for k, v in memory_feeds(exported.memories["int8"], "decoder_step_q8").items())
    assert memory_inputs.variant_for("int8") == "decoder_step_q8" and memory_inputs.variant_for("fp16") == "decoder_step"


# ---- 3. per-layer key requantization --------------------------------------------------------------------------


def _segments(lengths, seed=0, kv=2, hd=8):
    """Per-segment int8 keys of very different magnitudes, quantized as the memory file stores them."""
    rng = np.random.default_rng(seed)
    parts = [quantize_keys(rng.standard_normal((kv, hd, n)).astype(np.float32) * (1 + 3 * k))
             for k, n in enumerate(lengths)]
    return np.concatenate([q for q, _ in parts], axis=2), np.concatenate([s for _, s in parts], axis=2)  # [kv,hd,n], [kv,hd,S]


def test_requantize_is_exact_for_one_segment():
    key_t, scales = _segments([7])
    q, scale = requantize_keys_per_layer(key_t, scales, [7])
    assert q.dtype == np.int8 and scale.shape == (2, 8, 1)
    np.testing.assert_array_equal(q, key_t)
    np.testing.assert_array_equal(scale, scales)


def test_requantize_error_is_at_most_half_a_step_of_the_largest_scale():
    lengths = [5, 0, 9, 3]
    key_t, scales = _segments(lengths, seed=1)
    q, scale = requantize_keys_per_layer(key_t, scales, lengths)
    assert q.shape == key_t.shape and q.dtype == np.int8 and scale.shape == (2, 8, 1)
    np.testing.assert_array_equal(scale, scales.max(axis=2, keepdims=True))
    before = key_t.astype(np.float32) * np.repeat(scales, lengths, axis=2)  # [kv, hd, n]
    after = q.astype(np.float32) * scale
    err = np.abs(after - before)
    assert (err <= scale / 2 * (1 + 1e-6)).all()
    assert err.max() > 0  # the smaller-scale segments really were rounded
    top = np.repeat(scales == scale, lengths, axis=2)  # tokens whose segment has the largest scale
    np.testing.assert_array_equal(q[top], key_t[top])


def test_requantize_rejects_mismatched_segments():
    key_t, scales = _segments([4, 4])
    with pytest.raises(EmlocError, match="segment lengths"):
        requantize_keys_per_layer(key_t, scales, [4, 5])


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
            assert inputs["mem_key_scale.0"].shape == [g.num_kv_heads, g.head_dim, 1]
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
