"""Rounds of episodes: sampling nodes pooled across a round's episodes, then updates in turn; resumes exactly."""

import json
import threading

import pytest
import torch

from adapters.trainer import TestTimeTrainer
from agents.lm.generation import Generation, Request, Sampling
from graph.episodes import EVENTS, StopFlag, committed_states
from graph.pooling import Lockstep
from tests import test_loop
from tests.fakes import ScriptedBackend
from tests.test_loop import APPLES, CAKES, PENS, World, _run, _settings, _state_of, trained

make_run = test_loop.make_run  # the loop tests' fixture: a scripted model over the tiny model's bank


def _events(run_dir) -> list[dict]:
    """The event log without wall times, which differ from run to run."""
    lines = (run_dir / EVENTS).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_a_round_sends_its_episodes_first_solves_as_one_backend_call(make_run, tmp_path):
    ctx, backend = make_run(World())
    finals = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    assert [f["problem"]["id"] for f in finals] == ["p-apples", "p-pens", "p-cakes"]
    k = ctx.verifier.samples
    assert backend.together[0] == [1, k] * 3  # each episode's greedy answer and k samples, in episode order
    alone, backend_alone = make_run(World(), run_dir=tmp_path / "alone")
    _run(alone, [APPLES, PENS, CAKES], tmp_path / "alone", round_size=1)
    assert len(backend.together) < len(backend_alone.together)


def test_a_rounds_episodes_sample_from_the_bank_as_the_round_found_it(make_run, tmp_path):
    # CAKES fails and trains the bank; PENS is right greedily once any expert is trained.
    ctx, _ = make_run(World(), run_dir=tmp_path / "one")
    cakes, pens = _run(ctx, [CAKES, PENS], tmp_path / "one", round_size=1)
    assert cakes["updates"] and pens["first_try"]["correct"]
    ctx.memory.close()
    ctx, _ = make_run(World(), run_dir=tmp_path / "two")
    cakes, pens = _run(ctx, [CAKES, PENS], tmp_path / "two", round_size=2)
    assert cakes["updates"] and not pens["first_try"]["correct"]  # solved before CAKES's update
    assert trained(ctx)


def test_each_episode_of_a_round_gets_the_carry_of_the_episode_before_it(make_run, tmp_path):
    ctx, _ = make_run(World(), settings=_settings(round_gate=False))  # each update gated alone
    apples, pens, cakes = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    assert apples["outcome"] == "correct" and apples["carry"]["canary"][0]["id"] == "p-apples"
    # PENS sampled with APPLES at the same time, but its update is checked against APPLES's canary
    assert pens["updates"] and pens["canary_checks"][0]["checked"] == 1
    usage_after_pens = pens["carry"]["expert_updates"]
    assert sum(usage_after_pens) == len(pens["updates"])
    assert sum(cakes["carry"]["expert_updates"]) == sum(usage_after_pens) + len(cakes["updates"])


def _kill_then_resume(make_run, tmp_path, monkeypatch, owner, name, kill_at, **loop):
    """test_loop's kill-and-resume, over two rounds of 3 (the second a round of one)."""
    problems = [APPLES, PENS, CAKES, PENS | {"id": "p-pens-2"}]
    want, resumed, finals = test_loop._kill_then_resume(make_run, tmp_path, monkeypatch, problems, owner, name, kill_at,
                                                        "killed", settings=_settings(**loop), round_size=3)
    return want, _state_of(resumed, finals)


@pytest.mark.parametrize("round_gate", [False, True])
@pytest.mark.parametrize("kill_at", [4, 5, 6])
def test_a_kill_while_a_round_samples_resumes_to_the_uninterrupted_run(make_run, tmp_path, monkeypatch, kill_at,
                                                                       round_gate):
    # the 4th pooled call of the first round (diversify's): solve, verify and reflect are checkpointed for every
    # episode that got so far, APPLES waits before its commit, and the round must sample again from its start.
    # Under the round gate the 5th is the round's pooled re-evaluation, after its updates changed the bank,
    # and the 6th a second cycle's reflect, after the gate's verdict.
    want, got = _kill_then_resume(make_run, tmp_path, monkeypatch, ScriptedBackend, "generate_requests", kill_at,
                                  round_gate=round_gate)
    assert got[1:] == want[1:]
    assert all((want[0][k] == got[0][k]).all() for k in want[0])
    assert _events(tmp_path / "b") == _events(tmp_path / "a")  # the half-sampled round's lines were dropped


@pytest.mark.parametrize("round_gate", [False, True])
def test_a_kill_inside_a_rounds_updates_resumes_to_the_uninterrupted_run(make_run, tmp_path, monkeypatch, round_gate):
    want, got = _kill_then_resume(make_run, tmp_path, monkeypatch, TestTimeTrainer, "step", 3, round_gate=round_gate)
    assert got[1:] == want[1:]
    assert all((want[0][k] == got[0][k]).all() for k in want[0])
    assert _events(tmp_path / "b") == _events(tmp_path / "a")


def test_a_stop_while_a_round_samples_resumes_to_the_uninterrupted_run(make_run, tmp_path):
    problems = [APPLES, PENS, CAKES]
    ctx, _ = make_run(World(), run_dir=tmp_path / "a")
    want = _state_of(ctx, _run(ctx, problems, tmp_path / "a", round_size=3))
    ctx.memory.close()
    ctx_b, _ = make_run(World(), run_dir=tmp_path / "b")
    stop, seen = StopFlag(), []

    def on_event(event):
        seen.append((event.episode, event.node))
        if event.node == "reflect":
            stop.set()

    assert _run(ctx_b, problems, tmp_path / "b", round_size=3, on_event=on_event, stop=stop) == []
    assert seen[-1] == (1, "reflect") and not trained(ctx_b)  # stopped after the node, before any update
    assert committed_states(tmp_path / "b") == []  # sampled, none finished
    ctx_b.memory.close()
    resumed, _ = make_run(World(), run_dir=tmp_path / "b")
    finals = _run(resumed, problems, tmp_path / "b", round_size=3)
    assert committed_states(tmp_path / "b") == finals  # as the driver yields them, read with no model
    got = _state_of(resumed, finals)
    assert got[1:] == want[1:]
    assert all((want[0][k] == got[0][k]).all() for k in want[0])
    assert _events(tmp_path / "b") == _events(tmp_path / "a")


# ---------------------------------------------------------------- the round gate


def _rarely_right_apples() -> World:
    world = World()
    world.rarely_right = {"p-apples"}  # right greedily, rarely sampled: it trains, and joins its round's canary
    return world


def test_the_round_gate_re_evaluates_a_rounds_updates_in_one_call_with_one_canary(make_run, tmp_path):
    ctx, backend = make_run(_rarely_right_apples(), settings=_settings(cycles=1))
    apples, pens, cakes = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    assert all(f["updates"] for f in (apples, pens, cakes))
    # Every update ran before any re-evaluation, in episode order, from the bank before the first one.
    assert [f["updates"][0]["gate_rollback_to"] for f in (apples, pens, cakes)] == ["ep00000-c0"] * 3
    # One call: each problem again, and the round's canary (APPLES) asked by all three; the canary
    # request equals APPLES's own re-solve, so it is generated once (6 requests without the merge).
    assert backend.together[-1] == [1, 1, 1]
    checks = [f["canary_checks"][0] for f in (apples, pens, cakes)]
    assert all(c["checked"] == 1 and c["broke"] == [] and not c["canary_rolled_back"] for c in checks)
    assert trained(ctx)
    # The carry is handed on episode by episode; each counts its own update once.
    usage = [sum(f["carry"]["expert_updates"]) for f in (apples, pens, cakes)]
    assert usage == [1, 2, 3]
    assert cakes["carry"]["canary"][0]["id"] == "p-apples"


@pytest.mark.parametrize("canary_size", [2, 0])
def test_the_rounds_problems_right_at_the_first_try_join_its_canary(make_run, tmp_path, canary_size):
    ctx, _ = make_run(World(), settings=_settings(cycles=1, canary_size=canary_size))
    apples, pens, cakes = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    assert not apples["updates"] and pens["updates"] and cakes["updates"]
    # APPLES, right at once and not trained on, guards the round as it would the episodes after it
    # without the gate; with no canary asked for, only a round's own trained problems are guarded.
    want = 1 if canary_size else 0
    assert pens["canary_checks"][0]["checked"] == cakes["canary_checks"][0]["checked"] == want


def test_a_broken_round_canary_undoes_every_update_of_the_round(make_run, tmp_path):
    world = _rarely_right_apples()
    world.broken_after = {"p-apples"}  # once trained, APPLES's greedy answer turns wrong
    ctx, _ = make_run(world, settings=_settings(cycles=1))
    finals = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    checks = [f["canary_checks"][-1] for f in finals]
    assert all(c["broke"] == ["p-apples"] and c["canary_rolled_back"] for c in checks)
    assert all(c["update_id"] == f["updates"][-1]["update_id"] for c, f in zip(checks, finals))
    assert not trained(ctx)  # back to the bank before the round's first update
    assert all(f["carry"]["replay"] == {} for f in finals)  # nothing undone is replayed
    broken = [e for e in ctx.memory.list_episodes() if e.split == "canary"]
    assert broken and all(e.problem_text == APPLES["question"] for e in broken)  # the graph's 'broke' edges


def test_a_round_that_breaks_a_problem_it_trained_on_is_undone_at_any_canary_margin(make_run, tmp_path):
    world = _rarely_right_apples()
    world.broken_after = {"p-apples"}
    ctx, _ = make_run(world, settings=_settings(cycles=1, canary_margin=1.0))
    finals = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    assert all(f["canary_checks"][-1]["canary_rolled_back"] for f in finals)
    assert not trained(ctx)


@pytest.mark.parametrize("round_gate", [True, False])
def test_the_binomial_canary_test_keeps_updates_that_broke_a_problem_right_by_luck(make_run, tmp_path, round_gate):
    world = _rarely_right_apples()  # one sample of three right: a chance of breaking of (2 + 1) / (3 + 2)
    world.broken_after = {"p-apples"}
    ctx, _ = make_run(world, settings=_settings(cycles=1, canary_test="binomial", round_gate=round_gate))
    apples, *others = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    # The margin test undoes these updates (the two tests above); the binomial one sees a likely
    # break, in the round's canary or (each update gated alone) as APPLES's own problem broken.
    checks = [f["canary_checks"][-1] for f in (others if not round_gate else [apples, *others])]
    assert all(c["broke"] == ["p-apples"] and not c["canary_rolled_back"] for c in checks)
    assert all(c["p_value"] == pytest.approx(0.6) for c in checks)
    logged = [e for e in _events(tmp_path / "run") if e["node"] == "reevaluate" and e["canary_broke"]]
    assert logged and all(e["canary_p_value"] == pytest.approx(0.6) for e in logged)
    assert apples["updates"] and apples["episode_rolled_back_to"] is None
    assert trained(ctx)


@pytest.mark.parametrize("round_gate", [True, False])
@pytest.mark.parametrize("alpha, undone", [(0.05, False), (0.25, True)])
def test_the_binomial_canary_test_undoes_a_break_less_likely_than_its_level(make_run, tmp_path, round_gate, alpha,
                                                                            undone):
    world = World()
    world.broken_after = {"p-apples"}  # every sample right at first: a chance of breaking of 1 / (3 + 2)
    ctx, _ = make_run(world, settings=_settings(cycles=1, canary_test="binomial", canary_alpha=alpha,
                                                round_gate=round_gate))
    apples, pens, cakes = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    assert pens["updates"] and cakes["updates"]
    check = pens["canary_checks"][-1]
    assert check["broke"] == ["p-apples"] and check["p_value"] == pytest.approx(0.2)
    assert check["canary_rolled_back"] is undone
    assert trained(ctx) is not undone


# ---------------------------------------------------------------- pooled updates


def _completions(update: dict) -> list[str]:
    return [t["completion"] for t in update["texts"] if t["source"] != "replay"]


def test_pooled_updates_train_a_round_once_on_the_texts_of_all_its_episodes(make_run, tmp_path):
    from graph.evaluation.learning import learning_summary, update_bursts

    ctx, _ = make_run(_rarely_right_apples(), settings=_settings(cycles=1, pool_updates=True))
    trainer_calls, real = [], ctx.trainer.update

    memory_rows, wanted = [], []
    problems = [APPLES, PENS, CAKES]

    def spy(examples, **kwargs):
        trainer_calls.append([e.completion for e in examples])
        memory_rows.append(kwargs["memory"])
        # what each problem's own update would look up now: blind to itself
        wanted.append(ctx.memory_vectors([p["question"] for p in problems], exclude=[p["id"] for p in problems])[0])
        return real(examples, **kwargs)

    ctx.trainer.update = spy
    finals = _run(ctx, problems, tmp_path / "run", round_size=3)
    (first,), *pooled = [f["updates"] for f in finals]
    own = [_completions(f["updates"][0]) for f in finals]
    assert all(own)  # each episode contributed texts, listed in its own record
    assert trainer_calls == [own[0] + own[1] + own[2]]  # one update, on every episode's texts
    # Each text routed with its own problem's memory features, as that problem's update would have.
    (memory,), (looked_up,) = memory_rows, wanted
    assert memory.shape == (len(trainer_calls[0]), ctx.router.config.memory_dim)
    starts = [0, len(own[0]), len(own[0]) + len(own[1]), len(trainer_calls[0])]
    for i in range(3):
        assert torch.allclose(memory[starts[i]:starts[i + 1]], looked_up[i].to(memory.dtype).expand(len(own[i]), -1))
    assert "pooled_into" not in first and first["pooled_texts"] == len(own[1]) + len(own[2])
    for (record,), final in zip(pooled, finals[1:]):
        assert record["pooled_into"] == record["update_id"] == first["update_id"]
        assert (record["expert"], record["loss_after"]) == (first["expert"], first["loss_after"])
        assert record["rule"] == (final.get("rule") or {}).get("text")
    assert trained(ctx)
    # Counted, replayed and summarised once per update and once per text.
    last = finals[-1]["carry"]
    assert sum(last["expert_updates"]) == 1
    assert [t["completion"] for t in last["replay"][str(first["expert"])]] == own[0] + own[1] + own[2]
    summary = learning_summary(finals)
    assert (summary["updates"], summary["updates_kept"], summary["updates_pooled"]) == (1, 1, 1)
    assert summary["learned_from"] == 3 and summary["texts"] == sum(map(len, own))
    bursts = [[[e.completion for e in burst] for burst in episode] for episode in update_bursts(finals)]
    # The single-lora arm trains it as one burst too, after the last of its problems (a stream run
    # scores each problem before training its episode's bursts).
    assert bursts == [[], [], [own[0] + own[1] + own[2]]]
    logged = [e for e in _events(tmp_path / "run") if e["node"] == "update"]
    assert [e.get("pooled_into") for e in logged] == [None, "ep00000-c0", "ep00000-c0"]

def test_a_pooled_variant_text_is_routed_with_its_problems_features_not_the_variants(make_run, tmp_path):
    # Two rounds of 2, so that the memory holds the first round when the second pools. In the second,
    # CAKES trains and PENS-2 (wrong greedily, a rule validates) pools rule-conditioned and variant texts,
    # whose question is the variant's wording ("crate" for "box").
    world = _rarely_right_apples()
    world.right_after = set()
    # the adapters arm's setting: no retrieved rule in the prompt, so PENS-2 samples as PENS did
    ctx, _ = make_run(world, settings=_settings(cycles=1, pool_updates=True, rules_in_prompt=False))
    pens_2 = PENS | {"id": "p-pens-2"}
    calls = []
    real = ctx.trainer.update

    def spy(examples, **kwargs):
        # and what PENS-2's own update would look up now: blind to itself
        wanted, *_ = ctx.memory_vectors([PENS["question"]], exclude=["p-pens-2"])
        calls.append((examples, kwargs["memory"], wanted))
        return real(examples, **kwargs)

    ctx.trainer.update = spy
    finals = _run(ctx, [APPLES, PENS, CAKES, pens_2], tmp_path / "run", round_size=2)
    cakes, pens = finals[2], finals[3]
    assert cakes["updates"][0].get("pooled_into") is None and pens["updates"][0]["pooled_into"]
    pooled = pens["updates"][0]["texts"]
    assert any(t["source"] == "variant" and t["question"] != PENS["question"] for t in pooled)
    examples, memory, wanted = calls[-1]
    assert [e.completion for e in examples][-len(pooled):] == [t["completion"] for t in pooled]
    assert wanted.abs().sum() > 0  # the first round is in the memory: a wrong row could not pass unseen
    rows = memory[-len(pooled):]
    assert torch.allclose(rows, wanted.to(rows.dtype).expand(len(pooled), -1))



def test_each_episode_updating_alone_trains_once_per_episode(make_run, tmp_path):
    ctx, _ = make_run(_rarely_right_apples(), settings=_settings(cycles=1))
    finals = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    ids = [f["updates"][0]["update_id"] for f in finals]
    assert len(set(ids)) == 3 and not any(f["updates"][0].get("pooled_into") for f in finals)
    assert sum(finals[-1]["carry"]["expert_updates"]) == 3


def test_a_broken_round_canary_undoes_a_pooled_update_for_every_episode(make_run, tmp_path):
    from graph.evaluation.learning import learning_summary

    world = _rarely_right_apples()
    world.broken_after = {"p-apples"}
    ctx, _ = make_run(world, settings=_settings(cycles=1, pool_updates=True))
    finals = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run", round_size=3)
    assert all(f["canary_checks"][-1]["canary_rolled_back"] for f in finals)
    assert not trained(ctx)
    assert all(f["carry"]["replay"] == {} for f in finals)
    summary = learning_summary(finals)
    assert (summary["updates"], summary["updates_kept"], summary["updates_rolled_back"]) == (1, 0, 1)


@pytest.mark.parametrize("owner, name, kill_at", [(TestTimeTrainer, "step", 2), (TestTimeTrainer, "step", 3),
                                                  (ScriptedBackend, "generate_requests", 5)])
def test_a_kill_inside_a_pooled_round_resumes_to_the_uninterrupted_run(make_run, tmp_path, monkeypatch, owner, name,
                                                                       kill_at):
    # The pooled update's 2nd step, a second cycle's, and the round's pooled re-evaluation.
    want, got = _kill_then_resume(make_run, tmp_path, monkeypatch, owner, name, kill_at, pool_updates=True)
    assert any(e.get("pooled_into") for e in _events(tmp_path / "b"))
    assert got[1:] == want[1:]
    assert all((want[0][k] == got[0][k]).all() for k in want[0])
    assert _events(tmp_path / "b") == _events(tmp_path / "a")


def test_pooled_updates_need_the_round_gate_and_are_saved_with_a_run_or_arm(tmp_path):
    from graph.context import LoopConfig
    from graph.evaluation.config import EVAL_FILE, EvalConfig, arm_settings, eval_config
    from graph.run_dir import RUN_FILE, RunSettings, run_settings
    from graph.saved_settings import SettingsError

    with pytest.raises(ValueError, match=r"pool_updates \(--pool-updates\) needs round_gate"):
        LoopConfig(pool_updates=True, round_gate=False)
    with pytest.raises(ValueError, match="--pool-updates needs the round gate"):
        EvalConfig(pool_updates=True, round_gate=False)
    assert arm_settings(EvalConfig(pool_updates=True), "adapters", 2).loop.pool_updates is True
    old = RunSettings(model="tiny-random", data="train", episodes=2).to_dict()
    del old["loop"]["pool_updates"]  # saved before pooled updates existed
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    assert run_settings(tmp_path, True, {}).loop.pool_updates is False
    with pytest.raises(SettingsError, match="--pool-updates True differs from the saved False"):
        run_settings(tmp_path, True, {"loop.pool_updates": True})  # it changes what the run learns
    saved = EvalConfig(model="tiny-random").to_dict()
    del saved["pool_updates"]
    (tmp_path / EVAL_FILE).write_text(json.dumps({"config": saved}))
    assert eval_config(tmp_path, True, {}).pool_updates is False
    # Like the gate, for learning arms not started (a started one keeps its run.json's, checked above).
    config = eval_config(tmp_path, True, {"pool_updates": True})
    assert config.pool_updates is True and arm_settings(config, "full", 2).loop.pool_updates is True


def test_a_run_saved_before_the_round_gate_resumes_with_each_update_gated_alone(tmp_path):
    from graph.run_dir import RUN_FILE, RunSettings, run_settings
    from graph.saved_settings import SettingsError

    old = RunSettings(model="tiny-random", data="train", episodes=2).to_dict()
    del old["loop"]["round_gate"]
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    assert run_settings(tmp_path, True, {}).loop.round_gate is False
    assert RunSettings().loop.round_gate is True
    with pytest.raises(SettingsError, match="--round-gate True differs from the saved False"):
        run_settings(tmp_path, True, {"loop.round_gate": True})  # it changes what the run learns


def test_an_evaluation_may_switch_the_round_gate_of_arms_not_started(tmp_path):
    from graph.evaluation.config import EVAL_FILE, EvalConfig, arm_settings, eval_config

    saved = EvalConfig(model="tiny-random").to_dict()
    del saved["round_gate"]  # saved before the gate existed
    (tmp_path / EVAL_FILE).write_text(json.dumps({"config": saved}))
    assert eval_config(tmp_path, True, {}).round_gate is False
    config = eval_config(tmp_path, True, {"round_gate": True})
    assert config.round_gate is True and arm_settings(config, "full", 2).loop.round_gate is True


def test_the_round_gate_needs_kept_updates():
    from graph.context import LoopConfig

    with pytest.raises(ValueError, match="round_gate needs keep_unfixed_updates"):
        LoopConfig(keep_unfixed_updates=False)
    assert LoopConfig(keep_unfixed_updates=False, round_gate=False).round_gate is False


def test_round_size_must_be_positive(make_run, tmp_path):
    ctx, _ = make_run(World())
    with pytest.raises(ValueError, match="round_size"):
        _run(ctx, [APPLES], tmp_path / "run", round_size=0)


# ---------------------------------------------------------------- the lockstep itself


class _Echo:
    """A backend that answers each prompt with itself and records the prompts of every call."""

    name, description = "echo", "echo (tests)"

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate_requests(self, requests):
        self.calls.append([p for r in requests for p in r.prompts])
        return [[Generation(p, 1, 0.0) for p in r.prompts] for r in requests]


def _ask(pooled, *prompts):
    (out,) = pooled.generate_requests([Request(tuple(prompts), None, 8, False)])
    return [g.text for g in out]


def test_lockstep_pools_every_jobs_call_in_job_order_and_returns_each_its_own():
    backend = _Echo()
    lockstep = Lockstep(backend)
    pooled = lockstep.pooled_backend()
    jobs = [lambda: (_ask(pooled, "a1"), _ask(pooled, "a2")),
            lambda: (_ask(pooled, "b1", "b1'"),),
            lambda: (_ask(pooled, "c1"), _ask(pooled, "c2"), _ask(pooled, "c3"))]
    turns = lockstep.run(jobs)
    assert backend.calls == [["a1", "b1", "b1'", "c1"], ["a2", "c2"], ["c3"]]
    assert [t.result for t in turns] == [(["a1"], ["a2"]), (["b1", "b1'"],), (["c1"], ["c2"], ["c3"])]
    assert all(t.seconds() >= 0 for t in turns)


def test_lockstep_runs_one_job_at_a_time():
    lockstep = Lockstep(_Echo())
    pooled = lockstep.pooled_backend()
    running, most = [0], [0]
    guard = threading.Lock()

    def job():
        for i in range(3):
            with guard:
                running[0] += 1
                most[0] = max(most[0], running[0])
            with guard:
                running[0] -= 1
            _ask(pooled, str(i))

    lockstep.run([job] * 4)
    assert most[0] == 1


def test_an_error_in_one_job_cancels_the_others_and_is_raised():
    backend = _Echo()
    lockstep = Lockstep(backend)
    pooled = lockstep.pooled_backend()
    finished = []

    def good():
        _ask(pooled, "x")
        _ask(pooled, "y")
        finished.append("good")

    def bad():
        _ask(pooled, "z")
        raise RuntimeError("broken job")

    with pytest.raises(RuntimeError, match="broken job"):
        lockstep.run([good, bad])
    assert finished == [] and backend.calls == [["x", "z"]]


def test_a_stop_cancels_the_waiting_jobs():
    backend = _Echo()
    lockstep = Lockstep(backend)
    pooled = lockstep.pooled_backend()
    jobs = [lambda: _ask(pooled, "a1") + _ask(pooled, "b1"), lambda: _ask(pooled, "a2") + _ask(pooled, "b2")]
    turns = lockstep.run(jobs, stop=lambda: len(backend.calls) == 1)
    assert backend.calls == [["a1", "a2"]]
    assert all(t.done and t.result is None for t in turns)


# ---------------------------------------------------------------- the setting


def test_a_run_saved_before_rounds_resumes_one_episode_at_a_time(tmp_path):
    from graph.run_dir import RUN_FILE, RunSettings, run_settings

    old = RunSettings(model="tiny-random", data="train", episodes=2).to_dict()
    del old["round_size"]
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    assert run_settings(tmp_path, True, {}).round_size == 1
    assert RunSettings().round_size == 8
    from graph.saved_settings import SettingsError

    with pytest.raises(SettingsError, match="--round-size 4 differs from the saved 1"):
        run_settings(tmp_path, True, {"round_size": 4})  # it changes what the run learns


def test_an_evaluation_may_change_the_round_size_of_arms_not_started(tmp_path):
    from graph.evaluation.config import EVAL_FILE, EvalConfig, eval_config

    saved = EvalConfig(model="tiny-random").to_dict()
    del saved["round_size"]  # saved before rounds existed
    (tmp_path / EVAL_FILE).write_text(json.dumps({"config": saved}))
    assert eval_config(tmp_path, True, {}).round_size == 1
    assert eval_config(tmp_path, True, {"round_size": 8}).round_size == 8
    with pytest.raises(ValueError, match="round_size must be >= 1"):
        EvalConfig(round_size=0)


def test_a_greedy_request_asked_by_several_jobs_is_generated_once():
    backend = _Echo()
    lockstep = Lockstep(backend)
    pooled = lockstep.pooled_backend()
    sampled = Request(("s",), None, 8, False, Sampling(temperature=0.8, seed=1))
    jobs = [lambda: (_ask(pooled, "own-a"), _ask(pooled, "canary")),
            lambda: (_ask(pooled, "own-b"), _ask(pooled, "canary")),
            lambda: (_ask(pooled, "own-c"), pooled.generate_requests([sampled])),
            lambda: (_ask(pooled, "own-d"), pooled.generate_requests([sampled]))]
    turns = lockstep.run(jobs)
    assert backend.calls == [["own-a", "own-b", "own-c", "own-d"], ["canary", "s", "s"]]  # sampled: never merged
    assert turns[0].result[1] == turns[1].result[1] == ["canary"]


def test_a_lockstep_runs_once():
    lockstep = Lockstep(_Echo())
    lockstep.run([lambda: None])
    with pytest.raises(RuntimeError, match="one per round"):
        lockstep.run([lambda: None])


def test_committed_states_of_a_checkpoints_file_not_yet_set_up_is_empty_and_left_alone(tmp_path):
    from graph.run_dir import CHECKPOINTS

    (tmp_path / CHECKPOINTS).write_bytes(b"")  # created by a run that has not checkpointed yet
    assert committed_states(tmp_path) == [] and (tmp_path / CHECKPOINTS).stat().st_size == 0
