"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (MIT): 60k train + 10k test, 28x28 grey.

    apt-get install dataset-fashion-mnist     # -> /usr/share/datasets/fashion-mnist/*.gz
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) of split 'train' or 't10k'."""
    images_gz = FMNIST_DIR / f"{split}-images-idx3-ubyte.gz"
    labels_gz = FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not images_gz.is_file():
        raise SystemExit(f"{images_gz}: not found; apt-get install dataset-fashion-mnist (or set FMNIST_DIR)")
    images = np.frombuffer(gzip.open(images_gz).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(labels_gz).read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def per_class(labels: np.ndarray, count: int, rng: np.random.Generator, exclude: set[int] | None = None) -> np.ndarray:
    """Indices of `count` random images of every class, sorted by class then draw order."""
    exclude = exclude or set()
    out = []
    for c in range(len(CLASSES)):
        pool = np.array([i for i in np.flatnonzero(labels == c) if int(i) not in exclude])
        out.append(rng.choice(pool, size=count, replace=False))
    return np.concatenate(out)
