"""Which ONNX Runtime execution providers a model runs on."""
from __future__ import annotations

import onnxruntime as ort

from ..errors import BadInputError


def select_providers(choice: str = "auto") -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU (auto or cuda), else the CPU."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BadInputError("provider 'cuda': CUDA is not available (needs onnxruntime-gpu and a GPU)",
                                parameters="provider")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice != "auto":
        raise BadInputError(f"provider must be auto, cpu or cuda, got {choice!r}", parameters="provider")
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
