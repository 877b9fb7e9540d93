"""Layer budget policies: how many of a chunk's tokens each layer keeps.

A policy sees a chunk through the narrow `ChunkSearch` protocol: it may measure the output divergence
of a candidate keep count for a layer (`try_keep`) and must settle every layer once (`settle`). The
chunk driver never branches on the policy type; policies are selected by name from `POLICIES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..errors import BadInputError


class ChunkSearch(Protocol):
    num_layers: int

    def keep_count(self, ratio: float) -> int: ...

    def try_keep(self, layer: int, count: int) -> float:
        """Prune `layer` to its `count` best tokens (higher layers as settled) and return the final-output JS."""

    def settle(self, layer: int, count: int, ratio: float, js: float | None) -> None:
        """Fix `layer` at its `count` best tokens."""


class LayerBudgetPolicy(Protocol):
    name: ClassVar[str]

    def decide(self, search: ChunkSearch) -> None: ...


@dataclass
class GreedyTopDown:
    """EMLoC: layers from the top down; for each, the smallest ratio whose output stays within delta.

    The test is cumulative: a candidate is judged with every higher layer already pruned as decided,
    and the hidden states entering a layer depend only on the (not yet pruned) layers below it.
    A layer where no ratio passes keeps the whole chunk.
    """

    name: ClassVar[str] = "emloc"
    delta: float = 0.005
    ratios: tuple[float, ...] = (0.1, 0.2, 0.5)

    def decide(self, search: ChunkSearch) -> None:
        for layer in reversed(range(search.num_layers)):
            # JS is never negative: with delta < 0 no candidate can pass, so none is measured.
            for ratio in self.ratios if self.delta >= 0 else ():
                js = search.try_keep(layer, search.keep_count(ratio))
                if js <= self.delta:
                    search.settle(layer, search.keep_count(ratio), ratio, js)
                    break
            else:
                search.settle(layer, search.keep_count(1.0), 1.0, None)


@dataclass
class UniformRatio:
    """Baseline (SnapKV-style): the same scores, one fixed ratio in every layer, no divergence test."""

    name: ClassVar[str] = "uniform"
    ratio: float = 0.2

    def decide(self, search: ChunkSearch) -> None:
        for layer in range(search.num_layers):
            search.settle(layer, search.keep_count(self.ratio), self.ratio, None)


POLICIES: dict[str, type] = {p.name: p for p in (GreedyTopDown, UniformRatio)}


def validate_ratios(ratios: tuple[float, ...]) -> tuple[float, ...]:
    if not ratios or any(not (0.0 < r <= 1.0) or math.isnan(r) for r in ratios):
        raise BadInputError(f"ratios: keep ratios must be in (0, 1], got {list(ratios)}", parameters="ratios")
    return tuple(sorted(set(ratios)))
