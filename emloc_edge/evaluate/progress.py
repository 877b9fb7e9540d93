"""A tqdm bar over the scored queries (conditions × test items), on stderr, labelled with the stage."""
from __future__ import annotations

import sys


class TqdmProgress:
    """Implements `run.EvalProgress`; use as a context manager so the bar is closed on errors too."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.bar = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def begin(self, total: int) -> None:
        if not self.disable:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="query", desc="evaluating", file=sys.stderr, dynamic_ncols=True)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
