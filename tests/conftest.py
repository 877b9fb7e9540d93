"""Session fixtures: tiny random checkpoints built once per session into a temp dir, plus images.

Fixtures
--------
- ``tiny_model_dir``: factory ``(family, **overrides) -> Path``; cached per (family, overrides), so
  e.g. ``tiny_model_dir("llama", max_position_embeddings=64)`` is built once per session.
- ``qwen2_vl_dir``, ``qwen2_5_vl_dir``, ``llama_dir``: default builds of each family.
- ``vl_family_dir`` / ``all_family_dir``: parametrized over the VL families / all families;
  each yields a ``TinyModel(family, path)``.
- ``tiny_vlm_dir``: factory ``(**kwargs) -> Path`` of ``tiny_vlm_model.build_tiny_vlm`` folders (the default
  model's family, random weights), cached per kwargs, e.g. ``tiny_vlm_dir(image_tokens=4)``.
- ``make_images``: the ``tiny_models.make_images(dir, n, seed)`` function (PNG paths).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

# Must happen before anything imports transformers / huggingface_hub: the Hub is unreachable
# and every model here is local, so never let a lookup try the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Make `import tiny_models` work under any pytest import mode (and from benchmarks via tests/).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core box a busy neighbour
# makes torch's OpenMP pool ~50-100x slower (measured: 4 ms vs 0.35-0.6 s per VL forward).
# EMLOC_TEST_TORCH_THREADS=0 leaves torch's default alone.
_THREADS = int(os.environ.get("EMLOC_TEST_TORCH_THREADS", "1"))
if _THREADS > 0:
    try:
        import torch

        torch.set_num_threads(_THREADS)
    except ImportError:  # runtime-only installs run the tests that need no torch
        pass

from tiny_models import (  # noqa: E402
    FAMILIES,
    VL_FAMILIES,
    TinyModel,
    build_tiny_model,
    make_images as _make_images,
)
from tiny_vlm_model import build_tiny_vlm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory building (once per session and per distinct overrides) a tiny checkpoint folder."""
    cache: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def get(family: str, **overrides: Any) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            n = len(cache)
            out = tmp_path_factory.mktemp(f"tiny_{family}_{n}", numbered=True)
            cache[key] = build_tiny_model(family, out, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory building (once per session and per distinct kwargs) a tiny random emloc_tiny_vlm folder."""
    cache: dict[tuple[tuple[str, Any], ...], Path] = {}

    def get(**kwargs: Any) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = build_tiny_vlm(tmp_path_factory.mktemp(f"tiny_vlm_{len(cache)}", numbered=True), **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def qwen2_vl_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("qwen2_vl")


@pytest.fixture(scope="session")
def qwen2_5_vl_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("qwen2_5_vl")


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session", params=VL_FAMILIES)
def vl_family_dir(request: pytest.FixtureRequest, tiny_model_dir: Callable[..., Path]) -> TinyModel:
    """Parametrized over the VL families; a test using it runs once per family."""
    return TinyModel(request.param, tiny_model_dir(request.param))


@pytest.fixture(scope="session", params=FAMILIES)
def all_family_dir(request: pytest.FixtureRequest, tiny_model_dir: Callable[..., Path]) -> TinyModel:
    """Parametrized over every family (VL and text-only)."""
    return TinyModel(request.param, tiny_model_dir(request.param))


@pytest.fixture(scope="session")
def make_images() -> Callable[[Path, int, int], list[Path]]:
    """``make_images(dir, n, seed) -> [png paths]``: small distinct random RGB images, 40-80 px."""
    return _make_images


# ---- real weights: built once per session, shared by every module that needs them ----------------------------
@pytest.fixture(scope="session")
def default_vlm(tmp_path_factory: pytest.TempPathFactory):
    """The embedded default model (real parts), assembled once per session into a temp folder; skipped,
    with the reason, where its packages are not installed."""
    from real_parts import missing_packages, real_work_threads

    missing = missing_packages()
    if missing:
        pytest.skip(f"default model parts not installed: {', '.join(missing)} (see scripts/env.sh)")
    from emloc_edge.models import default_model
    from emloc_edge.models.loading import load_model

    with real_work_threads():
        folder = default_model.build_default_model(tmp_path_factory.mktemp("home") / "emloc-tiny-vlm")
        return load_model(folder)


@pytest.fixture(scope="session")
def default_vlm_export(default_vlm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model exported once per session with export's defaults (int8 weights, validated),
    as `run` and the quickstart use it."""
    from real_parts import real_work_threads

    from emloc_edge.export.api import export_model

    out = tmp_path_factory.mktemp("default_export") / "emloc-tiny-vlm"
    with real_work_threads():
        export_model(default_vlm, out)
    return out


# --- eval (test_eval.py, test_eval_cli.py) ----------------------------------------------------------
@pytest.fixture(scope="module")
def eval_home(tmp_path_factory):
    """Exports are cached under $EMLOC_EDGE_HOME: one per module, never in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("eval-home")
        patch.setenv("EMLOC_EDGE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """A text task: 8 demos and 4 test items (folders laid out as demos.jsonl)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "cli"))
    from support import text_rows, write_jsonl

    base = tmp_path_factory.mktemp("eval")
    return write_jsonl(base / "demos", text_rows(8)), write_jsonl(base / "test", text_rows(4, seed=3))
