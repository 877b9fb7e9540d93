"""EMLoC compressor behaviour on tiny random models of every family (spec §12 of emloc-algorithm.md)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.demos import Demo
from emloc_edge.compile.divergence import js_divergence
from emloc_edge.compile.query import memory_kv, query_logits
from emloc_edge.models.decoder import LayerKV, RaggedDecoder
from emloc_edge.models.loading import load_model

WORDS = "red green blue small large round square metal wooden plastic heavy light old new".split()


def _images(folder: Path, n: int, seed: int, size: int = 112) -> list[Path]:
    """RGB images large enough to take 16 LLM tokens each, so answer tokens stay under 10% of a chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def make_demos(family: str, n: int, folder: Path, seed: int = 0, long: bool = False) -> list[Demo]:
    """Demos with one-token answers; `long` questions keep answers under 10% of the tokens."""
    rng = np.random.default_rng(seed)
    images = _images(folder, n, seed) if family != "llama" else [None] * n
    demos = []
    for i in range(n):
        words = rng.choice(WORDS, size=24 if long else 4)
        demos.append(Demo(f"which bin for the {' '.join(words)} item?", "ABCD"[int(rng.integers(4))], images[i]))
    return demos


@pytest.fixture(scope="module")
def adapters(all_family_dir):
    return all_family_dir.family, load_model(all_family_dir.path)


def _compile(adapter, demos, **options) -> "TaskMemory":  # noqa: F821
    return Compressor(adapter, CompileOptions(**options)).compile(demos)


def _hf_inputs(adapter, messages, images: list[Path], generation_prompt: bool) -> dict:
    """Plain-transformers inputs for a conversation (the recipe in tiny_models.py)."""
    from tiny_models import build_hf_inputs, load_image_processor

    processor = load_image_processor(adapter.source) if adapter.has_vision else None
    pil = [Image.open(p).convert("RGB") for p in images]
    return build_hf_inputs(adapter.tokenizer, processor, messages, pil, add_generation_prompt=generation_prompt)


def _hf_reference(adapter, demos: list[Demo], question: str, image: Path | None):
    """Next-token logits and next position of plain transformers on the whole conversation."""
    messages = adapter.chat.messages(demos) + [
        {"role": "user", "content": adapter.user_content(question, image is not None)}
    ]
    images = [d.image for d in demos if d.image is not None] + ([image] if image is not None else [])
    inputs = _hf_inputs(adapter, messages, images, generation_prompt=True)
    with torch.no_grad():
        out = adapter.model(**inputs)
    return out.logits[0, -1]


def test_no_pruning_equals_transformers_on_the_whole_conversation(adapters, tmp_path):
    """delta < 0 keeps everything; chunked prefill + query equals one HF forward (fp32, 1e-4)."""
    family, adapter = adapters
    demos = make_demos(family, 7, tmp_path)  # chunks of 3, 3, 1: a one-demo chunk too
    memory = _compile(adapter, demos, delta=-1.0, chunk_size=3, precision="fp32")
    assert all(r == 1.0 for c in memory.meta.chunks for r in c.ratio_per_layer)
    assert memory.meta.kept_tokens_per_layer == [memory.meta.context_tokens] * adapter.geometry.num_layers

    query_image = _images(tmp_path / "q", 1, seed=99)[0] if adapter.has_vision else None
    ours = query_logits(adapter, memory_kv(memory), memory.meta.position_offset, "which bin for this?", query_image)
    reference = _hf_reference(adapter, demos, "which bin for this?", query_image)
    assert torch.allclose(ours, reference, atol=1e-4), float((ours - reference).abs().max())


def test_position_offset_is_the_conversations_next_position(adapters, tmp_path):
    family, adapter = adapters
    demos = make_demos(family, 5, tmp_path)
    memory = _compile(adapter, demos, delta=math.inf, chunk_size=2, precision="fp32")
    text = adapter.chat.render(adapter.chat.messages(demos))
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    images = [d.image for d in demos if d.image is not None]
    from emloc_edge.models.base import Sequence

    expanded, _ = adapter.expand_images(ids, [False] * len(ids), images)
    assert memory.meta.context_tokens == len(expanded)
    expected = adapter.position_span(Sequence(expanded, [False] * len(expanded), images))
    assert memory.meta.position_offset == expected
    if adapter.has_vision:  # M-RoPE: images advance positions by max(h, w), not h·w
        assert memory.meta.position_offset < memory.meta.context_tokens


def test_infinite_delta_keeps_a_tenth_of_every_chunk(adapters, tmp_path):
    family, adapter = adapters
    demos = make_demos(family, 6, tmp_path, long=True)
    memory = _compile(adapter, demos, delta=math.inf, chunk_size=3, precision="fp32", policy="emloc")  # chunk-wise
    for chunk in memory.meta.chunks:
        answers = 3 * 3  # per demo: last prompt token, one answer token, end-of-turn
        assert int(0.1 * chunk.tokens) >= answers, "test precondition: the answers fit in 10%"
        assert chunk.kept_per_layer == [int(0.1 * chunk.tokens)] * adapter.geometry.num_layers
        assert chunk.ratio_per_layer == [0.1] * adapter.geometry.num_layers


def _answer_token_indices(adapter, demos: list[Demo], chunk_size: int) -> set[int]:
    compressor = Compressor(adapter, CompileOptions(chunk_size=chunk_size))
    found, base = set(), 0
    for k in range(0, len(demos), chunk_size):
        seq = compressor._render_chunk(demos[k : k + chunk_size], with_system=k == 0).sequence
        found |= {base + i for i, a in enumerate(seq.answer_mask) if a}
        base += len(seq.input_ids)
    return found


def test_answer_tokens_survive_in_every_layer_and_head(adapters, tmp_path):
    """emloc-paper forces the whole answer span (the default policy only its content tokens:
    test_compile_search.py)."""
    family, adapter = adapters
    demos = make_demos(family, 6, tmp_path, long=True)
    memory = _compile(adapter, demos, delta=math.inf, chunk_size=3, precision="fp32", policy="emloc-paper")
    answers = _answer_token_indices(adapter, demos, 3)
    assert len(answers) == 6 * 3
    for layer in memory.layers:
        for head in layer.token_index:
            assert answers <= set(head.tolist())


def test_layers_get_different_ratios_and_heads_different_tokens(adapters, tmp_path):
    family, adapter = adapters
    demos = make_demos(family, 6, tmp_path, long=True)
    memory = _compile(adapter, demos, delta=0.005, chunk_size=3, precision="fp32")
    ratios = {r for c in memory.meta.chunks for r in c.ratio_per_layer}
    assert len(ratios) > 1, "adaptive policy should not pick one ratio everywhere"
    assert any(
        not np.array_equal(layer.token_index[0], layer.token_index[1]) for layer in memory.layers
    ), "KV heads choose their tokens independently"


def _stored(layer) -> list[np.ndarray]:
    parts = [layer.key_t, layer.value, layer.token_index]
    return parts + [x for x in (layer.key_scale, layer.value_scale) if x is not None]


@pytest.mark.parametrize("policy,precision", [("emloc-paper", "int8"), ("emloc-paper", "fp32"), ("emloc", "fp32"),
                                              ("emloc", "int8")])
def test_append_keeps_old_memory_and_equals_one_compile(adapters, tmp_path, policy, precision):
    family, adapter = adapters
    demos = make_demos(family, 8, tmp_path)
    opts = dict(delta=0.005, chunk_size=2, precision=precision, policy=policy)
    whole = _compile(adapter, demos, **opts)
    first = _compile(adapter, demos[:4], **opts)
    before = [[x.copy() for x in _stored(layer)] for layer in first.layers]
    grown = Compressor(adapter, CompileOptions(**opts)).compile(demos[4:], existing=first)
    # the existing memory object is untouched, and its bytes open the grown memory
    for layer, old in zip(first.layers, before):
        assert all(np.array_equal(a, b) for a, b in zip(_stored(layer), old))
    for layer, old in zip(grown.layers, first.layers):
        n = old.key_t.shape[-1]
        assert np.array_equal(layer.key_t[..., :n], old.key_t)
        assert np.array_equal(layer.value[:, :n], old.value)
        assert np.array_equal(layer.token_index[:, :n], old.token_index)
    made = CompileOptions(**opts).make_policy()
    if made.calibration == "next" or (not made.judges_stored and precision == "int8"):
        # A policy calibrating a chunk on the next chunk's demos saw, compiled alone, no next chunk for
        # A's last one (it took the previous chunk's). One that decides in fp32 conditions later chunks
        # on fp32 K/V, which an int8 file no longer holds: an append conditions on the dequantized
        # memory. Either way only the old chunks are identical.
        return
    # compile(A + B) == compile(A) then append(B) with the same chunking
    for a, b in zip(whole.layers, grown.layers):
        assert all(np.array_equal(x, y) for x, y in zip(_stored(a), _stored(b)))
    assert whole.meta.position_offset == grown.meta.position_offset
    assert whole.meta.context_tokens == grown.meta.context_tokens


def test_js_recomputed_after_each_chunk_is_within_delta(adapters, tmp_path):
    """Rebuild each chunk's teacher (previous memory + unpruned chunk) from scratch and re-measure, on
    the calibration rows the chunk-wise policy asks for (its own demos re-read)."""
    from emloc_edge.compile.compressor import _calibration

    family, adapter = adapters
    delta, size = 0.005, 3
    demos = make_demos(family, 6, tmp_path, long=True)
    memory = _compile(adapter, demos, delta=delta, chunk_size=size, precision="fp32", policy="emloc")
    compressor = Compressor(adapter, CompileOptions(chunk_size=size, policy="emloc"))
    policy = CompileOptions(policy="emloc").make_policy()
    rendered = [compressor._render_chunk(demos[k : k + size], with_system=k == 0) for k in range(0, len(demos), size)]
    decoder = RaggedDecoder(adapter)
    kv = memory_kv(memory)
    offset, start = 0, [0] * adapter.geometry.num_layers
    for k, record in enumerate(memory.meta.chunks):
        seq = rendered[k].sequence
        rows, _ = _calibration(rendered, k, policy.calibration, policy.calibration_rows)
        chunk, calib = adapter.embed([seq]), adapter.embed(rows)
        end = [s + n for s, n in zip(start, record.kept_per_layer)]
        old = [LayerKV(m.key[:, :s], m.value[:, :s]) for m, s in zip(kv, start)]
        pruned = [LayerKV(m.key[:, :e], m.value[:, :e]) for m, e in zip(kv, end)]
        out = decoder.forward(chunk.inputs_embeds, chunk.position_ids + offset, chunk.attention_mask, old, keep_kv=True)
        full = [m.extend(kk[0], vv[0]) for m, (kk, vv) in zip(old, out.new_kv)]
        offset += int(chunk.next_position[0])
        pos = calib.position_ids + offset
        teacher = decoder.forward(calib.inputs_embeds, pos, calib.attention_mask, full)
        student = decoder.forward(calib.inputs_embeds, pos, calib.attention_mask, pruned)
        mask = calib.answer_mask
        t = decoder.logits(teacher.hidden[mask]).float().log_softmax(-1)
        js = js_divergence(decoder.logits(student.hidden[mask]), t)
        assert js <= delta, (k, js)
        assert js == pytest.approx(record.final_js, abs=1e-6)
        start = end


def test_scores_exclude_older_memory_from_the_softmax():
    """With skip = n the scores come from a softmax over the new tokens only: they sum to the query weight."""
    from emloc_edge.models.decoder import attend

    torch.manual_seed(0)
    B, H, kv, T, hd, n = 2, 4, 2, 5, 8, 7
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, kv, T, hd), torch.randn(B, kv, T, hd)
    memory = LayerKV(torch.randn(kv, n, hd), torch.randn(kv, n, hd))
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
    weights = torch.zeros(B, T)
    weights[:, -1] = 1.0
    _, scores = attend(q, k, v, memory, visible, 0.3, (weights, 3))  # softmax over memory[3:] + new
    assert scores.shape == (kv, n - 3)
    # by hand for KV head 0: its G=2 query heads, last query, keys memory[3:] + new tokens
    total = torch.zeros(n - 3)
    for b in range(B):
        for h in range(2):
            logits = torch.cat([q[b, h, -1] @ memory.key[0, 3:].T, q[b, h, -1] @ k[b, 0].T]) * 0.3
            total += logits.softmax(-1)[: n - 3]
    assert torch.allclose(scores[0], total, atol=1e-6)


def test_decoder_matches_transformers_layer_by_layer(adapters, tmp_path):
    """No memory, one sequence: the explicit decoder's logits equal the HF model's at every position."""
    family, adapter = adapters
    demos = make_demos(family, 2, tmp_path)
    seq = Compressor(adapter)._render_chunk(demos, with_system=True).sequence
    batch = adapter.embed([seq])
    g = adapter.geometry
    empty = [LayerKV.empty(g.num_kv_heads, g.head_dim) for _ in range(g.num_layers)]
    out = RaggedDecoder(adapter).forward(batch.inputs_embeds, batch.position_ids, batch.attention_mask, empty)
    ours = RaggedDecoder(adapter).logits(out.hidden[0])
    images = [d.image for d in demos if d.image is not None]
    inputs = _hf_inputs(adapter, adapter.chat.messages(demos), images, generation_prompt=False)
    with torch.no_grad():
        reference = adapter.model(**inputs).logits[0]
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-4)
