"""The canary gate's tests: the margin, and the binomial test weighed by each problem's samples."""

import itertools
import math
from dataclasses import astuple

import pytest

from graph.canary import (
    CanaryVerdict,
    canary_entry,
    canary_regressed,
    chance_of_breaking,
    check_canary_settings,
    tail_at_least,
    trained_break_undoes,
    unused_canary_settings,
)


def _brute_tail(chances, k):
    """P(X >= k) by summing over every outcome of the trials."""
    total = 0.0
    for outcome in itertools.product((0, 1), repeat=len(chances)):
        if sum(outcome) >= k:
            total += math.prod(p if o else 1 - p for p, o in zip(chances, outcome))
    return total


@pytest.mark.parametrize("chances", [[0.5], [0.125, 0.25, 0.875], [0.1, 0.2, 0.3, 0.4, 0.9, 0.05], []])
def test_the_tail_equals_the_sum_over_every_outcome(chances):
    for k in range(len(chances) + 2):
        assert tail_at_least(chances, k) == pytest.approx(_brute_tail(chances, k), abs=1e-12), k


def test_the_chance_of_breaking_is_laplaces_rule_over_the_samples():
    assert chance_of_breaking(1.0, 6) == 1 / 8  # every sample right: (0 + 1) / (6 + 2)
    assert chance_of_breaking(5 / 6, 6) == 2 / 8
    assert chance_of_breaking(0.0, 6) == 7 / 8  # right greedily by luck
    assert chance_of_breaking(1.0, 0) == 1 / 2  # nothing sampled: nothing known


def _canary(*shares, samples=6):
    return [{"id": f"c{i}", "share": s, "samples": samples} for i, s in enumerate(shares)]


def test_the_margin_test_allows_its_share_of_broken_problems():
    canary = _canary(1.0, 1.0, 1.0, 1.0)
    assert canary_regressed("margin", canary, [], margin=0.0, alpha=0.05) == CanaryVerdict(False, None)
    assert canary_regressed("margin", canary, ["c0"], margin=0.0, alpha=0.05) == CanaryVerdict(True, None)
    assert canary_regressed("margin", canary, ["c0"], margin=0.25, alpha=0.05) == CanaryVerdict(False, None)
    assert canary_regressed("margin", canary, ["c0", "c1"], margin=0.25, alpha=0.05) == CanaryVerdict(True, None)
    assert canary_regressed("margin", [], [], margin=0.0, alpha=0.05) == CanaryVerdict(False, None)


def test_the_binomial_test_undoes_only_breaks_unlikely_by_chance():
    # Problems right by luck (no sample right): three of four breaking is what chance predicts.
    lucky = _canary(0.0, 0.0, 0.0, 0.0)
    regressed, p = astuple(canary_regressed("binomial", lucky, ["c0", "c1", "c2"], margin=0.0, alpha=0.05))
    assert not regressed and p == pytest.approx(_brute_tail([7 / 8] * 4, 3))
    # Problems every sample solved: three of four breaking is not chance.
    firm = _canary(1.0, 1.0, 1.0, 1.0)
    regressed, p = astuple(canary_regressed("binomial", firm, ["c0", "c1", "c2"], margin=0.0, alpha=0.05))
    assert regressed and p == pytest.approx(_brute_tail([1 / 8] * 4, 3)) and p < 0.05
    # One firm problem broken alone stays above the level (p = 1 - (7/8)^4), unless the level is high.
    assert canary_regressed("binomial", firm, ["c0"], margin=0.0, alpha=0.05).regressed is False
    assert canary_regressed("binomial", firm, ["c0"], margin=0.0, alpha=0.5).regressed is True
    # Nothing broken is never a regression, whatever the level.
    assert canary_regressed("binomial", firm, [], margin=0.0, alpha=0.99) == CanaryVerdict(False, 1.0)


def test_the_binomial_test_has_little_power_over_a_small_canary():
    # Every sample right still leaves a chance of 1/8 with 6 samples: of a canary of 4 such
    # problems, 3 must break before the default level of 0.05 undoes the update.
    firm = _canary(1.0, 1.0, 1.0, 1.0)
    assert not canary_regressed("binomial", firm, ["c0", "c1"], margin=0.0, alpha=0.05).regressed
    assert canary_regressed("binomial", firm, ["c0", "c1", "c2"], margin=0.0, alpha=0.05).regressed


def test_the_binomial_test_refuses_a_canary_without_its_samples():
    with pytest.raises(ValueError, match="canary problem c0 has no record of its first try's samples"):
        canary_regressed("binomial", [{"id": "c0"}], ["c0"], margin=0.0, alpha=0.05)


def test_an_unknown_canary_test_is_refused():
    with pytest.raises(ValueError, match="canary_test must be one of margin, binomial; got 'vote'"):
        canary_regressed("vote", _canary(1.0), ["c0"], margin=0.0, alpha=0.05)


def test_a_canary_entry_keeps_how_firmly_its_samples_were_right():
    values = {"problem": {"id": "p", "question": "q?", "label": "3"}, "target": "3", "verified_share": 0.5,
              "samples": [{}, {}, {}, {}]}
    assert canary_entry(values) == {"id": "p", "question": "q?", "label": "3", "share": 0.5, "samples": 4}


def _firm(problem_id: str, share: float) -> dict:
    return {"id": problem_id, "question": "q", "label": "1", "share": share, "samples": 6}


def test_a_trained_problem_broken_undoes_its_update_by_one_rule_for_both_gates():
    two_firm = [_firm("a", 1.0), _firm("b", 1.0)]  # each breaks by chance 1/8: both, 1/64
    assert not trained_break_undoes("margin", [], alpha=0.05, in_canary=False)
    assert trained_break_undoes("margin", [_firm("a", 0.0)], alpha=0.05, in_canary=True)  # any break, either gate
    assert trained_break_undoes("margin", [_firm("a", 0.0)], alpha=0.05, in_canary=False)
    # Binomial: within the round's canary it is weighed there already; alone it is a canary of its own.
    assert not trained_break_undoes("binomial", two_firm, alpha=0.05, in_canary=True)
    assert trained_break_undoes("binomial", two_firm, alpha=0.05, in_canary=False)
    assert not trained_break_undoes("binomial", two_firm[:1], alpha=0.05, in_canary=False)  # p = 1/8
    assert trained_break_undoes("binomial", two_firm[:1], alpha=0.2, in_canary=False)


def test_the_canary_settings_are_checked_in_one_place():
    check_canary_settings(4, 0.0, "binomial", 0.05)
    for args, message in [((-1, 0.0, "margin", 0.05), "canary_size must be >= 0"),
                          ((4, 1.5, "margin", 0.05), "canary_margin must be in"),
                          ((4, 0.0, "sometimes", 0.05), "canary_test must be one of"),
                          ((4, 0.0, "binomial", 1.0), "canary_alpha must be in")]:
        with pytest.raises(ValueError, match=message):
            check_canary_settings(*args)


def test_each_test_names_the_setting_it_never_reads():
    assert unused_canary_settings("margin") == ("canary_alpha",)
    assert unused_canary_settings("binomial") == ("canary_margin",)
