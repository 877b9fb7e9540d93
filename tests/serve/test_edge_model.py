"""EdgeModel: one opened model, many bound memories sharing its graphs; the byte-bounded LRU of memories."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from emloc_edge.errors import BadInputError, ModelMismatchError
from emloc_edge.memory import TaskMemory
from emloc_edge.runtime.memory_inputs import memory_feeds
from emloc_edge.runtime.model import EdgeModel
from emloc_edge.runtime.session import EdgeSession

MAX = 6


def _copies(task, tmp_path, n: int) -> list:
    """n memories with the same tensors and distinct checksums (created_by differs)."""
    paths = []
    for i in range(n):
        memory = TaskMemory.load(task.memories / "full.emloc")
        memory.meta.created_by = f"copy {i}"
        memory.save(tmp_path / f"copy{i}.emloc")
        paths.append(tmp_path / f"copy{i}.emloc")
    return paths


def test_bound_sessions_share_graphs_and_answer_like_edge_session(text_task):
    model = EdgeModel.open(text_task.model, provider="cpu", max_new_tokens=MAX)
    sessions = {name: model.bind(text_task.memories / f"{name}.emloc") for name in text_task.names}
    assert sessions["int8one"].decoder is sessions["int8chunks"].decoder  # both int8: one q8 graph
    assert sessions["int8one"].decoder is not sessions["full"].decoder  # the q8 graph, opened on demand
    assert sessions["full"].tokenizer is sessions["int8one"].tokenizer is model.tokenizer
    for name, _, question in text_task.queries:
        want = EdgeSession(text_task.model, text_task.memories / f"{name}.emloc", provider="cpu", max_new_tokens=MAX)
        assert sessions[name].answer(None, question).token_ids == want.answer(None, question).token_ids


def test_graphs_open_lazily_per_variant(text_task):
    model = EdgeModel.open(text_task.model, provider="cpu")
    assert model._decoders == {}
    model.bind(text_task.memories / "full.emloc")
    assert set(model._decoders) == {"decoder_step"}
    model.bind(text_task.memories / "int8one.emloc")
    assert set(model._decoders) == {"decoder_step", "decoder_step_q8"}


def test_cache_is_keyed_by_checksum_and_counts_the_bound_bytes(text_task, tmp_path):
    model = EdgeModel.open(text_task.model, provider="cpu")
    path = text_task.memories / "full.emloc"
    first = model.bind(path).memory
    shutil.copy(path, tmp_path / "renamed.emloc")
    assert model.bind(tmp_path / "renamed.emloc").memory is first  # same bytes, other name: a hit
    loaded = TaskMemory.load(path)
    assert model.bind(loaded).memory is first  # a loaded TaskMemory has the same checksum
    feeds = memory_feeds(loaded, first.variant)
    assert first.nbytes == sum(v.nbytes for v in feeds.values()) > 0
    assert model.cache.nbytes == first.nbytes and len(model.cache) == 1
    # the other variant of the same file is its own entry
    assert model.bind(path, memory_inputs="float").memory is first
    with pytest.raises(BadInputError, match="int8"):
        model.bind(path, memory_inputs="int8")


def test_lru_holds_what_fits_in_bytes(text_task, tmp_path):
    paths = _copies(text_task, tmp_path, 4)
    one = EdgeModel.open(text_task.model, provider="cpu").bind(paths[0]).memory.nbytes
    model = EdgeModel.open(text_task.model, provider="cpu", cache_bytes=2 * one)
    kept = [model.bind(p).memory for p in paths[:2]]
    model.bind(paths[0])  # touch: copy1 is now the least recently used
    model.bind(paths[2])
    assert len(model.cache) == 2 and model.cache.nbytes <= 2 * one
    assert model.bind(paths[0]).memory is kept[0]  # still cached
    assert model.bind(paths[1]).memory is not kept[1]  # was evicted, bound again
    assert kept[1].values, "an evicted memory stays usable by the session that holds it"
    unbounded = EdgeModel.open(text_task.model, provider="cpu", cache_bytes=0)
    unbounded.bind(paths[3])
    assert len(unbounded.cache) == 0


def test_memory_of_another_model_is_refused(text_task, foreign_memory):
    model = EdgeModel.open(text_task.model, provider="cpu")
    with pytest.raises(ModelMismatchError, match="foreign.emloc"):
        model.bind(foreign_memory)
    assert len(model.cache) == 0


def test_concurrent_sessions_on_one_model_agree(text_task):
    from concurrent.futures import ThreadPoolExecutor

    model = EdgeModel.open(text_task.model, provider="cpu", max_new_tokens=MAX)
    jobs = text_task.queries * 3

    def run(q):
        name, _, question = q
        return model.bind(text_task.memories / f"{name}.emloc").answer(None, question).token_ids

    sequential = [run(q) for q in jobs]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, jobs)) == sequential
    assert np.sum([len(s) for s in sequential]) > 0
