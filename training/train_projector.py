"""Train the default model's projector (seeded; ~5 min on 2 CPU cores, most of it encoding images).

    apt-get install dataset-fashion-mnist
    python training/train_projector.py            # -> emloc_edge/models/assets/tiny_vlm_projector.safetensors
                                                  #    + training/tiny_vlm_training_log.json

Frozen: EfficientNet-Lite0 (features computed once) and SmolLM2-135M-Instruct. Trained: only the
projector's linear head (1280 x 10 + 10 parameters), which picks one of ten caption-word
embeddings (`Projector` in emloc_edge/models/tiny_vlm_vision.py), with cross-entropy against the
Fashion-MNIST class of each training image (caption alignment).

Why not train through the LM on in-context episodes (the spike's recipe): on this machine fp32 GEMM
runs at ~28 GFLOP/s and bf16 at ~0.2 GFLOP/s (no bf16 kernels on this CPU), so one forward+backward
of SmolLM2 over a 1,300-token episode takes ~48 s; an hour buys ~75 such steps, about a tenth of
what the spike needed. Instead the head is trained in seconds and in-context learning is then
*measured*: episodes of held-out Fashion-MNIST images where each class gets a random answer word for
that episode only (forward passes through the frozen LM, the same chat template `compile` uses).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emloc_edge.models.default_model import PROJECTOR_FILE, build_default_model  # noqa: E402
from emloc_edge.models.tiny_vlm import TinyVLMAdapter  # noqa: E402
from emloc_edge.runtime.image import preprocess_square  # noqa: E402
from fmnist import CLASSES, load_split, per_class  # noqa: E402

QUESTIONS = (
    "What is this?", "Which bin does this item go to?", "Label?", "Which zone is this for?",
    "Which shelf?", "Where does this go?", "Category?", "What label does this get?",
)


# --- data -----------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(adapter: TinyVLMAdapter, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Pooled encoder features [N, T, 1280] of 28x28 grey images, preprocessed as compile does."""
    from PIL import Image

    settings = adapter.image_preprocessing()
    out = []
    for i in range(0, len(images), batch):
        pixels = np.stack([preprocess_square(Image.fromarray(im, mode="L"), settings) for im in images[i : i + batch]])
        out.append(adapter.vision.encoder(torch.from_numpy(pixels)))
        print(f"\r  features {min(i + batch, len(images))}/{len(images)}", end="", flush=True)
    print()
    return torch.cat(out)


def answer_words(tokenizer, rng: np.random.Generator, count: int = 450) -> list[str]:
    """Common lowercase English words that are one token both with and without a leading space."""
    vocab = tokenizer.get_vocab()
    words = [t for t in vocab if t.isascii() and t.isalpha() and t.islower() and 4 <= len(t) <= 8 and "Ġ" + t in vocab]
    words.sort(key=lambda t: vocab["Ġ" + t])  # BPE merge order ~ frequency
    words = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1][:count]
    return list(rng.permutation(words))


@dataclass
class Row:
    ids: list[int]
    targets: list[tuple[int, int]]  # (position whose logits predict, target token id)
    features: list[int]  # feature-cache index of each image, in slot order
    candidates: list[int] | None = None  # the episode's answer tokens (for accuracy)
    shots_before: list[int] | None = None  # per target: how many times its class appeared before


class Renderer:
    """Token ids of demonstration pieces, cached per (question, answer, with_system)."""

    def __init__(self, adapter: TinyVLMAdapter) -> None:
        self.adapter, self.cache = adapter, {}

    def demo(self, question: str, answer: str, with_system: bool) -> tuple[list[int], int, int]:
        """(ids, position predicting the answer's first token, number of answer tokens)."""
        key = (question, answer, with_system)
        if key not in self.cache:
            chat = self.adapter.chat
            ids, mask = chat.encode(chat.demo_piece(question, answer, True, with_system))
            ids, mask = self.adapter.expand_images(ids, mask, [None])
            start = mask.index(True)  # last generation-prompt token
            n_answer = sum(mask) - 2  # minus that token and the end-of-turn token
            self.cache[key] = (ids, start, n_answer)
        return self.cache[key]


def episode(render: Renderer, labels: np.ndarray, words: list[str], rng, n_way: int, k_shot: int) -> Row:
    """N classes x K shots, one random answer word per class for this episode, shuffled."""
    classes = rng.choice(len(CLASSES), size=n_way, replace=False)
    chosen = rng.choice(len(words), size=n_way, replace=False)
    pool = {c: np.flatnonzero(labels == c) for c in classes}
    items = [(c, int(i)) for c in classes for i in rng.choice(pool[c], size=k_shot, replace=False)]
    items = [items[j] for j in rng.permutation(len(items))]
    question = QUESTIONS[rng.integers(len(QUESTIONS))]
    word_of = {c: words[w] for c, w in zip(classes, chosen)}
    row = Row([], [], [], candidates=[], shots_before=[])
    seen: dict[int, int] = {}
    for j, (c, index) in enumerate(items):
        ids, start, _ = render.demo(question, word_of[c], with_system=j == 0)
        if seen.get(c, 0) > 0:
            row.targets.append((len(row.ids) + start, ids[start + 1]))
            row.shots_before.append(seen[c])
        seen[c] = seen.get(c, 0) + 1
        row.ids += ids
        row.features.append(index)
    answer_token = lambda w: (lambda ids, start, _: ids[start + 1])(*render.demo(question, w, False))  # noqa: E731
    row.candidates = sorted({answer_token(w) for w in word_of.values()})
    return row


# --- model ----------------------------------------------------------------------------------------
def forward(adapter: TinyVLMAdapter, rows: list[Row], features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n_targets, V] at every target position, and the target ids [n_targets]."""
    lm = adapter.model
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), adapter.chat.end_of_turn_id, dtype=torch.long)  # right padding
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids)  # [B, W, D] bf16
    image = adapter.vision.projector(torch.cat([features[r.features] for r in rows]))  # [n, T, D]
    slots = (ids == adapter.image_token_id)[..., None]
    embeds = embeds.masked_scatter(slots, image.to(embeds.dtype))
    # Right padding only follows real tokens, so causal attention needs no mask.
    hidden = lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, W, D]
    where = [(b, p) for b, r in enumerate(rows) for p, _ in r.targets]
    picked = hidden[[b for b, _ in where], [p for _, p in where]]  # [n, D]
    targets = torch.tensor([t for r in rows for _, t in r.targets])
    return lm.lm_head(picked).float(), targets


@torch.no_grad()
def evaluate(adapter, render, labels, features, words, rng, episodes: int, n_way: int, k_shot: int) -> dict:
    """Accuracy on later demos of held-out-word episodes: argmax over the episode's words and over the vocab."""
    hits = {"1": [], "2-4": [], "5+": []}
    free = []
    for _ in range(episodes):
        row = episode(render, labels, words, rng, n_way, k_shot)
        logits, targets = forward(adapter, [row], features)
        cand = torch.tensor(row.candidates)
        constrained = cand[logits[:, cand].argmax(-1)]
        for shots, c, f, t in zip(row.shots_before, constrained, logits.argmax(-1), targets):
            hits["1" if shots == 1 else "2-4" if shots < 5 else "5+"].append(int(c == t))
            free.append(int(f == t))
    out = {f"acc_shots_{k}": round(float(np.mean(v)), 4) for k, v in hits.items() if v}
    out["acc_free_all"] = round(float(np.mean(free)), 4)
    return out


def train_head(projector, feats: torch.Tensor, labels: np.ndarray, val_feats, val_labels, steps: int, lr: float,
               l2: float) -> list[dict]:
    """Full-batch AdamW on the caption-word head with an L2 penalty; keeps the step with the best
    validation loss (the head overfits 12,810 parameters quickly). Returns the training curve."""
    opt = torch.optim.AdamW(projector.linear.parameters(), lr=lr, weight_decay=0.0)
    y, val_y = torch.from_numpy(labels), torch.from_numpy(val_labels)
    curve, best = [], (float("inf"), None, 0)
    for step in range(steps):
        loss = F.cross_entropy(projector.scores(feats)[:, 0], y)  # T = 1 image token
        penalty = l2 * projector.linear.weight.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        opt.step()
        with torch.no_grad():
            val = projector.scores(val_feats)[:, 0]
            val_loss = float(F.cross_entropy(val, val_y))
            if val_loss < best[0]:
                best = (val_loss, {k: v.clone() for k, v in projector.linear.state_dict().items()}, step + 1)
            if step % 10 == 9 or step == 0:
                curve.append({"step": step + 1, "train_loss": round(float(loss), 4), "val_loss": round(val_loss, 4),
                              "val_caption_acc": round(float((val.argmax(-1) == val_y).float().mean()), 4)})
    projector.linear.load_state_dict(best[1])
    curve.append({"kept_step": best[2], "val_loss": round(best[0], 4)})
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=PROJECTOR_FILE)
    ap.add_argument("--log", type=Path, default=Path(__file__).with_name("tiny_vlm_training_log.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--val-per-class", type=int, default=40)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the head's weights")
    ap.add_argument("--icl-episodes", type=int, default=2, help="10-way 10-shot episodes measured after training")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    work = Path(tempfile.mkdtemp(prefix="emloc-train-"))
    adapter = TinyVLMAdapter.from_folder(build_default_model(work / "model", projector=None, seed=args.seed))
    adapter.model.requires_grad_(False)
    adapter.vision.encoder.requires_grad_(False)
    projector = adapter.vision.projector

    images, labels = load_split("train")
    train_idx = per_class(labels, args.train_per_class, rng)
    val_idx = per_class(labels, args.val_per_class, rng, exclude=set(train_idx.tolist()))
    print(f"encoding {len(train_idx)} train + {len(val_idx)} validation images ...")
    train_feat, val_feat = encode_images(adapter, images[train_idx]), encode_images(adapter, images[val_idx])
    flat = train_feat.flatten(0, 1)  # [N·T, 1280]
    projector.feature_mean.copy_(flat.mean(0))
    projector.feature_std.copy_(flat.std(0).clamp_min(1e-3))
    train_labels, val_labels = labels[train_idx], labels[val_idx]
    feature_seconds = time.time() - t0
    print(f"features done in {feature_seconds:.0f} s")

    curve = train_head(projector, train_feat, train_labels, val_feat, val_labels, args.steps, args.lr, args.l2)
    print(json.dumps(curve[-1]))
    projector.eval()

    words = answer_words(adapter.tokenizer, rng)
    render = Renderer(adapter)
    erng = np.random.default_rng(args.seed + 1)
    icl = {
        "5way_5shot": evaluate(adapter, render, val_labels, val_feat, words, erng, 4 * args.icl_episodes, 5, 5),
        "10way_10shot": evaluate(adapter, render, val_labels, val_feat, words, erng, args.icl_episodes, 10, 10),
    }
    print(json.dumps(icl))

    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in projector.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file(state, tmp, metadata={"recipe": "training/train_projector.py", "seed": str(args.seed)})
    tmp.replace(args.out)
    log = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "curve": curve, "icl_validation": icl, "answer_words": words, "feature_seconds": round(feature_seconds, 1),
           "train_images": train_idx.tolist(), "val_images": val_idx.tolist(), "seconds": round(time.time() - t0, 1)}
    args.log.write_text(json.dumps(log))
    print(f"wrote {args.out} and {args.log} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
