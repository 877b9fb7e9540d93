"""The evaluation report: per-condition results, a plain table, one JSON object, an accuracy/memory plot."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import BadInputError
from ..textout import finite as _finite, human_size as _size


@dataclass
class ConditionResult:
    name: str
    correct: int
    total: int
    accuracy: float  # correct / total
    memory_bytes: int  # the memory saved as a file; 0 without one
    kept_tokens_per_layer: list[int]
    mean_kept_tokens_per_layer: float
    kept_fraction: float  # mean kept per layer / context tokens
    ms_per_query: float  # median wall time of one greedy answer
    js_to_full_context: float  # mean JS (nats) of the first-answer-token distribution to full context's
    compile_seconds: float
    settings: dict | None  # compile hyperparameters + precision (None: no memory)
    predictions: list[str] = field(default_factory=list)  # the decoded, stripped answer per test item
    correct_items: list[bool] = field(default_factory=list)


@dataclass
class EvalReport:
    model: str
    demos: int
    test_items: int
    context_tokens: int  # tokens of the whole demonstration conversation
    distinct_answers: int  # among the demos
    chance: float  # 1 / distinct_answers
    settings: dict
    conditions: list[ConditionResult]
    items: list[dict]  # question, answer, image of each test item

    def to_dict(self) -> dict:
        """One JSON-able object; non-finite numbers (delta = inf) become strings."""
        return _finite(dataclasses.asdict(self))

    def condition(self, name: str) -> ConditionResult:
        return next(c for c in self.conditions if c.name == name)

    def table(self) -> str:
        """Aligned plain-text table, one row per condition, then a line with chance and the setup."""
        head = ("condition", "accuracy", "memory", "kept/layer", "kept", "ms/query", "JS to full", "compile s")
        rows = [(c.name, f"{c.accuracy:.3f} ({c.correct}/{c.total})", _size(c.memory_bytes),
                 f"{c.mean_kept_tokens_per_layer:.1f}", f"{100 * c.kept_fraction:.1f}%", f"{c.ms_per_query:.1f}",
                 f"{c.js_to_full_context:.4f}", f"{c.compile_seconds:.2f}") for c in self.conditions]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        def line(row: tuple[str, ...]) -> str:  # names left-aligned, numbers right-aligned
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

        s = self.settings
        return "\n".join([
            line(head), *map(line, rows),
            f"chance {self.chance:.3f} (1/{self.distinct_answers} distinct answers); {self.demos} demos, "
            f"{self.test_items} test items, {self.context_tokens} context tokens; {self.model}; "
            f"delta {s['delta']}, ratios {','.join(map(str, s['ratios']))}, chunk size {s['chunk_size']}",
        ])

    def write_json(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), allow_nan=False, indent=2) + "\n"
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write_plot(self, path: str | Path) -> None:
        """Accuracy against memory size, one labelled point per condition, chance as a dashed line."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        try:
            points = [(c.name, c.memory_bytes / 1024, c.accuracy) for c in self.conditions]
            span = max(x for _, x, _ in points) or 1.0
            for k, (name, x, y) in enumerate(points):
                # equal-size conditions (emloc-int8, uniform-int8) land on one spot: stack their labels
                near = sum(abs(x - x2) < 0.08 * span and abs(y - y2) < 0.06 for _, x2, y2 in points[:k])
                ax.scatter([x], [y], s=36, zorder=3)
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5 + 11 * near), fontsize=9)
            ax.margins(x=0.18)
            ax.axhline(self.chance, linestyle="--", color="grey", label=f"chance ({self.chance:.2f})")
            ax.set(xlabel="memory size (KB)", ylabel="accuracy", ylim=(-0.03, 1.08),
                   title=f"{self.model}: {self.test_items} test items, {self.demos} demos")
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
            fig.tight_layout()
            atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        finally:
            plt.close(fig)


def check_output(path: Path, suffix: str | None = None, option: str = "") -> None:
    """Refuse an output path that cannot be written (a folder, a missing folder, a wrong suffix) up front."""
    where = f"{option} {path}".strip()
    if suffix is not None and path.suffix.lower() != suffix:
        raise BadInputError(f"{where}: expected a {suffix} file name")
    if path.is_dir():
        raise BadInputError(f"{where}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise BadInputError(f"{where}: output folder {path.parent} does not exist")


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """`write(tmp)` a temporary file next to `path`, then rename it over `path`; no partial file is left."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
