"""Paired comparison of two conditions answered on the same test items.

Two memories answered on the same items differ only on the items where one is right and the other
wrong (the discordant items); the items both get right or both get wrong say nothing about which is
better. The sign test on the discordant items (McNemar's exact test) says how surprising the split is
if both were equally good: with 40 items, 3 lost and 0 won is p = 0.25, i.e. not evidence of a loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedComparison:
    lost: int  # items the reference answers right and the other condition wrong
    won: int  # items the other condition answers right and the reference wrong
    p_value: float  # exact two-sided sign test on the lost + won discordant items

    def describe(self) -> str:
        """e.g. '-3 +0 (p 0.25)'"""
        return f"-{self.lost} +{self.won} (p {self.p_value:.2g})"


def compare(reference: list[bool], other: list[bool]) -> PairedComparison:
    """Per-item correctness of the reference and another condition on the same items, in the same order."""
    if len(reference) != len(other):
        raise ValueError(f"paired items differ in number: {len(reference)} and {len(other)}")
    lost = sum(r and not o for r, o in zip(reference, other))
    won = sum(o and not r for r, o in zip(reference, other))
    return PairedComparison(lost, won, sign_test_p(lost, won))


def sign_test_p(lost: int, won: int) -> float:
    """Two-sided exact binomial test of lost vs won discordant items at p = 1/2: twice the smaller tail,
    capped at 1 (1.0 when there are none, or when they split evenly)."""
    n, k = lost + won, min(lost, won)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
