"""emloc-edge: compile many demonstrations into an EMLoC task memory; answer queries under ONNX Runtime.

The compile half (`compile_memory`) needs the `[compile]` extra (torch, transformers); the memory file
(`TaskMemory`) and the runtime need only the base install. Names are imported lazily so that
`import emloc_edge` never pulls in torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "TaskMemory": "emloc_edge.memory",
    "compile_memory": "emloc_edge.compile.api",
    "CompileOptions": "emloc_edge.compile.compressor",
    "load_model": "emloc_edge.models.loading",
    "evaluate": "emloc_edge.evaluate",
    "EdgeSession": "emloc_edge.runtime.session",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emloc_edge' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
