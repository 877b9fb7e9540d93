"""Tiny random `emloc_tiny_vlm` folders (the embedded default model's layout) for tests; the language
model is the tiny llama of `tiny_models.py`, built through the same checkpoint writer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_models import _build_checkpoint

#: Caption words of the tiny VLM's codebook: each one token of the tiny BPE.
TINY_VLM_CAPTION_WORDS: tuple[str, ...] = (" red", " blue", " green", " yellow", " dog", " cat")


def build_tiny_vlm(out_dir: Path, image_tokens: int = 1, image_size: int = 64, codebook_size: int = 3,
                   seed: int = 0) -> Path:
    """A tiny random `emloc_tiny_vlm` folder (the default model's layout) in ``out_dir``; returns it::

        config.json                  model_type emloc_tiny_vlm, image_token/tokens/size, ImageNet mean/std
        language_model/              the tiny llama (4 layers, hidden 64) + `<empty_output>` image token
        vision_encoder.safetensors   randomly initialised EfficientNet-Lite0 for image_size px
        projector.safetensors        random Projector; codebook = the LM embeddings of the caption words

    image_tokens: a square number, pooled from the (image_size / 32)² encoder map (64 px: 2x2, so 1 token
    averages the 4 cells and 4 tokens are the 2x2 grid itself).
    The projector standardises with the encoder's feature statistics on a few fixed random images, so
    different images pick different codebook words. Loads with `emloc_edge.models.loading.load_model`.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from emloc_edge.models.default_model import CONFIG, IMAGE_TOKEN, caption_token_ids
    from emloc_edge.models.tiny_vlm_vision import ImageEncoder, Projector

    if not 1 <= codebook_size <= len(TINY_VLM_CAPTION_WORDS):
        raise ValueError(f"codebook_size must be 1..{len(TINY_VLM_CAPTION_WORDS)}, got {codebook_size}")
    out_dir = Path(out_dir)
    lm_dir = _build_checkpoint("llama", out_dir / "language_model", {"seed": seed}, image_token=IMAGE_TOKEN)
    words = list(TINY_VLM_CAPTION_WORDS[:codebook_size])
    config = {**CONFIG, "language_model": "language_model", "image_token": IMAGE_TOKEN,
              "image_tokens": image_tokens, "image_size": image_size, "caption_words": words}
    tok = AutoTokenizer.from_pretrained(lm_dir)
    embed = load_file(lm_dir / "model.safetensors")["model.embed_tokens.weight"]  # [vocab, D]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ImageEncoder(image_tokens, image_size)
        projector = Projector(image_tokens, embed.shape[1], codebook_size)
        calibration = torch.rand(8, 3, image_size, image_size) * 4 - 2  # [8, 3, S, S], roughly normalised pixels
        with torch.no_grad():
            _calibrate_batch_norm(encoder, calibration)  # train mode: drop-connect draws from the forked RNG
    with torch.no_grad():
        features = encoder(calibration).flatten(0, 1)  # [8·T, 1280]
        projector.feature_mean.copy_(features.mean(0))
        projector.feature_std.copy_(features.std(0).clamp_min(1e-3))
        projector.codebook.copy_(embed[caption_token_ids(tok, words)])
    save_file({k: v.contiguous() for k, v in encoder.net.state_dict().items()}, out_dir / "vision_encoder.safetensors")
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, out_dir / "projector.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _calibrate_batch_norm(encoder: torch.nn.Module, pixels: torch.Tensor) -> None:
    """Running statistics of every BatchNorm from one train-mode pass, then eval mode: at PyTorch's
    default init the 16 blocks shrink activations to ~1e-11, where fp32 rounding would pick the word."""
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
    encoder.train()
    encoder(pixels)
    encoder.eval()
