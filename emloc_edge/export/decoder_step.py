"""The decoder-step graph the runtime answers queries with: a fixed per-layer memory + a recent cache.

One step feeds T new tokens (the query turn, then one generated token at a time). Each layer attends to
its own memory (length n_i, differs per layer), the recent cache (the query and the tokens generated so
far, length t, common to all layers) and the new tokens themselves (causal). The graph outputs the
next-token logits and the new tokens' K/V, which the runtime appends to the recent cache.

Memory attention of one layer (kv KV heads, G = H / kv query heads per group, batch 1):

    q [H, T, hd] ── reshape ──► qg [kv, G*T, hd]  (G query heads of a KV group folded into rows)
                                  │ × scaling
            ┌─────────────────────┼─────────────────────────────┐
            ▼                     ▼                             ▼
    @ mem_key_t [kv, hd, n]   @ rec_keyᵀ [kv, hd, t]      @ new_keyᵀ [kv, hd, T] + causal mask
    (q8: Cast int8→f32 × the      │                             │
     segment scales per token)    │                             │
            │ s_mem [kv,G*T,n]    │ s_rec [kv,G*T,t]            │ s_new [kv,G*T,T]
            └──────────── Concat ─┴─ Softmax ─ Split ───────────┘
            ▼                     ▼                             ▼
    p_mem (q8: × mem_value_scale) p_rec                         p_new
    @ mem_value [kv, n, hd]   + @ rec_value [kv, t, hd]   + @ new_value [kv, T, hd]  ──► [kv, G*T, hd]

The memory is never transposed, repeated per head or concatenated at run time (those copies cost ~60 ms a
step at 2000 tokens, onnx-runtime-notes §6). q8: K has one scale per channel per chunk segment
(mem_key_scale [kv, hd, S]) and mem_key_segment [n] names each token's segment; the step expands the
scales per token with a one-hot MatMul ([kv, hd, S] @ [S, n]: one 1 per column, so exact) and multiplies
the Cast keys, so scores equal the dequantized memory's bit for bit. (benchmarks/q8_attention_formulations.py,
memory attention only, 30 layers, n = 470, S = 13, 2 threads: 1.5x / 1.2x the fp32-memory attention at
T = 1 / 16; a Gather of the scales along n 3.9x / 2.1x; q pre-scaled once per segment, S x the score
MatMul, 1.9x / 5.9x.) The per-token V scales fold into p; the int8 V is only Cast.
"""
from __future__ import annotations

import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import BadInputError, ExportValidationError
from ..models.base import ModelAdapter
from ..models.decoder import rotate
from ..runtime.memory_inputs import MEMORY_INPUT_AXES, memory_input_names
from . import weights as weight_files

GRAPHS = {"decoder_step": False, "decoder_step_q8": True}  # graph name -> takes an int8 memory
DATA_FILE = "decoder_weights.data"
StepProgress = Callable[[str], None]  # called with a step's name as it starts
_EXAMPLE_T, _EXAMPLE_RECENT = 3, 2  # trace sizes >= 2 so no dim is specialised to 0/1 (notes §3)


def _layer_axes(quantized: bool) -> dict[str, tuple[str, ...]]:
    """Base input name -> axes of one layer's inputs (declared once, in runtime/memory_inputs.py)."""
    return MEMORY_INPUT_AXES["decoder_step_q8" if quantized else "decoder_step"]


def input_names(num_layers: int, quantized: bool) -> list[str]:
    names = ["inputs_embeds", "position_ids"]
    for i in range(num_layers):
        names += memory_input_names(i, quantized)
    return names


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [name for i in range(num_layers) for name in (f"new_key.{i}", f"new_value.{i}")]


class DecoderStep(nn.Module):
    """One decoding step over a per-layer memory and a recent cache (batch 1), reusing the HF weights.

    forward(inputs_embeds [1, T, D] f32, position_ids [P, T] int64, *per_layer) with per_layer =
    for each layer i the tensors named by `memory_input_names(i, quantized)`:
        mem_key_t [kv, hd, n_i]  (f32, or int8 when quantized)   mem_value [kv, n_i, hd]
        mem_key_scale [kv, hd, S_i] f32, mem_key_segment [n_i] int32, mem_value_scale [kv, n_i] f32  (quantized only)
        rec_key [kv, t, hd] f32, rec_value [kv, t, hd] f32
    returns (logits [1, V] of the last token, new_key.0, new_value.0, ...), each new K/V [kv, T, hd].
    """

    def __init__(self, adapter: ModelAdapter, quantized: bool = False) -> None:
        super().__init__()
        stack = adapter.text_stack()
        self.adapter = adapter  # only for adapter.rotary(); its modules are registered below
        self.layers, self.norm, self.lm_head, self.rotary_emb = stack.layers, stack.norm, stack.lm_head, stack.rotary_emb
        self.geometry = adapter.geometry
        self.quantized = quantized
        self.inputs = list(_layer_axes(quantized))  # base names of one layer's inputs
        self.per_layer = len(self.inputs)

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, *per_layer: Tensor) -> tuple[Tensor, ...]:
        g = self.geometry
        h = inputs_embeds  # [1, T, D]
        T = h.shape[1]
        cos, sin = self.adapter.rotary(h, position_ids[:, None, :])  # [P, T] -> [P, 1, T]; cos, sin [1, T, hd]
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # [T, T] (query, key)
        causal = causal[None].expand(g.group_size, T, T).reshape(g.group_size * T, T)  # [G*T, T], row g*T + t
        outs = []
        for i, layer in enumerate(self.layers):
            tensors = dict(zip(self.inputs, per_layer[i * self.per_layer : (i + 1) * self.per_layer]))
            h, k, v = self._layer(layer, h, cos, sin, causal, tensors)
            outs += [k, v]
        last = self.norm(h[:, -1:])  # [1, 1, D]; 3-D so lm_head exports as MatMul (quantizable)
        logits = self.lm_head(last).reshape(1, -1)  # [1, 1, V] -> [1, V]
        return (logits, *outs)

    def _layer(self, layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, causal: Tensor,
               mem: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder layer: h [1, T, D], mem = this layer's inputs by base name -> (h [1, T, D], new key, new value [kv, T, hd])."""
        g = self.geometry
        attn = layer.self_attn
        T = h.shape[1]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, T, g.num_heads, g.head_dim).transpose(1, 2)  # [1, T, H*hd] -> [1, H, T, hd]
        k = attn.k_proj(x).view(1, T, g.num_kv_heads, g.head_dim).transpose(1, 2)  # -> [1, kv, T, hd]
        v = attn.v_proj(x).view(1, T, g.num_kv_heads, g.head_dim).transpose(1, 2)  # -> [1, kv, T, hd]
        q, k = rotate(q, cos, sin)[0], rotate(k, cos, sin)[0]  # [H, T, hd], [kv, T, hd]
        v = v[0]  # [kv, T, hd]
        out = self._attend(q, k, v, mem, attn.scaling, causal)
        out = out.reshape(g.num_heads, T, g.head_dim).transpose(0, 1).reshape(1, T, -1)  # [kv, G*T, hd] -> [1, T, H*hd]
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mem: dict[str, Tensor], scaling: float, causal: Tensor) -> Tensor:
        """q [H, T, hd]; k, v [kv, T, hd]; mem: one layer's inputs as in the module docstring -> [kv, G*T, hd]."""
        g = self.geometry
        T = q.shape[1]
        qg = q.reshape(g.num_kv_heads, g.group_size * T, g.head_dim) * scaling  # [H, T, hd] -> [kv, G*T, hd]
        key_t = mem["mem_key_t"].to(torch.float32)  # [kv, hd, n]
        if self.quantized:
            key_t = key_t * _per_token(mem["mem_key_scale"], mem["mem_key_segment"])  # [kv, hd, n]
        s_mem = qg @ key_t  # [kv, G*T, n]
        s_rec = qg @ mem["rec_key"].transpose(1, 2)  # [kv, G*T, t]
        s_new = (qg @ k.transpose(1, 2)).masked_fill(~causal, float("-inf"))  # [kv, G*T, T]
        n, t = s_mem.shape[-1], s_rec.shape[-1]
        p = torch.cat([s_mem, s_rec, s_new], dim=-1).softmax(-1)  # [kv, G*T, n + t + T]
        p_mem, p_rec, p_new = p.split([n, t, T], dim=-1)
        if self.quantized:
            p_mem = p_mem * mem["mem_value_scale"].reshape(g.num_kv_heads, 1, -1)  # [kv, n] -> [kv, 1, n]
        return p_mem @ mem["mem_value"].to(torch.float32) + p_rec @ mem["rec_value"] + p_new @ v  # [kv, G*T, hd]


def _per_token(scale: Tensor, segment: Tensor) -> Tensor:
    """Segment scales [kv, hd, S] at each token's segment [n] int32 -> [kv, hd, n], exactly (a one-hot MatMul)."""
    one_hot = torch.arange(scale.shape[-1], dtype=segment.dtype)[:, None] == segment[None, :]  # [S, n]
    return scale @ one_hot.to(scale.dtype)  # [kv, hd, S] @ [S, n]: each column picks one scale (x 1, + 0s)


# ---- example inputs ------------------------------------------------------------------------------------------


def example_inputs(
    geometry, quantized: bool, T: int, t: int, lengths: list[int], seed: int = 0, position: int = 100
) -> dict[str, np.ndarray]:
    """Random feeds by graph input name: a ragged memory (n_i = lengths[i]), recent length t, T new tokens."""
    g, rng = geometry, np.random.default_rng(seed)
    kv, hd = g.num_kv_heads, g.head_dim
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feeds = {
        "inputs_embeds": f32(1, T, g.hidden_size),
        "position_ids": np.tile(np.arange(position + t, position + t + T, dtype=np.int64), (g.position_dims, 1)),
    }
    for i, n in enumerate(lengths):
        if quantized:
            S = 2 + i % 3  # distinct segment counts >= 2 (notes §3)
            feeds[f"mem_key_t.{i}"] = rng.integers(-127, 128, (kv, hd, n), dtype=np.int8)
            feeds[f"mem_value.{i}"] = rng.integers(-127, 128, (kv, n, hd), dtype=np.int8)
            feeds[f"mem_key_scale.{i}"] = (rng.random((kv, hd, S)) * 0.02 + 1e-3).astype(np.float32)
            feeds[f"mem_key_segment.{i}"] = np.sort(rng.integers(0, S, n)).astype(np.int32)
            feeds[f"mem_value_scale.{i}"] = (rng.random((kv, n)) * 0.02 + 1e-3).astype(np.float32)
        else:
            feeds[f"mem_key_t.{i}"], feeds[f"mem_value.{i}"] = f32(kv, hd, n), f32(kv, n, hd)
        feeds[f"rec_key.{i}"], feeds[f"rec_value.{i}"] = f32(kv, t, hd), f32(kv, t, hd)
    return feeds


def _example_lengths(num_layers: int) -> list[int]:
    return [5 + 3 * i for i in range(num_layers)]  # distinct and >= 2 (notes §3)


# ---- export --------------------------------------------------------------------------------------------------


def _export_one(module: DecoderStep, path: Path, opset: int) -> None:
    """Trace one variant with the TorchScript exporter to `path` (one self-contained file; < 2 GiB).

    Measured on the embedded model (30 layers, 2 CPU cores): ~7 s a graph, where torch.onnx.export's
    dynamo path took 50-75 s (torch.export, decompositions and onnxscript's rewriter, each linear in the
    layer count), for the same graph speed under ONNX Runtime and the same agreement with PyTorch. A trace
    that specialised a size would show as a mismatch in `validate_decoder_step`, which feeds other sizes.
    """
    g = module.geometry
    names = input_names(g.num_layers, module.quantized)
    feeds = example_inputs(g, module.quantized, _EXAMPLE_T, _EXAMPLE_RECENT, _example_lengths(g.num_layers))
    args = tuple(torch.from_numpy(feeds[name]) for name in names)
    with torch.no_grad(), quiet_torchscript_exporter():
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=names, output_names=output_names(g.num_layers), dynamic_axes=_dynamic_axes(g, module.quantized),
        )


def _dynamic_axes(g, quantized: bool) -> dict[str, dict[int, str]]:
    """Named dynamic dims of every input and output: T new tokens, t recent tokens, n_i memory tokens and
    S_i K-scale segments of layer i (the per-layer axes are declared once, in runtime/memory_inputs.py)."""
    axes = {"inputs_embeds": {1: "T"}, "position_ids": {1: "T"}}
    for i in range(g.num_layers):
        dims = {"n": f"n_{i}", "S": f"S_{i}", "t": "t"}  # kv, hd are static
        for base, names in _layer_axes(quantized).items():
            axes[f"{base}.{i}"] = {a: dims[name] for a, name in enumerate(names) if name in dims}
        axes[f"new_key.{i}"] = axes[f"new_value.{i}"] = {1: "T"}
    return axes


@contextmanager
def quiet_torchscript_exporter():
    """Silence TorchScript-exporter noise that says nothing about our graphs; other warnings still show."""
    with warnings.catch_warnings():
        # Shapes read in forward() (T, t, n) are traced as graph ops; the tracer warns about each anyway.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        # torch >= 2.9 marks this exporter legacy in favour of dynamo (why we keep it: see `_export_one`).
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield


def export_decoder_step(adapter: ModelAdapter, out_dir: Path, weights: str = "fp32", opset: int = 18,
                        validate: bool = False, progress: StepProgress | None = None) -> dict:
    """Write decoder_step.onnx, decoder_step_q8.onnx and their one shared decoder_weights.data into out_dir.

    weights: fp32 (as exported) | int8 | int4 (MatMulNBits, block 32, accuracy level 4). With `validate`,
    the fp32 traces are checked against PyTorch (`validate_decoder_step`) before their weights are
    quantized, so an export bug fails at the 1e-3 gate whatever the weights; quantization itself is a
    deterministic rewrite of MatMul weights, measured apart (tests, benchmarks). `progress(step)` is
    called as each step starts. Returns the manifest section {"graphs": {name: {"file", "weights_file",
    "memory", "inputs", "outputs"}}, "weights", "opset"[, "validation_max_scaled_diff"]}; "memory" is the
    dtype of the graph's mem_key_t / mem_value inputs (float32 | int8).
    """
    if weights not in weight_files.WEIGHT_FORMATS:
        raise BadInputError(f"weights must be one of {', '.join(weight_files.WEIGHT_FORMATS)}, got {weights!r}",
                            parameters="weights")
    step = progress or (lambda name: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = adapter.geometry
    section: dict = {}
    with tempfile.TemporaryDirectory(prefix="emloc-export-") as tmp:
        staged = {}
        for name, quantized in GRAPHS.items():
            step(f"tracing {name}")
            staged[name] = Path(tmp) / f"{name}.onnx"
            _export_one(DecoderStep(adapter, quantized).eval(), staged[name], opset)
        if validate:
            step("validating the fp32 traces against PyTorch")
            section["validation_max_scaled_diff"] = validate_decoder_step(adapter, Path(tmp))
        step(f"writing decoder weights ({weights})" if weights == "fp32" else f"quantizing decoder weights to {weights}")
        weight_files.save_shared(staged, out_dir, DATA_FILE, weights)
    section.update({
        "graphs": {
            name: {
                "file": f"{name}.onnx",
                "weights_file": DATA_FILE,
                "memory": "int8" if quantized else "float32",
                "inputs": input_names(g.num_layers, quantized),
                "outputs": output_names(g.num_layers),
            }
            for name, quantized in GRAPHS.items()
        },
        "weights": weights,
        "opset": opset,
    })
    return section


# ---- validation ----------------------------------------------------------------------------------------------


def validate_decoder_step(adapter: ModelAdapter, out_dir: Path, atol: float = 1e-3) -> dict[str, float]:
    """Run both graphs under ONNX Runtime and DecoderStep in torch on a random ragged memory (T=3, t=2).

    Returns per output ("decoder_step/logits", "decoder_step_q8/new_key.0", ...) the max |Δ| scaled by
    the output's magnitude, max |Δ| / max(1, max |reference|): real weights fed random inputs give
    deep-layer values and logits in the tens, where fp32 summation order alone moves the last digits.
    With fp32 weights, raises ExportValidationError naming every output over `atol`; with quantized weights
    (MatMulNBits in the graph) the differences are only reported, since they measure weight
    quantization, not export.
    """
    import onnxruntime as ort

    g = adapter.geometry
    lengths = [int(x) for x in 2 + 3 * np.random.default_rng(0).permutation(g.num_layers)]  # distinct n_i >= 2
    deltas: dict[str, float] = {}
    quantized_weights = False
    for name, quantized in GRAPHS.items():
        path = Path(out_dir) / f"{name}.onnx"
        quantized_weights |= weight_files.has_quantized_weights(path)
        feeds = example_inputs(g, quantized, T=3, t=2, lengths=lengths, seed=1)
        module = DecoderStep(adapter, quantized).eval()
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[n]) for n in input_names(g.num_layers, quantized)))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(output_names(g.num_layers), feeds)
        for out_name, w, o in zip(output_names(g.num_layers), want, got):
            ref = w.numpy()
            deltas[f"{name}/{out_name}"] = float(np.abs(ref - o).max() / max(1.0, float(np.abs(ref).max())))
    bad = {k: d for k, d in deltas.items() if not d <= atol}
    if bad and not quantized_weights:
        listed = ", ".join(f"{k} {d:.2e}" for k, d in bad.items())
        raise ExportValidationError(f"{out_dir}: ONNX decoder step differs from PyTorch beyond {atol:g} (relative to each output's scale): {listed}; "
                         "this is an export bug: please report it (export with validate=False to keep the graphs)",
                                    parameters="validate")
    return deltas


__all__ = [
    "DATA_FILE", "GRAPHS", "DecoderStep", "example_inputs", "export_decoder_step", "input_names",
    "memory_input_names", "output_names", "validate_decoder_step",
]
