"""MemoryConfig: defaults, the feature size contract with the router, and loud validation."""

import pytest

from memory_store.config import MemoryConfig


def test_defaults_and_feature_dim(tmp_path):
    config = MemoryConfig(run_dir=tmp_path)
    assert config.embedded and config.n_experts == 16
    assert config.feature_dim == config.embed_dim + config.n_experts == 400
    assert MemoryConfig(run_dir=tmp_path, embed_dim=8, n_experts=3).feature_dim == 11
    assert config.memory_dir == tmp_path / "memory"
    assert config.rules_collection == "rules" and config.episodes_collection == "episodes"


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"dedup_threshold": 1.5}, "1.5"),
        ({"similar_threshold": 0.0}, "similar_threshold"),
        ({"url": "ftp://host:1"}, "ftp://host:1"),
        ({"url": "http://host:notaport"}, "notaport"),
        ({"n_experts": 0}, "n_experts"),
        ({"k": 0}, "k must be"),
        ({"collection_prefix": "-bad"}, "-bad"),
        ({"prior_smoothing": 0.0}, "prior_smoothing"),
        ({"run_dir": ""}, "run_dir"),
    ],
)
def test_bad_values_name_themselves(tmp_path, bad, fragment):
    kwargs = {"run_dir": tmp_path, **bad}
    with pytest.raises(ValueError, match=fragment):
        MemoryConfig(**kwargs)


def test_server_url_accepted(tmp_path):
    config = MemoryConfig(run_dir=tmp_path, url="http://127.0.0.1:8123")
    assert not config.embedded
