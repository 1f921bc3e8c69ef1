"""The canary gate's test: did an update break more of the canary than chance would?

Two tests, chosen by ``LoopConfig.canary_test``:

- ``margin``: the canary's accuracy may drop by at most ``canary_margin``; at 0, any broken
  problem undoes the update.
- ``binomial``: each canary problem was right greedily at its first try, and its sampled answers
  then say how firmly: one whose greedy answer was right while most samples were wrong is
  re-rolled by any change of the weights, not forgotten. Each problem's chance of breaking by
  chance is estimated from its samples by Laplace's rule of succession, (wrong + 1) / (samples + 2),
  and the update is undone when at least as many breaks as seen have a probability below
  ``canary_alpha`` under those chances: the upper tail of a Poisson-binomial distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from graph.state import CanaryData

CANARY_TESTS = ("margin", "binomial")


def unused_canary_settings(test: str) -> tuple[str, ...]:
    """The canary settings a test never reads: a run may change them on resume."""
    return {"margin": ("canary_alpha",), "binomial": ("canary_margin",)}.get(test, ())


def check_canary_settings(size: int, margin: float, test: str, alpha: float) -> None:
    """ValueError naming the first canary setting out of range (the loop's and the evaluation's)."""
    if size < 0:
        raise ValueError(f"canary_size must be >= 0, got {size}")
    if not 0 <= margin <= 1:
        raise ValueError(f"canary_margin must be in [0, 1], got {margin}")
    if test not in CANARY_TESTS:
        raise ValueError(f"canary_test must be one of {', '.join(CANARY_TESTS)}; got {test!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"canary_alpha must be in (0, 1), got {alpha}")


def canary_entry(values: dict) -> CanaryData:
    """A loop state's problem, right at its first try, as a canary: its label (label-free: the
    confident majority) and how firmly its samples were right then, which the binomial test weighs."""
    problem = values["problem"]
    return {"id": problem["id"], "question": problem["question"], "label": values["target"],
            "share": values.get("verified_share", 0.0), "samples": len(values.get("samples") or [])}


def chance_of_breaking(share: float, samples: int) -> float:
    """Laplace's rule of succession for a problem right greedily with ``share`` of ``samples`` samples also right."""
    wrong = samples - round(share * samples)
    return (wrong + 1) / (samples + 2)


def tail_at_least(chances: Sequence[float], k: int) -> float:
    """P(X >= k) for X the number of successes of independent trials with the given chances.

    The distribution by the textbook recursion over trials (Poisson-binomial; e.g. Hong 2013,
    Computational Statistics & Data Analysis 59, section 2), exact up to float rounding.
    """
    if k <= 0:
        return 1.0
    dist = [1.0]  # dist[j] = P(j successes among the trials so far)
    for p in chances:
        dist = [(dist[j] if j < len(dist) else 0.0) * (1 - p) + (dist[j - 1] * p if j else 0.0)
                for j in range(len(dist) + 1)]
    return min(1.0, sum(dist[k:]))


@dataclass(frozen=True)
class CanaryVerdict:
    regressed: bool  # the update (or round) is to be undone
    p_value: float | None  # the binomial test's P(at least this many breaks by chance); None under margin


def canary_regressed(test: str, canary: Sequence[CanaryData], broke: Sequence[str], *, margin: float,
                     alpha: float) -> CanaryVerdict:
    """Whether the broken canary problems undo the update, by the margin or the binomial test.

    Under the binomial test each canary entry must carry the ``share`` of its samples that
    verified at its first try and how many ``samples`` there were (``canary_entry``).
    """
    if not canary:
        return CanaryVerdict(False, None)
    if test == "margin":
        return CanaryVerdict(len(broke) / len(canary) > margin, None)
    if test != "binomial":
        raise ValueError(f"canary_test must be one of {', '.join(CANARY_TESTS)}; got {test!r}")
    missing = [c["id"] for c in canary if "share" not in c or "samples" not in c]
    if missing:
        raise ValueError(f"canary problem {missing[0]} has no record of its first try's samples; "
                         "the binomial canary test needs one")
    p_value = tail_at_least([chance_of_breaking(c["share"], c["samples"]) for c in canary], len(broke))
    return CanaryVerdict(bool(broke) and p_value < alpha, p_value)


def trained_break_undoes(test: str, broken: Sequence[CanaryData], *, alpha: float, in_canary: bool) -> bool:
    """Whether breaking problems an update trained on, each right at its first try, undoes it by itself.

    The one rule of both gates. The margin test undoes at any such break. The binomial test weighs
    the broken problems by their samples: within the canary when they are part of it (the round
    gate, whose canary holds the round's problems: nothing more to decide here), else as a canary
    of their own (the episode gate's rollback node).
    """
    if not broken:
        return False
    if test == "margin":
        return True
    if in_canary:
        return False
    return canary_regressed(test, broken, [c["id"] for c in broken], margin=0.0, alpha=alpha).regressed
