"""Write the bundled demo task from the Fashion-MNIST *test* split (the projector trains on the train split).

    apt-get install dataset-fashion-mnist
    python training/make_demo_task.py      # -> demos/ (100 demonstrations) and examples/fashion-bins/test/ (400)
    python training/make_demo_task.py --val-per-bin 30 --only-val   # -> examples/fashion-bins/val/ (300)

The validation folder (drawn after, and disjoint from, demos and test; demos/ and test/ stay as they
are) is what compile settings are tuned on; the test folder is for the final report only.

Task: a warehouse puts each kind of item into a bin; the bin codes are arbitrary, so only the
demonstrations tell them. The held-out folder uses the folder-per-answer layout (`<bin code>/<image>.png`); `demos/` has
the same layout plus a `demos.jsonl` that fixes a shuffled order (see below).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist import CLASSES, load_split, per_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Which bin does this item go to?"
# Fashion-MNIST class -> bin code (arbitrary: a model cannot guess these).
BINS = {
    "T-shirt": "K7", "trouser": "B3", "pullover": "R2", "dress": "D9", "coat": "M4",
    "sandal": "S6", "shirt": "H1", "sneaker": "T8", "bag": "W5", "ankle boot": "F0",
}
LICENCE = """Images: Fashion-MNIST (Zalando Research), MIT licence, test split, from the Debian package
`dataset-fashion-mnist`. Written by training/make_demo_task.py (seed {seed}): indices into the
test split are in the file names. Bin codes are made up for this example.
"""


def write(folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    for i in indices:
        code = BINS[CLASSES[labels[i]]]
        (folder / code).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(folder / code / f"fmnist-test-{i:05d}.png", optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demos-per-bin", type=int, default=10)
    ap.add_argument("--test-per-bin", type=int, default=40)
    ap.add_argument("--val-per-bin", type=int, default=0, help="also write examples/fashion-bins/val/")
    ap.add_argument("--only-val", action="store_true", help="write only the validation folder")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    images, labels = load_split("t10k")
    demo_idx = per_class(labels, args.demos_per_bin, rng)
    test_idx = per_class(labels, args.test_per_bin, rng, exclude=set(demo_idx.tolist()))
    demo_order = rng.permutation(demo_idx)  # demos.jsonl's order (see below)

    demos, test = ROOT / "demos", ROOT / "examples" / "fashion-bins" / "test"
    if args.val_per_bin:  # drawn after demos and test, so their draws do not change
        val_idx = per_class(labels, args.val_per_bin, rng, exclude=set(demo_idx.tolist()) | set(test_idx.tolist()))
        val = test.parent / "val"
        write(val, images, labels, val_idx)
        (val / "task.json").write_text(json.dumps({"question": QUESTION}) + "\n")
        print(f"wrote {len(val_idx)} validation images to {val}")
    if args.only_val:
        return
    write(demos, images, labels, demo_idx)
    # demos.jsonl in a seeded random order: the folder layout's round-robin order is periodic
    # (B3, D9, ..., W5, B3, ...), and a small LM then predicts the next bin in the cycle instead of
    # reading the image (measured: most answers became B3, the bin after the last demo's).
    lines = [{"image": f"{BINS[CLASSES[labels[i]]]}/fmnist-test-{i:05d}.png", "answer": BINS[CLASSES[labels[i]]]}
             for i in demo_order]
    (demos / "demos.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (demos / "task.json").write_text(json.dumps({"question": QUESTION}) + "\n")
    (demos / "LICENSE.txt").write_text(LICENCE.format(seed=args.seed))
    write(test, images, labels, test_idx)
    (test.parent / "LICENSE.txt").write_text(LICENCE.format(seed=args.seed))
    (test / "task.json").write_text(json.dumps({"question": QUESTION}) + "\n")
    print(f"wrote {len(demo_idx)} demos to {demos} and {len(test_idx)} held-out images to {test}")


if __name__ == "__main__":
    main()
