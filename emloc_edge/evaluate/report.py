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
from ..textout import comma_list, finite as _finite, human_size as _size
from .paired import PairedComparison


@dataclass
class ConditionResult:
    name: str
    line: str | None  # the plot line it belongs to: POLICY-PRECISION (None: zero-shot, full-context)
    correct: int
    total: int
    accuracy: float  # correct / total
    memory_bytes: int  # the memory saved as a file; 0 without one
    precision: str | None  # how the memory stores K/V (None: no memory)
    size_vs_full_context: float  # memory bytes / full-context's memory bytes
    weights: str  # the answering model's weights (the export's, or the torch dtype)
    kept_tokens_per_layer: list[int]
    mean_kept_tokens_per_layer: float
    kept_fraction: float  # mean kept per layer / context tokens
    ms_per_query: float  # median wall time of one greedy answer
    ttft_ms: float | None  # median time to first token (ort backend; None: not measured)
    tokens_per_s: float | None  # median decode speed after the first token (ort backend)
    js_to_full_context: float  # mean JS (nats) of the first-answer-token distribution to full context's
    compile_seconds: float
    settings: dict | None  # compile hyperparameters + precision (None: no memory)
    predictions: list[str] = field(default_factory=list)  # the decoded, stripped answer per test item
    correct_items: list[bool] = field(default_factory=list)
    # paired with full-context on the same items (None: full-context not evaluated, or this is it):
    lost_to_full_context: int | None = None  # items full-context answers right and this wrong
    won_over_full_context: int | None = None  # items this answers right and full-context wrong
    p_vs_full_context: float | None = None  # exact sign test on those discordant items (`paired.py`)


@dataclass
class EvalReport:
    model: str
    demos: int
    test_items: int
    context_tokens: int  # tokens of the whole demonstration conversation
    distinct_answers: int  # among the demos
    chance: float  # 1 / distinct_answers
    runtime: dict  # backend, weights, provider, compile_device (ort: threads, model_dir; torch: device)
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
        head = ("condition", "accuracy", "vs full", "memory", "stored", "of full", "kept/layer", "kept", "weights",
                "ms/query", "TTFT ms", "tok/s", "JS to full", "compile s")
        rows = [(c.name, f"{c.accuracy:.3f} ({c.correct}/{c.total})", _paired(c), _size(c.memory_bytes),
                 c.precision or "-", f"{100 * c.size_vs_full_context:.1f}%", f"{c.mean_kept_tokens_per_layer:.1f}",
                 f"{100 * c.kept_fraction:.1f}%", c.weights, f"{c.ms_per_query:.1f}", _opt(c.ttft_ms),
                 _opt(c.tokens_per_s), f"{c.js_to_full_context:.4f}", f"{c.compile_seconds:.2f}")
                for c in self.conditions]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(row: tuple[str, ...]) -> str:  # names left-aligned, numbers right-aligned
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

        s, r = self.settings, self.runtime
        where = f"{r['backend']} backend, {r['weights']} weights" + (f", {r['provider']} provider" if r.get("provider")
                                                                     else f", {r.get('device', 'cpu')}")
        return "\n".join([
            line(head), *map(line, rows),
            f"chance {self.chance:.3f} (1/{self.distinct_answers} distinct answers); {self.demos} demos, "
            f"{self.test_items} test items, {self.context_tokens} context tokens; {self.model}; {where}; "
            f"policy {s['policy']}, delta {s['delta']}, ratios {comma_list(s['ratios'])}, "
            f"chunk size {s['chunk_size']}" + (f", forced {s['forced']}" if s.get("forced") else ""),
        ])

    def write_json(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), allow_nan=False, indent=2) + "\n"
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write_plot(self, path: str | Path) -> None:
        """Accuracy against memory size (MB) and against kept fraction (one line per policy), as a PNG."""
        from .plot import draw

        atomic_write(Path(path), lambda tmp: draw(self, tmp))


def _paired(c: ConditionResult) -> str:
    """Items lost and won against full-context, with the sign test's p, e.g. '-3 +0 (p 0.25)'."""
    if c.lost_to_full_context is None:
        return "-"
    return PairedComparison(c.lost_to_full_context, c.won_over_full_context, c.p_vs_full_context).describe()


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


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
