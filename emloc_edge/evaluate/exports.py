"""The exported model eval answers with: made once per (model fingerprint, weights) and cached.

    $EMLOC_EDGE_HOME/exported/<model name>-<fingerprint[:12]>-<weights>/   eval's own cache
    default_export_dir()                                                 `run`'s export of the embedded model

A folder is reused when its manifest names the same fingerprint and weights (so `run`'s export of the
embedded model serves eval too, whatever its weights). Quantized weights are made from a cached fp32
export without tracing again when one exists (`quantize_export`: the same files `export` writes).
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Callable

from ..errors import ModelLoadError
from ..models.base import ModelAdapter
from ..models.default_model import default_export_dir, emloc_home
from ..runtime.model_folder import MANIFEST, ModelFolder


def default_weights() -> str:
    """`export`'s own default weights: read from `export_model`'s signature, the one place it is set."""
    from ..export.api import export_model

    return inspect.signature(export_model).parameters["weights"].default


def cache_dir(adapter: ModelAdapter, weights: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", adapter.name).strip("-.") or "model"
    return emloc_home() / "exported" / f"{slug}-{adapter.fingerprint()[:12]}-{weights}"


def find_export(adapter: ModelAdapter, weights: str) -> Path | None:
    """A cached export of this model with these weights, if any."""
    for folder in (cache_dir(adapter, weights), default_export_dir()):
        if _holds(folder, adapter.fingerprint(), weights):
            return folder
    return None


def cached_export(adapter: ModelAdapter, weights: str, progress: Callable[[str], None] = lambda _: None) -> Path:
    """The exported folder of `adapter` with `weights`, exported (or quantized from fp32) on first use."""
    from ..export.api import export_model, quantize_export

    found = find_export(adapter, weights)
    if found is not None:
        return found
    target = cache_dir(adapter, weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    fp32 = find_export(adapter, "fp32") if weights != "fp32" else None
    if fp32 is not None:
        progress(f"quantizing the {fp32.name} export to {weights} weights")
        quantize_export(fp32, target, weights)
    else:
        progress(f"exporting {adapter.name} with {weights} weights (once)")
        export_model(adapter, target, weights=weights)
    return target


def _holds(folder: Path, fingerprint: str, weights: str) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    try:
        manifest = ModelFolder.open(folder).manifest
    except ModelLoadError:  # a broken cache entry is exported again, not an error for eval
        return False
    return manifest["model_fingerprint"] == fingerprint and manifest["weights"] == weights
