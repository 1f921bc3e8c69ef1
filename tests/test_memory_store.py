"""MemoryStore against embedded Chroma and a real Chroma server started for this module.

Most tests run in both modes (the ``config`` fixture is parametrised); the lock and snapshot
tests are about the embedded store's files and run embedded only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from chromadb.api.client import SharedSystemClient
from chromadb.utils.embedding_functions import register_embedding_function

from agents.errors import MemoryStoreError
from memory_store.config import MemoryConfig
from memory_store.embedding import HashEmbedding
from memory_store.errors import BadFilterError, ReadOnlyError, UnknownIdError, WriterLockedError
from memory_store.graph_file import GRAPH_FILE
from memory_store.records import Episode, NewRule
from memory_store.server import free_port, local_chroma_server
from memory_store.store import MemoryStore

REPO = Path(__file__).resolve().parents[1]
N_EXPERTS = 4
SERVER_START_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """A real `chroma run` on a free localhost port for this module; yields its URL."""
    with local_chroma_server(tmp_path_factory.mktemp("chroma-server"), start_timeout_s=SERVER_START_TIMEOUT_S) as url:
        yield url


@pytest.fixture(autouse=True)
def _isolated_chroma():
    yield
    SharedSystemClient.clear_system_cache()


@pytest.fixture(params=["embedded", "server"])
def config(request, tmp_path):
    url = request.getfixturevalue("chroma_server") if request.param == "server" else None
    # One server serves the whole module: a fresh collection prefix keeps tests apart.
    return MemoryConfig(
        run_dir=tmp_path / "run", url=url, collection_prefix=f"t{uuid.uuid4().hex[:10]}_", n_experts=N_EXPERTS
    )


@pytest.fixture
def embedded_config(tmp_path):
    return MemoryConfig(run_dir=tmp_path / "run", n_experts=N_EXPERTS)


def _open(config, **kwargs) -> MemoryStore:
    return MemoryStore.open(config, embedder=HashEmbedding(), **kwargs)


def _run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _fill(store: MemoryStore) -> dict[str, str]:
    """A small history: a failure, its rule, a training update, a re-evaluation and a canary."""
    failure = Episode(
        problem_id="p-apples",
        problem_text="Tom has 3 apples and buys 2 more. How many apples does he have?",
        verdict_before=False,
        expert_weights=[0.7, 0.1, 0.1, 0.1],
        cycle=1,
    )
    store.add_episode(failure)
    rule_id, merged = store.add_rule(
        "When items are bought, add them to the starting count.",
        problem_id="p-apples",
        episode_id=failure.episode_id,
        cycle=1,
    )
    assert not merged
    store.add_episode(failure.model_copy(update={"rule_ids": [rule_id]}))
    store.record_training(rule_id, expert=2, update_id="u-1", prompts=["Ann has 5 pens and buys 4 more. How many?"])
    store.add_episode(
        Episode(
            problem_id="p-apples",
            problem_text=failure.problem_text,
            split="reeval",
            update_id="u-1",
            cycle=1,
            verdict_before=False,
            verdict_after=True,
            expert_weights=[0.0, 0.0, 1.0, 0.0],
        )
    )
    store.add_episode(
        Episode(
            problem_id="p-trains",
            problem_text="A train leaves at 3 pm at 60 km/h. When does it arrive 120 km away?",
            split="canary",
            update_id="u-1",
            cycle=1,
            verdict_before=True,
            verdict_after=False,
        )
    )
    store.record_outcome(rule_id, helped=True)
    other_id, _ = store.add_rule("Convert every speed to the same units first.", problem_id="p-trains", cycle=1)
    return {"rule": rule_id, "other": other_id, "failure": failure.episode_id}


# -- persistence --------------------------------------------------------------------------


def test_persistence_across_reopen(config):
    with _open(config) as store:
        ids = _fill(store)
        rules_before = store.list_rules()
        episodes_before = store.list_episodes()
        graph_before = store.graph
    with _open(config) as store:
        assert store.list_rules() == rules_before
        assert store.list_episodes() == episodes_before
        assert store.get_rule(ids["rule"]).helped == 1
        assert store.graph.same_as(graph_before)
        stats = store.stats()
        assert (stats.n_rules, stats.n_episodes, stats.mode) == (2, 3, config.embedded and "embedded" or "server")


def test_writes_after_reopen_keep_counting(config):
    with _open(config) as store:
        rule_id, _ = store.add_rule("Check the units.", problem_id="p1")
        store.record_outcome(rule_id, helped=False)
    with _open(config) as store:
        store.record_outcome(rule_id, helped=False)
        store.record_retrieved([rule_id, rule_id])
        rule = store.get_rule(rule_id)
        assert (rule.hurt, rule.retrieved, rule.outcome) == (2, 2, "hurt")


# -- dedup --------------------------------------------------------------------------------


def test_dedup_merges_near_duplicates(config):
    with _open(config) as store:
        first, merged = store.add_rule("Always convert minutes to hours before dividing.", problem_id="p1", cycle=1)
        assert not merged
        again, merged = store.add_rule("  always convert MINUTES to hours before dividing. ", problem_id="p2")
        assert (again, merged) == (first, True)  # same normalised text
        near, merged = store.add_rule("Always convert minutes to hours before dividing!", problem_id="p3")
        assert (near, merged) == (first, True)  # cosine 1 under the hash embedder
        other, merged = store.add_rule("Read the question twice and list the given numbers.", problem_id="p4")
        assert other != first and not merged
        rule = store.get_rule(first)
        assert [s.problem_id for s in rule.merged_from] == ["p2", "p3"]
        assert rule.text == "Always convert minutes to hours before dividing."
        assert store.stats().n_rules == 2
        # Re-adding the very same source is idempotent.
        store.add_rule("Always convert minutes to hours before dividing!", problem_id="p3")
        assert len(store.get_rule(first).merged_from) == 2


def test_dedup_threshold_is_configurable(config):
    strict = MemoryConfig(**{**config.to_dict(), "dedup_threshold": 1.0})
    base = np.ones(strict.embed_dim, dtype=np.float32)
    tilted = base.copy()
    tilted[0] = 1.5  # cosine to base ~0.9997
    with _open(strict) as store:
        a, _ = store.add_rule("rule a", problem_id="p1", embedding=base)
        b, merged = store.add_rule("rule b", problem_id="p2", embedding=tilted)
        assert a != b and not merged
    loose = MemoryConfig(**{**config.to_dict(), "dedup_threshold": 0.99})
    with _open(loose) as store:
        c, merged = store.add_rule("rule c", problem_id="p3", embedding=tilted * 2)
        assert merged and c == b  # nearest stored rule wins


def test_batch_add_dedups_within_the_batch(config):
    with _open(config) as store:
        results = store.add_rules(
            [
                NewRule(text="Sum the parts.", problem_id="p1"),
                NewRule(text="sum the parts.", problem_id="p2"),
                NewRule(text="Sum the parts!", problem_id="p3"),
                NewRule(text="Subtract what was eaten.", problem_id="p4", expert=1),
            ]
        )
        assert [merged for _, merged in results] == [False, True, True, False]
        assert results[0][0] == results[1][0] == results[2][0]
        assert len(store.get_rule(results[0][0]).merged_from) == 2
        assert store.get_rule(results[3][0]).expert == 1


def test_batch_add_dedups_across_chunks(config, monkeypatch):
    monkeypatch.setattr("memory_store.store.BATCH", 2)  # 5 rules: chunks of 2, 2 and 1
    with _open(config) as store:
        texts = ["Draw a table.", "Guess and check.", "Draw a table!", "Work backwards.", "guess and check."]
        results = store.add_rules([NewRule(text=t, problem_id=f"p{i}") for i, t in enumerate(texts)])
        assert [merged for _, merged in results] == [False, False, True, False, True]
        assert results[2][0] == results[0][0] and results[4][0] == results[1][0]
        assert [s.problem_id for s in store.get_rule(results[0][0]).merged_from] == ["p2"]
        assert store.stats().n_rules == 3


# -- provenance ---------------------------------------------------------------------------


def test_provenance_chain(config):
    with _open(config) as store:
        ids = _fill(store)
        chain = store.show_rule(ids["rule"])
    assert chain.problem_id == "p-apples"
    assert chain.problem_text.startswith("Tom has 3 apples")
    assert chain.failure is not None and chain.failure.episode_id == ids["failure"]
    assert chain.failure.verdict_before is False
    assert chain.rule.rule_id == ids["rule"] and chain.rule.status == "trained"
    assert chain.prompts == ["Ann has 5 pens and buys 4 more. How many?"]
    assert chain.update is not None
    assert (chain.update.update_id, chain.update.expert, chain.update.rule_ids) == ("u-1", 2, [ids["rule"]])
    assert chain.update.fixed == ["p-apples"] and chain.update.broke == ["p-trains"]
    assert chain.outcome == "helped"


def test_rule_history_queries(config):
    with _open(config) as store:
        ids = _fill(store)
        store.set_status(ids["other"], "retired")
        assert [r.rule_id for r in store.list_rules()] == [ids["rule"], ids["other"]]
        assert [r.rule_id for r in store.list_rules(newest_first=True, limit=1)] == [ids["other"]]
        assert [r.rule_id for r in store.list_rules(expert=2)] == [ids["rule"]]
        assert [r.rule_id for r in store.list_rules(status="retired")] == [ids["other"]]
        assert [r.rule_id for r in store.list_rules(outcome="untested")] == [ids["other"]]
        assert [r.rule_id for r in store.list_rules(where={"helped": {"$gte": 1}})] == [ids["rule"]]
        hits = store.search_rules("convert the units of speed", k=2)
        assert hits[0].rule.rule_id == ids["other"] and hits[0].similarity > hits[1].similarity
        assert [h.rule.rule_id for h in store.search_rules("units", k=5, where={"status": "trained"})] == [ids["rule"]]
        stats = store.stats()
        assert stats.rules_by_status == {"trained": 1, "retired": 1}
        assert stats.rules_by_expert == {2: 1} and stats.helped == 1
        assert stats.n_problems == 2


# -- memory features ----------------------------------------------------------------------


def test_memory_features_empty_then_informed(config):
    with _open(config) as store:
        empty = store.memory_features("How many apples?")
        assert empty.vector.shape == (config.feature_dim,) and not empty.vector.any()
        np.testing.assert_allclose(empty.prior, np.full(N_EXPERTS, 1 / N_EXPERTS), rtol=1e-6)
        ids = _fill(store)
        features = store.memory_features("Tom has 3 apples and buys 5 more. How many apples does he have?")
    assert features.vector.shape == (config.feature_dim,) and features.vector.dtype == np.float32
    assert features.vector[: config.embed_dim].any()
    assert features.vector[config.embed_dim :].sum() == pytest.approx(1.0, abs=1e-5)
    assert features.prior.sum() == pytest.approx(1.0, abs=1e-5)
    assert int(np.argmax(features.prior)) == 2  # the expert whose update fixed this problem
    assert ids["rule"] in features.rule_ids
    assert "When items are bought, add them to the starting count." in features.rules


def test_memory_features_skip_inactive_rules(config):
    with _open(config) as store:
        rule_id, _ = store.add_rule("Count the legs of each animal.", problem_id="p1", expert=1)
        assert store.memory_features("How many legs do 3 cows have?").rule_ids == [rule_id]
        store.set_status(rule_id, "rolled_back")
        features = store.memory_features("How many legs do 3 cows have?")
        assert features.rule_ids == [] and not features.vector.any()


# -- the graph file -----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_graph_rebuilt_from_chroma_metadata(config, damage):
    with _open(config) as store:
        _fill(store)
        original = store.graph
    path = config.memory_dir / GRAPH_FILE
    if damage == "missing":
        path.unlink()
    else:
        path.write_text('{"directed": true, "nodes": [')  # a torn write, as if saved non-atomically
    with _open(config) as store:
        assert store.graph.same_as(original)
        assert store.graph.fixed_by("u-1") == ["p-apples"]
    assert path.exists()  # the rebuilt graph was saved again


def test_graph_rebuilt_after_a_crash(embedded_config):
    # A writer that dies without close(): its last writes are in Chroma, not in the graph JSON.
    code = """
        import os, sys
        from memory_store.config import MemoryConfig
        from memory_store.embedding import HashEmbedding
        from memory_store.store import MemoryStore
        store = MemoryStore.open(MemoryConfig(run_dir=sys.argv[1], n_experts=4), embedder=HashEmbedding())
        store.add_rule("Draw a picture of the problem.", problem_id="p9", expert=3)
        os._exit(0)
    """
    with _open(embedded_config):
        pass  # leaves a clean, empty graph file behind
    done = _run_python(code, str(embedded_config.run_dir))
    assert done.returncode == 0, done.stderr
    assert (embedded_config.memory_dir / "graph.dirty").exists()
    with _open(embedded_config) as store:
        assert store.graph.count_nodes()["rule"] == 1
        assert store.graph.targets("rule:" + store.list_rules()[0].rule_id, "trained_into") == ["3"]
    assert not (embedded_config.memory_dir / "graph.dirty").exists()


def test_graph_file_is_replaced_atomically(config, monkeypatch):
    with _open(config) as store:
        store.add_rule("Estimate first.", problem_id="p1")
        store.flush()
        before = (config.memory_dir / GRAPH_FILE).read_bytes()

        def crash(self, data):  # part of the new file is written, then the process dies
            with open(self, "wb") as handle:
                handle.write(data[: len(data) // 2])
            raise OSError("killed mid-write")

        monkeypatch.setattr(Path, "write_bytes", crash)
        store.add_rule("Check the answer by substitution.", problem_id="p2")
        with pytest.raises(OSError, match="mid-write"):
            store.flush()
        assert (config.memory_dir / GRAPH_FILE).read_bytes() == before
        monkeypatch.undo()
    with _open(config) as store:
        assert store.graph.count_nodes()["rule"] == 2


# -- the writer lock and read-only inspection ---------------------------------------------


HOLDER = """
    import sys
    from memory_store.config import MemoryConfig
    from memory_store.embedding import HashEmbedding
    from memory_store.store import MemoryStore
    store = MemoryStore.open(MemoryConfig(run_dir=sys.argv[1], n_experts=4), embedder=HashEmbedding())
    store.add_rule("Work backwards from the answer.", problem_id="p1")
    print("ready", flush=True)
    sys.stdin.read()  # hold the store until the test closes our stdin (or kills us)
"""

SECOND_WRITER = """
    import sys
    from memory_store.config import MemoryConfig
    from memory_store.embedding import HashEmbedding
    from memory_store.errors import WriterLockedError
    from memory_store.store import MemoryStore
    config = MemoryConfig(run_dir=sys.argv[1], n_experts=4)
    try:
        MemoryStore.open(config, embedder=HashEmbedding())
    except WriterLockedError as exc:
        print("LOCKED", exc)
        sys.exit(3)
    print("OPENED")
"""

READER = """
    import sys
    from memory_store.config import MemoryConfig
    from memory_store.embedding import HashEmbedding
    from memory_store.store import MemoryStore
    config = MemoryConfig(run_dir=sys.argv[1], n_experts=4)
    with MemoryStore.open(config, embedder=HashEmbedding(), writable=False) as store:
        print(store.stats().n_rules, store.search_rules("units", k=1)[0].rule.text)
"""


def test_second_writer_process_gets_a_clear_error(embedded_config):
    with _open(embedded_config):
        done = _run_python(SECOND_WRITER, str(embedded_config.run_dir))
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"already open for writing by process {os.getpid()}" in done.stdout
    assert "writable=False" in done.stdout
    done = _run_python(SECOND_WRITER, str(embedded_config.run_dir))  # released at close
    assert done.returncode == 0 and "OPENED" in done.stdout, done.stderr


def test_second_writer_in_the_same_process_is_refused(embedded_config):
    with _open(embedded_config):
        with pytest.raises(WriterLockedError, match=str(os.getpid())):
            _open(embedded_config)


def test_lock_is_released_when_the_holder_dies(embedded_config):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(embedded_config.run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        with pytest.raises(WriterLockedError, match=f"by process {holder.pid}"):
            _open(embedded_config)
        with _open(embedded_config, writable=False) as reader:  # inspection works meanwhile
            assert reader.stats().n_rules == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    with _open(embedded_config) as store:  # the kernel dropped the dead holder's lock
        assert [r.text for r in store.list_rules()] == ["Work backwards from the answer."]


def test_read_only_inspection_while_a_writer_runs(embedded_config):
    with _open(embedded_config) as writer:
        writer.add_rule("Keep track of the units.", problem_id="p1")
        done = _run_python(READER, str(embedded_config.run_dir))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split(maxsplit=1) == ["1", "Keep track of the units.\n"]
        writer.add_rule("Round only at the end.", problem_id="p2")  # the writer carries on
        assert writer.stats().n_rules == 2


def test_read_only_store_refuses_writes(config):
    with _open(config) as store:
        store.add_rule("Name the unknown.", problem_id="p1")
    with _open(config, writable=False) as reader:
        assert reader.stats().n_rules == 1 and not reader.writable
        with pytest.raises(ReadOnlyError, match="read-only"):
            reader.add_rule("Another rule.", problem_id="p2")
        with pytest.raises(ReadOnlyError, match="read-only"):
            reader.record_outcome(reader.list_rules()[0].rule_id, helped=True)


def test_read_only_open_of_an_empty_run_dir(embedded_config):
    with pytest.raises(MemoryStoreError, match="no memory store"):
        _open(embedded_config, writable=False)


# -- clear errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, fragment",
    [
        ({"colour": "red"}, "unknown where-filter key 'colour'"),
        ({"cycle": {"$near": 3}}, "unknown where-filter operator '\\$near'"),
        ({"$xor": [{"cycle": 1}]}, "'\\$xor'"),
        ({"cycle": "three"}, "'cycle'.*int"),
        ({"expert": True}, "'expert'"),
        ({"status": {"$gt": "new"}}, "numeric key"),
        ({"cycle": {"$in": []}}, "non-empty list"),
        ({"$and": "cycle"}, "\\$and"),
        ({"cycle": {"$gt": 1, "$lt": 3}}, "exactly one operator"),
    ],
)
def test_bad_where_filters(config, where, fragment):
    with _open(config) as store:
        store.add_rule("Name the unknown.", problem_id="p1")
        with pytest.raises(BadFilterError, match=fragment):
            store.list_rules(where=where)
        with pytest.raises(BadFilterError, match=fragment):
            store.search_rules("unknown", where=where)


def test_good_compound_filters(config):
    with _open(config) as store:
        ids = _fill(store)
        both = {"cycle": 1, "status": {"$in": ["trained", "new"]}}
        assert len(store.list_rules(where=both)) == 2
        either = {"$or": [{"expert": 2}, {"problem_id": "p-trains"}]}
        assert {r.rule_id for r in store.list_rules(where=either)} == {ids["rule"], ids["other"]}
        assert [e.split for e in store.list_episodes(where={"verdict_after": True})] == ["reeval"]


def test_unknown_ids_and_values(config):
    with _open(config) as store:
        with pytest.raises(UnknownIdError, match="no rule with id 'r-nope'"):
            store.get_rule("r-nope")
        with pytest.raises(UnknownIdError, match="'r-nope'"):
            store.show_rule("r-nope")
        with pytest.raises(UnknownIdError, match="'r-nope'"):
            store.record_outcome("r-nope", helped=True)
        with pytest.raises(UnknownIdError, match="'r-nope'"):
            store.record_retrieved(["r-nope"])
        with pytest.raises(UnknownIdError, match="no episode with id 'e-nope'"):
            store.get_episode("e-nope")
        with pytest.raises(UnknownIdError, match="unknown rule 'r-nope'"):
            store.add_episode(Episode(problem_id="p", problem_text="q", rule_ids=["r-nope"]))
        rule_id, _ = store.add_rule("Name the unknown.", problem_id="p1")
        with pytest.raises(MemoryStoreError, match="unknown rule status 'done'"):
            store.set_status(rule_id, "done")
        with pytest.raises(BadFilterError, match="unknown outcome 'great'"):
            store.list_rules(outcome="great")
        with pytest.raises(MemoryStoreError, match="expert must be in \\[0, 4\\), got 7"):
            store.add_rule("x", problem_id="p", expert=7)
        with pytest.raises(MemoryStoreError, match="3 expert weights"):
            store.add_episode(Episode(problem_id="p", problem_text="q", expert_weights=[1, 0, 0]))


def test_embedder_mismatch_on_reopen(config):
    with _open(config):
        pass
    with pytest.raises(MemoryStoreError, match="embedder gives 64-d vectors|64-d"):
        MemoryStore.open(config, embedder=HashEmbedding(dim=64))
    small = MemoryConfig(**{**config.to_dict(), "embed_dim": 64})
    with pytest.raises(MemoryStoreError, match="embed_dim"):
        MemoryStore.open(small, embedder=HashEmbedding(dim=64))
    with pytest.raises(MemoryStoreError, match="another embedder.*test_other_hash"):
        MemoryStore.open(config, embedder=OtherHash())


@register_embedding_function
class OtherHash(HashEmbedding):
    """Same size as HashEmbedding, another vector space: a store must not mix the two."""

    @staticmethod
    def name() -> str:
        return "test_other_hash"


def test_unreachable_server(tmp_path):
    config = MemoryConfig(run_dir=tmp_path, url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MemoryStoreError, match="cannot reach the Chroma server"):
        _open(config)


# -- the real model -----------------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_ranks_paraphrases_first(tmp_path):
    from memory_store.embedding import MiniLMEmbedding

    embedder = MiniLMEmbedding()
    assert embedder.dim == 384
    query, close, far = embedder(
        [
            "How many apples are left after Tom eats two of his five apples?",
            "Tom had five apples and ate two; how many remain?",
            "The train departs the station at noon heading north.",
        ]
    )
    assert float(query @ close) > float(query @ far) + 0.2
    assert query.shape == (embedder.dim,)  # the dimension declared before the model loaded is the model's
    with MemoryStore.open(MemoryConfig(run_dir=tmp_path), embedder=embedder) as store:
        store.add_rule("Subtract the eaten items from the starting amount.", problem_id="p1")
        store.add_rule("Distance equals speed multiplied by time.", problem_id="p2")
        store.add_rule("Convert percentages to fractions before multiplying.", problem_id="p3")
        hits = store.search_rules("Tom had five apples and ate two; how many remain?", k=3)
        assert hits[0].rule.text.startswith("Subtract the eaten items")
        assert hits[0].similarity > hits[-1].similarity


BUSY_WRITER = """
    import sys
    import time
    import numpy as np
    from memory_store.config import MemoryConfig
    from memory_store.embedding import HashEmbedding
    from memory_store.records import NewRule
    from memory_store.store import MemoryStore
    store = MemoryStore.open(MemoryConfig(run_dir=sys.argv[1], n_experts=4), embedder=HashEmbedding())
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    for batch in range(int(sys.argv[2])):
        rules = [NewRule(text=f"rule {batch}-{i}", problem_id=f"p{i}") for i in range(500)]
        store.add_rules(rules, embeddings=rng.standard_normal((500, 384)).astype(np.float32))
        time.sleep(0.2)  # a loop does other work between writes
    store.close()
"""


def test_snapshots_stay_consistent_under_a_busy_writer(embedded_config):
    # 500-rule batches cross Chroma's HNSW persist threshold (1000) while readers copy the store.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(BUSY_WRITER), str(embedded_config.run_dir), "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        seen = [0]
        while writer.poll() is None and len(seen) < 6:
            with _open(embedded_config, writable=False) as reader:
                count = len(reader.list_rules())
                assert count % 500 == 0 and count >= seen[-1]  # whole batches only, never going back
                if count:
                    assert len(reader.search_rules("rule", k=3)) == 3
                seen.append(count)
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    with _open(embedded_config) as store:
        assert store.stats().n_rules == 3000 and store.graph.count_nodes()["rule"] == 3000
    assert len(seen) >= 2  # at least one snapshot was read while the writer ran
