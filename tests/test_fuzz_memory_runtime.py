"""Fuzz: memories the loader accepts but the model folder cannot run (geometry, positions, template),
checked against the manifest at load. Shared strategies and helpers are in test_fuzz_memory.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from emloc_edge.errors import EmlocError, ModelMismatchError
from emloc_edge.memory import TaskMemory
from emloc_edge.runtime.model_folder import ModelFolder
from emloc_edge.runtime.positions import mrope_positions, text_positions
from test_fuzz_memory import FUZZ, RUNTIME_EXAMPLES, _tmp, assert_loads_or_one_line, json_values, write_raw
from test_memory import FINGERPRINT, make_meta

# ---- memories the runtime cannot use: checked against the model folder's manifest at load ----

def _manifest(meta) -> dict:
    return {"model_fingerprint": FINGERPRINT, "model_name": meta.model_name, "model_family": meta.model_family,
            "geometry": {"num_layers": 3, "num_kv_heads": 2, "head_dim": 8, "position_dims": 3,
                         "max_positions": 4096, "vocab_size": 151646},
            "template": {k: v for k, v in meta.template.items() if k != "default_question"},
            "image_preprocessing": meta.image_preprocessing}


RUNTIME_META = make_meta("int8", num_layers=3)
RUNTIME_META.template = {"query_text": ["<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"],
                         "query_image": ["<|im_start|>user\n<|image_pad|>", "<|im_end|>\n<|im_start|>assistant\n"],
                         "end_of_turn": "<|im_end|>", "stop_token_ids": [151643, 151645]}
RUNTIME_META.image_preprocessing = {"image_token": "<|image_pad|>", "merge_size": 2, "patch_size": 14}
MANIFEST = _manifest(RUNTIME_META)


@st.composite
def runtime_meta(draw) -> str:
    meta = json.loads(RUNTIME_META.to_json())
    field = draw(st.sampled_from(["position_offset", "position_dims", "num_layers", "num_kv_heads", "head_dim",
                                  "model_family", "template", "template.key", "image_preprocessing"]))
    if field == "position_offset":
        meta[field] = draw(st.sampled_from([2**63, 2**64, 2**31 - 1, 4095, 4096, 0, 10]) | st.integers(0, 2**80))
    elif field == "template":
        meta[field] = draw(st.dictionaries(st.sampled_from(list(meta["template"]) + ["default_question"]),
                                           json_values, max_size=5))
    elif field == "template.key":
        key = draw(st.sampled_from(list(meta["template"]) + ["default_question"]))
        if draw(st.booleans()):
            meta["template"].pop(key, None)
        else:
            meta["template"][key] = draw(json_values | st.just(None))
    elif field == "image_preprocessing":
        meta[field] = draw(st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=3))
    elif field == "model_family":
        meta[field] = draw(st.sampled_from(["llama", "qwen2_5_vl", "qwen2_vl"]))
    else:
        meta[field] = draw(st.integers(1, 4))
    return json.dumps(meta)


@settings(max_examples=RUNTIME_EXAMPLES, **FUZZ)
@given(meta_text=runtime_meta())
def test_memory_the_model_folder_accepts_is_usable(meta_text):
    """check_memory passes only memories whose positions, template and geometry the runtime can run."""
    meta = json.loads(meta_text)
    n = meta["num_layers"] if isinstance(meta["num_layers"], int) and 0 < meta["num_layers"] < 6 else 3
    memory = TaskMemory.empty(make_meta("int8", num_layers=n))
    tensors = {name: t for name, t in memory.tensors().items()}
    with _tmp() as d:
        path = Path(d) / "m.emloc"
        write_raw(path, tensors, meta_text)
        loaded = assert_loads_or_one_line(path)
        if loaded is None:
            return
        folder = ModelFolder(Path(d), MANIFEST)
        try:
            folder.check_memory(loaded, path)
        except ModelMismatchError as e:
            assert str(e).startswith(f"{path}: ") and len(str(e).splitlines()) == 1
            return
    m = loaded.meta  # accepted: everything render_query and the decode loop read works
    prefix, suffix = m.template["query_text"]
    assert isinstance(prefix + "q" + suffix, str)
    assert set(m.template["stop_token_ids"]) and all(isinstance(i, int) for i in m.template["stop_token_ids"])
    ids = np.arange(5)
    positions = text_positions(5, m.position_offset) if m.position_dims == 1 else mrope_positions(ids, -1, [], 1, m.position_offset)
    assert positions.max() < MANIFEST["geometry"]["max_positions"] + 5
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.position_dims) == (3, 2, 8, 3)
    assert m.image_preprocessing == MANIFEST["image_preprocessing"]


def test_runtime_refuses_what_the_loader_accepts_but_the_model_cannot_run(tmp_path):
    """The listed instances: position_offset >= 2**63 (as int, refused at load), a template without
    stop_token_ids, query_text null or of the wrong arity, position_dims that disagree with the model."""
    folder = ModelFolder(tmp_path, MANIFEST)
    cases = [("template", {**RUNTIME_META.template, "stop_token_ids": None}, "stop_token_ids"),
             ("template", {k: v for k, v in RUNTIME_META.template.items() if k != "stop_token_ids"}, "stop_token_ids"),
             ("template", {**RUNTIME_META.template, "query_text": None}, "query_text"),
             ("template", {**RUNTIME_META.template, "query_text": ["a", "b", "c"]}, "query_text"),
             ("position_dims", 1, "position_dims"), ("position_offset", 5000, "position_offset")]
    for field, value, named in cases:
        meta = json.loads(RUNTIME_META.to_json())
        meta[field] = value
        write_raw(tmp_path / "m.emloc", TaskMemory.empty(RUNTIME_META).tensors(), json.dumps(meta))
        memory = TaskMemory.load(tmp_path / "m.emloc")
        with pytest.raises(ModelMismatchError, match=named):
            folder.check_memory(memory, tmp_path / "m.emloc")
    assert issubclass(ModelMismatchError, EmlocError)
