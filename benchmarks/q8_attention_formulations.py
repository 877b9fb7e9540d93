"""Micro-benchmark: exact ways for the q8 decoder graph to apply per-segment K scales, under ONNX Runtime.

Memory attention only (scores, softmax, p @ V) of L layers at SmolLM2-135M geometry (3 KV heads, 3 query
heads per group, head_dim 64), n memory tokens and S chunk segments per layer, one graph per formulation:

  float    fp32 K/V inputs (the memory dequantized at load)                       reference speed, 4x the RAM
  layer    int8, one K scale per channel per layer folded into q                  NOT exact (the old q8 graph)
  gather   int8, scales gathered per token along n (Gather axis 2), x Cast(K)      exact
  onehot   int8, scales expanded by a one-hot MatMul [kv,hd,S] @ [S,n], x Cast(K)  exact (the q8 graph's choice)
  qseg     int8, q pre-scaled once per segment: S x the score MatMul, then each token's segment picked  exact
  qtok     int8, q pre-scaled per segment, gathered per token, multiplied and summed over hd           exact

    python benchmarks/q8_attention_formulations.py --layers 30 --tokens 470 --segments 13 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

KV, G, HD = 3, 3, 64
MODES = ("float", "layer", "gather", "onehot", "qseg", "qtok")


def scores(mode: str, q, k, ks, seg):
    """q [kv, R, hd]; k int8 [kv, hd, n]; ks [kv, hd, S]; seg int32 [n] -> scores [kv, R, n]."""
    kf = k.to(torch.float32)
    if mode == "layer":
        return (q * ks.amax(2)[:, None, :]) @ kf
    if mode == "gather":
        return q @ (kf * ks.index_select(2, seg))
    if mode == "onehot":
        one_hot = (torch.arange(ks.shape[2], dtype=seg.dtype)[:, None] == seg[None, :]).to(torch.float32)  # [S, n]
        return q @ (kf * (ks @ one_hot))
    if mode == "qseg":
        R, n = q.shape[1], k.shape[2]
        qs = q[:, None] * ks.transpose(1, 2)[:, :, None, :]  # [kv, S, R, hd]
        every = (qs.reshape(KV, -1, HD) @ kf).reshape(KV, -1, R, n)  # [kv, S, R, n]
        one_hot = (seg[None, :] == torch.arange(every.shape[1], dtype=seg.dtype)[:, None]).to(torch.float32)  # [S, n]
        return (every * one_hot[None, :, None, :]).sum(1)
    qt = (q[:, :, :, None] * ks[:, None]).index_select(3, seg)  # qtok: [kv, R, hd, S] -> [kv, R, hd, n]
    return (qt * kf[:, None]).sum(2)


class Attention(nn.Module):
    def __init__(self, mode: str, layers: int):
        super().__init__()
        self.mode, self.layers = mode, layers

    def forward(self, q, *per):
        outs = []
        for i in range(self.layers):
            if self.mode == "float":
                k, v = per[2 * i: 2 * i + 2]
                outs.append((q @ k).softmax(-1) @ v)
                continue
            k, v, ks, seg, vs = per[5 * i: 5 * i + 5]
            p = scores(self.mode, q, k, ks, seg).softmax(-1) * vs[:, None, :]
            outs.append(p @ v.to(torch.float32))
        return torch.stack(outs).sum(0)


def feeds(mode: str, layers: int, n: int, S: int, T: int, rng) -> dict[str, np.ndarray]:
    f = {"q": rng.standard_normal((KV, G * T, HD)).astype(np.float32)}
    for i in range(layers):
        if mode == "float":
            f[f"k{i}"] = rng.standard_normal((KV, HD, n)).astype(np.float32)
            f[f"v{i}"] = rng.standard_normal((KV, n, HD)).astype(np.float32)
            continue
        f[f"k{i}"] = rng.integers(-127, 128, (KV, HD, n), dtype=np.int8)
        f[f"v{i}"] = rng.integers(-127, 128, (KV, n, HD), dtype=np.int8)
        f[f"ks{i}"] = (rng.random((KV, HD, S)) * 0.02).astype(np.float32)
        f[f"seg{i}"] = np.sort(rng.integers(0, S, n)).astype(np.int32)
        f[f"vs{i}"] = (rng.random((KV, n)) * 0.02).astype(np.float32)
    return f


def session(mode: str, layers: int, S: int, threads: int, folder: Path) -> ort.InferenceSession:
    example = feeds(mode, layers, 7, S, 2, np.random.default_rng(0))
    names = list(example)
    dims = []
    for i in range(layers):
        n = Dim(f"n{i}", min=2, max=1 << 20)
        dims += [{2: n}, {1: n}] if mode == "float" else [{2: n}, {1: n}, {2: Dim(f"S{i}", min=2, max=4096)}, {0: n}, {1: n}]
    path = folder / f"{mode}.onnx"
    with torch.no_grad():
        torch.onnx.export(Attention(mode, layers), tuple(torch.from_numpy(example[k]) for k in names), str(path),
                          dynamo=True, input_names=names, dynamic_shapes=({1: Dim("R", min=1, max=4096)}, tuple(dims)),
                          optimize=True, verbose=False, report=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=470, help="memory tokens per layer (warehouse-text: ~470)")
    ap.add_argument("--segments", type=int, default=13, help="chunk segments (warehouse-text: 13)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = args.modes.split(",")
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {m: session(m, args.layers, args.segments, args.threads, Path(tmp)) for m in modes}
        times = {(m, T): [] for m in modes for T in (1, 16)}
        inputs = {(m, T): feeds(m, args.layers, args.tokens, args.segments, T, rng) for m in modes for T in (1, 16)}
        for r in range(args.rounds):  # interleaved: the box is shared
            for m in modes[r % len(modes):] + modes[: r % len(modes)]:
                for T in (1, 16):
                    sessions[m].run(None, inputs[m, T])
                    for _ in range(5):
                        start = time.perf_counter()
                        sessions[m].run(None, inputs[m, T])
                        times[m, T].append(1000 * (time.perf_counter() - start))
    print(f"{args.layers} layers, n = {args.tokens}, S = {args.segments}, {args.threads} threads; median ms")
    print(f"{'mode':<8} {'T=1':>8} {'T=16':>8}   (x float)")
    for m in modes:
        t1, t16 = (statistics.median(times[m, T]) for T in (1, 16))
        f1, f16 = (statistics.median(times["float", T]) for T in (1, 16)) if "float" in modes else (t1, t16)
        print(f"{m:<8} {t1:8.2f} {t16:8.2f}   ({t1 / f1:.2f}, {t16 / f16:.2f})")


if __name__ == "__main__":
    main()
