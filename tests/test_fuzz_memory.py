"""Property/fuzz tests of the memory loader: every crafted file loads and is usable, or is one MemoryFileError.

Families (cases per run = max_examples, reported in the issue's closing note):
    META      resealed meta JSON: fields replaced by any JSON value, raw text (deep nesting, 5,000-digit ints)
    TENSORS   resealed tensors: any dtype (also F8/BF16, which numpy lacks), shape, NaN/inf, negative indices
    HEADER    the raw safetensors header: length field, offsets, dtype strings, JSON
    DAMAGE    random byte flips, truncation, appended bytes (no reseal: the checksum or the parser catches them)
    RUNTIME   memories the loader accepts, checked against a model manifest: accepted ones are usable
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from emloc_edge.errors import MemoryFileError
from emloc_edge.memory import FORMAT_NAME, TaskMemory, payload_sha256
from emloc_edge.runtime.memory_inputs import memory_feeds
from emloc_edge.runtime.model_folder import ModelFolder
from test_memory import build

META_EXAMPLES, TENSOR_EXAMPLES, HEADER_EXAMPLES, DAMAGE_EXAMPLES, RUNTIME_EXAMPLES = 300, 200, 150, 300, 200
CLI_EXAMPLES = 150
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BASE = build("int8", [[5, 10, 1], [2, 0, 4]])
BASE_TENSORS = BASE.tensors()
BASE_META = json.loads(BASE.meta.to_json())
RAW = "\x00RAW\x00"  # placeholder replaced by raw JSON text after json.dumps

# ----------------------------------------------------------------------------------------- helpers
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([2**31, 2**63, 2**64, 10**6, 10**8, -1, 0, 1, 3, "inf", "nan", "-inf", "int8", "", "\ud800"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
raw_values = st.sampled_from(["[" * 5000 + "]" * 5000, "1" * 5000, "-" + "9" * 4500, "1e999999", "{" * 100 + "}" * 100,
                              '{"a":' * 40 + "1" + "}" * 40, "[" * 40 + "]" * 40, "NaN", "Infinity", "-Infinity",
                              "1e400", '{"x": NaN}', "[1e999]"])


def _paths(obj, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


META_PATHS = [p for p in _paths(BASE_META) if p]


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DELETE = object()


@st.composite
def crafted_meta_text(draw) -> str:
    meta = json.loads(json.dumps(BASE_META))
    raw = None
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(META_PATHS))
        try:
            kind = draw(st.sampled_from(["value", "value", "raw", "delete"]))
            value = {"value": lambda: draw(json_values), "raw": lambda: RAW, "delete": lambda: _DELETE}[kind]()
            if value is RAW:
                raw = draw(raw_values)
            _set(meta, path, value)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced this path
            pass
    if draw(st.booleans()):
        meta[draw(st.sampled_from(["extra", "num_layers", "position_offset"]))] = draw(json_values)
    text = json.dumps(meta)
    return text.replace(json.dumps(RAW), raw) if raw is not None else text


def write_raw(path: Path, tensors: dict, meta_text: str, **header) -> None:
    """A resealed file: any meta text, any numpy tensors, with a valid payload_sha256."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"format": FORMAT_NAME, "format_version": "1", "meta": meta_text,
            "payload_sha256": payload_sha256(meta_text, tensors), **header}
    save_file(tensors, str(path), metadata=meta)


def raw_safetensors(entries: dict[str, tuple[str, list[int], bytes]], metadata: dict | None) -> bytes:
    """A safetensors file by hand, so that any dtype string (F8_E4M3, BF16, ...) can be written."""
    header, data = {}, b""
    for name, (dtype, shape, blob) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def assert_loads_or_one_line(path: Path) -> TaskMemory | None:
    """The property every family checks: a usable memory, or one MemoryFileError line naming the file."""
    try:
        memory = TaskMemory.load(path)
    except MemoryFileError as e:
        msg = str(e)
        assert msg.startswith(f"{path}: ") and len(msg.splitlines()) == 1 and len(msg) < 1000, msg
        event("refused: " + " ".join(msg[len(str(path)) + 2:].split()[:3]))  # --hypothesis-show-statistics
        return None
    event("loaded")
    exercise(memory)
    return memory


def exercise(memory: TaskMemory) -> None:
    """What inspect and the runtime do with a loaded memory must not raise."""
    json.dumps(memory.summary(file_bytes=1), allow_nan=False, default=str)
    memory.meta.to_json()
    for variant in (["decoder_step", "decoder_step_q8"] if memory.meta.precision == "int8" else ["decoder_step"]):
        feeds = memory_feeds(memory, variant)
        assert all(np.isfinite(v).all() for v in feeds.values() if v.dtype.kind == "f")


def _tmp():
    return tempfile.TemporaryDirectory(prefix="fuzzmem")


# ------------------------------------------------------------------------------------------ families
@settings(max_examples=META_EXAMPLES, **FUZZ)
@given(meta_text=crafted_meta_text())
def test_resealed_meta_loads_or_is_one_line(meta_text):
    with _tmp() as d:
        path = Path(d) / "m.emloc"
        write_raw(path, BASE_TENSORS, meta_text)
        assert_loads_or_one_line(path)


dtypes = st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64", "bool"])


@st.composite
def crafted_tensors(draw) -> dict:
    tensors = dict(BASE_TENSORS)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(tensors) + ["layers.3.key_t", "layers.0.extra", "x"]))
        kind = draw(st.sampled_from(["values", "values", "dtype", "shape", "delete"]))
        old = tensors.get(name, np.zeros((2, 8, 1), np.float32))
        if kind == "delete":
            tensors.pop(name, None)
        elif kind == "dtype":
            with np.errstate(all="ignore"):  # NaN cast to an integer dtype is garbage on purpose
                tensors[name] = old.astype(draw(dtypes))
        elif kind == "shape":
            shape = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
            tensors[name] = np.zeros(shape, draw(dtypes))
        else:
            special = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1, 0, -(2**31), 2**31 - 1, 1e30, -0.0]))
            t = old.copy()
            if t.size:
                flat = t.reshape(-1)
                with np.errstate(all="ignore"):
                    flat[draw(st.integers(0, t.size - 1))] = np.asarray(special).astype(t.dtype) if t.dtype.kind != "f" \
                        else special
            tensors[name] = t
    return tensors


@settings(max_examples=TENSOR_EXAMPLES, **FUZZ)
@given(tensors=crafted_tensors())
def test_resealed_tensors_load_or_are_one_line(tensors):
    with _tmp() as d:
        path = Path(d) / "m.emloc"
        write_raw(path, tensors, BASE.meta.to_json())
        memory = assert_loads_or_one_line(path)
        if memory is not None:  # accepted: then it holds exactly what the file holds, all finite and in range
            for layer in memory.layers:
                assert (layer.token_index >= 0).all()


@st.composite
def crafted_header(draw) -> bytes:
    entries = {name: (dtype, list(t.shape), t.tobytes()) for name, t in BASE_TENSORS.items()
               for dtype in [{"int8": "I8", "float32": "F32", "int32": "I32"}[t.dtype.name]]}
    name = draw(st.sampled_from(sorted(entries)))
    dtype, shape, blob = entries[name]
    kind = draw(st.sampled_from(["dtype", "shape", "blob", "metadata", "length", "offsets"]))
    metadata = {"format": FORMAT_NAME, "format_version": "1", "meta": BASE.meta.to_json(),
                "payload_sha256": payload_sha256(BASE.meta.to_json(), BASE_TENSORS)}
    if kind == "dtype":
        entries[name] = (draw(st.sampled_from(["F8_E4M3", "F8_E5M2", "BF16", "F4", "F6_E2M3", "C64", "XX", "U8"])), shape, blob)
    elif kind == "shape":
        entries[name] = (dtype, draw(st.lists(st.integers(0, 2**70), max_size=5)), blob)
    elif kind == "blob":
        entries[name] = (dtype, shape, blob[: draw(st.integers(0, len(blob)))])
    elif kind == "metadata":
        metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3))
    data = raw_safetensors(entries, metadata)
    if kind == "length":
        data = struct.pack("<Q", draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, len(data), 10**8]))) + data[8:]
    elif kind == "offsets":
        data = data.replace(b'"data_offsets": [0, ', f'"data_offsets": [{draw(st.integers(0, 2**66))}, '.encode(), 1)
    return data


@settings(max_examples=HEADER_EXAMPLES, **FUZZ)
@given(data=crafted_header())
def test_crafted_raw_header_loads_or_is_one_line(data):
    with _tmp() as d:
        path = Path(d) / "m.emloc"
        path.write_bytes(data)
        assert_loads_or_one_line(path)


GOOD_BYTES = None


def _good_bytes() -> bytes:
    global GOOD_BYTES
    if GOOD_BYTES is None:
        with _tmp() as d:
            BASE.save(Path(d) / "m.emloc")
            GOOD_BYTES = (Path(d) / "m.emloc").read_bytes()
    return GOOD_BYTES


@settings(max_examples=DAMAGE_EXAMPLES, **FUZZ)
@given(kind=st.sampled_from(["flip", "truncate", "append"]), where=st.floats(0, 1), bit=st.integers(0, 7),
       extra=st.binary(min_size=1, max_size=64))
def test_flipped_truncated_or_appended_bytes_are_refused(kind, where, bit, extra):
    good = _good_bytes()
    i = min(int(where * len(good)), len(good) - 1)
    damaged = {"flip": lambda: good[:i] + bytes([good[i] ^ (1 << bit)]) + good[i + 1:],
               "truncate": lambda: good[:i], "append": lambda: good + extra}[kind]()
    with _tmp() as d:
        path = Path(d) / "m.emloc"
        path.write_bytes(damaged)
        memory = assert_loads_or_one_line(path)
        # A flip inside the JSON's insignificant bytes cannot exist (it is compact), so nothing damaged loads,
        # except a flip that JSON reads the same (e.g. inside a string of the free-form template).
        if memory is not None:
            assert kind == "flip" and memory.meta.model_fingerprint == BASE.meta.model_fingerprint


# ---- the instances the issue lists, each once, by name ----

@pytest.mark.parametrize("edit, named", [
    (lambda t: t.replace('"num_layers": 3', '"num_layers": 100000000'), "num_layers"),
    (lambda t: t.replace('"num_layers": 3', '"num_layers": ' + "1" * 5000), "meta is not valid JSON"),
    (lambda t: t.replace('"chunk_size": 4', '"chunk_size": ' + "[" * 5000 + "]" * 5000), "meta is not valid JSON"),
    (lambda t: t.replace('"chunk_size": 4', '"chunk_size": {"a": ' + "[" * 100 + "]" * 100 + "}"), "nested deeper"),
    (lambda t: t.replace('"position_offset": 20', '"position_offset": 9223372036854775808'), "position_offset"),
])
def test_listed_meta_instances(tmp_path, edit, named):
    path = tmp_path / "m.emloc"
    text = edit(BASE.meta.to_json())
    assert text != BASE.meta.to_json()
    write_raw(path, BASE_TENSORS, text)
    with pytest.raises(MemoryFileError, match=named):
        TaskMemory.load(path)


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "BF16"])
def test_dtypes_numpy_lacks_are_one_line(tmp_path, dtype):
    entries = {name: ("I8" if t.dtype == np.int8 else "F32" if t.dtype == np.float32 else "I32", list(t.shape), t.tobytes())
               for name, t in BASE_TENSORS.items()}
    entries["layers.0.key_t"] = (dtype, [2, 8, 3], b"\0" * (48 if dtype.startswith("F8") else 96))
    meta = {"format": FORMAT_NAME, "format_version": "1", "meta": BASE.meta.to_json(), "payload_sha256": "0" * 64}
    (tmp_path / "m.emloc").write_bytes(raw_safetensors(entries, meta))
    with pytest.raises(MemoryFileError, match=f"dtype '{dtype}'"):
        TaskMemory.load(tmp_path / "m.emloc")


@pytest.mark.parametrize("name, value, named", [
    ("layers.0.key_scale", np.nan, "scale"), ("layers.1.value_scale", np.inf, "scale"),
    ("layers.2.token_index", -1, "negative token index"),
])
def test_non_finite_scales_and_negative_index_are_refused(tmp_path, name, value, named):
    tensors = {k: v.copy() for k, v in BASE_TENSORS.items()}
    tensors[name].reshape(-1)[0] = value
    write_raw(tmp_path / "m.emloc", tensors, BASE.meta.to_json())
    with pytest.raises(MemoryFileError, match=named):
        TaskMemory.load(tmp_path / "m.emloc")


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_non_finite_values_are_refused(tmp_path, precision):
    memory = build(precision, [[3, 2, 1]])
    tensors = memory.tensors()
    tensors["layers.0.value"].reshape(-1)[1] = np.nan
    write_raw(tmp_path / "m.emloc", tensors, memory.meta.to_json())
    with pytest.raises(MemoryFileError, match="NaN or inf"):
        TaskMemory.load(tmp_path / "m.emloc")


def test_stale_temp_files_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "task.emloc"
    BASE.save(path)
    stale = tmp_path / ".task.emloc.abcd1234.tmp"  # what a save killed before its rename leaves
    stale.write_bytes(b"half")
    other = tmp_path / ".other.emloc.abcd1234.tmp"  # another file's temp: not ours to remove
    other.write_bytes(b"x")
    BASE.save(path)
    assert sorted(os.listdir(tmp_path)) == [".other.emloc.abcd1234.tmp", "task.emloc"]
    TaskMemory.load(path)


def test_a_temp_file_a_live_save_holds_is_kept(tmp_path):
    import fcntl

    from emloc_edge.memory.format import remove_stale_temps

    live = tmp_path / ".task.emloc.live5678.tmp"
    live.write_bytes(b"being written")
    with open(live, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert remove_stale_temps(str(tmp_path), ".task.emloc.") == []
    assert remove_stale_temps(str(tmp_path), ".task.emloc.") == [str(live)]


@settings(max_examples=CLI_EXAMPLES, **FUZZ)
@given(meta_text=crafted_meta_text(), as_json=st.booleans())
def test_inspect_of_a_crafted_memory_prints_it_or_one_error_line(meta_text, as_json):
    """Through the CLI: exit 0, or exit 2 with one `error:` line on stderr and no traceback."""
    from click.testing import CliRunner

    from emloc_edge.cli import main

    with _tmp() as d:
        path = Path(d) / "m.emloc"
        write_raw(path, BASE_TENSORS, meta_text)
        r = CliRunner().invoke(main, ["inspect", str(path)] + (["--json"] if as_json else []))
    assert r.exit_code in (0, 2) and type(r.exception) in (type(None), SystemExit), (r.exception, r.output)
    if r.exit_code == 2:
        assert r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_killed_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    """A real kill (SIGKILL in the middle of writing), not a simulated one."""
    import subprocess
    import sys

    BASE.save(tmp_path / "task.emloc")
    before = (tmp_path / "task.emloc").read_bytes()
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2])\n"
            "from emloc_edge.memory import format as f\n"
            "from test_fuzz_memory import BASE\n"
            "def killed(tensors, filename, metadata=None):\n"
            "    open(filename, 'wb').write(b'half a memory'); os.kill(os.getpid(), signal.SIGKILL)\n"
            "f.save_file = killed\n"
            "BASE.save(sys.argv[1])\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "task.emloc"), str(Path(__file__).parent)],
                         capture_output=True, cwd=tmp_path)
    assert run.returncode == -9, run.stderr
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and left[0].startswith(".task.emloc.") and left[0].endswith(".tmp"), left
    assert (tmp_path / "task.emloc").read_bytes() == before  # the old file is intact
    BASE.save(tmp_path / "task.emloc")
    assert os.listdir(tmp_path) == ["task.emloc"]


@pytest.mark.parametrize("name", ["x" * 5000, "a\x00b"])
def test_unusable_paths_are_one_line_errors(tmp_path, name):
    from emloc_edge.errors import ModelLoadError

    with pytest.raises(MemoryFileError):
        TaskMemory.load(tmp_path / name)
    with pytest.raises(ModelLoadError):
        ModelFolder.open(tmp_path / name)
