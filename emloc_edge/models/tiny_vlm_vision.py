"""The image half of the default model: frozen EfficientNet-Lite0 features -> a few LM input embeddings.

    pixels [B, 3, 224, 224] --EfficientNet-Lite0 (frozen, ImageNet)--> [B, 1280, 7, 7]
        --adaptive average pool to g x g (as a fixed matrix, so it exports)--> [B, T, 1280]   (T = g²)
        --standardise (train-set mean/std) --Linear 1280->C--> scores of C caption words
        --argmax, look up codebook [C, D] (their frozen LM input embeddings)--> [B, T, D]

Only the projector is trained (training/train_projector.py); its weights ship with the package.
"""
from __future__ import annotations

import math

import torch
from torch import nn

FEATURE_DIM = 1280  # EfficientNet-Lite0 head channels


def pooling_matrix(grid_in: int, grid_out: int) -> torch.Tensor:
    """[grid_out², grid_in²] averaging weights equal to `adaptive_avg_pool2d(grid_in -> grid_out)`."""
    rows = torch.zeros(grid_out, grid_in)
    for i in range(grid_out):
        lo, hi = (i * grid_in) // grid_out, math.ceil((i + 1) * grid_in / grid_out)  # PyTorch's bin edges
        rows[i, lo:hi] = 1.0 / (hi - lo)
    return torch.einsum("ah,bw->abhw", rows, rows).reshape(grid_out**2, grid_in**2)


class ImageEncoder(nn.Module):
    """EfficientNet-Lite0 (from `efficientnet-lite-pytorch`) -> T pooled 1280-d feature vectors per image."""

    def __init__(self, image_tokens: int, image_size: int = 224) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        grid = math.isqrt(image_tokens)
        if grid * grid != image_tokens:
            raise ValueError(f"image_tokens must be a square number, got {image_tokens}")
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        # Lite0 uses ReLU6, as trained; `set_swish` would swap in Swish and change every feature.
        side = math.ceil(image_size / 32)  # the network downsamples by 32
        self.register_buffer("pool", pooling_matrix(side, grid), persistent=False)  # [T, side²]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.net.extract_features(pixels)  # [B, 1280, side, side]
        return torch.einsum("tp,bcp->btc", self.pool, maps.flatten(2))  # [B, T, 1280]


class Projector(nn.Module):
    """Pooled features [B, T, 1280] -> LM input embeddings [B, T, D] (the only trained part).

    A choice among caption words: a linear head scores the `codebook` entries (the frozen LM input
    embeddings of a few single-token caption words) and the image token is the best one's embedding.
    The LM therefore reads a real word, which its in-context copying already handles; a free linear
    map could not be trained through the LM on this CPU (see the model card in `assets/`). Measured
    on held-out images, the hard choice beat the probability-weighted mean of the embeddings.
    """

    def __init__(self, image_tokens: int, hidden_size: int, codebook_size: int) -> None:
        super().__init__()
        self.image_tokens = image_tokens
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_std", torch.ones(FEATURE_DIM))
        self.register_buffer("codebook", torch.zeros(codebook_size, hidden_size))  # [C, D], frozen
        self.linear = nn.Linear(FEATURE_DIM, codebook_size)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std  # [B, T, 1280]
        return self.linear(x)  # [B, T, C] caption-word logits

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        word = self.scores(features).argmax(-1)  # [B, T] best caption word
        return self.codebook[word]  # [B, T, D]


class ImageTokens(nn.Module):
    """Encoder + projector: what the exported vision graph computes."""

    def __init__(self, encoder: ImageEncoder, projector: Projector) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(pixels))  # [B, T, D]
