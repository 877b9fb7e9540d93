"""`evaluate/paired.py`: items lost and won against a reference, and the exact sign test on them."""
from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given, strategies as st

from emloc_edge.evaluate.paired import compare, sign_test_p


def _as_extreme(lost: int, won: int) -> Fraction:
    """Brute force: the share of all 2^n splits of n discordant items at least as far from even as this one."""
    n = lost + won
    far = abs(lost - won)
    splits = list(itertools.product((0, 1), repeat=n))
    return Fraction(sum(abs(2 * sum(s) - n) >= far for s in splits), len(splits))


@given(st.integers(0, 7), st.integers(0, 7))
def test_sign_test_is_the_exact_two_sided_binomial_test(lost, won):
    p = sign_test_p(lost, won)
    assert p == pytest.approx(float(_as_extreme(lost, won)), abs=1e-12)
    assert p == sign_test_p(won, lost)  # two-sided: which side lost does not matter
    assert 0.0 < p <= 1.0


@given(st.integers(0, 30), st.integers(0, 30))
def test_a_more_lopsided_split_is_less_likely(lost, won):
    if lost >= won:
        assert sign_test_p(lost + 1, won) <= sign_test_p(lost, won)


def test_known_values():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(2, 2) == 1.0
    assert sign_test_p(3, 0) == 0.25  # 40 items, 3 lost, none won: not evidence of a loss
    assert sign_test_p(6, 0) == pytest.approx(1 / 32)
    assert compare([True] * 3 + [False], [False] * 3 + [True]).describe() == "-3 +1 (p 0.62)"


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60))
def test_compare_counts_the_discordant_items(pairs):
    reference, other = [r for r, _ in pairs], [o for _, o in pairs]
    c = compare(reference, other)
    assert c.lost == sum(r and not o for r, o in pairs) and c.won == sum(o and not r for r, o in pairs)
    assert c.won - c.lost == sum(other) - sum(reference)
    assert c.p_value == sign_test_p(c.lost, c.won)


def test_compare_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="differ in number: 2 and 1"):
        compare([True, False], [True])
