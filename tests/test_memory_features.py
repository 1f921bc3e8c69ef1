"""Router memory features from neighbours: fixed size, normalised parts, a prior that learns."""

import numpy as np
import pytest

from memory_store.config import MemoryConfig
from memory_store.features import compute_features, empty_features, episode_neighbour, rule_neighbour
from memory_store.records import Episode, Rule


@pytest.fixture
def config(tmp_path):
    return MemoryConfig(run_dir=tmp_path, embed_dim=4, n_experts=3, n_rules=1)


def _rule(expert, helped=0, hurt=0, status="trained"):
    return Rule(
        rule_id=f"r-{expert}-{status}",
        text=f"rule for expert {expert}",
        problem_id="p",
        expert=expert,
        status=status,
        helped=helped,
        hurt=hurt,
        created_at=0.0,
        updated_at=0.0,
    )


def test_empty_history_is_zero_and_uniform(config):
    features = empty_features(config)
    assert features.vector.shape == (config.feature_dim,) and features.vector.dtype == np.float32
    assert not features.vector.any()
    np.testing.assert_allclose(features.prior, np.full(3, 1 / 3), rtol=1e-6)
    assert features.rules == []


def test_weighted_mean_histogram_and_prior(config):
    solved = Episode(
        problem_id="a", problem_text="a", verdict_before=False, verdict_after=True, expert_weights=[0, 2, 2]
    )
    unsolved = Episode(problem_id="b", problem_text="b", verdict_before=False, expert_weights=[1, 0, 0])
    neighbours = [
        episode_neighbour(solved, np.array([1.0, 0, 0, 0]), 0.9, 3),
        episode_neighbour(unsolved, np.array([0, 1.0, 0, 0]), 0.3, 3),
        rule_neighbour(_rule(2, helped=3, hurt=1), np.array([0, 0, 1.0, 0]), 0.6, 3),
    ]
    top = [(_rule(2, helped=3, hurt=1), 0.6), (_rule(0, status="retired"), 0.5)]
    features = compute_features(config, neighbours, top, ["e1", "e2"])
    assert features.vector.shape == (config.feature_dim,)
    np.testing.assert_allclose(features.vector[:4], np.array([0.9, 0.3, 0.6, 0]) / 1.8, rtol=1e-6)
    histogram = features.vector[4:]
    # usage: solved [0, .5, .5] * .9, unsolved [1, 0, 0] * .3, rule one-hot(2) * .6, over 1.8
    np.testing.assert_allclose(histogram, np.array([0.3, 0.45, 1.05]) / 1.8, rtol=1e-6)
    assert histogram.sum() == pytest.approx(1.0)
    # counts: solved gives .45 to experts 1 and 2; the rule gives .6 * 3/4 = .45 to expert 2
    np.testing.assert_allclose(features.prior, (np.array([0, 0.45, 0.9]) + 1) / (1.35 + 3), rtol=1e-6)
    assert features.prior.sum() == pytest.approx(1.0)
    assert features.rules == ["rule for expert 2"]  # retired rules are not offered; n_rules=1


def test_unknown_experts_leave_histogram_zero(config):
    episode = Episode(problem_id="a", problem_text="a", verdict_before=True)
    features = compute_features(config, [episode_neighbour(episode, np.ones(4), 0.5, 3)], [], ["e"])
    assert not features.vector[4:].any()
    np.testing.assert_allclose(features.prior, np.full(3, 1 / 3), rtol=1e-6)
