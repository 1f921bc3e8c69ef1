"""The LangGraph loop: node logic with a scripted fake LM over the real tiny model's bank and a real Chroma store."""

import re

import pytest
import torch
from chromadb.api.client import SharedSystemClient

from adapters.bank import BankConfig
from adapters.snapshot import BankSnapshot
from adapters.trainer import TrainerConfig
from agents.solver import SolverConfig
from agents.verifier import VerifierConfig
from graph.context import LoopConfig
from graph.runner import RunSettings, StopFlag, build_context, run_episodes
from memory_store.embedding import HashEmbedding
from tests.fakes import ScriptedBackend

APPLES = {"id": "p-apples", "question": "Tom has 3 apples and buys 5 more. How many apples?", "label": "8",
          "split": "train", "solution": "3 + 5 = 8"}
PENS = {"id": "p-pens", "question": "A box holds 4 pens. How many pens are in 6 boxes?", "label": "24",
        "split": "train", "solution": "4 * 6 = 24"}
CAKES = {"id": "p-cakes", "question": "Ann bakes 7 cakes and sells 2. How many are left?", "label": "5",
         "split": "train", "solution": "7 - 2 = 5"}


def trained(ctx) -> bool:
    return bool((ctx.bank.expert_norms() > 0).any())


class World:
    """A scripted model whose answers depend on whether the bank has been trained."""

    def __init__(self):
        self.ctx = None
        self.right_before = {"Tom has 3 apples"}  # solved by the frozen model
        self.right_after = {"A box holds 4 pens"}  # solved once any expert is trained
        self.broken_after = set()  # solved before training, wrong after (a harmful update)
        self.rules = iter([])

    def script(self, prompt, sampling, weights):
        if "Problem:" in prompt and "Start with 'RULE:'" not in prompt and "Rule:" not in prompt:
            question = re.search(r"Problem: (.*?)</user>", prompt, re.DOTALL).group(1)
            is_trained = trained(self.ctx)
            if any(q in question for q in self.broken_after):
                return "The answer is 99." if is_trained else _right(question)
            if any(q in question for q in self.right_before) or (is_trained and any(q in question for q in self.right_after)):
                return _right(question)
            return "I think it is 1.\nThe answer is 1."
        if "Start with 'RULE:'" in prompt:
            return next(self.rules, "RULE: Read every quantity in the question before combining them.")
        if "NEW short math word problem" in prompt:
            return "Problem: A bag has 2 red and 3 blue marbles. How many marbles?\n\n2 + 3 = 5. The answer is 5."
        return "Go through each quantity, name its unit, and combine them in the order the question asks."


def _right(question):
    for p in (APPLES, PENS, CAKES):
        if p["question"][:15] in question:
            return f"{p['solution']}.\nThe answer is {p['label']}."
    raise AssertionError(question)


def _settings(**loop):
    return RunSettings(
        model="tiny-random", data="inline", episodes=3,
        loop=LoopConfig(**{"cycles": 2, "canary_size": 2, **loop}),
        bank=BankConfig(n_experts=4),
        trainer=TrainerConfig(steps_per_update=2),
        solver=SolverConfig(max_new_tokens=16),
        verifier=VerifierConfig(samples=3),
    )


@pytest.fixture
def make_run(tmp_path):
    contexts = []

    def make(world, run_dir=None, settings=None, loaded=None):
        from agents.models import load_model

        SharedSystemClient.clear_system_cache()
        loaded = loaded or load_model("tiny-random")
        backend = ScriptedBackend(world.script)
        ctx = build_context(loaded, settings or _settings(), run_dir or tmp_path / "run",
                            embedder=HashEmbedding(dim=384), backend=backend)
        world.ctx = ctx
        contexts.append(ctx)
        return ctx, backend

    yield make
    for ctx in contexts:
        if ctx.memory is not None:
            ctx.memory.close()
    SharedSystemClient.clear_system_cache()


def _run(ctx, problems, run_dir, **kw):
    return list(run_episodes(ctx, problems, run_dir=run_dir, **kw))


def test_correct_first_try_commits_without_learning(make_run, tmp_path):
    ctx, backend = make_run(World())
    (final,) = _run(ctx, [APPLES], tmp_path / "run")
    assert final["outcome"] == "correct" and final["updates"] == [] and final["rules"] == []
    assert final["carry"]["canary"][0]["id"] == "p-apples"
    assert not backend.prompts_containing("Start with 'RULE:'")
    assert not trained(ctx)
    assert ctx.memory.stats().n_episodes == 1


def test_wrong_answer_is_reflected_trained_and_fixed(make_run, tmp_path):
    ctx, backend = make_run(World())
    base = BankSnapshot.capture(ctx.bank, ctx.router)
    (final,) = _run(ctx, [PENS], tmp_path / "run")
    assert final["first"]["correct"] is False
    assert final["outcome"] == "fixed" and final["verdict"]["correct"]
    assert len(final["updates"]) == 1 and len(final["texts"]) == 4
    update = final["updates"][0]
    assert update["expert"] != ctx.bank.config.shared_expert or update["mode"] == "single"
    assert any(not torch.equal(v, base.bank[k]) for k, v in BankSnapshot.capture(ctx.bank, ctx.router).bank.items())
    # the reflector saw the learning problem's reference solution, never an answer-bearing rule
    (reflect_prompt,) = backend.prompts_containing("Start with 'RULE:'")
    assert "4 * 6 = 24" in reflect_prompt
    (rule,) = ctx.memory.list_rules()
    assert rule.expert == update["expert"] and rule.helped == 1 and rule.status == "trained"
    provenance = ctx.memory.show_rule(rule.rule_id)
    assert provenance.rule.rule_id == rule.rule_id
    # the bank on disk is the trained one
    saved = BankSnapshot.capture(ctx.bank, ctx.router)
    from adapters.store import load_bank

    load_bank(ctx.bank_store.current, ctx.bank, ctx.router)
    assert all(torch.equal(v, saved.bank[k]) for k, v in BankSnapshot.capture(ctx.bank, ctx.router).bank.items())


def test_unfixed_problem_uses_all_cycles_then_rolls_back(make_run, tmp_path):
    world = World()
    world.rules = iter(["RULE: Count the boxes first.", "RULE: Multiply only after reading units."])
    ctx, backend = make_run(world)
    before = BankSnapshot.capture(ctx.bank, ctx.router)
    (final,) = _run(ctx, [CAKES], tmp_path / "run")
    assert final["outcome"] == "unfixed" and len(final["updates"]) == 2
    assert [r["text"] for r in final["rules"]] == ["Count the boxes first.", "Multiply only after reading units."]
    second_reflection = backend.prompts_containing("Start with 'RULE:'")[1]
    assert "Earlier rule: Count the boxes first." in second_reflection
    after = BankSnapshot.capture(ctx.bank, ctx.router)
    assert all(torch.equal(v, before.bank[k]) for k, v in after.bank.items())  # the episode was undone
    assert final["rolled_back_to"] == "ep00000-c0"
    assert {r.helped + r.hurt for r in ctx.memory.list_rules()} == {0, 1}


def test_regression_gate_rolls_back_an_update_that_breaks_a_canary(make_run, tmp_path):
    world = World()
    world.broken_after = {"Tom has 3 apples"}  # any training breaks the apples problem
    ctx, _ = make_run(world)
    first, second = _run(ctx, [APPLES, PENS], tmp_path / "run")
    assert first["outcome"] == "correct"
    checks = second["canary_checks"]
    assert checks and all(c["rolled_back"] and c["broke"] == ["p-apples"] for c in checks)
    assert second["outcome"] == "unfixed"
    assert not trained(ctx)  # every harmful update was undone
    broke = ctx.memory.graph.broke_by(checks[0]["update_id"])
    assert broke, "the memory graph records the broken canary"


def test_holdout_problems_never_reach_reflect_diversify_or_update(make_run, tmp_path):
    ctx, backend = make_run(World())
    (final,) = _run(ctx, [dict(CAKES, solution=None)], tmp_path / "run", learning=False)
    assert final["outcome"] == "not_learned"
    assert not backend.prompts_containing("Start with 'RULE:'")
    assert not backend.prompts_containing("Rule:")
    assert final["updates"] == [] and not trained(ctx)


def test_label_free_mode_votes_on_sampled_answers(make_run, tmp_path):
    ctx, backend = make_run(World(), settings=_settings(label_free=True))
    (final,) = _run(ctx, [dict(APPLES, label=None, solution=None)], tmp_path / "run")
    assert final["first"]["label_free"] and final["first"]["correct"]
    assert final["first"]["confidence"] == 1.0 and final["first"]["votes"] == {"8": 3}
    sampled = [c for c in backend.calls if c["sampling"].temperature > 0]
    assert len(sampled) == 3
    assert final["carry"]["canary"][0]["label"] == "8"  # the confident majority guards later updates


def _state_of(ctx, finals):
    bank = {k: v.clone() for k, v in BankSnapshot.capture(ctx.bank, ctx.router).bank.items()}
    rules = sorted((r.rule_id, r.text, r.expert, r.helped, r.hurt) for r in ctx.memory.list_rules())
    results = [(f["problem"]["id"], f["outcome"], f["verdict"]["answer"], len(f["updates"])) for f in finals]
    return bank, rules, results


def test_kill_inside_update_then_resume_equals_uninterrupted_run(make_run, tmp_path, monkeypatch):
    problems = [APPLES, PENS, CAKES]
    ctx, _ = make_run(World(), run_dir=tmp_path / "a")
    want = _state_of(ctx, _run(ctx, problems, tmp_path / "a"))
    ctx.memory.close()

    from adapters.trainer import TestTimeTrainer

    real_step = TestTimeTrainer.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after one optimizer step of the first update has changed the bank
            raise KeyboardInterrupt("killed inside update")
        return real_step(self, *args, **kwargs)

    ctx_b, _ = make_run(World(), run_dir=tmp_path / "b")
    monkeypatch.setattr(TestTimeTrainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _run(ctx_b, problems, tmp_path / "b")
    ctx_b.memory.close()
    monkeypatch.setattr(TestTimeTrainer, "step", real_step)

    resumed, _ = make_run(World(), run_dir=tmp_path / "b")  # a new process: fresh model, bank from disk
    got = _state_of(resumed, _run(resumed, problems, tmp_path / "b"))
    assert got[1] == want[1] and got[2] == want[2]
    assert want[0].keys() == got[0].keys()
    assert all(torch.equal(want[0][k], got[0][k]) for k in want[0])


def test_stop_between_nodes_then_resume_equals_uninterrupted_run(make_run, tmp_path):
    problems = [PENS, CAKES]
    ctx, _ = make_run(World(), run_dir=tmp_path / "a")
    want = _state_of(ctx, _run(ctx, problems, tmp_path / "a"))
    ctx.memory.close()

    ctx_b, _ = make_run(World(), run_dir=tmp_path / "b")
    stop = StopFlag()
    seen = []

    def on_event(event):
        seen.append(event.node)
        if event.node == "diversify":
            stop.set()  # like Ctrl-C: the driver stops once this node's checkpoint is written

    partial = _run(ctx_b, problems, tmp_path / "b", on_event=on_event, stop=stop)
    assert partial == [] and seen[-1] == "diversify"
    ctx_b.memory.close()
    resumed, _ = make_run(World(), run_dir=tmp_path / "b")
    got = _state_of(resumed, _run(resumed, problems, tmp_path / "b"))
    assert got[1] == want[1] and got[2] == want[2]
    assert all(torch.equal(want[0][k], got[0][k]) for k in want[0])


def test_resume_accepts_a_run_saved_before_backend_settings_existed(tmp_path):
    """How text is generated may change on resume; what is learned may not."""
    import json

    from graph.runner import RUN_FILE, RunDirError, prepare_run_dir

    settings = RunSettings(model="tiny-random", data="train", episodes=2)
    old = settings.to_dict()
    del old["batch_size"]
    old["backend"] = "torch"  # an older run: no batch size, torch by default
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    prepare_run_dir(tmp_path, settings, resume=True)
    assert json.loads((tmp_path / RUN_FILE).read_text())["backend"] == "auto"  # now recorded as resumed
    changed = RunSettings(model="tiny-random", data="train", episodes=2, loop=LoopConfig(cycles=5))
    with pytest.raises(RunDirError, match=r"different settings \(loop.cycles: saved 2, now 5\)"):
        prepare_run_dir(tmp_path, changed, resume=True)
