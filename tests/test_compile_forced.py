"""Which answer-span tokens every layer keeps (`forced`): the option, what it keeps, and how a memory
records it (README "Which answer-span tokens must be kept")."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from emloc_edge.compile.api import compile_memory
from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.policy import FORCES, POLICIES
from emloc_edge.compile.scoring import FORCED_TOKENS
from emloc_edge.errors import BadInputError
from emloc_edge.memory import TaskMemory
from emloc_edge.models.loading import load_model
from test_compile import make_demos


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(llama_dir)


@pytest.fixture(scope="module")
def floors(llama, tmp_path_factory) -> dict[str | None, TaskMemory]:
    """The same demos compiled at delta inf (every layer at its floor) with each forced set."""
    demos = make_demos("llama", 6, tmp_path_factory.mktemp("demos"))
    return {f: Compressor(llama, CompileOptions(delta=float("inf"), ratios=(0.01,), precision="fp32", forced=f)).compile(demos)
            for f in (None, *FORCES)}


def test_the_names_are_the_implemented_sets():
    assert set(FORCES) == set(FORCED_TOKENS)
    assert CompileOptions().make_policy().forces == "answer"
    assert CompileOptions(forced="content").make_policy().forces == "content"


def test_fewer_forced_tokens_lower_the_floor(floors):
    # At delta inf every layer takes its smallest count, max(0.01·L, forced): the forced set sets it.
    kept = {f: sum(m.meta.kept_tokens_per_layer) for f, m in floors.items()}
    assert kept[None] == kept["answer"]
    assert kept["content"] < kept["answer+end"] < kept["answer"]


def test_the_memory_records_a_given_forced_set_only(floors):
    assert "forced" not in floors[None].meta.hyperparameters  # files as before: the policy's own
    assert floors["content"].meta.hyperparameters["forced"] == "content"
    assert floors["content"].summary()["forced"] == "content" and floors[None].summary()["forced"] is None


@settings(max_examples=25, deadline=None)
@given(name=st.text(max_size=12).filter(lambda s: s not in FORCES))
def test_an_unknown_forced_set_is_refused_by_name(name):
    with pytest.raises(BadInputError, match="forced must be one of") as e:
        CompileOptions(forced=name)
    assert e.value.parameters == ("forced",)


@settings(max_examples=20, deadline=None)
@given(key=st.sampled_from(["policy", "forced"]), value=st.text(max_size=12))
def test_appending_to_a_memory_with_settings_no_compile_accepts_names_the_file(floors, llama, tmp_path_factory, key,
                                                                            value):
    if value in (FORCES if key == "forced" else POLICIES):
        return  # a valid name: nothing to refuse
    folder = tmp_path_factory.mktemp("odd")
    memory = floors[None]
    odd = TaskMemory(dataclasses.replace(memory.meta, hyperparameters={**memory.meta.hyperparameters, key: value}),
                     memory.layers)
    path = folder / "odd.emloc"
    odd.save(path)
    before = path.read_bytes()
    demos = make_demos("llama", 2, folder)
    with pytest.raises(BadInputError) as e:
        compile_memory(demos, llama, append=path)
    assert str(e.value).startswith(f"{path}: its settings: {key} must be one of")
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before  # nothing lost
