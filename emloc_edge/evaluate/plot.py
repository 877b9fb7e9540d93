"""The eval plot: accuracy against memory size in MB (a labelled point per condition), and accuracy
against kept fraction with one line per policy and precision (what --sweep fills in), zero-shot, full
context and chance as horizontal references."""
from __future__ import annotations

from collections import defaultdict

MB = 1024 * 1024
REFERENCE_STYLES = {"zero-shot": ":", "full-context": "-."}
KEPT_RANGE = (0.1, 0.6)  # the kept fractions that matter for a task memory (issue 8, goal 4)


def draw(report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (by_size, by_kept) = plt.subplots(1, 2, figsize=(12.0, 4.6))
    try:
        _by_size(by_size, report)
        _by_kept(by_kept, report)
        r = report.runtime
        fig.suptitle(f"{report.model}: {report.test_items} test items, {report.demos} demos "
                     f"({r['backend']}, {r['weights']} weights)", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
    finally:
        plt.close(fig)


def _by_size(ax, report) -> None:
    points = [(c.name, c.memory_bytes / MB, c.accuracy) for c in report.conditions if "@" not in c.name]
    span = max(x for _, x, _ in points) or 1.0
    for k, (name, x, y) in enumerate(points):
        # equal-size conditions (emloc-int8, uniform-int8) land on one spot: stack their labels
        near = sum(abs(x - x2) < 0.08 * span and abs(y - y2) < 0.06 for _, x2, y2 in points[:k])
        ax.scatter([x], [y], s=36, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5 + 11 * near), fontsize=8)
    swept = [(c.memory_bytes / MB, c.accuracy) for c in report.conditions if "@" in c.name]
    if swept:  # --sweep points: unlabelled here, a line per policy in the kept-fraction panel
        ax.scatter(*zip(*swept), s=14, color="grey", alpha=0.7, zorder=2, label="swept settings")
    ax.margins(x=0.18)
    ax.axhline(report.chance, linestyle="--", color="grey", label=f"chance ({report.chance:.2f})")
    ax.set(xlabel="memory size (MB)", ylabel="accuracy", ylim=(-0.03, 1.08), title="accuracy vs memory file size")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _by_kept(ax, report) -> None:
    lines = defaultdict(list)
    for c in report.conditions:
        if c.line is None:  # zero-shot, full-context: references, drawn across
            ax.axhline(c.accuracy, linestyle=REFERENCE_STYLES.get(c.name, "-."), color="black", alpha=0.6,
                       label=f"{c.name} ({c.accuracy:.2f})")
        else:
            lines[c.line].append((c.kept_fraction, c.accuracy))
    for name, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(report.chance, linestyle="--", color="grey", label=f"chance ({report.chance:.2f})")
    kept = [x for points in lines.values() for x, _ in points]
    lo, hi = min([KEPT_RANGE[0], *kept]), max([KEPT_RANGE[1], *kept])
    ax.set(xlabel="kept fraction of the context (mean over layers)", ylabel="accuracy", ylim=(-0.03, 1.08),
           xlim=(lo - 0.03, hi + 0.03), title="accuracy vs kept fraction")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
