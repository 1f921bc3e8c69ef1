"""Wilson intervals, exact McNemar and flip tables against published and hand-computed values."""

import math

import pytest

from graph.evaluation.stats import compare, flips, mcnemar_exact, wilson_interval

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat Med 17:857,
# Table II, method 3 (Wilson score, no continuity correction), 95%.
NEWCOMBE = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
]


@pytest.mark.parametrize("k,n,low,high", NEWCOMBE)
def test_wilson_matches_newcombe_table(k, n, low, high):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(low, abs=5e-5) and got[1] == pytest.approx(high, abs=5e-5)


def test_wilson_edges_by_hand():
    z2 = 1.959963984540054**2
    # k = 0: the interval is [0, z^2 / (n + z^2)]; k = n mirrors it.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2)), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(5, 10)
    assert low + high == pytest.approx(1.0) and low == pytest.approx(0.2366, abs=5e-5)  # symmetric around 1/2
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


@pytest.mark.parametrize("b,c,p", [
    (1, 6, 16 / 128),  # 2 * (C(7,0) + C(7,1)) / 2^7
    (0, 5, 2 / 32),  # 2 * C(5,0) / 2^5
    (2, 10, 2 * (1 + 12 + 66) / 4096),  # 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12
    (10, 2, 2 * (1 + 12 + 66) / 4096),  # symmetric in b and c
    (3, 3, 1.0),  # capped at 1
    (0, 0, 1.0),  # no discordant pair: no evidence
])
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_agrees_with_scipy_and_survives_large_counts():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(4, 9), (17, 30), (0, 1), (25, 25)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)
    p = mcnemar_exact(0, 2000)  # 2 / 2^2000: exact arithmetic, no overflow; the float underflows to 0
    assert 0.0 <= p < 1e-300 and not math.isnan(p)


def test_flips_and_paired_comparison():
    frozen = [True, True, False, False, False, True]
    arm = [True, False, True, True, False, True]
    table = flips(frozen, arm)
    assert (table.right_right, table.wrong_right, table.right_wrong, table.wrong_wrong) == (2, 2, 1, 1)
    assert table.n == 6
    result = compare(frozen, arm)
    assert result.delta == pytest.approx((4 - 3) / 6)
    assert result.p_value == pytest.approx(1.0)  # b=2, c=1: 2 * (1 + 3) / 8 capped at 1
    with pytest.raises(ValueError, match="equal lengths"):
        flips([True], [True, False])
