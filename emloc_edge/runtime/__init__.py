"""The torch-free runtime: `EdgeSession` answers queries with a task memory under ONNX Runtime.

Names are imported lazily, so that reading an image or a model folder (as `compile` does) does not
load onnxruntime and tokenizers.
"""
from __future__ import annotations

_LAZY = {
    "EdgeSession": "emloc_edge.runtime.session",
    "Answer": "emloc_edge.runtime.session",
    "select_providers": "emloc_edge.runtime.session",
    "ModelFolder": "emloc_edge.runtime.model_folder",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emloc_edge.runtime' has no attribute {name!r}")


__all__ = list(_LAZY)
