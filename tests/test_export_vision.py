"""Exported vision graph under ONNX Runtime vs `get_image_features` in PyTorch, for both VL families, on image
sizes other than the one traced at export."""
from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from emloc_edge.export.vision import VISION_FILE, export_vision
from emloc_edge.export.vision_qwen2_vl import graph_inputs
from emloc_edge.models.loading import load_model
from emloc_edge.runtime.image import preprocess

TOL = 1e-4
# (w, h) -> grids 4x4 (one window), 6x8, 22x2 (tall strip), 8x8; the export traced 8x12.
SIZES = [(56, 56), (112, 84), (40, 300), (100, 100)]


@pytest.fixture(scope="module")
def exported(vl_family_dir, tmp_path_factory):
    adapter = load_model(vl_family_dir.path)
    out = tmp_path_factory.mktemp(f"vision_{vl_family_dir.family}")
    section = export_vision(adapter, out)
    session = ort.InferenceSession(str(out / section["file"]), providers=["CPUExecutionProvider"])
    return adapter, section, session, out


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference(adapter, pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = adapter.model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(grid[None]))
    return out.pooler_output[0].numpy()  # [n_tokens, D]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_ort_features_match_torch(exported, size):
    adapter, section, session, _ = exported
    pixels, grid = preprocess(_image(size, sum(size)), adapter.image_preprocessing())
    ref = _reference(adapter, pixels, grid)
    (features,) = session.run(None, graph_inputs(pixels, grid, section))
    assert features.shape == ref.shape == (int(grid.prod()) // section["merge_size"] ** 2, ref.shape[1])
    assert np.abs(features - ref).max() <= TOL


def test_manifest_matches_graph(exported):
    adapter, section, session, out = exported
    assert section["file"] == VISION_FILE and section["family"] == adapter.family
    assert [i.name for i in session.get_inputs()] == [s["name"] for s in section["inputs"]]
    assert [o.name for o in session.get_outputs()] == [s["name"] for s in section["outputs"]]
    assert section["outputs"][0]["shape"][1] == adapter.model.config.text_config.hidden_size
    model = onnx.load(str(out / VISION_FILE))
    assert next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 18
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)  # plain ONNX ops only
    assert "external_data" not in section  # tiny weights stay inside the .onnx file


def test_window_mask_matters(exported):
    """Qwen2.5-VL: attention in the windowed blocks really stays inside windows (the test above would
    not notice a mask that lets everything through if windows never mattered)."""
    adapter, section, session, _ = exported
    windowed = "window_ids" in {s["name"] for s in section["inputs"]}
    assert windowed == (adapter.family == "qwen2_5_vl")  # only Qwen2.5-VL attends within windows
    if not windowed:
        return
    pixels, grid = preprocess(_image((100, 100), 3), adapter.image_preprocessing())
    feed = graph_inputs(pixels, grid, section)
    assert len(np.unique(feed["window_ids"])) == 4  # 4x4 merged tokens in 2x2-token windows
    feed["window_ids"] = np.zeros_like(feed["window_ids"])  # one window = full attention everywhere
    (features,) = session.run(None, feed)
    assert np.abs(features - _reference(adapter, pixels, grid)).max() > 1e-3
