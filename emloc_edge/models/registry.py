"""Adapters by family name and by HF `model_type`: the one place that maps a model to its adapter."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from .base import ModelAdapter

ADAPTERS: dict[str, type["ModelAdapter"]] = {}


def register(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
    ADAPTERS[cls.family] = cls
    return cls


def adapter_for(model_type: str) -> type["ModelAdapter"]:
    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls
    known = sorted(t for cls in ADAPTERS.values() for t in cls.model_types)
    raise ModelLoadError(f"unsupported model type {model_type!r} (supported: {', '.join(known)})")
