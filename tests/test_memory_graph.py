"""MemoryGraph: edges built from records, atomic saves, refusal of broken files."""

import json
from pathlib import Path

import pytest

from agents.errors import MemoryStoreError
from memory_store.graph import MemoryGraph, node_id
from memory_store.records import Episode, Rule, RuleSource


def _rule(**kw):
    base = dict(rule_id="r-1", text="carry the one", problem_id="p1", created_at=1.0, updated_at=1.0)
    return Rule(**{**base, **kw})


def _records():
    failure = Episode(problem_id="p1", problem_text="12 + 19?", verdict_before=False, rule_ids=["r-1"])
    other = Episode(problem_id="p2", problem_text="13 + 18?", verdict_before=True, similar_problems=["p1"])
    reeval = Episode(
        problem_id="p1",
        problem_text="12 + 19?",
        split="reeval",
        update_id="u1",
        verdict_before=False,
        verdict_after=True,
    )
    canary = Episode(
        problem_id="p2",
        problem_text="13 + 18?",
        split="canary",
        update_id="u1",
        verdict_before=True,
        verdict_after=False,
    )
    rule = _rule(
        episode_id=failure.episode_id,
        expert=3,
        update_id="u1",
        status="trained",
        merged_from=[RuleSource(problem_id="p3", episode_id=None, text="carry 1")],
    )
    return [rule], [failure, other, reeval, canary]


def test_edges_from_records():
    rules, episodes = _records()
    graph = MemoryGraph.from_records(rules, episodes)
    failure = episodes[0]
    rule_node, update_node = node_id("rule", "r-1"), node_id("update", "u1")
    assert graph.targets(node_id("episode", failure.episode_id), "failed_on") == ["p1"]
    assert graph.targets(node_id("episode", episodes[1].episode_id), "attempted") == ["p2"]
    assert graph.targets(node_id("episode", failure.episode_id), "produced") == ["r-1"]
    assert graph.targets(rule_node, "trained_into") == ["3"]
    assert graph.targets(rule_node, "trained_in") == ["u1"]
    assert graph.targets(rule_node, "from_problem") == ["p1", "p3"]
    assert graph.targets(update_node, "updated") == ["3"]
    assert graph.similar_problems("p1") == ["p2"] and graph.similar_problems("p2") == ["p1"]
    assert graph.fixed_by("u1") == ["p1"] and graph.broke_by("u1") == ["p2"]
    assert graph.rules_in_update("u1") == ["r-1"]
    assert graph.count_nodes() == {"problem": 3, "rule": 1, "expert": 1, "episode": 4, "update": 1}


def test_readding_an_episode_replaces_its_edges():
    rules, episodes = _records()
    graph = MemoryGraph.from_records(rules, episodes)
    reeval = episodes[2].model_copy(update={"verdict_after": False})  # judged again: not fixed after all
    graph.add_episode(reeval)
    assert graph.fixed_by("u1") == []
    assert graph.targets(node_id("episode", reeval.episode_id), "failed_on") == ["p1"]


def test_incremental_equals_rebuilt_in_any_order():
    rules, episodes = _records()
    incremental = MemoryGraph()
    incremental.add_rule(rules[0])
    for episode in reversed(episodes):
        incremental.add_episode(episode)
    assert incremental.same_as(MemoryGraph.from_records(rules, episodes))


def test_save_load_roundtrip(tmp_path):
    graph = MemoryGraph.from_records(*_records())
    path = tmp_path / "g.json"
    graph.save(path)
    assert MemoryGraph.load(path).same_as(graph)
    data = json.loads(path.read_text())
    assert data["graph"]["format"] == 1 and data["directed"] and data["multigraph"]


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "g.json"
    old = MemoryGraph.from_records(*_records())
    old.save(path)
    before = path.read_bytes()

    def crash(self, data):  # half the file reaches the disk, then the disk is full
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        MemoryGraph().save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]  # no temp file left behind


@pytest.mark.parametrize("content", ["{not json", '{"graph": {"format": 99}}', '{"graph": {"format": 1}}'])
def test_load_refuses_broken_files(tmp_path, content):
    path = tmp_path / "g.json"
    path.write_text(content)
    with pytest.raises(MemoryStoreError, match="g.json"):
        MemoryGraph.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(MemoryStoreError, match="does not exist"):
        MemoryGraph.load(tmp_path / "nope.json")
