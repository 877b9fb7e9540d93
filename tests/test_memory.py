"""Task-memory file: quantization bounds, append-only segments, atomic save, and load-time validation."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from emloc_edge.errors import MemoryFileError, ModelMismatchError
from emloc_edge.memory import (FORMAT_NAME, PRECISIONS, ChunkRecord, MemoryMeta, TaskMemory, payload_sha256, roundtrip)
from emloc_edge.memory import format as fmt

KV, HD = 2, 8
FINGERPRINT = "ab" * 32
SUMMARY_KEYS = {
    "format_version", "model", "model_family", "model_fingerprint", "num_layers", "num_kv_heads", "head_dim",
    "context_tokens", "kept_tokens_per_layer", "compression", "position_offset", "position_dims", "precision",
    "delta", "ratios", "chunk_size", "policy", "forced", "chunks", "chunk_details", "demos", "file_bytes",
}


def make_meta(precision: str = "int8", num_layers: int = 3, delta: float = 0.005) -> MemoryMeta:
    return MemoryMeta(
        model_name="tiny-qwen2-vl", model_family="qwen2_vl", model_fingerprint=FINGERPRINT,
        num_layers=num_layers, num_kv_heads=KV, head_dim=HD, precision=precision,
        position_offset=0, position_dims=3, context_tokens=0,
        hyperparameters={"delta": delta, "ratios": [0.1, 0.2, 0.5], "chunk_size": 4},
        template={"query_prefix": "<|im_start|>user\n", "stop_ids": [151645]},
        image_preprocessing={"min_pixels": 3136, "max_pixels": 50176},
        chunks=[], created_by="emloc-edge test",
    )


def make_chunk(rng: np.random.Generator, kept: list[int], tokens: int, start: int = 0):
    """Random keys/values/token indices for one chunk, plus its ChunkRecord."""
    keys = [rng.normal(size=(KV, n, HD)).astype(np.float32) for n in kept]
    values = [rng.normal(size=(KV, n, HD)).astype(np.float32) for n in kept]
    index = [np.stack([np.sort(rng.choice(tokens, n, replace=False)) + start for _ in range(KV)]) for n in kept]
    ratios = [1.0 if n == tokens else n / tokens for n in kept]
    record = ChunkRecord(demos=4, tokens=tokens, kept_per_layer=list(kept), ratio_per_layer=ratios,
                         js_per_layer=[None if r == 1.0 else 0.001 for r in ratios], final_js=0.004)
    return keys, values, index, record


def build(precision: str, chunk_kept: list[list[int]], tokens: int = 10, seed: int = 0) -> TaskMemory:
    rng = np.random.default_rng(seed)
    mem = TaskMemory.empty(make_meta(precision, num_layers=len(chunk_kept[0])))
    for k, kept in enumerate(chunk_kept):
        mem.add_chunk(*make_chunk(rng, kept, tokens, start=k * tokens))
        mem.meta.context_tokens += tokens
        mem.meta.position_offset += tokens
    return mem


def write_raw(path, tensors: dict, meta: dict | str, **header_overrides) -> None:
    """A file with a *valid* checksum, so that load gets past it to the check under test."""
    meta_json = meta if isinstance(meta, str) else json.dumps(meta)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # save_file garbles strided arrays
    header = {"format": FORMAT_NAME, "format_version": "1", "meta": meta_json,
              "payload_sha256": payload_sha256(meta_json, tensors), **header_overrides}
    save_file(tensors, str(path), metadata=header)


def load_error(path) -> str:
    with pytest.raises(MemoryFileError) as info:
        TaskMemory.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg


@pytest.fixture
def saved(tmp_path):
    """(path, memory, tensors, meta dict) of a valid two-chunk int8 memory on disk."""
    mem = build("int8", [[5, 10, 1], [2, 0, 4]])
    path = tmp_path / "task.emloc"
    mem.save(path)
    return path, mem, mem.tensors(), json.loads(mem.meta.to_json())


# ---- quantize ----

@pytest.mark.parametrize("precision", PRECISIONS)
def test_save_load_roundtrip(tmp_path, precision):
    mem = build(precision, [[5, 10, 1], [2, 3, 4]])
    path = tmp_path / "m.emloc"
    size = mem.save(path)
    assert size == os.path.getsize(path)
    loaded = TaskMemory.load(path)
    assert loaded.meta == mem.meta
    assert loaded.tensors().keys() == mem.tensors().keys()
    for name, t in mem.tensors().items():
        assert loaded.tensors()[name].dtype == t.dtype
        np.testing.assert_array_equal(loaded.tensors()[name], t, err_msg=name)
    for a, b in zip(loaded.layers, mem.layers):
        assert a.segment_lengths == b.segment_lengths
        for x, y in zip(a.dequantized(), b.dequantized()):
            np.testing.assert_array_equal(x, y)
    summary = loaded.summary(file_bytes=size)
    assert set(summary) == SUMMARY_KEYS
    json.dumps(summary, allow_nan=False)
    assert summary["kept_tokens_per_layer"] == [7, 13, 5] and summary["chunks"] == 2 and summary["demos"] == 8
    assert summary["compression"] == pytest.approx(25 / 3 / 20)
    assert summary["chunk_details"][0]["kept_per_layer"] == [5, 10, 1] and summary["file_bytes"] == size


@pytest.mark.parametrize("precision", PRECISIONS)
def test_dequantized_equals_roundtrip_per_segment(precision):
    """The compiler's working memory (roundtrip per chunk) must equal what the runtime reads, bit for bit."""
    rng = np.random.default_rng(4)
    mem = TaskMemory.empty(make_meta(precision, num_layers=1))
    expected_k, expected_v = [], []
    for kept in ([6], [3], [0], [5]):
        keys, values, index, record = make_chunk(rng, kept, tokens=10)
        keys[0][:, :, 2] *= 30.0 * (1 + len(expected_k))  # segments with very different ranges
        mem.add_chunk(keys, values, index, record)
        k, v = roundtrip(keys[0].transpose(0, 2, 1), values[0], precision)
        expected_k.append(k)
        expected_v.append(v)
    key_t, value = mem.layers[0].dequantized()
    assert key_t.shape == (KV, HD, 14) and value.shape == (KV, 14, HD)
    np.testing.assert_array_equal(key_t, np.concatenate(expected_k, axis=2))
    np.testing.assert_array_equal(value, np.concatenate(expected_v, axis=1))


def first_segment(mem: TaskMemory, layer: int, n: int) -> list[bytes]:
    lay = mem.layers[layer]
    parts = [lay.key_t[:, :, :n], lay.value[:, :n], lay.token_index[:, :n]]
    if lay.key_scale is not None:
        parts += [lay.key_scale[:, :, :1], lay.value_scale[:, :n]]
    return [np.ascontiguousarray(p).tobytes() for p in parts]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_add_chunk_keeps_earlier_segments_bit_identical(precision):
    one = build(precision, [[5, 10, 1]])
    two = build(precision, [[5, 10, 1], [2, 0, 4]])  # same seed: same first chunk
    for layer, n in enumerate([5, 10, 1]):
        assert first_segment(two, layer, n) == first_segment(one, layer, n)
    assert two.layers[1].key_t.shape[2] == 10 and two.layers[2].key_t.shape[2] == 5
    if precision == "int8":
        assert two.layers[0].key_scale.shape == (KV, HD, 2)


def test_append_to_saved_file_keeps_old_bytes(tmp_path):
    path = tmp_path / "m.emloc"
    build("int8", [[5, 10, 1]]).save(path)
    before = TaskMemory.load(path)
    grown = TaskMemory.load(path)
    grown.add_chunk(*make_chunk(np.random.default_rng(9), [3, 1, 2], tokens=10, start=10))
    grown.save(path)  # over the file it was loaded from
    after = TaskMemory.load(path)
    assert len(after.meta.chunks) == 2 and after.meta.kept_tokens_per_layer == [8, 11, 3]
    for layer, n in enumerate([5, 10, 1]):
        assert first_segment(after, layer, n) == first_segment(before, layer, n)


def test_ragged_layers_with_zero_tokens_and_empty_memory(tmp_path):
    mem = build("int8", [[4, 0, 3], [0, 0, 2]])
    mem.save(tmp_path / "r.emloc")
    loaded = TaskMemory.load(tmp_path / "r.emloc")
    assert [lay.key_t.shape[2] for lay in loaded.layers] == [4, 0, 5]
    assert loaded.layers[1].value.shape == (KV, 0, HD) and loaded.layers[1].key_scale.shape == (KV, HD, 2)
    k, v = loaded.layers[1].dequantized()
    assert k.shape == (KV, HD, 0) and v.shape == (KV, 0, HD)
    empty = TaskMemory.empty(make_meta("fp16"))
    empty.save(tmp_path / "e.emloc")
    again = TaskMemory.load(tmp_path / "e.emloc")
    assert again.meta == empty.meta and again.summary()["kept_tokens_per_layer"] == [0, 0, 0]


def test_add_chunk_rejects_wrong_shapes_and_leaves_memory_unchanged():
    mem = build("int8", [[5, 10, 1]])
    layers_before = list(mem.layers)
    keys, values, index, record = make_chunk(np.random.default_rng(5), [2, 2, 2], tokens=10)
    keys[2] = keys[2][:, :1]  # last layer has 1 token, record says 2
    with pytest.raises(ValueError, match="layer 2"):
        mem.add_chunk(keys, values, index, record)
    assert mem.layers == layers_before and len(mem.meta.chunks) == 1
    with pytest.raises(ValueError, match="kept_per_layer"):
        mem.add_chunk(keys, values, index, ChunkRecord(4, 10, [2, 2], [0.2] * 3, [None] * 3, 0.0))


def test_add_chunk_accepts_numpy_scalars_in_record(tmp_path):
    mem = TaskMemory.empty(make_meta("fp32"))
    keys, values, index, record = make_chunk(np.random.default_rng(6), [1, 2, 3], tokens=10)
    record.kept_per_layer = list(np.array(record.kept_per_layer))
    record.final_js, record.tokens = np.float32(0.25), np.int64(10)
    mem.add_chunk(keys, values, index, record)
    record.kept_per_layer[0] = 99  # the memory keeps its own plain-Python copy
    stored = mem.meta.chunks[0]
    assert stored.kept_per_layer == [1, 2, 3] and type(stored.kept_per_layer[0]) is int and stored.final_js == 0.25
    mem.save(tmp_path / "n.emloc")
    assert TaskMemory.load(tmp_path / "n.emloc").meta == mem.meta


@pytest.mark.parametrize("delta", [float("inf"), float("-inf")])
def test_infinite_delta_roundtrips(tmp_path, delta):
    mem = TaskMemory.empty(make_meta(delta=delta))
    mem.save(tmp_path / "d.emloc")
    loaded = TaskMemory.load(tmp_path / "d.emloc")
    assert loaded.meta.hyperparameters["delta"] == delta
    assert json.loads(mem.meta.to_json())["hyperparameters"]["delta"] == str(delta)
    assert loaded.summary()["delta"] == str(delta)


def test_check_model_names_both_models():
    mem = build("fp16", [[1, 1, 1]])
    mem.check_model(FINGERPRINT, "task.emloc")
    with pytest.raises(ModelMismatchError) as info:
        mem.check_model("cd" * 32, "task.emloc", model_name="other-model")
    msg = str(info.value)
    assert msg.startswith("task.emloc: ") and "\n" not in msg
    assert "tiny-qwen2-vl" in msg and "other-model" in msg and FINGERPRINT[:12] in msg and "cdcdcdcdcdcd" in msg


# ---- atomic save ----

def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.emloc"
    build("int8", [[5, 10, 1]]).save(path)
    old = path.read_bytes()
    bigger = build("int8", [[5, 10, 1], [2, 2, 2]])

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["m.emloc"]
    monkeypatch.undo()
    monkeypatch.setattr(fmt.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        bigger.save(path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["m.emloc"]


# ---- load-time validation ----

def test_corrupt_payload_byte_fails_checksum(saved):
    path = saved[0]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a byte inside the last tensor
    path.write_bytes(bytes(data))
    assert "checksum mismatch" in load_error(path)


def test_edited_meta_fails_checksum(saved):
    """The checksum covers the meta too: a silently changed position_offset would shift every query."""
    path = saved[0]
    data = path.read_bytes()
    assert data.count(b'position_offset\\": 20') == 1
    path.write_bytes(data.replace(b'position_offset\\": 20', b'position_offset\\": 21'))
    assert "checksum mismatch" in load_error(path)


def test_missing_truncated_and_non_safetensors_files(saved, tmp_path):
    assert "no such memory file" in load_error(tmp_path / "nope.emloc") and "folder" in load_error(tmp_path)
    path = saved[0]
    path.write_bytes(path.read_bytes()[:-10])
    assert "truncated" in load_error(path)
    junk = tmp_path / "junk.emloc"
    junk.write_bytes(b"\x00" * 3)
    assert "not a readable safetensors file" in load_error(junk)


def test_wrong_magic_and_missing_header(saved, tmp_path):
    _, _, tensors, meta = saved
    write_raw(tmp_path / "a.st", tensors, meta, format="gguf")
    assert "not an emloc-edge memory" in load_error(tmp_path / "a.st")
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "b.st"))  # e.g. a weights file, no metadata
    assert "not an emloc-edge memory" in load_error(tmp_path / "b.st")


def test_future_version(saved, tmp_path):
    _, _, tensors, meta = saved
    write_raw(tmp_path / "v.st", tensors, meta, format_version="2")
    msg = load_error(tmp_path / "v.st")
    assert "version '2' is not supported" in msg and "reads version 1" in msg


@pytest.mark.parametrize("field", ["position_offset", "model_fingerprint", "chunks"])
def test_meta_missing_field(saved, tmp_path, field):
    _, _, tensors, meta = saved
    del meta[field]
    write_raw(tmp_path / "f.st", tensors, meta)
    assert f"meta field '{field}' is missing" in load_error(tmp_path / "f.st")


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(num_layers="3"), "meta.num_layers must be int"),
    (lambda m: m.update(head_dim=True), "meta.head_dim must be int"),
    (lambda m: m.update(precision="int4"), "meta.precision must be one of"),
    (lambda m: m["hyperparameters"].pop("delta"), "meta.hyperparameters field 'delta' is missing"),
    (lambda m: m["hyperparameters"].update(delta="huge"), "meta.hyperparameters.delta must be a number"),
    (lambda m: m["chunks"][1].pop("final_js"), "meta.chunks[1] field 'final_js' is missing"),
    (lambda m: m["chunks"][0].update(kept_per_layer=[5, 10]), "meta.chunks[0].kept_per_layer has 2 entries"),
    (lambda m: m["chunks"][0].update(kept_per_layer=[5, 10, 11]), "kept <= tokens"),
    (lambda m: m.update(extra=1), "unexpected field(s) extra"),
])
def test_meta_wrong_values(saved, tmp_path, edit, expected):
    _, _, tensors, meta = saved
    edit(meta)
    write_raw(tmp_path / "w.st", tensors, meta)
    assert expected in load_error(tmp_path / "w.st")


def test_meta_not_json(saved, tmp_path):
    write_raw(tmp_path / "j.st", saved[2], "{not json")
    assert "meta is not valid JSON" in load_error(tmp_path / "j.st")


def test_tensor_shape_dtype_missing_and_extra(saved, tmp_path):
    _, _, tensors, meta = saved
    cases = [
        ({"layers.1.value": tensors["layers.1.value"][:, :-1]},
         "'layers.1.value' has shape [2, 9, 8], expected [2, 10, 8]"),
        ({"layers.0.key_t": tensors["layers.0.key_t"].astype(np.float16)}, "has dtype float16, expected int8"),
        ({"layers.2.key_scale": tensors["layers.2.key_scale"][:, :, :1]}, "'layers.2.key_scale' has shape"),
        ({"layers.0.token_index": tensors["layers.0.token_index"].astype(np.int64)}, "expected int32"),
        ({"layers.3.key_t": tensors["layers.0.key_t"]}, "unexpected tensor(s) layers.3.key_t"),
    ]
    for i, (change, expected) in enumerate(cases):
        write_raw(tmp_path / f"t{i}.st", {**tensors, **change}, meta)
        assert expected in load_error(tmp_path / f"t{i}.st")
    missing = {k: v for k, v in tensors.items() if k != "layers.2.value_scale"}
    write_raw(tmp_path / "m.st", missing, meta)
    assert "'layers.2.value_scale' is missing" in load_error(tmp_path / "m.st")
    # meta says fewer kept tokens than the tensors hold: the shapes, not the meta, must win
    meta["chunks"][0]["kept_per_layer"] = [4, 10, 1]
    write_raw(tmp_path / "k.st", tensors, meta)
    assert "'layers.0.key_t' has shape [2, 8, 7], expected [2, 8, 6]" in load_error(tmp_path / "k.st")


def test_with_precision_keeps_tokens_and_round_trips():
    from emloc_edge.memory import with_precision

    fp32 = build("fp32", [[4, 0, 7], [3, 5, 2]], seed=5)
    q8 = with_precision(fp32, "int8")
    assert q8.meta.precision == "int8" and q8.meta.kept_tokens_per_layer == fp32.meta.kept_tokens_per_layer
    back = with_precision(q8, "fp32")
    for a, b, c in zip(fp32.layers, q8.layers, back.layers):
        assert np.array_equal(a.token_index, b.token_index)
        key_q, value_q = b.dequantized()
        assert np.array_equal(c.key_t, key_q) and np.array_equal(c.value, value_q)  # int8 -> fp32 is exact
        assert np.abs(a.key_t - key_q).max() <= np.abs(a.key_t).max() / 127  # one quantization step at most
