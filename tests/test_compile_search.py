"""The compiler's search on tiny random models: policies by name, identical candidates measured once,
the same decisions as a naive search, the profile policy's verification, fp32 decisions stored int8,
the restricted-vocabulary JS bracket, and the device option."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from emloc_edge.compile.api import compile_memory
from emloc_edge.compile.chunk import ChunkSearch
from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.divergence import js_divergence
from emloc_edge.compile.policy import POLICIES, GreedyTopDown, ProfileVerified, greedy_top_down
from emloc_edge.compile.restricted_js import RestrictedHead, full_js
from emloc_edge.compile.scoring import TOKEN_WEIGHTS
from emloc_edge.errors import BadInputError
from emloc_edge.memory import with_precision
from emloc_edge.compile.query import memory_kv
from emloc_edge.models.decoder import LayerKV
from emloc_edge.models.loading import load_model
from test_compile import make_demos


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(llama_dir)


def _compile(adapter, demos, **options):
    compressor = Compressor(adapter, CompileOptions(**options))
    return compressor.compile(demos), compressor.stats


def test_policies_by_name_and_default():
    assert list(POLICIES)[:4] == ["emloc-context", "emloc", "emloc-paper", "uniform"]
    assert CompileOptions().policy == "emloc-context"
    assert isinstance(CompileOptions(policy="emloc-paper").make_policy(), GreedyTopDown)
    with pytest.raises(BadInputError, match="policy"):
        CompileOptions(policy="nope")


def test_each_policy_has_its_own_default_ratios():
    """Unset ratios are each policy's own, also in a copy of the options for another policy (as `eval`
    compiles its comparison policies); given ratios hold for every policy."""
    import dataclasses

    fresh = CompileOptions()
    assert fresh.keep_ratios == (0.1, 0.2, 0.3, 0.5) == tuple(fresh.hyperparameters()["ratios"])
    assert fresh.make_policy().ratios == (0.1, 0.2, 0.3, 0.5)
    for paper in ("emloc-paper", "emloc"):
        assert dataclasses.replace(fresh, policy=paper).keep_ratios == (0.1, 0.2, 0.5)
        assert CompileOptions(policy=paper).make_policy().ratios == (0.1, 0.2, 0.5)
    given = CompileOptions(ratios=(0.5, 0.1))
    assert dataclasses.replace(given, policy="emloc-paper").keep_ratios == (0.1, 0.5) == given.keep_ratios


def test_identical_candidates_are_measured_once(llama, tmp_path):
    """Ratios 0.01 and 0.02 both fall under a chunk's answer tokens, so they keep the same count.
    With delta 0 nothing passes: every layer asks for both, and only one forward runs per layer."""
    demos = make_demos("llama", 4, tmp_path)  # 4-word questions
    memory, stats = _compile(llama, demos, delta=0.0, ratios=(0.01, 0.02), chunk_size=2, precision="fp32",
                             policy="emloc-paper")
    layers = llama.geometry.num_layers
    for chunk in memory.meta.chunks:
        answers = 2 * 3
        assert int(0.02 * chunk.tokens) <= answers, "test precondition: both ratios give the answer count"
    assert stats.requested == 2 * layers * 2  # chunks × layers × ratios
    assert stats.run == 2 * (layers + 1)  # one per layer, and the final state once per chunk


def _naive_greedy(search: ChunkSearch, delta: float, ratios) -> list[int]:
    """The paper's search with nothing shared between trials: every candidate run, JS on the whole head."""
    counts = []
    for layer in reversed(range(search.num_layers)):
        chosen = search.tokens
        for ratio in ratios:
            n = search.keep_count(ratio)
            memory = list(search.working)
            memory[layer] = search._choose(layer, n).stored
            out = search.decoder.forward(search.layer_inputs[layer], search.calib_positions,
                                         search.calib.attention_mask, memory, start_layer=layer)
            logits = search.decoder.logits(out.hidden[search.calib.answer_mask])
            if js_divergence(logits, search.head.log_q) <= delta:
                chosen = n
                break
        search.settle(layer, chosen, 1.0, None)
        counts.append(chosen)
    return counts[::-1]


@dataclass
class _Judged(CompileOptions):
    """A policy with some judging settings changed (calibration rows, forced tokens, ...)."""

    judging: dict = field(default_factory=dict)

    def make_policy(self):
        policy = super().make_policy()
        for name, value in self.judging.items():
            setattr(policy, name, value)
        return policy


@pytest.mark.parametrize("delta", [0.0005, 0.005, 0.05])
def test_search_reaches_the_naive_searchs_decisions(llama, tmp_path, delta):
    """emloc-paper (candidates deduplicated) keeps what a naive search keeps; so does the first chunk of
    emloc, which learns its profile there with headroom (at delta·search_margin)."""
    demos = make_demos("llama", 6, tmp_path, long=True)
    compressor = Compressor(llama, CompileOptions(chunk_size=3, precision="fp32"))
    ratios = (0.1, 0.2, 0.5)
    offset = 0
    paper, _ = _compile(llama, demos, delta=delta, chunk_size=3, precision="fp32", policy="emloc-paper")
    ours, _ = _compile(llama, demos, delta=delta, chunk_size=3, precision="fp32", policy="emloc")
    emloc = CompileOptions(policy="emloc").make_policy()
    headroom = _Judged(delta=delta * emloc.search_margin, chunk_size=3, precision="fp32", policy="emloc-paper",
                       judging={"calibration": emloc.calibration, "forces": emloc.forces,
                                "scores_from": emloc.scores_from})
    headroom = Compressor(llama, headroom).compile(demos)
    # naive search on chunk 0 from the empty memory, and on chunk 1 from the paper's own chunk-0 memory
    kv = memory_kv(paper)
    start = [0] * llama.geometry.num_layers
    for k, record in enumerate(paper.meta.chunks):
        rendered = compressor._render_chunk(demos[k * 3 : (k + 1) * 3], with_system=k == 0)
        seq, calib_seqs = rendered.sequence, rendered.calibration
        prefix = [LayerKV(m.key[:, :s], m.value[:, :s]) for m, s in zip(kv, start)]
        with torch.no_grad():
            search = ChunkSearch(compressor.decoder, prefix, llama.embed([seq]), llama.embed(calib_seqs), offset, "fp32")
            assert _naive_greedy(search, delta, ratios) == record.kept_per_layer, (k, delta)
        offset += search.span
        start = [s + n for s, n in zip(start, record.kept_per_layer)]
    assert ours.meta.chunks[0].kept_per_layer == headroom.meta.chunks[0].kept_per_layer


def test_profile_policy_verifies_later_chunks_in_one_trial(llama, tmp_path):
    """delta = inf: chunk 0 is searched (every layer's first ratio passes), every later chunk is one trial."""
    demos = make_demos("llama", 9, tmp_path, long=True)
    memory, stats = _compile(llama, demos, delta=math.inf, chunk_size=3, precision="fp32", policy="emloc")
    layers = llama.geometry.num_layers
    assert stats.requested == layers + 2  # chunk 0: one per layer; chunks 1, 2: one profile trial each
    assert all(c.ratio_per_layer == [0.1] * layers for c in memory.meta.chunks)


def test_profile_window_searches_the_first_chunks_then_verifies(llama, tmp_path):
    """profile_window 2, delta = inf: chunks 0 and 1 are searched (one trial a layer), chunks 2, 3 verified."""
    demos = make_demos("llama", 12, tmp_path, long=True)
    compressor = Compressor(llama, _Judged(delta=math.inf, chunk_size=3, precision="fp32", policy="emloc",
                                           judging={"profile_window": 2}))
    memory = compressor.compile(demos)
    layers = llama.geometry.num_layers
    assert compressor.stats.requested == 2 * layers + 2
    assert all(c.ratio_per_layer == [0.1] * layers for c in memory.meta.chunks)


def test_profile_is_the_per_layer_median_of_the_last_searches():
    policy = ProfileVerified(profile_window=3)
    policy.searched = [[0.1, 1.0, 0.5], [0.5, 0.2, 0.5]]
    assert policy.profile is None  # fewer searches than the window: every chunk is searched
    policy.searched.append([0.2, 0.1, 1.0])
    assert policy.profile == [0.2, 0.2, 0.5]
    policy.resume([[0.1, 0.1, 0.1]] * 2 + [[0.5, 0.5, 0.5]] * 2)  # appending: the last `window` chunks
    assert policy.searched == [[0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    assert ProfileVerified(profile_window=2, searched=[[0.1], [0.5]]).profile == [0.5]  # even: the larger


def test_profile_policy_chunks_stay_within_delta(llama, tmp_path):
    demos = make_demos("llama", 9, tmp_path, long=True)
    memory, _ = _compile(llama, demos, delta=0.005, chunk_size=3, precision="fp32", policy="emloc")
    assert all(c.final_js <= 0.005 for c in memory.meta.chunks)


@pytest.mark.parametrize("policy", ["emloc", "uniform"])
def test_fp32_decisions_stored_int8(llama, tmp_path, policy):
    """emloc decides as computed: an int8 compile keeps exactly the fp32 compile's tokens, and its file
    is that fp32 memory stored int8."""
    demos = make_demos("llama", 8, tmp_path, long=True)
    fp32, _ = _compile(llama, demos, delta=0.005, chunk_size=2, precision="fp32", policy=policy)
    int8, _ = _compile(llama, demos, delta=0.005, chunk_size=2, precision="int8", policy=policy)
    stored = with_precision(fp32, "int8")
    for a, b in zip(int8.layers, stored.layers):
        assert np.array_equal(a.token_index, b.token_index)
        assert np.array_equal(a.key_t, b.key_t) and np.array_equal(a.value, b.value)
    assert [c.kept_per_layer for c in int8.meta.chunks] == [c.kept_per_layer for c in fp32.meta.chunks]


def _head_case(seed: int, vocab: int = 3000, dim: int = 24, n: int = 6, sharp: float = 6.0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g) / math.sqrt(dim)
    x_t = torch.randn(n, dim, generator=g) * sharp  # a peaked teacher, as at answer positions
    return weight, x_t, g


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [0.01, 0.1, 0.5])
def test_restricted_bracket_holds_against_the_full_vocabulary(seed, scale):
    weight, x_t, g = _head_case(seed)
    head = RestrictedHead(weight, x_t, eps=1e-3, per_position=64, max_share=1.0)
    assert 0 < len(head.vocab) < weight.shape[0]
    x_s = x_t + scale * torch.randn(x_t.shape, generator=g) * x_t.norm(dim=-1, keepdim=True) / math.sqrt(x_t.shape[1])
    exact = float(full_js(x_s @ weight.T, (x_t @ weight.T).log_softmax(-1)).mean())
    assert head.exact(x_s) == pytest.approx(exact, rel=1e-5)
    b = head.bracket(x_s)
    assert b.lo <= exact + 1e-7 and exact <= b.hi + 1e-7, (b, exact)
    est = head.estimate(x_s)
    assert est <= exact * 1.02 + 1e-7  # below the full JS up to the tangent tail estimate's error
    if scale <= 0.1:
        assert est >= 0.8 * exact, (est, exact)


def test_restricted_head_at_the_teacher_is_zero():
    weight, x_t, _ = _head_case(0)
    head = RestrictedHead(weight, x_t, eps=1e-3, per_position=64, max_share=1.0)
    assert head.estimate(x_t) == pytest.approx(0.0, abs=1e-6)
    assert head.bracket(x_t).lo == pytest.approx(0.0, abs=1e-6)


def test_device_cpu_equals_auto_on_this_machine(llama, tmp_path):
    demos = make_demos("llama", 4, tmp_path, long=True)
    auto = compile_memory(demos, llama, chunk_size=2, device="auto")
    cpu = compile_memory(demos, llama, chunk_size=2, device="cpu")
    for a, b in zip(auto.layers, cpu.layers):
        assert np.array_equal(a.token_index, b.token_index) and np.array_equal(a.key_t, b.key_t)
    with pytest.raises(BadInputError, match="device"):
        compile_memory(demos, llama, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="cuda"):
            compile_memory(demos, llama, device="cuda")


def test_greedy_top_down_returns_what_it_settled():
    class Fake:
        num_layers = 3

        def __init__(self):
            self.settled = {}

        def keep_count(self, r):
            return int(r * 100)

        def try_keep(self, layer, count, delta=None):
            return 0.0 if (layer, count) in {(2, 10), (0, 50)} else 1.0

        def settle(self, layer, count, ratio, js):
            self.settled[layer] = count

    fake = Fake()
    assert greedy_top_down(fake, 0.005, (0.1, 0.2, 0.5)) == [0.5, 1.0, 0.1]
    assert fake.settled == {2: 10, 1: 100, 0: 50}


@pytest.mark.parametrize("forces", ["content", "answer+end"])
def test_partial_forcing_keeps_exactly_the_forced_tokens(llama, tmp_path, forces):
    """forces = "content" / "answer+end" (judging settings policies may take; compile_benchmark's
    "+content", "+end"), at delta = inf: every layer at its floor, which is the forced tokens (the
    turn's opening newline, and for "content" its end-of-turn, are scored, not forced), and every layer
    keeps all of them in every head."""
    from emloc_edge.compile.scoring import FORCED_TOKENS

    demos = make_demos("llama", 4, tmp_path)  # short questions: the floor is above 0.1 of the chunk
    compressor = Compressor(llama, _Judged(delta=math.inf, chunk_size=4, precision="fp32", policy="emloc",
                                           judging={"forces": forces}))
    memory = compressor.compile(demos)
    seq = compressor._render_chunk(demos, with_system=True).sequence
    answer = torch.tensor(seq.answer_mask)
    content = FORCED_TOKENS[forces](answer)
    spans = int((answer & ~torch.cat([answer.new_zeros(1), answer[:-1]])).sum())  # answer spans = demos
    dropped = {"content": 2, "answer+end": 1}[forces]  # structure tokens dropped per span
    assert int(content.sum()) == int(answer.sum()) - dropped * spans and spans == len(demos)
    floor = max(int(0.1 * len(seq.input_ids)), int(content.sum()))
    assert memory.meta.chunks[0].kept_per_layer == [floor] * llama.geometry.num_layers
    must_keep = set(torch.nonzero(content).flatten().tolist())
    for layer in memory.layers:
        for head in layer.token_index:
            assert must_keep <= set(head.tolist())


def test_scores_from_every_calibration_token(llama, tmp_path):
    """scores_from = "all" (compile_benchmark's "+all"): every calibration token's attention scores the
    chunk, not only the answers'. The kept tokens change, and the answer tokens stay forced."""
    demos = make_demos("llama", 4, tmp_path, long=True)
    options = dict(delta=math.inf, chunk_size=4, precision="fp32", policy="uniform", ratios=(0.3,))
    by_answers = Compressor(llama, _Judged(**options)).compile(demos)
    by_all = Compressor(llama, _Judged(**options, judging={"scores_from": "all"})).compile(demos)
    assert by_all.meta.kept_tokens_per_layer == by_answers.meta.kept_tokens_per_layer
    differ = [not np.array_equal(a.token_index, b.token_index) for a, b in zip(by_all.layers, by_answers.layers)]
    assert any(differ), "the answers' attention and every token's rank the chunk's tokens differently"
    seq = Compressor(llama)._render_chunk(demos, with_system=True).sequence
    answers = set(np.flatnonzero(seq.answer_mask).tolist())
    for layer in by_all.layers:
        for head in layer.token_index:
            assert answers <= set(head.tolist())


def test_value_norm_weights_each_tokens_attention_before_smoothing(llama, tmp_path, monkeypatch):
    """score_weight = "value-norm" (compile_benchmark's "+vnorm"): a token's attention mass is multiplied
    by its value's norm, per layer and KV head, before the spans are smoothed. Checked with a weight that
    is zero but on one token: only that token's smoothing window scores, and only where it is attended."""
    demos = make_demos("llama", 4, tmp_path, long=True)
    compressor = Compressor(llama, CompileOptions(chunk_size=4, precision="fp32"))
    rendered = compressor._render_chunk(demos, with_system=True)
    chunk, calib = llama.embed([rendered.sequence]), llama.embed(rendered.calibration)
    empty = [LayerKV.empty(llama.geometry.num_kv_heads, llama.geometry.head_dim)] * llama.geometry.num_layers
    forced = torch.zeros(chunk.input_ids.shape[1], dtype=torch.bool)  # nothing forced: every score finite
    one = 7
    monkeypatch.setitem(TOKEN_WEIGHTS, "one-token", lambda value: torch.nn.functional.one_hot(
        torch.full(value.shape[:1], one), value.shape[1]).float())  # [kv, L]: 1 at token `one`
    with torch.no_grad():
        plain = ChunkSearch(compressor.decoder, empty, chunk, calib, 0, "fp32", forced=forced)
        single = ChunkSearch(compressor.decoder, empty, chunk, calib, 0, "fp32", forced=forced, score_weight="one-token")
        by_norm = ChunkSearch(compressor.decoder, empty, chunk, calib, 0, "fp32", forced=forced,
                              score_weight="value-norm")
    width = 5  # smooth_scores' window
    for l, (k, v) in enumerate(plain.chunk_kv):
        outside = torch.ones(k.shape[1], dtype=torch.bool)
        outside[one - width // 2 : one + width // 2 + 1] = False
        assert (single.importance[l][:, outside] == 0).all() and (single.importance[l][:, ~outside] > 0).all()
        assert not torch.equal(by_norm.importance[l], plain.importance[l])
    assert torch.equal(TOKEN_WEIGHTS["value-norm"](plain.chunk_kv[0][1]), plain.chunk_kv[0][1].norm(dim=-1))
    options = dict(delta=math.inf, chunk_size=4, precision="fp32", policy="uniform", ratios=(0.3,))
    weighted = Compressor(llama, _Judged(**options, judging={"score_weight": "value-norm"})).compile(demos)
    answers = set(np.flatnonzero(rendered.sequence.answer_mask).tolist())
    assert all(answers <= set(head.tolist()) for layer in weighted.layers for head in layer.token_index)
