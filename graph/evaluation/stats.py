"""Statistics for comparing arms on the same problems: Wilson intervals, exact McNemar, flips.

Accuracy is a binomial proportion, so its interval is Wilson's score interval (Wilson 1927;
recommended over the normal approximation by Brown, Cai & DasGupta 2001, "Interval
Estimation for a Binomial Proportion", Statistical Science 16(2)). Two arms scored on the
same problems are paired; only the discordant problems (one arm right, the other wrong)
carry information, and under "no difference" each discordant pair goes either way with
probability 1/2: the exact McNemar test is the two-sided binomial test on them
(McNemar 1947; Fagerland, Lydersen & Laake 2013, BMC Med Res Methodol 13:91).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Sequence

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for successes/n; (0, 1) when n = 0 (nothing is known)."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At p = 0 or 1 the bound equals 0 or 1 exactly; clamp the float rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2**n)  # exact, no float underflow
    return float(min(Fraction(1), 2 * tail))


@dataclass(frozen=True)
class Flips:
    """The paired 2x2 table of a baseline and an arm on the same problems."""

    right_right: int  # both right
    wrong_right: int  # baseline wrong, arm right (fixed)
    right_wrong: int  # baseline right, arm wrong (broken)
    wrong_wrong: int  # both wrong

    @property
    def n(self) -> int:
        return self.right_right + self.wrong_right + self.right_wrong + self.wrong_wrong

    def to_dict(self) -> dict:
        return asdict(self)


def flips(baseline: Sequence[bool], arm: Sequence[bool]) -> Flips:
    """Count the four cells for two verdict lists in the same problem order."""
    if len(baseline) != len(arm):
        raise ValueError(f"paired verdicts need equal lengths, got {len(baseline)} and {len(arm)}")
    pairs = list(zip(map(bool, baseline), map(bool, arm)))
    return Flips(
        right_right=pairs.count((True, True)),
        wrong_right=pairs.count((False, True)),
        right_wrong=pairs.count((True, False)),
        wrong_wrong=pairs.count((False, False)),
    )


@dataclass(frozen=True)
class PairedComparison:
    flips: Flips
    delta: float  # arm accuracy minus baseline accuracy
    p_value: float  # exact McNemar, two-sided

    def to_dict(self) -> dict:
        return {"flips": self.flips.to_dict(), "delta": self.delta, "p_value": self.p_value}


def compare(baseline: Sequence[bool], arm: Sequence[bool]) -> PairedComparison:
    """Paired comparison of an arm against a baseline scored on the same problems."""
    table = flips(baseline, arm)
    delta = (table.wrong_right - table.right_wrong) / table.n if table.n else 0.0
    return PairedComparison(table, delta, mcnemar_exact(table.wrong_right, table.right_wrong))
