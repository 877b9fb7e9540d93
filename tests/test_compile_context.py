"""The whole-context policy (`emloc-context`) and its parts: calibration rows blind to their own copy,
per-segment budgets, one search over the whole context."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from emloc_edge.compile.compressor import CompileOptions, Compressor, _evenly_spaced
from emloc_edge.compile.policy import WholeContext
from emloc_edge.compile.scoring import keep_count, keep_topk_per_segment
from emloc_edge.models.decoder import LayerKV, attend
from emloc_edge.models.loading import load_model
from test_compile import make_demos


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(llama_dir)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), demos=st.integers(1, 4), T=st.integers(1, 4))
def test_a_blind_row_attends_as_if_its_demo_were_not_in_the_memory(seed, n, demos, T):
    """Masking a row's own demo equals removing that demo's entries from the memory, for that row."""
    g = torch.Generator().manual_seed(seed)
    B, H, kv, hd = 2, 4, 2, 8
    q, k, v = (torch.randn(B, H, T, hd, generator=g), torch.randn(B, kv, T, hd, generator=g),
               torch.randn(B, kv, T, hd, generator=g))
    origin = torch.randint(-1, demos, (n,), generator=g)  # the same per head, so a removal stays rectangular
    memory = LayerKV(torch.randn(kv, n, hd, generator=g), torch.randn(kv, n, hd, generator=g), origin[None].expand(kv, n))
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
    blind_to = torch.tensor([0, -1])  # row 0 does not see demo 0; row 1 (-1) sees everything
    out, _ = attend(q, k, v, memory, visible, 0.3, blind_to=blind_to)
    keep = origin != 0
    without = LayerKV(memory.key[:, keep], memory.value[:, keep])
    expected0, _ = attend(q[:1], k[:1], v[:1], without, visible[:1], 0.3)
    expected1, _ = attend(q[1:], k[1:], v[1:], LayerKV(memory.key, memory.value), visible[1:], 0.3)
    assert torch.allclose(out[:1], expected0, atol=1e-6)
    assert torch.allclose(out[1:], expected1, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5), data=st.data())
def test_per_segment_top_k_is_each_segments_own_top_k(seed, sizes, data):
    g = torch.Generator().manual_seed(seed)
    kv = 2
    segment = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])  # [L]
    scores = torch.rand(kv, len(segment), generator=g)
    quotas = [data.draw(st.integers(0, s)) for s in sizes]
    index = keep_topk_per_segment(scores, segment, quotas)  # [kv, sum]
    assert index.shape == (kv, sum(quotas))
    assert torch.equal(index, index.sort(-1).values)
    for h in range(kv):
        for s, quota in enumerate(quotas):
            mine = [i for i in index[h].tolist() if segment[i] == s]
            where = (segment == s).nonzero()[:, 0]
            best = where[scores[h, where].argsort(descending=True)[:quota]].tolist()
            assert sorted(mine) == sorted(best)


def test_evenly_spaced_rows():
    assert _evenly_spaced(50, 8) == [0, 6, 12, 18, 25, 31, 37, 43]
    assert _evenly_spaced(3, 8) == [0, 1, 2]
    assert _evenly_spaced(5, 1) == [0]


def _segment_tokens(adapter, demos, chunk_size: int) -> list[int]:
    compressor = Compressor(adapter, CompileOptions(chunk_size=chunk_size))
    return [len(compressor._render_chunk(demos[k : k + chunk_size], with_system=k == 0).sequence.input_ids)
            for k in range(0, len(demos), chunk_size)]


def test_whole_context_is_one_chunk_with_every_segment_at_its_share(llama, tmp_path):
    """delta = inf: every layer takes the smallest ratio, and every 3 demos keep their own share of it."""
    demos = make_demos("llama", 7, tmp_path, long=True)
    options = CompileOptions(delta=float("inf"), ratios=(0.3, 0.6), chunk_size=3, precision="fp32", policy="emloc-context")
    compressor = Compressor(llama, options)
    compressor.options.make_policy = lambda: WholeContext(delta=float("inf"), ratios=(0.3, 0.6), budget="chunk",
                                                          search="greedy")
    memory = compressor.compile(demos)
    assert [c.demos for c in memory.meta.chunks] == [0, 7]  # the first token's own segment, then every demo
    sizes = _segment_tokens(llama, demos, 3)
    bounds = np.cumsum([0] + sizes)
    assert memory.meta.context_tokens == bounds[-1]
    answers = [3 * 3 + 1, 3 * 3, 3]  # 3 answer-span tokens a demo (one-token answers); the first token forced
    for layer in memory.layers:
        for head in layer.token_index:  # [n] per KV head
            per_segment = np.histogram(head, bins=bounds)[0].tolist()
            assert per_segment == [keep_count(0.3, n, a) for n, a in zip(sizes, answers)]
    assert compressor.stats.requested == llama.geometry.num_layers  # one trial a layer: the first ratio passes


def test_one_pool_keeps_the_layers_best_tokens_wherever_they_are(llama, tmp_path):
    """budget "context" (the default): a layer's count is a share of the whole context, not of each segment."""
    demos = make_demos("llama", 7, tmp_path, long=True)
    memory = Compressor(llama, CompileOptions(delta=float("inf"), ratios=(0.3, 0.6), chunk_size=3, precision="fp32",
                                              policy="emloc-context")).compile(demos)
    tokens = memory.meta.context_tokens
    assert all(layer.token_index.shape[1] == keep_count(0.3, tokens, 7 * 3 + 1) for layer in memory.layers)


def test_whole_context_search_keeps_everything_at_negative_delta(llama, tmp_path):
    demos = make_demos("llama", 4, tmp_path, long=True)
    memory = Compressor(llama, CompileOptions(delta=-1.0, chunk_size=2, precision="fp32", policy="emloc-context")).compile(demos)
    assert memory.meta.compression == 1.0


def test_whole_context_final_memory_within_delta(llama, tmp_path):
    demos = make_demos("llama", 8, tmp_path, long=True)
    memory = Compressor(llama, CompileOptions(delta=0.005, chunk_size=2, precision="fp32", policy="emloc-context")).compile(demos)
    assert memory.meta.chunks[-1].final_js <= 0.005
    assert memory.meta.compression < 1.0


def test_whole_context_policy_defaults():
    policy = CompileOptions(policy="emloc-context").make_policy()
    assert isinstance(policy, WholeContext)
    assert (policy.scope, policy.budget, policy.calibration, policy.scores_from) == ("context", "context", "held-out", "all")
    assert (policy.search, policy.calibration_rows, policy.ranking_rows, policy.judges_stored) == ("ranked-slope", 8, 4, False)


def test_prefill_in_blocks_equals_one_forward(llama, tmp_path):
    """A whole-context chunk is prefilled a block at a time; the K/V are those of one forward."""
    from emloc_edge.compile.chunk import ChunkSearch

    demos = make_demos("llama", 3, tmp_path, long=True)
    compressor = Compressor(llama)
    rendered = compressor._render_chunk(demos, with_system=True)
    g = llama.geometry
    empty = [LayerKV.empty(g.num_kv_heads, g.head_dim) for _ in range(g.num_layers)]
    with torch.no_grad():
        search = ChunkSearch(compressor.decoder, empty, llama.embed([rendered.sequence]),
                             llama.embed(rendered.calibration), 0, "fp32")
        tokens = search.tokens
        assert tokens > 20, "test precondition: several blocks"
        for (k1, v1), (k7, v7) in zip(search._prefill(block=tokens), search._prefill(block=7)):
            assert torch.allclose(k1, k7, atol=1e-5) and torch.allclose(v1, v7, atol=1e-5)


def test_appending_adds_one_chunk_and_keeps_the_old_bytes(llama, tmp_path):
    demos = make_demos("llama", 8, tmp_path, long=True)
    options = CompileOptions(delta=0.005, chunk_size=2, precision="int8", policy="emloc-context")
    first = Compressor(llama, options).compile(demos[:5])
    grown = Compressor(llama, options).compile(demos[5:], existing=first)
    assert [c.demos for c in grown.meta.chunks] == [0, 5, 3]  # the first token's segment once
    for old, new in zip(first.layers, grown.layers):
        n = old.key_t.shape[-1]
        assert np.array_equal(new.key_t[..., :n], old.key_t) and np.array_equal(new.token_index[:, :n], old.token_index)
    assert grown.meta.context_tokens > first.meta.context_tokens


class _AdditiveSearch:
    """A stand-in ChunkSearch whose JS is the sum of each pruned layer's cost: monotone in the steps taken."""

    def __init__(self, costs: dict[tuple[int, float], float], tokens: int = 100) -> None:
        self.num_layers = 1 + max(layer for layer, _ in costs)
        self.costs, self.tokens = costs, tokens
        self.settled: dict[int, float] = {}
        self.profiles = 0

    def keep_count(self, ratio: float) -> int:
        return int(ratio * self.tokens)

    def _cost(self, layer: int, count: int) -> float:
        return 0.0 if count == self.tokens else self.costs[(layer, count / self.tokens)]

    def try_keep(self, layer: int, count: int, delta: float | None = None) -> float:
        return self._cost(layer, count)

    def try_profile(self, counts: list[int], delta: float | None = None) -> float:
        self.profiles += 1
        return sum(self._cost(layer, c) for layer, c in enumerate(counts))

    def settle(self, layer: int, count: int, ratio: float, js: float | None) -> None:
        self.settled[layer] = ratio

    def measured(self, layer: int) -> None:
        pass


def _ladder_costs(draw_cost, layers: int, ratios: tuple[float, ...]) -> dict:
    """Per layer, a cost that grows as the ratio shrinks (pruning more never diverges less)."""
    costs = {}
    for layer in range(layers):
        running = 0.0
        for r in sorted(ratios, reverse=True):
            running += draw_cost()
            costs[(layer, r)] = running
    return costs


@settings(max_examples=80, deadline=None)
@given(data=st.data(), layers=st.integers(1, 6), delta=st.floats(0.0, 3.0))
def test_ranked_search_takes_the_longest_prefix_within_delta(data, layers, delta):
    """With a monotone JS, bisection finds exactly the longest prefix of the ranked steps within delta,
    and a larger delta never keeps more tokens."""
    from emloc_edge.compile.policy import ranked_prefix

    ratios = (0.1, 0.5)
    costs = _ladder_costs(lambda: data.draw(st.floats(0.0, 1.0)), layers, ratios)
    search = _AdditiveSearch(costs)
    chosen = ranked_prefix(search, delta, ratios)
    assert [search.settled[l] for l in range(layers)] == chosen
    # the exhaustive answer: walk the same ranked order one step at a time
    steps = sorted((c, layer, rung, r) for layer in range(layers)
                   for rung, (r, c) in enumerate((r, costs[(layer, r)]) for r in sorted(ratios, reverse=True)))
    expected, total = [1.0] * layers, 0.0
    for cost, layer, _, ratio in steps:
        step = cost - (costs[(layer, 0.5)] if ratio == 0.1 else 0.0)
        if total + step > delta:
            break
        total, expected[layer] = total + step, ratio
    assert chosen == expected
    assert search.profiles <= int(np.ceil(np.log2(len(steps) + 1)))
    bigger = ranked_prefix(_AdditiveSearch(costs), delta * 1.1 + 1e-9, ratios)
    assert sum(search.keep_count(r) for r in bigger) <= sum(search.keep_count(r) for r in chosen)


def _hull_slopes(alone: list[float], removed: list[int]) -> list[float]:
    """Brute force: each rung's slope on the lower convex hull of (0, 0), (removed_r, alone_r)."""
    points = [(0, 0.0)] + list(zip(removed, alone))
    slopes, start = [], 0
    while start < len(points) - 1:  # from each hull vertex, the next is the point of least slope (the farthest on ties)
        x0, y0 = points[start]
        best = min(range(start + 1, len(points)), key=lambda j: ((points[j][1] - y0) / (points[j][0] - x0), -j))
        slopes += [(points[best][1] - y0) / (points[best][0] - x0)] * (best - start)
        start = best
    return slopes


@settings(max_examples=200, deadline=None)
@given(data=st.data(), rungs=st.integers(1, 5))
def test_slope_keys_are_the_lower_convex_hull(data, rungs):
    """Each rung's key is its slope on the lower convex hull of (tokens removed, JS alone): never
    decreasing down the rungs, and a rung cheaper than the one before it is pooled with it."""
    from emloc_edge.compile.policy import _slope_keys

    removed = sorted(data.draw(st.sets(st.integers(1, 1000), min_size=rungs, max_size=rungs)))
    alone = list(np.cumsum(data.draw(st.lists(st.floats(0.0, 1.0), min_size=rungs, max_size=rungs))))
    keys = _slope_keys(alone, removed)
    assert keys == pytest.approx(_hull_slopes(alone, removed), rel=1e-9, abs=1e-12)
    assert all(a <= b * (1 + 1e-9) + 1e-15 for a, b in zip(keys, keys[1:]))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), layers=st.integers(1, 6), delta=st.floats(0.0, 3.0))
def test_slope_search_takes_the_longest_prefix_of_its_order(data, layers, delta):
    """order "slope": bisection finds the longest prefix of the JS-per-token order within delta (an
    additive JS makes every prefix's JS its steps' sum), and a larger delta never keeps more tokens."""
    from emloc_edge.compile.policy import _slope_keys, ranked_prefix

    ratios = (0.1, 0.2, 0.5)
    costs = _ladder_costs(lambda: data.draw(st.floats(0.0, 1.0)), layers, ratios)
    search = _AdditiveSearch(costs)
    chosen = ranked_prefix(search, delta, ratios, order="slope")
    down = sorted(ratios, reverse=True)
    steps = sorted((key, layer, rung, r) for layer in range(layers) for rung, (key, r) in enumerate(zip(
        _slope_keys([costs[(layer, r)] for r in down], [100 - search.keep_count(r) for r in down]), down)))
    expected = [1.0] * layers
    for _, layer, _, ratio in steps:  # the exhaustive answer: walk the order one step at a time
        trial = list(expected)
        trial[layer] = ratio
        if sum(search._cost(l, search.keep_count(r)) for l, r in enumerate(trial)) > delta:
            break
        expected = trial
    assert chosen == expected
    bigger = ranked_prefix(_AdditiveSearch(costs), delta * 1.1 + 1e-9, ratios, order="slope")
    assert sum(search.keep_count(r) for r in bigger) <= sum(search.keep_count(r) for r in chosen)


def test_slope_order_spends_the_budget_where_it_removes_most():
    """Two layers, room for one step: by JS alone the search takes layer 0's small cheap step (0.2 -> 0.1,
    10 tokens); by JS per token it takes layer 1's halving (50 tokens), which costs a little more."""
    from emloc_edge.compile.policy import ranked_prefix

    costs = {(0, 0.5): 0.0, (0, 0.2): 0.0, (0, 0.1): 0.2, (1, 0.5): 0.25, (1, 0.2): 5.0, (1, 0.1): 9.0}
    # layer 0's first two rungs are free; the budget 0.3 then fits one of: layer 0 -> 0.1 or layer 1 -> 0.5
    assert ranked_prefix(_AdditiveSearch(costs), 0.3, (0.1, 0.2, 0.5)) == [0.1, 1.0]
    assert ranked_prefix(_AdditiveSearch(costs), 0.3, (0.1, 0.2, 0.5), order="slope") == [0.2, 0.5]


def test_ranked_search_on_a_model(llama, tmp_path):
    """The default search on a model. delta = inf: every layer at the smallest ratio; delta < 0: nothing
    pruned; in between: within delta, with at most |ratios|·layers + log2 trials."""
    demos = make_demos("llama", 6, tmp_path, long=True)

    def compile_at(delta: float):
        compressor = Compressor(llama, CompileOptions(delta=delta, chunk_size=2, precision="fp32"))
        return compressor.compile(demos), compressor.stats

    whole, _ = compile_at(-1.0)
    assert whole.meta.compression == 1.0
    floor = keep_count(0.1, whole.meta.context_tokens, 6 * 3 + 1)
    smallest, _ = compile_at(float("inf"))
    assert smallest.meta.kept_tokens_per_layer == [floor] * llama.geometry.num_layers
    middle, stats = compile_at(0.005)
    assert middle.meta.chunks[-1].final_js <= 0.005 * 1.05  # decided on the restricted-vocabulary JS
    steps = len(CompileOptions().keep_ratios) * llama.geometry.num_layers  # the default ladder: 4 rungs
    assert stats.requested <= steps + int(np.ceil(np.log2(steps + 1)))


def test_progress_counts_each_layer_once(llama, tmp_path):
    """The ranked search settles every layer at the end; the progress bar moves as it measures them."""
    demos = make_demos("llama", 4, tmp_path, long=True)
    events: list[str] = []

    class Recorder:
        def chunk(self, index: int, total: int, demos: int, layers: int) -> None:
            events.append("chunk")

        def layer(self) -> None:
            events.append("layer")

    compressor = Compressor(llama, CompileOptions(delta=0.005, chunk_size=2, precision="fp32"))
    compressor.compile(demos, progress=Recorder())
    assert events == ["chunk"] + ["layer"] * llama.geometry.num_layers


def test_the_first_token_is_its_own_int8_segment(llama, tmp_path):
    """A fresh whole-context compile keeps the context's first token in every head of every layer and
    stores it as segment 0 (its own K scales); the rest of the context is segment 1."""
    demos = make_demos("llama", 6, tmp_path, long=True)
    memory = Compressor(llama, CompileOptions(delta=float("inf"), chunk_size=2, precision="int8")).compile(demos)
    sink, rest = memory.meta.chunks
    assert (sink.demos, sink.tokens, sink.kept_per_layer) == (0, 1, [1] * llama.geometry.num_layers)
    assert rest.demos == 6 and sink.tokens + rest.tokens == memory.meta.context_tokens
    for layer in memory.layers:
        assert layer.segment_lengths[0] == 1 and (layer.token_index[:, 0] == 0).all()
        assert layer.key_scale.shape[-1] == 2
        assert (layer.token_index[:, 1:] > 0).all()


def test_ranking_rows_judge_single_layer_trials_on_those_rows_and_profiles_on_all(llama, tmp_path):
    """ranking_rows = k: try_keep measures the JS of the k evenly spaced rows alone (as a search calibrated on
    those rows only would, the same tokens kept), try_profile that of every row."""
    from emloc_edge.compile.chunk import ChunkSearch

    demos = make_demos("llama", 6, tmp_path, long=True)
    compressor = Compressor(llama)
    rendered = compressor._render_chunk(demos, with_system=True)
    g = llama.geometry
    empty = [LayerKV.empty(g.num_kv_heads, g.head_dim) for _ in range(g.num_layers)]
    chunk, rows = llama.embed([rendered.sequence]), rendered.calibration
    assert len(rows) == 6, "test precondition"
    with torch.no_grad():
        ranked = ChunkSearch(compressor.decoder, empty, chunk, llama.embed(rows), 0, "fp32", ranking_rows=2)
        subset = ranked.ranking[0].tolist()
        assert subset == [0, 5]
        alone = ChunkSearch(compressor.decoder, empty, chunk, llama.embed([rows[i] for i in subset]), 0, "fp32")
        every = ChunkSearch(compressor.decoder, empty, chunk, llama.embed(rows), 0, "fp32")
        alone.importance = every.importance = ranked.importance  # the same tokens kept at every count
        count = ranked.keep_count(0.2)
        for layer in (0, g.num_layers - 1):
            assert ranked.try_keep(layer, count) == pytest.approx(alone.try_keep(layer, count), rel=1e-4, abs=1e-8)
            assert ranked.try_keep(layer, count) != pytest.approx(every.try_keep(layer, count), rel=1e-3)
        profile = [count] * g.num_layers
        assert ranked.try_profile(profile) == pytest.approx(every.try_profile(profile), rel=1e-5, abs=1e-9)
