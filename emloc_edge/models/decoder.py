"""An explicit decoder forward over a ragged, per-layer prefix memory, reusing the HF layer weights.

HF decoders share one causal mask across layers, sized from layer 0, so they cannot attend to a
memory whose length differs per layer when more than one new token is fed. This module runs the same
weights (norms, q/k/v/o projections, MLP, rotary tables) with its own attention:

    new tokens h [B, T, D] ──► layer l:  q,k,v ── RoPE ──► attend([memory_l ; new k,v]) ──► o_proj ─► MLP
                                            memory_l: [kv, n_l, hd], n_l differs per layer,
                                            fully visible to every new token; new tokens causal.

Query heads are folded into their KV group, so the memory is never repeated per head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ModelAdapter


@dataclass
class LayerKV:
    """One layer's prefix memory (keys already rotated at their original positions)."""

    key: torch.Tensor  # [kv, n, hd]
    value: torch.Tensor  # [kv, n, hd]
    origin: torch.Tensor | None = None  # [kv, n] long: the demonstration each entry came from (-1: none known)

    @classmethod
    def empty(cls, kv_heads: int, head_dim: int, dtype=torch.float32) -> "LayerKV":
        return cls(torch.zeros(kv_heads, 0, head_dim, dtype=dtype), torch.zeros(kv_heads, 0, head_dim, dtype=dtype))

    def __len__(self) -> int:
        return self.key.shape[1]

    def extend(self, key: torch.Tensor, value: torch.Tensor, origin: torch.Tensor | None = None) -> "LayerKV":
        """The memory followed by new entries key, value [kv, m, hd] (origin [kv, m], or none known)."""
        merged = None
        if origin is not None or self.origin is not None:
            merged = torch.cat([_origins(self.origin, self.key), _origins(origin, key)], 1)
        return LayerKV(torch.cat([self.key, key], 1), torch.cat([self.value, value], 1), merged)


def _origins(origin: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """origin [kv, n], or -1 (none known) for each of key's [kv, n] entries."""
    return origin if origin is not None else torch.full(key.shape[:2], -1, dtype=torch.long, device=key.device)


@dataclass
class Scoring:
    """Ask a forward pass for attention mass per prefix token (the EMLoC importance score)."""

    queries: torch.Tensor  # [B, T] bool: the new tokens whose attention counts (answer-span tokens)
    skip: list[int]  # per layer: prefix entries before this index (older memory) are left out of the softmax


@dataclass
class ForwardOut:
    hidden: torch.Tensor  # [B, T, D] output of the last layer (before the final norm)
    layer_inputs: list[torch.Tensor] | None  # h_l entering each layer run, if asked
    new_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer run: ([B, kv, T, hd], [B, kv, T, hd])
    scores: list[torch.Tensor] | None  # per layer run: [kv, n_l - skip_l]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, heads, T, hd] with cos, sin [B, T, hd] (rotate-half convention, as HF)."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    memory: LayerKV,
    visible: torch.Tensor,
    scaling: float,
    scoring: tuple[torch.Tensor, int] | None = None,
    blind_to: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of T new tokens over [memory ; new tokens].

    q [B, H, T, hd]; k, v [B, kv, T, hd]; memory [kv, n, hd]; visible [B, T, T] bool (query, key).
    blind_to [B] long: row b does not see memory entries whose origin is blind_to[b] (a demonstration
    re-read without its own copy in the memory is a held-out item; -1 hides nothing).
    scoring = (query weights [B, T], skip): also return the attention mass each memory entry from
    `skip` on receives, with the softmax taken over [memory[skip:] ; new tokens] only.
    Returns out [B, H, T, hd] and scores [kv, n - skip] or None.
    """
    B, H, T, hd = q.shape
    kv = k.shape[1]
    G = H // kv
    n = memory.key.shape[1]
    qg = q.float().reshape(B, kv, G * T, hd)  # query heads folded into their KV group (row = g*T + t)
    keys = torch.cat([memory.key.float().expand(B, -1, -1, -1), k.float()], 2)  # [B, kv, n+T, hd]
    values = torch.cat([memory.value.float().expand(B, -1, -1, -1), v.float()], 2)
    seen_new = visible[:, None, None].expand(B, 1, G, T, T).reshape(B, 1, G * T, T)  # [B, 1, G*T, T]
    seen_memory = torch.ones(B, 1, 1, n, dtype=torch.bool, device=q.device)  # [B, 1|kv, 1, n]
    if blind_to is not None and memory.origin is not None:
        own = memory.origin[None, :, None, :] == blind_to[:, None, None, None]  # [B, kv, 1, n]
        seen_memory = ~(own & (blind_to >= 0)[:, None, None, None])
    heads = seen_memory.shape[1]
    seen = torch.cat([seen_memory.expand(B, heads, G * T, n), seen_new.expand(B, heads, G * T, T)], -1)
    # The fused kernel: about 2.5x the explicit softmax's speed on CPU, and no [B, kv, G*T, n+T] float logits kept.
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=seen, scale=scaling)  # [B, kv, G*T, hd]
    out = out.reshape(B, H, T, hd).to(q.dtype)

    scores = None
    if scoring is not None:  # the EMLoC importance: attention mass per memory entry, older memory left out
        weights, skip = scoring
        logits = (qg @ keys[:, :, skip:].transpose(2, 3) * scaling).masked_fill(~seen[..., skip:], float("-inf"))
        p_sub = logits.softmax(-1)[..., : n - skip].reshape(B, kv, G, T, n - skip)  # [B, kv, G, T, n-skip]
        scores = torch.einsum("bkgtc,bt->kc", p_sub, weights.float())  # summed over rows, queries, group heads
    return out, scores


class RaggedDecoder:
    """Runs the adapter's text decoder layers over new tokens with a per-layer prefix memory."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.stack = adapter.text_stack()
        self.geometry = adapter.geometry

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.rotary(hidden, positions)

    @torch.no_grad()
    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        memory: list[LayerKV],
        start_layer: int = 0,
        keep_inputs: bool = False,
        keep_kv: bool = False,
        scoring: Scoring | None = None,
        blind_to: torch.Tensor | None = None,
    ) -> ForwardOut:
        """hidden [B, T, D] entering `start_layer`; positions [P, B, T] absolute; valid [B, T] bool;
        blind_to [B]: each row's hidden memory origin (see `attend`)."""
        g = self.geometry
        B, T, _ = hidden.shape
        cos, sin = self.rotary(hidden, positions)
        causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()
        visible = causal[None] & valid[:, None, :]  # [B, T, T] query t sees valid keys s ≤ t
        inputs, new_kv, scores = [], [], []
        for l in range(start_layer, g.num_layers):
            layer = self.stack.layers[l]
            attn = layer.self_attn
            if keep_inputs:
                inputs.append(hidden)
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(B, T, g.num_heads, g.head_dim).transpose(1, 2)  # [B, H, T, hd]
            k = attn.k_proj(x).view(B, T, g.num_kv_heads, g.head_dim).transpose(1, 2)  # [B, kv, T, hd]
            v = attn.v_proj(x).view(B, T, g.num_kv_heads, g.head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            score_arg = (scoring.queries, scoring.skip[l]) if scoring is not None else None
            out, s = attend(q, k, v, memory[l], visible, attn.scaling, score_arg, blind_to)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if keep_kv:
                new_kv.append((k, v))
            if s is not None:
                scores.append(s)
        return ForwardOut(
            hidden,
            inputs if keep_inputs else None,
            new_kv if keep_kv else None,
            scores if scoring is not None else None,
        )

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., vocab]"""
        return self.stack.lm_head(self.stack.norm(hidden))
