"""Accuracy vs kept fraction: an `emloc-edge eval --json` report's policies beside kvpress's presses
(`kvpress_peers.py --json`) on the same test items, one line each; a second panel shows each line
against its own path's full context (ours under ONNX Runtime, kvpress's under HF), which differ.

    python benchmarks/plot_peers.py --eval benchmarks/results/warehouse-text-eval.json \
        --peers benchmarks/results/kvpress-warehouse-text.json -o benchmarks/results/warehouse-text-peers.png

Several --eval reports (the same test items and backend) are merged: a later report's lines and
references replace an earlier one's of the same name, so a new policy's run can sit beside an older
run of the others.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes


DEFAULT_LINE = "emloc-context-int8"  # drawn thicker: the default policy, stored int8


def lines_from_eval(report: dict) -> tuple[dict[str, list], dict[str, float]]:
    """(policy line -> [(kept, accuracy)], reference name -> accuracy) of an eval report."""
    lines, references = defaultdict(list), {}
    for c in report["conditions"]:
        if c["line"] is None:
            references[c["name"]] = c["accuracy"]
        else:
            lines[c["line"]].append((c["kept_fraction"], c["accuracy"]))
    return lines, references


def lines_from_peers(peers: dict) -> tuple[dict[str, list], float | None]:
    """(kvpress press -> [(kept, accuracy)], its own full-context accuracy). Presses that mask per head
    (AdaKV, KVzip) get a second line at their dense size: each layer's heads padded to its largest."""
    lines, full = defaultdict(list), None
    for row in peers["rows"]:
        if row["press"] == "none":
            full = row["accuracy"]
            continue
        lines[f"kvpress {row['press']}"].append((row["kept_fraction"], row["accuracy"]))
        dense = row.get("dense_kept_fraction", row["kept_fraction"])
        if dense > row["kept_fraction"] + 1e-3:  # per-head masks: also where a dense per-layer cache lands
            lines[f"kvpress {row['press']}, dense size"].append((dense, row["accuracy"]))
    return lines, full


def shifted(lines: dict[str, list], reference: float) -> dict[str, list]:
    """The same lines with `reference` subtracted from every accuracy."""
    return {name: [(kept, acc - reference) for kept, acc in points] for name, points in lines.items()}


def draw(ax: "Axes", ours: dict[str, list], theirs: dict[str, list]) -> None:
    """Our policies as solid lines (the default thicker), kvpress's presses dashed (dense sizes dotted)."""
    for name, points in sorted(ours.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linewidth=2.2 if name.startswith(DEFAULT_LINE) else 1.4, label=name)
    colors = {}  # a press's dense-size line takes its press's colour
    for name, points in sorted(theirs.items()):
        xs, ys = zip(*sorted(points))
        press = name.split(",")[0]
        dense = name != press
        line, = ax.plot(xs, ys, marker="x" if dense else "s", linestyle=":" if dense else "--", linewidth=1.0,
                        label=name, color=colors.get(press))
        colors[press] = line.get_color()
    ax.grid(alpha=0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", required=True, type=Path, nargs="+", help="emloc-edge eval --json report(s)")
    ap.add_argument("--peers", required=True, type=Path, help="kvpress_peers.py --json result")
    ap.add_argument("-o", "--output", required=True, type=Path)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    reports, peers = [json.loads(p.read_text()) for p in args.eval], json.loads(args.peers.read_text())
    ours, references = {}, {}
    for report in reports:  # later reports win
        lines, refs = lines_from_eval(report)
        ours.update(lines)
        references.update(refs)
    if len({(r["test_items"], r["demos"], r["runtime"]["backend"], r["runtime"]["weights"]) for r in reports}) > 1:
        raise SystemExit("--eval reports must come from the same demos, test items and backend (runtime, weights)")
    theirs, peers_full = lines_from_peers(peers)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    our_full = references.get("full-context")
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.25, 1]})
    draw(ax, ours, theirs)
    if our_full is not None:
        ax.axhline(our_full, linestyle="-.", color="black", alpha=0.6, label=f"full context, ORT ({our_full:.3f})")
    if peers_full is not None:
        ax.axhline(peers_full, linestyle=":", color="black", alpha=0.6, label=f"full context, HF ({peers_full:.3f})")
    ax.set(xlabel="kept fraction of the context (mean over layers and heads)", ylabel="accuracy",
           ylim=(-0.03, 1.03), xlim=(0.05, 0.8),
           title=args.title or f"{reports[-1]['model']}: {reports[-1]['test_items']} test items, {reports[-1]['demos']} demos")
    ax.legend(loc="lower right", fontsize=7)
    if our_full is not None and peers_full is not None:
        # Each path against its own full context: ours answer under ORT (int8 weights), kvpress's under
        # HF; the two full contexts differ by an item or two, which the left panel's heights include.
        draw(gap, shifted(ours, our_full), shifted(theirs, peers_full))
        gap.axhline(0.0, linestyle="-.", color="black", alpha=0.6)
        gap.set(xlabel="kept fraction of the context", ylabel="accuracy − its own path's full context",
                xlim=(0.05, 0.8), ylim=(-0.35, 0.1), title="against each path's own full context (cut at −0.35)")
    else:
        gap.set_visible(False)
    fig.tight_layout()
    fig.savefig(args.output, format="png", dpi=120)
    plt.close(fig)
    print(args.output)


if __name__ == "__main__":
    main()
