"""Merging evicted tokens' values into kept ones (policy knob merge_threshold; compile_benchmark's "+m95")."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from emloc_edge.compile.compressor import Compressor
from emloc_edge.compile.scoring import gather_tokens, keep_topk, merge_evicted_values
from emloc_edge.models.loading import load_model
from test_compile import make_demos
from test_compile_search import _Judged


def _brute_force(key, value, index, mass, threshold, origin=None):
    """Token by token: each evicted token joins the kept token of its head (and of its own demonstration,
    with `origin`) with the most similar key."""
    kv, tokens, _ = value.shape
    out = gather_tokens(value, index).clone()
    for h in range(kv):
        kept = index[h].tolist()
        total = {j: mass[h, t] * value[h, t] for j, t in enumerate(kept)}
        norm = {j: mass[h, t] for j, t in enumerate(kept)}
        for e in set(range(tokens)) - set(kept):
            sims = [torch.cosine_similarity(key[h, e], key[h, t], dim=0)
                    if origin is None or origin[e] == origin[t] else torch.tensor(-float("inf")) for t in kept]
            j = int(torch.stack(sims).argmax())
            if sims[j] >= threshold:
                total[j] = total[j] + mass[h, e] * value[h, e]
                norm[j] = norm[j] + mass[h, e]
        for j in total:
            out[h, j] = total[j] / norm[j]
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kv=st.integers(1, 3), tokens=st.integers(2, 12), hd=st.integers(1, 5),
       threshold=st.sampled_from([-1.0, 0.0, 0.5, 0.9, 2.0]), demos=st.integers(0, 3), data=st.data())
def test_merged_values_equal_a_token_by_token_merge(seed, kv, tokens, hd, threshold, demos, data):
    """Against a brute-force merge on random keys, values and masses: every kept token's value is the
    mass-weighted mean of its own and its evicted neighbours' (threshold > 1: the kept values as computed),
    and the mass-weighted sum of the values is conserved when every evicted token merges (threshold -1)."""
    g = torch.Generator().manual_seed(seed)
    key, value = torch.randn(kv, tokens, hd, generator=g), torch.randn(kv, tokens, hd, generator=g)
    mass = torch.rand(kv, tokens, generator=g) + 0.01
    n = data.draw(st.integers(1, tokens))
    index = keep_topk(torch.rand(kv, tokens, generator=g), n)
    origin = torch.randint(0, demos, (tokens,), generator=g) if demos else None  # 0: no origins
    merged = merge_evicted_values(key, value, index, mass, threshold, origin)
    expected = _brute_force(key, value, index, mass, threshold, origin)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    if threshold > 1:
        assert torch.equal(merged, gather_tokens(value, index))
    if threshold == -1.0 and origin is None:
        # every evicted token lands somewhere: sum over kept of (its mass + merged masses) * value = sum m v
        nearest = torch.nn.functional.normalize(key, dim=-1) @ torch.nn.functional.normalize(
            gather_tokens(key, index), dim=-1).transpose(1, 2)
        owner = index.gather(1, nearest.argmax(-1))  # [kv, L] the kept token each token lands on
        owner.scatter_(1, index, index)  # kept tokens are their own
        norm = torch.zeros(kv, tokens).scatter_add(1, owner, mass).gather(1, index)  # [kv, n]
        torch.testing.assert_close((norm[..., None] * merged).sum(1), (mass[..., None] * value).sum(1),
                                   rtol=1e-4, atol=1e-4)


def test_merging_changes_values_not_which_tokens_are_kept(llama_dir, tmp_path):
    """A compile with merging keeps the same tokens as one without (uniform ratio, no search), stores
    other values where evicted tokens merged, and the keys as computed."""
    llama = load_model(llama_dir)
    demos = make_demos("llama", 4, tmp_path, long=True)
    options = dict(delta=float("inf"), chunk_size=4, precision="fp32", policy="uniform", ratios=(0.3,))
    plain = Compressor(llama, _Judged(**options)).compile(demos)
    merged = Compressor(llama, _Judged(**options, judging={"merge_threshold": -1.0})).compile(demos)
    assert plain.meta.kept_tokens_per_layer == merged.meta.kept_tokens_per_layer
    for a, b in zip(plain.layers, merged.layers):
        assert np.array_equal(a.token_index, b.token_index)
        np.testing.assert_array_equal(a.key_t, b.key_t)
        assert not np.allclose(a.value, b.value)
    none = Compressor(llama, _Judged(**options, judging={"merge_threshold": 2.0})).compile(demos)
    for a, b in zip(plain.layers, none.layers):
        np.testing.assert_array_equal(a.value, b.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_kept_token_with_no_attention_keeps_its_value(dtype):
    """Attention mass that underflowed to 0 on a kept token with nothing merged into it: its value as
    computed, not 0/0."""
    key = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], dtype=dtype)
    value = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], dtype=dtype)
    mass = torch.tensor([[0.0, 1.0, 1.0]], dtype=dtype)
    merged = merge_evicted_values(key, value, torch.tensor([[0, 1]]), mass, 0.5)
    torch.testing.assert_close(merged, torch.tensor([[[1.0, 2.0], [4.0, 5.0]]], dtype=dtype))


def test_merging_sums_in_float32_whatever_the_value_dtype():
    """Attention mass summed over rows, queries and heads passes fp16's 65504: the merge must not overflow."""
    key = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    value = torch.tensor([[[30.0, 1.0], [20.0, 2.0], [5.0, 6.0]]])
    mass = torch.tensor([[70000.0, 50000.0, 1.0]])
    index = torch.tensor([[0, 2]])
    expected = merge_evicted_values(key, value, index, mass, 0.5)
    half = merge_evicted_values(key.half(), value.half(), index, mass, 0.5)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), expected, rtol=1e-3, atol=1e-2)


def test_held_out_compiles_merge_within_each_demonstration(llama_dir, tmp_path, monkeypatch):
    """emloc-context calibrates on rows blind to their own demonstration; its merges get the chunk's token
    origins, so no kept token carries another demonstration's values to a row blind to that one."""
    import emloc_edge.compile.chunk as chunk_module

    seen = []

    def recording(key, value, index, mass, threshold, origin=None):
        seen.append(origin)
        return merge_evicted_values(key, value, index, mass, threshold, origin)

    monkeypatch.setattr(chunk_module, "merge_evicted_values", recording)
    llama = load_model(llama_dir)
    demos = make_demos("llama", 4, tmp_path, long=True)
    Compressor(llama, _Judged(delta=0.05, chunk_size=4, precision="fp32", policy="emloc-context",
                              judging={"merge_threshold": 0.5})).compile(demos)
    rendered = Compressor(llama)._render_chunk(demos, with_system=True)
    assert seen and all(o is not None for o in seen)
    assert all(o.tolist() == rendered.token_origin for o in seen)
