"""The LangGraph loop: node logic with a scripted fake LM over the real tiny model's bank and a real Chroma store."""

import re

import pytest
import torch
from chromadb.api.client import SharedSystemClient

from adapters.bank import BankConfig
from adapters.snapshot import BankSnapshot
from adapters.trainer import TrainerConfig
from agents.prompts import VARIANT_SYSTEM
from agents.solver import SolverConfig
from agents.verifier import VerifierConfig
from graph.context import LoopConfig
from graph.episodes import StopFlag, run_episodes
from graph.run_dir import RunSettings
from graph.runner import build_context
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


HELPFUL = "Read every quantity"  # rules starting so make the scripted model's samples right
HINT = "Hint: the correct final answer is"


def _base(question):
    """The problem a question (or a variant of it, which keeps the numbers) comes from."""
    numbers = sorted(re.findall(r"\d+", question))
    for p in (APPLES, PENS, CAKES):
        if sorted(re.findall(r"\d+", p["question"])) == numbers:
            return p
    raise AssertionError(question)


class World:
    """A scripted model: greedy answers depend on whether the bank is trained; samples on the rule in the prompt."""

    def __init__(self):
        self.ctx = None
        self.right_before = {"p-apples"}  # greedy and sampled answers right before any training
        self.right_after = {"p-pens"}  # greedy right once any expert is trained
        self.broken_after = set()  # right before training, wrong after (a harmful update)
        self.rule_helps = {"p-pens", "p-cakes"}  # sampled answers right with a HELPFUL rule in the prompt
        self.rarely_right = set()  # greedy right, but only the first sample of each call
        self.scattered = False  # sampled answers all different (no agreement)
        self.variants_keep_numbers = True
        self.unsound_hinted = False  # solutions written with the hint reach the answer by a false step
        self.rules = iter([])
        self.calls = 0

    def script(self, prompt, sampling, weights):
        self.calls += 1
        if "Start with 'RULE:'" in prompt:
            return next(self.rules, f"RULE: {HELPFUL} in the question before combining them.")
        question = re.search(r"Problem: (.*?)</user>", prompt, re.DOTALL).group(1)
        if VARIANT_SYSTEM in prompt:
            keep = question.replace("Tom", "Sam").replace("box", "crate").replace("Ann", "Eve")
            return "Problem: " + (keep if self.variants_keep_numbers else keep + " Then 9 more arrive.")
        problem = _base(question.split("\n\n(Hint")[0])
        sampled = sampling.temperature > 0
        if HINT in question:
            work = "2 + 2 = 5" if self.unsound_hinted else problem["solution"]
            return f"Working it out myself: {work}.\nThe answer is {problem['label']}."
        if sampled and self.scattered:
            return f"The answer is {self.calls}."
        if problem["id"] in self.broken_after and trained(self.ctx):
            return "The answer is 99."
        if problem["id"] in self.rarely_right:
            right = not sampled or self.calls % 3 == 0
            return _right(problem) if right else "I think it is 1.\nThe answer is 1."
        if problem["id"] in self.right_before or (not sampled and trained(self.ctx) and problem["id"] in self.right_after):
            return _right(problem)
        if sampled and problem["id"] in self.rule_helps and HELPFUL in prompt:
            return _right(problem)
        return "I think it is 1.\nThe answer is 1."


def _right(problem):
    return f"{problem['solution']}.\nThe answer is {problem['label']}."


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
        from agents.lm.models import load_model

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


def _trained_texts(final):
    return [t for u in final["updates"] for t in u["texts"]]


def test_wrong_answer_gets_a_validated_rule_verified_texts_and_is_fixed(make_run, tmp_path):
    ctx, backend = make_run(World())
    base = BankSnapshot.capture(ctx.bank, ctx.router)
    (final,) = _run(ctx, [PENS], tmp_path / "run")
    assert final["first_try"]["correct"] is False and final["verified_share"] == 0.0
    assert final["outcome"] == "fixed" and final["verdict"]["correct"]
    rule = final["rule"]
    assert rule["status"] == "validated" and rule["chosen"] and rule["share_with"] == 1.0 and rule["share_without"] == 0.0
    assert [r["status"] for r in final["candidates"]] == ["refused", "refused", "validated"]  # repeats of the first
    texts = _trained_texts(final)
    assert {t["source"] for t in texts} == {"rule_conditioned", "variant"}
    assert all(t["completion"].endswith("The answer is 24.") for t in texts)  # only verified solutions
    # context distillation: the rule helped in the prompt, the training prompts carry no rule
    assert not any("Rules learned" in t["prompt"] or HELPFUL in t["prompt"] for t in texts)
    assert any("crate" in t["prompt"] for t in texts)  # a variant, solved with the rule, trained without it
    update = final["updates"][0]
    assert update["expert"] != ctx.bank.config.shared_expert or update["mode"] == "single"
    assert any(not torch.equal(v, base.bank[k]) for k, v in BankSnapshot.capture(ctx.bank, ctx.router).bank.items())
    # the reflector compared the wrong attempt with the learning problem's reference solution
    reflect_prompts = backend.prompts_containing("Start with 'RULE:'")
    assert len(reflect_prompts) == ctx.reflector.config.max_attempts and len(set(reflect_prompts)) == 1  # one call
    reflect_prompt = reflect_prompts[0]
    assert "4 * 6 = 24" in reflect_prompt and "I think it is 1." in reflect_prompt
    # five backend calls: solve (greedy + samples), reflect (rules + variant drafts; then validation
    # + rationalization), diversify (the variants with the rule), reevaluate (problem + canary)
    k, n_rules, n_variants = ctx.verifier.samples, ctx.reflector.config.max_attempts, len(ctx.diversifier.config.kinds)
    accepted = sum(c["status"] != "refused" for c in final["candidates"])
    kept = sum(v["status"] == "kept" for v in final["variants"])
    assert backend.together == [[1, k], [n_rules, n_variants], [k] * accepted + [k], [kept * k], [1]]
    (stored,) = ctx.memory.list_rules()
    assert stored.expert == update["expert"] and stored.helped == 1 and stored.status == "trained"
    assert (stored.share_with, stored.share_without) == (1.0, 0.0)
    assert ctx.memory.show_rule(stored.rule_id).rule.rule_id == stored.rule_id
    saved = BankSnapshot.capture(ctx.bank, ctx.router)
    from adapters.store import load_bank

    load_bank(ctx.bank_store.current, ctx.bank, ctx.router)  # the bank on disk is the trained one
    assert all(torch.equal(v, saved.bank[k]) for k, v in BankSnapshot.capture(ctx.bank, ctx.router).bank.items())


def test_a_refuted_rule_is_stored_refuted_and_never_placed_in_a_prompt(make_run, tmp_path):
    world = World()
    world.rules = iter(["RULE: Count the boxes first.", "RULE: Multiply only after reading units.",
                        "RULE: Subtract what is sold."])  # then the helpful default
    world.right_after = set()
    ctx, backend = make_run(world, settings=_settings(cycles=1))
    first, second = _run(ctx, [CAKES, PENS], tmp_path / "run")
    assert [r["status"] for r in first["rules"]] == ["refuted"] * 3 and first["rule"] is None
    statuses = {r.text: r.status for r in ctx.memory.list_rules()}
    assert statuses["Count the boxes first."] == "refuted" and statuses["Subtract what is sold."] == "refuted"
    # a refuted rule appeared only in its own validation prompts, never in a later solve
    for text in ("Count the boxes first.", "Subtract what is sold."):
        assert all("Ann bakes 7 cakes" in p for p in backend.prompts_containing(text) if "Rules learned" in p)
    assert not any("Count the boxes first." in p for p in backend.prompts_containing("A box holds 4 pens")
                   if "Rules learned" in p)
    # no rule validated: STaR's rationalization, whose hint never reaches a training prompt
    texts = _trained_texts(first)
    assert texts and {t["source"] for t in texts} == {"rationalization"}
    assert backend.prompts_containing(HINT) and not any(HINT in t["prompt"] for t in texts)
    assert all(t["completion"].endswith("The answer is 5.") for t in texts)
    assert second["rules"][0]["status"] == "validated"


def test_train_sources_limit_what_reaches_the_gradient_and_skip_the_calls_left_out(make_run, tmp_path):
    # PENS: a rule validates, so its texts are rule-conditioned samples and variants; variants left out.
    ctx, backend = make_run(World(), settings=_settings(train_sources=("rule_conditioned", "rationalization")))
    (final,) = _run(ctx, [PENS], tmp_path / "run")
    assert final["rule"]["status"] == "validated"
    assert {t["source"] for t in _trained_texts(final)} == {"rule_conditioned"}
    assert not backend.prompts_containing(VARIANT_SYSTEM)  # no variant drafted: nothing of it would be trained
    # CAKES, no rule validates: rationalization left out, so neither asked for nor trained
    world = World()
    world.rules = iter(["RULE: Count the boxes first.", "RULE: Multiply only after reading units.",
                        "RULE: Subtract what is sold."])
    ctx, backend = make_run(world, run_dir=tmp_path / "run2", settings=_settings(cycles=1, train_sources=("variant",)))
    (final,) = _run(ctx, [CAKES], tmp_path / "run2")
    assert final["rule"] is None and final["updates"] == [] and not backend.prompts_containing(HINT)
    assert not trained(ctx)
    with pytest.raises(ValueError, match="non-empty subset"):
        LoopConfig(train_sources=("own_sample", "reference"))


def test_only_verified_texts_reach_the_trainer(make_run, tmp_path, monkeypatch):
    from adapters.trainer import TestTimeTrainer

    seen = []
    real = TestTimeTrainer.update

    def recording(self, examples, *args, **kwargs):
        seen.extend(examples)
        return real(self, examples, *args, **kwargs)

    monkeypatch.setattr(TestTimeTrainer, "update", recording)
    world = World()
    world.rarely_right = {"p-cakes"}
    ctx, _ = make_run(world)
    _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run")
    assert seen
    for example in seen:
        problem = _base(re.search(r"Problem: (.*?)</user>", example.prompt, re.DOTALL).group(1))
        assert example.completion.endswith(f"The answer is {problem['label']}."), example.completion
        assert "The answer is 1." not in example.completion and HINT not in example.prompt


def test_a_right_answer_reached_by_a_false_step_is_recorded_and_never_trained(make_run, tmp_path):
    world = World()
    world.rule_helps = set()  # no rule validates on CAKES: rationalization, whose solutions are unsound
    world.unsound_hinted = True
    ctx, backend = make_run(world, settings=_settings(cycles=1))
    (final,) = _run(ctx, [CAKES], tmp_path / "run")
    assert backend.prompts_containing(HINT) and final["updates"] == [] and not trained(ctx)
    assert final["unsound"] and {u["source"] for u in final["unsound"]} == {"rationalization"}
    assert final["unsound"][0]["reason"] == "false step: 2 + 2 = 5"
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert "rationalization: false step: 2 + 2 = 5" in events


def test_right_but_rarely_learns_from_its_own_verified_samples(make_run, tmp_path):
    world = World()
    world.rarely_right = {"p-cakes"}
    ctx, backend = make_run(world)
    (final,) = _run(ctx, [CAKES], tmp_path / "run")
    assert final["first_try"]["correct"] and final["verified_share"] < ctx.config.low_share
    assert final["outcome"] == "correct" and not backend.prompts_containing("Start with 'RULE:'")
    (update,) = final["updates"]
    assert {t["source"] for t in update["texts"]} == {"own_sample"} and len(update["texts"]) == 1  # distinct


@pytest.mark.parametrize("round_gate", [False, True])
def test_learning_that_breaks_a_problem_answered_right_is_undone(make_run, tmp_path, round_gate):
    world = World()
    world.rarely_right = {"p-cakes"}
    world.broken_after = {"p-cakes"}  # once trained, the greedy answer turns wrong
    ctx, _ = make_run(world, settings=_settings(round_gate=round_gate))
    (final,) = _run(ctx, [CAKES], tmp_path / "run")
    assert final["updates"] and not trained(ctx)
    if round_gate:  # the problem is in its round's canary, which undoes the round's update
        assert final["canary_checks"][-1]["canary_rolled_back"] and final["canary_checks"][-1]["broke"] == ["p-cakes"]
    else:
        assert final["episode_rolled_back_to"] == "ep00000-c0"
    assert final["carry"]["replay"] == {}


def test_replay_carries_the_kept_texts_to_the_next_update_of_the_expert(make_run, tmp_path):
    settings = _settings(expert_policy="fresh")
    ctx, _ = make_run(World(), settings=settings)
    first, = _run(ctx, [PENS], tmp_path / "run")
    (expert, texts), = [(k, v) for k, v in first["carry"]["replay"].items() if v]
    assert {t["source"] for t in texts} <= {"rule_conditioned", "variant"} and all("question" in t for t in texts)


def test_the_next_update_of_the_trained_expert_replays_the_kept_texts_in_single_mode(make_run, tmp_path):
    """In Single mode the shared expert trains whichever expert was picked: its replay is the shared one's."""
    from adapters.stress import StressConfig

    settings = _settings(expert_policy="fresh", cycles=1)
    settings.stress = StressConfig(loss_scale=1e6)  # every loss looks easy: Single mode, the shared expert
    ctx, _ = make_run(World(), settings=settings)
    first, second = _run(ctx, [PENS, CAKES], tmp_path / "run")
    shared = ctx.bank.config.shared_expert
    assert {u["expert"] for u in first["updates"] + second["updates"]} == {shared}
    assert {u["picked"] for u in first["updates"]} != {shared} or {u["picked"] for u in second["updates"]} != {shared}
    kept = [t["completion"] for t in first["carry"]["replay"][str(shared)]]
    replayed = [t["completion"] for t in second["updates"][0]["texts"] if t["source"] == "replay"]
    assert kept and replayed == kept[-ctx.config.replay:] and second["updates"][0]["replayed"] == len(replayed)


def test_a_replayed_text_is_routed_with_its_own_problems_memory_features(make_run, tmp_path):
    """PENS's kept texts replay in CAKES's update with PENS's features (blind to PENS), not CAKES's."""
    from adapters.stress import StressConfig

    settings = _settings(expert_policy="fresh", cycles=1)
    settings.stress = StressConfig(loss_scale=1e6)  # Single mode: every update trains (and replays) the shared expert
    ctx, _ = make_run(World(), settings=settings)
    steps = []
    real_step = ctx.trainer.step

    def spy(examples, expert, optimizer, memory=None, features=None):
        wanted, *_ = ctx.memory_vectors([PENS["question"], CAKES["question"]], exclude=["p-pens", "p-cakes"])
        steps.append((list(examples), memory, wanted))
        return real_step(examples, expert, optimizer, memory, features)

    ctx.trainer.step = spy
    apples, pens, cakes = _run(ctx, [APPLES, PENS, CAKES], tmp_path / "run")  # APPLES fills the memory
    assert apples["outcome"] == "correct" and pens["updates"] and cakes["updates"]
    replayed = [t for t in cakes["updates"][0]["texts"] if t["source"] == "replay"]
    assert replayed and all(t["problem_id"] == "p-pens" for t in pens["carry"]["replay"][str(ctx.bank.config.shared_expert)])
    examples, memory, (for_pens, for_cakes) = steps[-1]
    assert [e.completion for e in examples][-len(replayed):] == [t["completion"] for t in replayed]
    assert not torch.allclose(for_pens, for_cakes)  # a row of the wrong problem could not pass unseen
    rows = memory[-len(replayed):]
    assert torch.allclose(rows, for_pens.to(rows.dtype).expand(len(replayed), -1))
    assert torch.allclose(memory[0], for_cakes.to(memory.dtype))  # CAKES's own texts keep CAKES's


def test_a_replayed_text_kept_without_its_problem_takes_the_updating_problems_features(make_run, tmp_path):
    """An older run's carry kept replay texts without their problem: they train as they did then."""
    from adapters.stress import StressConfig
    from graph.nodes import _replay_memory, _route

    settings = _settings(expert_policy="fresh", cycles=1)
    settings.stress = StressConfig(loss_scale=1e6)
    ctx, _ = make_run(World(), settings=settings)
    _run(ctx, [APPLES, PENS], tmp_path / "run")
    routed = _route(ctx, CAKES["question"], {"problem": CAKES})
    new = {"question": "v", "completion": "c", "source": "variant", "problem_id": "p-pens",
           "problem_question": PENS["question"]}
    old = {k: new[k] for k in ("question", "completion", "source")}
    rows = _replay_memory(ctx, routed, {0: [new, old, new]})[0]
    wanted, *_ = ctx.memory_vectors([PENS["question"]], exclude=["p-pens"])
    assert not torch.allclose(wanted[0], routed.memory[0])
    assert torch.allclose(rows, torch.stack([wanted[0], routed.memory[0], wanted[0]]).to(rows))


def test_variants_that_change_a_quantity_are_refused(make_run, tmp_path):
    world = World()
    world.variants_keep_numbers = False
    ctx, _ = make_run(world)
    (final,) = _run(ctx, [PENS], tmp_path / "run")
    assert final["variants"] and all(v["status"] == "refused" and "numbers differ" in v["reason"] for v in final["variants"])
    assert {t["source"] for t in _trained_texts(final)} == {"rule_conditioned"}


def test_unfixed_problem_keeps_its_verified_updates_by_default(make_run, tmp_path):
    world = World()
    world.right_after = set()
    ctx, _ = make_run(world)
    (final,) = _run(ctx, [CAKES], tmp_path / "run")
    assert final["outcome"] == "unfixed" and len(final["updates"]) == 2
    assert final["episode_rolled_back_to"] is None and trained(ctx)
    assert {r.status for r in ctx.memory.list_rules()} == {"trained"}


def test_unfixed_problem_uses_all_cycles_then_rolls_back(make_run, tmp_path):
    world = World()
    world.right_after = set()
    ctx, backend = make_run(world, settings=_settings(keep_unfixed_updates=False, round_gate=False))
    before = BankSnapshot.capture(ctx.bank, ctx.router)
    (final,) = _run(ctx, [CAKES], tmp_path / "run")
    assert final["outcome"] == "unfixed" and len(final["updates"]) == 2
    second_reflection = backend.prompts_containing("Start with 'RULE:'")[-1]
    assert "These rules were tried and did not help" in second_reflection and HELPFUL in second_reflection
    after = BankSnapshot.capture(ctx.bank, ctx.router)
    assert all(torch.equal(v, before.bank[k]) for k, v in after.bank.items())  # the episode was undone
    assert final["episode_rolled_back_to"] == "ep00000-c0"
    assert {r.status for r in ctx.memory.list_rules()} <= {"rolled_back", "refuted"}


def test_regression_gate_rolls_back_an_update_that_breaks_a_canary(make_run, tmp_path):
    world = World()
    world.broken_after = {"p-apples"}  # any training breaks the apples problem
    ctx, _ = make_run(world)
    first, second = _run(ctx, [APPLES, PENS], tmp_path / "run")
    assert first["outcome"] == "correct"
    checks = second["canary_checks"]
    assert checks and all(c["canary_rolled_back"] and c["broke"] == ["p-apples"] for c in checks)
    assert second["outcome"] == "unfixed"
    assert not trained(ctx)  # every harmful update was undone
    assert ctx.memory.graph.broke_by(checks[0]["update_id"]), "the memory graph records the broken canary"
    # the rule whose update the gate undid is not recorded as trained into its expert
    assert {r.status for r in ctx.memory.list_rules()} == {"rolled_back"}
    assert all(not texts for texts in second["carry"]["replay"].values())  # undone texts are never replayed


def test_holdout_problems_never_reach_reflect_diversify_or_update(make_run, tmp_path):
    ctx, backend = make_run(World())
    (final,) = _run(ctx, [dict(CAKES, solution=None)], tmp_path / "run", learning=False)
    assert final["outcome"] == "not_learned"
    assert not backend.prompts_containing("Start with 'RULE:'") and not backend.prompts_containing(VARIANT_SYSTEM)
    assert not backend.prompts_containing(HINT)
    assert not [c for c in backend.calls if c["sampling"].temperature > 0]  # not even sampled
    assert final["updates"] == [] and not trained(ctx)


def test_label_free_mode_votes_on_sampled_answers(make_run, tmp_path):
    ctx, backend = make_run(World(), settings=_settings(label_free=True))
    (final,) = _run(ctx, [dict(APPLES, label=None, solution=None)], tmp_path / "run")
    assert final["first_try"]["label_free"] and final["first_try"]["correct"] and final["target"] == "8"
    assert final["first_try"]["confidence"] == 1.0
    sampled = [c for c in backend.calls if c["sampling"].temperature > 0]
    assert len(sampled) == 3
    assert final["carry"]["canary"][0]["label"] == "8"  # the confident majority guards later updates


def test_label_free_skips_a_problem_below_the_agreement_share_and_never_rationalizes(make_run, tmp_path):
    world = World()
    world.scattered = True
    ctx, backend = make_run(world, settings=_settings(label_free=True))
    (skipped,) = _run(ctx, [dict(CAKES, label=None, solution=None)], tmp_path / "run")
    assert skipped["unverifiable"] and skipped["outcome"] == "skipped" and skipped["updates"] == []
    assert not backend.prompts_containing("Start with 'RULE:'")
    world.scattered = False  # now the samples agree (on the wrong 1): a pseudo-label, greedy agrees
    ctx2, backend2 = make_run(world, settings=_settings(label_free=True), run_dir=tmp_path / "two")
    (agreed,) = _run(ctx2, [dict(PENS, label=None, solution=None)], tmp_path / "two")
    assert agreed["target"] == "1" and not backend2.prompts_containing(HINT) and not backend.prompts_containing(HINT)


def _state_of(ctx, finals):
    bank = {k: v.clone() for k, v in BankSnapshot.capture(ctx.bank, ctx.router).bank.items()}
    rules = sorted((r.rule_id, r.text, r.expert, r.helped, r.hurt, r.retrieved, r.status, r.share_with, r.share_without)
                   for r in ctx.memory.list_rules())
    results = [(f["problem"]["id"], f["outcome"], f["verdict"]["answer"], len(f["updates"])) for f in finals]
    return bank, rules, results


def _kill_then_resume(make_run, tmp_path, monkeypatch, problems, owner, name, kill_at, why, settings=None, **run_kw):
    """An uninterrupted run in a/, and in b/ a run whose ``owner.name`` raises on its kill_at-th call, then resumed.

    Returns the uninterrupted state and the resumed run's context and final states.
    ``run_kw`` go to every ``run_episodes`` call (``round_size``, say); ``settings`` to every context.
    """
    ctx, _ = make_run(World(), run_dir=tmp_path / "a", settings=settings)
    want = _state_of(ctx, _run(ctx, problems, tmp_path / "a", **run_kw))
    ctx.memory.close()
    real = getattr(owner, name)
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt(why)
        return real(self, *args, **kwargs)

    ctx_b, _ = make_run(World(), run_dir=tmp_path / "b", settings=settings)
    monkeypatch.setattr(owner, name, dying)
    with pytest.raises(KeyboardInterrupt):
        _run(ctx_b, problems, tmp_path / "b", **run_kw)
    ctx_b.memory.close()
    monkeypatch.setattr(owner, name, real)
    assert calls["n"] == kill_at  # the kill happened
    resumed, _ = make_run(World(), run_dir=tmp_path / "b", settings=settings)  # a new process: fresh model, bank from disk
    return want, resumed, _run(resumed, problems, tmp_path / "b", **run_kw)


def test_kill_inside_update_then_resume_equals_uninterrupted_run(make_run, tmp_path, monkeypatch):
    from adapters.trainer import TestTimeTrainer

    # the 2nd optimizer step: after one step of the first update has changed the bank
    want, resumed, finals = _kill_then_resume(make_run, tmp_path, monkeypatch, [APPLES, PENS, CAKES],
                                              TestTimeTrainer, "step", 2, "killed inside update")
    got = _state_of(resumed, finals)
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

    from graph.run_dir import RUN_FILE, RunDirError, prepare_run_dir

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


def test_the_reflector_and_diversifier_configs_are_saved_and_checked_on_resume(tmp_path):
    import json

    from agents.diversifier import DiversifierConfig
    from agents.reflector import ReflectorConfig
    from graph.run_dir import RUN_FILE, RunDirError, prepare_run_dir

    settings = RunSettings(model="tiny-random", data="train", episodes=2, reflector=ReflectorConfig(max_attempts=5),
                           diversifier=DiversifierConfig(kinds=("rename",)))
    prepare_run_dir(tmp_path, settings, resume=False)
    saved = json.loads((tmp_path / RUN_FILE).read_text())
    assert saved["reflector"]["max_attempts"] == 5 and saved["diversifier"]["kinds"] == ["rename"]
    with pytest.raises(RunDirError, match=r"reflector.max_attempts: saved 5, now 3"):
        prepare_run_dir(tmp_path, RunSettings(model="tiny-random", data="train", episodes=2,
                                              diversifier=DiversifierConfig(kinds=("rename",))), resume=True)


def test_the_agents_of_a_run_use_its_reflector_and_diversifier_configs(make_run):
    from dataclasses import replace

    from agents.diversifier import DiversifierConfig
    from agents.reflector import ReflectorConfig

    settings = replace(_settings(), reflector=ReflectorConfig(max_attempts=1), diversifier=DiversifierConfig(per_kind=2))
    ctx, _ = make_run(World(), settings=settings)
    assert ctx.reflector.config.max_attempts == 1 and ctx.diversifier.config.per_kind == 2


def test_the_router_mode_is_the_same_by_default_everywhere():
    from adapters.router import RouterConfig
    from graph.evaluation.config import EvalConfig

    assert RouterConfig().mode == RunSettings().router.mode == EvalConfig().router.mode == "top-k"


def test_a_run_checkpointed_in_an_older_state_layout_is_refused_on_resume(make_run, tmp_path):
    import json

    from graph.run_dir import RUN_FILE, RunDirError, check_run_dir, prepare_run_dir

    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, _settings(), resume=False)
    check_run_dir(run_dir, _settings(), resume=True)  # this version's layout resumes
    saved = json.loads((run_dir / RUN_FILE).read_text())
    del saved["state_format"]  # as an older version wrote it
    (run_dir / RUN_FILE).write_text(json.dumps(saved))
    check_run_dir(run_dir, _settings(), resume=True)  # nothing checkpointed yet: nothing to misread
    ctx, _ = make_run(World(), run_dir=run_dir)
    _run(ctx, [APPLES], run_dir)
    with pytest.raises(RunDirError, match="made by an older version"):
        check_run_dir(run_dir, _settings(), resume=True)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 5, 8, 12])
def test_a_kill_inside_the_checkpointers_put_resumes_exactly(make_run, tmp_path, monkeypatch, kill_at):
    """The window after a node's writes are saved and before the next checkpoint: resume must finish the episode."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    # the node's writes are saved (put_writes); its checkpoint is not
    want, resumed, finals = _kill_then_resume(make_run, tmp_path, monkeypatch, [PENS, CAKES],
                                              SqliteSaver, "put", kill_at, "killed inside put")
    assert all(f.get("committed") and "outcome" in f for f in finals)
    got = _state_of(resumed, finals)
    assert got[1] == want[1] and got[2] == want[2]
    assert all(torch.equal(want[0][k], got[0][k]) for k in want[0])


@pytest.mark.parametrize("kill_at", [2, 5, 8])
def test_a_kill_between_the_commits_memory_writes_counts_nothing_twice(make_run, tmp_path, monkeypatch, kill_at):
    """Memory writes of commit as kill points: 5 and 8 fall after a rule's outcome or retrieval count and before the
    episode record (the writes of all nine points were tried; these three cover first, outcome and retrieval)."""
    from memory_store.store import MemoryStore

    want, resumed, finals = _kill_then_resume(make_run, tmp_path, monkeypatch, [PENS, CAKES, PENS],
                                              MemoryStore, "_writing", kill_at, "killed between memory writes")
    got = _state_of(resumed, finals)
    assert got[1] == want[1] and got[2] == want[2]
    assert any(r[3] or r[4] for r in want[1]) and any(r[5] for r in want[1])  # outcomes and retrievals were counted
    def episodes(stored):  # ids differ: they name the run folder
        return sorted((e.problem_id, e.split, e.verdict_before, e.verdict_after, e.cycle) for e in stored)

    assert episodes(resumed.memory.list_episodes()) == episodes(_episodes_of(tmp_path / "a"))


def _episodes_of(run_dir):
    from memory_store.config import MemoryConfig
    from memory_store.store import MemoryStore

    SharedSystemClient.clear_system_cache()
    store = MemoryStore.open(MemoryConfig(run_dir=run_dir, n_experts=4), embedder=HashEmbedding(dim=384), writable=False)
    try:
        return store.list_episodes()
    finally:
        store.close()
