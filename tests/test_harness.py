"""The evaluation harness: data subsets, protocols, arms, reports and the eval command.

The arms run on the real tiny model (its bank, router, trainer and Chroma memory) with a
scripted generation backend whose answers depend on what the arm brings: rules in the
prompt, or a trained expert in the mixture.
"""

import json
import re
import sys
import types
from dataclasses import replace

import pytest
from chromadb.api.client import SharedSystemClient
from typer.testing import CliRunner

from adapters.bank import BankConfig, LoRABankLinear
from adapters.trainer import TestTimeTrainer, TrainerConfig
from agents.data_sources import open_source
from agents.errors import DataError
from agents.gsm8k import Problem, problem_id, sample_problems
from agents.prompts import REFLECT_SYSTEM, SOLVER_SYSTEM, VARIANT_SYSTEM
from agents.trajectories import SOURCES
from agents.verifier import VerifierConfig
from graph.episodes import StopFlag
from graph.evaluation.config import EvalConfig, EvalInterrupted
from graph.evaluation.harness import evaluate, prepare_eval_dir
from graph.evaluation.problems import prepare_problems
from graph.evaluation.results import finished_arm
from graph.inspection.expert_export import export_expert
from graph.routing import route
from graph.run_dir import RunDirError
from run_loop import app
from tests.fakes import ScriptedBackend

LEARN = [(f"A crate holds {n} jars and a second crate holds {n} more jars. How many jars in all?", 2 * n, f"{n} + {n} = {2 * n}")
         for n in (11, 13, 17, 19)]
EVAL = [
    ("Sam reads 6 pages a day for 7 days. How many pages does he read?", 42, "6 * 7 = 42"),  # frozen right; rules confuse it
    ("A shelf has 9 rows of 4 books. How many books?", 36, "9 * 4 = 36"),  # frozen writes no number
    ("Ann had 40 dollars and spent 15. How many dollars are left?", 25, "40 - 15 = 25"),
    ("Bo walks 3 miles each morning and 2 each evening. How many miles a day?", 5, "3 + 2 = 5"),
]
EVAL_Q = [q for q, _, _ in EVAL]


def _write(path, rows):
    path.write_text("".join(json.dumps({"question": q, "answer": f"{s}\n#### {a}"}) + "\n" for q, a, s in rows))
    return str(path)


class Model:
    """A scripted model: rules in the prompt or a trained expert in the mixture make it right."""

    def __init__(self):
        self.loaded = None  # the latest model the harness loaded (one per arm)
        self.labels = {q: a for q, a, _ in LEARN + EVAL}
        self.backends = []

    def loader(self):
        from agents.lm.models import load_model

        self.loaded = load_model("tiny-random")
        return self.loaded

    def backend(self, loaded, bank):
        backend = ScriptedBackend(self.script)
        self.backends.append(backend)
        return backend

    def trained(self):
        return any(bool(m.lora_B.detach().any()) for m in self.loaded.model.modules() if isinstance(m, LoRABankLinear))

    def label(self, question):
        """The label of a question or of a variant of it (variants keep the numbers)."""
        numbers = sorted(re.findall(r"\d+", question))
        return next(a for q, a in self.labels.items() if sorted(re.findall(r"\d+", q)) == numbers)

    def script(self, prompt, sampling, weights):
        if VARIANT_SYSTEM in prompt:
            question = re.search(r"Problem: (.*?)</user>", prompt, re.DOTALL).group(1).strip()
            return "Problem: " + question.replace("crate", "box")
        if SOLVER_SYSTEM[:30] in prompt:
            question = re.search(r"Problem: (.*?)</user>", prompt, re.DOTALL).group(1).strip()
            with_rules = "Rules learned from earlier mistakes" in prompt
            adapted = weights is not None and self.trained()  # a mixture over a bank with a trained expert
            if question == EVAL_Q[0]:
                return "I get 41.\nThe answer is 41." if with_rules else "6 * 7 = 42.\nThe answer is 42."
            if with_rules or adapted:
                return f"Working it out, I get {self.label(question)}.\nThe answer is {self.label(question)}."
            if question == EVAL_Q[1]:
                return "I am not sure how to do this one."
            return "I think it is 1.\nThe answer is 1."
        if REFLECT_SYSTEM[:30] in prompt:
            return "RULE: Read every quantity in the question before combining them."
        raise AssertionError(f"unexpected prompt: {prompt[:200]}")

    def prompts(self, needle):
        return [p for b in self.backends for p in b.prompts_containing(needle)]


def _config(tmp_path, **kw):
    data = {"learn_data": _write(tmp_path / "learn.jsonl", LEARN), "eval_data": _write(tmp_path / "eval.jsonl", EVAL)}
    base = dict(model="tiny-random", learn_problems=4, eval_problems=4, cycles=2, max_new_tokens=16, embedder="hash",
                bank=BankConfig(n_experts=4), trainer=TrainerConfig(steps_per_update=1), batch_size=3,
                verifier=VerifierConfig(samples=3))
    return EvalConfig(**{**data, **base, **kw})


def _evaluate(config, run_dir, model, **kw):
    SharedSystemClient.clear_system_cache()
    return evaluate(config, run_dir, loader=model.loader, backend=model.backend, **kw)


# ---------------------------------------------------------------- data


def _problems(n, split="s"):
    return [Problem(problem_id(split, f"Question {i}?"), f"Question {i}?", "s", str(i), split) for i in range(n)]


def test_sample_problems_is_deterministic_by_seed_and_ids():
    problems = _problems(30)
    first = sample_problems(problems, 10, seed=3)
    assert [p.id for p in first] == [p.id for p in sample_problems(list(reversed(problems)), 10, seed=3)]
    assert [p.id for p in sample_problems(problems, 5, seed=3)] == [p.id for p in first[:5]]  # a larger n extends
    assert {p.id for p in sample_problems(problems, 10, seed=4)} != {p.id for p in first}
    with pytest.raises(DataError, match="only 30"):
        sample_problems(problems, 31, seed=0)
    with pytest.raises(DataError, match="same question twice"):
        sample_problems(problems + problems[:1], 3, seed=0)


def test_hub_source_without_a_hub_is_one_data_error_line(monkeypatch):
    with pytest.raises(DataError) as err:
        open_source("gsm8k:test")  # conftest sets HF_HUB_OFFLINE=1; this machine has no hub either
    assert "cannot load openai/gsm8k test from the local datasets cache" in str(err.value)
    assert "\n" not in str(err.value)


def test_hub_source_parses_rows_like_the_local_files(monkeypatch):
    rows = [{"question": "Tom has 3 apples and buys 5. How many?", "answer": "3+5=<<3+5=8>>8\n#### 8"}]
    calls = []
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: calls.append((a, k)) or rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (problem,) = open_source("gsm8k:train").problems
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"})]
    assert problem.id == problem_id("train", rows[0]["question"]) and problem.label == "8" and problem.solution == "3+5=8"


def test_overlap_between_learning_and_evaluation_data_fails_loudly(tmp_path):
    config = _config(tmp_path)
    # The same question under another file name: a different id, the same text.
    config.learn_data = _write(tmp_path / "other.jsonl", LEARN[:3] + [EVAL[2]])
    with pytest.raises(DataError, match=r"overlap \(0 by id, 1 by text"):
        prepare_problems(config)
    # One file for both: the learning draw comes from what the evaluation draw left.
    both = _write(tmp_path / "both.jsonl", LEARN + EVAL)
    sets = prepare_problems(_config(tmp_path, learn_data=both, eval_data=both, learn_problems=4, eval_problems=4))
    assert not {p.question for p in sets.learn} & {p.question for p in sets.scored}
    assert len(sets.learn) == len(sets.scored) == 4


@pytest.mark.parametrize("kw,needle", [
    ({"protocol": "nope"}, "protocol must be one of holdout, stream, recovery"),
    ({"arms": ("rules", "magic")}, "arms must be a non-empty subset"),
    ({"arms": ("single-lora",)}, "add the adapters arm"),
    ({"eval_problems": 0}, "eval_problems must be >= 1"),
    ({"embedder": "bert"}, "embedder must be one of"),
    ({"backend": "vllm"}, "backend must be one of auto, torch, llama.cpp"),
])
def test_config_errors_name_the_value(kw, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        EvalConfig(**kw)
    assert EvalConfig(arms=("rules",)).arms == ("frozen", "rules")  # frozen is always the baseline


# ---------------------------------------------------------------- holdout


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("holdout")
    model = Model()
    trained_texts = []
    real_update = TestTimeTrainer.update

    def spy(self, examples, *args, **kwargs):
        trained_texts.extend(e.prompt + "\n" + e.completion for e in examples)
        return real_update(self, examples, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TestTimeTrainer, "update", spy)
        report = _evaluate(_config(tmp), tmp / "run", model)
    return report, model, trained_texts, tmp / "run"


def test_holdout_arms_score_as_scripted_with_flips_and_tests(holdout):
    report, *_ = holdout
    arms = report.summary()["arms"]
    assert list(arms) == ["frozen", "vote", "rules", "adapters", "full", "single-lora"]
    assert {k: (v["correct"], v["n"]) for k, v in arms.items()} == {
        "frozen": (1, 4), "vote": (1, 4), "rules": (3, 4), "adapters": (4, 4), "full": (3, 4), "single-lora": (4, 4)}
    assert arms["adapters"]["vs_vote"]["flips"]["wrong_right"] == 3 and "vs_vote" not in arms["frozen"]
    assert arms["frozen"]["format_failures"] == 1 and arms["frozen"]["wrong"] == 2  # counted apart
    rules = arms["rules"]["vs_frozen"]
    assert rules["flips"] == {"right_right": 0, "wrong_right": 3, "right_wrong": 1, "wrong_wrong": 0}
    assert rules["p_value"] == pytest.approx(2 * (1 + 4) / 16)  # b=3, c=1
    assert arms["adapters"]["vs_frozen"]["delta"] == pytest.approx(0.75)
    low, high = arms["frozen"]["ci95"]
    assert low < 0.25 < high
    learning = report.arms["adapters"].learning
    assert learning["fixed"] >= 1 and learning["updates"] >= 1 and learning["texts"] >= 1
    assert learning["rules_validated"] >= 1 and learning["learned_from"] >= 1
    assert learning["texts_by_source"]["rule_conditioned"] >= 1 and learning["texts_by_source"]["variant"] >= 1
    assert learning["episodes_timed"] == 4 and learning["episode_seconds_p90"] >= learning["episode_seconds_median"]
    assert report.arms["single-lora"].learning["bursts"] == learning["updates"]
    usage = report.arms["full"].expert_usage
    assert len(usage["mean_weight"]) == 4 and sum(usage["updates"]) >= 1


def test_a_learning_arm_asks_its_problems_right_at_the_first_try_again_after_learning(tmp_path):
    # One problem at a time: once an expert is trained, the scripted model answers the later learning
    # problems right at the first try through the bank (and the frozen model never does).
    model = Model()
    routed: list[tuple[list[str], list | None]] = []

    def spy(ctx, questions, **kwargs):
        routed.append((list(questions), kwargs.get("exclude")))
        return route(ctx, questions, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("graph.evaluation.arms.route", spy)
        report = _evaluate(_config(tmp_path, arms=("adapters",), round_size=1, plots=False), tmp_path / "run", model)
    learning = report.arms["adapters"].learning
    right_first = sum(point["first_correct"] for point in report.arms["adapters"].curve)
    assert right_first >= 1
    forgetting = learning["forgetting"]
    assert forgetting.pop("seconds") >= 0
    assert forgetting == {"checked": right_first, "right_after": right_first, "right_frozen": 0, "lost": []}
    # Each learning problem is asked again blind to its own episode in memory; scored problems exclude none.
    _, states = finished_arm(tmp_path / "run", "adapters")
    by_question = {s["problem"]["question"]: s["problem"]["id"] for s in states}
    asked_again = [(qs, ex) for qs, ex in routed if ex is not None]
    assert len(asked_again) == 1 and len(asked_again[0][0]) == right_first
    assert asked_again[0][1] == [by_question[q] for q in asked_again[0][0]]
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"| {right_first} / 0 of {right_first} |" in md


def test_holdout_evaluation_problems_never_reach_reflect_diversify_or_training(holdout):
    report, model, trained_texts, _ = holdout
    reflect_prompts = model.prompts(REFLECT_SYSTEM[:30])
    diversify_prompts = model.prompts(VARIANT_SYSTEM)
    validate_prompts = [p for p in model.prompts("Rules learned from earlier mistakes") if "(Hint" not in p]
    assert reflect_prompts and diversify_prompts and trained_texts  # the check is not vacuous
    assert any(solution in p for _, _, solution in LEARN for p in reflect_prompts)  # learning solutions do reach it
    for question, label, solution in EVAL:
        for text in reflect_prompts + diversify_prompts + trained_texts:
            assert question not in text and solution not in text
    # rule validation solves only learning problems (and their variants); scoring is a separate call
    learning_sampled = [c["prompt"] for b in model.backends for c in b.calls if c["sampling"].temperature > 0
                        and "Rules learned" in c["prompt"]]
    assert learning_sampled and not any(q in p for q in EVAL_Q for p in learning_sampled)
    assert validate_prompts
    eval_ids = {item["id"] for item in report.items}
    assert not eval_ids & set(report.learn_ids)
    assert report.leak_check["containing_an_evaluation_question"] == 0
    assert report.leak_check["rules"] >= 2 and report.leak_check["training_texts"] >= 1
    # every solve of an evaluation question is a scoring call: no other node saw them
    solve_prompts = model.prompts(SOLVER_SYSTEM[:30])
    assert sum(EVAL_Q[2] in p for p in solve_prompts) == 5 + 3  # once per arm, and the vote arm's 3 samples


def test_the_report_warns_when_arms_were_scored_by_different_engines(holdout):
    import copy

    from graph.evaluation.report import render_markdown

    report = holdout[0]
    warning = "the arms' answers come from different engines or machines"
    assert warning not in render_markdown(report)
    elsewhere = copy.deepcopy(report)
    elsewhere.arms["vote"].backend = "torch (continuous batching), torch.bfloat16 weights on cpu (another CPU)"
    md = render_markdown(elsewhere)
    assert warning in md and "- scored answers generated by (vote): torch (continuous batching)" in md


def test_holdout_report_files_are_written_and_readable(holdout):
    from matplotlib.image import imread

    report, _, _, run_dir = holdout
    data = json.loads((run_dir / "report.json").read_text())
    assert data["protocol"] == "holdout" and "disjoint" in data["protocol_note"]
    assert data["arms"]["rules"]["vs_frozen"]["flips"]["right_wrong"] == 1
    assert [r["id"] for r in data["per_item"]["frozen"]] == [i["id"] for i in data["items"]]
    assert set(data["curves"]) == {"rules", "adapters", "full"}
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# GSM8K evaluation, protocol: holdout")
    assert "| rules | 3/4 | 75.0% |" in md and "McNemar" in md and "no answer" in md
    assert "- scored answers generated by (frozen, vote, rules, adapters, full, single-lora): scripted (tests)" in md
    assert "## Against majority voting at equal samples" in md and "| adapters | +75.0 pts | 3 | 0 |" in md
    assert "- learning generated by (rules, adapters, full): scripted (tests)" in md
    assert ("; rules: rounds of 8, gated per round, canary of 4 problems, margin 0.0; adapters: rounds of 8, "
            "gated per round, canary of 4 problems, margin 0.0; full: rounds") in md
    assert "## How the arms answered" in md and not any(line.startswith("| vote | ") and "right)" in line
                                                       for line in md.splitlines())
    from graph.evaluation.learning import learning_cells

    for arm in ("rules", "adapters", "full"):
        assert "| " + "{right_after} / {right_frozen} of {checked}".format(**data["learning"][arm]["forgetting"]) in md
        assert f"| {arm} | " + " | ".join(learning_cells(data["learning"][arm])) + " |" in md.splitlines()
    unsound = data["learning"]["adapters"]["unsound_by_source"]
    assert "adapters: right answers refused because their worked steps do not hold" in md
    assert f"own {unsound['own_sample']} / rule-conditioned {unsound['rule_conditioned']}" in md
    assert {arm["backend"] for arm in data["arms"].values()} == {"scripted (tests)"}
    for name in ("accuracy.png", "learning.png", "experts.png"):
        image = imread(run_dir / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, name
        assert f"]({name})" in md
    assert (run_dir / "arms" / "full" / "run.json").is_file()
    # the single LoRA is saved as a run directory of its own: it exports like any expert
    exported = export_expert(run_dir / "arms" / "single-lora", 0, run_dir / "peft-single")
    assert exported["trained"] and (run_dir / "peft-single" / "adapter_model.safetensors").is_file()


def test_resuming_an_evaluation_saved_before_the_backend_setting_means_torch(holdout, tmp_path):
    _, _, _, run_dir = holdout
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["config"]["backend"] == "auto"
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    del saved["config"]["backend"]  # written by a version without the setting, which scored on torch
    (old_dir / "eval.json").write_text(json.dumps(saved))
    config = EvalConfig(**{**_config(tmp_path).__dict__, "learn_data": saved["config"]["learn_data"],
                           "eval_data": saved["config"]["eval_data"]})
    with pytest.raises(RunDirError, match="backend"):
        prepare_eval_dir(old_dir, config, prepare_problems(config), resume=True)
    torch_config = EvalConfig(**{**config.__dict__, "backend": "torch"})
    prepare_eval_dir(old_dir, torch_config, prepare_problems(torch_config), resume=True)


def test_every_backend_an_evaluation_builds_is_closed_and_none_is_used_after(holdout):
    _, model, _, _ = holdout  # ScriptedBackend asserts on any call after close()
    assert len(model.backends) == 2 + 2 * 3 + 1  # frozen, vote; learning and scoring per loop arm; single-lora
    assert all(b.closed for b in model.backends)


def test_a_second_evaluation_in_the_same_dir_needs_resume(holdout, tmp_path):
    _, model, _, run_dir = holdout
    with pytest.raises(RunDirError, match="--resume"):
        _evaluate(_config(run_dir.parent), run_dir, model)


# ---------------------------------------------------------------- stream and recovery


def test_stream_scores_each_problem_once_before_learning_then_resumes_after_a_stop(tmp_path):
    model = Model()
    # one episode per round: every first attempt sees all the learning before it
    config = _config(tmp_path, protocol="stream", arms=("rules", "adapters", "single-lora"), plots=False, round_size=1)
    stop = StopFlag()

    def on_progress(p):
        if p.arm == "rules" and p.phase == "learn" and p.done == 2:
            stop.set()

    with pytest.raises(EvalInterrupted, match="rules arm"):
        _evaluate(config, tmp_path / "run", model, on_progress=on_progress, stop=stop)
    report = _evaluate(config, tmp_path / "run", model, resume=True)
    assert report.protocol == "stream" and report.leak_check == {"not_applicable": "stream"}
    # every episode timed, those of the stopped process too (read from the event log)
    assert report.arms["rules"].learning["episodes_timed"] == len(report.learn_ids)
    order = [item["id"] for item in report.items]
    assert report.learn_ids == order  # the stream is the scored set, in one seeded order
    special = problem_id("eval", EVAL_Q[0])  # right without rules, wrong with them
    # rules: no rule exists before the first failure; every first attempt after it carries one
    expected, have_rule = [], False
    for pid in order:
        right = (pid == special) != have_rule
        expected.append(right)
        have_rule = have_rule or not right
    assert [s.correct for s in report.arms["rules"].scores] == expected
    # single-lora: problem i is scored with the LoRA trained on the adapters arm's bursts of episodes < i
    updated = [c["updates"] > 0 for c in report.arms["adapters"].curve]
    assert any(updated)
    expected = [pid == special or any(updated[:i]) for i, pid in enumerate(order)]
    assert [s.correct for s in report.arms["single-lora"].scores] == expected
    md = (tmp_path / "run" / "report.md").read_text()
    assert "protocol: stream" in md and "online accuracy" in md.lower()


def test_recovery_rescores_frozen_failures_and_says_so(tmp_path):
    model = Model()
    config = _config(tmp_path, protocol="recovery", arms=("adapters",), plots=False)
    report = _evaluate(config, tmp_path / "run", model)
    summary = report.summary()
    assert summary["protocol"] == "recovery" and "plasticity, not generalisation" in summary["protocol_note"]
    assert summary["recovery_pool"] == {"n": 4, "frozen_correct": 1, "rescored_failed": 3}
    assert summary["arms"]["frozen"]["correct"] == 0 and summary["arms"]["adapters"]["correct"] == 3
    md = (tmp_path / "run" / "report.md").read_text()
    assert "protocol: recovery" in md and "plasticity, not generalisation" in md
    from graph.evaluation.status import evaluation_status

    status = evaluation_status(tmp_path / "run")  # counts the re-scored failures as the report does
    assert status["recovery_pool"] == summary["recovery_pool"] and status["n_scored"] == 3
    assert {arm: (s["correct"], s["n"], s.get("vs_frozen")) for arm, s in status["arms"].items()} == \
           {arm: (s["correct"], s["n"], s.get("vs_frozen")) for arm, s in summary["arms"].items()}


# ---------------------------------------------------------------- the eval command (tiny-random, real generation)


def test_eval_command_writes_a_report_and_prints_json(tmp_path):
    learn = _write(tmp_path / "learn.jsonl", LEARN)
    scored = _write(tmp_path / "eval.jsonl", EVAL)
    SharedSystemClient.clear_system_cache()
    result = CliRunner().invoke(app, [
        "eval", "--model", "tiny-random", "--learn-data", learn, "--eval-data", scored, "--learn-problems", "1",
        "--eval-problems", "2", "--arms", "rules", "--cycles", "1", "--max-new-tokens", "4", "--embedder", "hash",
        "--experts", "2", "--threads", "2", "--run-dir", str(tmp_path / "run"), "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["protocol"] == "holdout" and set(summary["arms"]) == {"frozen", "rules"}
    assert summary["arms"]["rules"]["n"] == 2 and "vs_frozen" in summary["arms"]["rules"]
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "accuracy.png").is_file()


@pytest.mark.parametrize("args,needle", [
    (["--protocol", "nope"], "protocol must be one of"),
    (["--arms", "rules,magic"], "arms must be a non-empty subset"),
    (["--eval-problems", "0"], "--eval-problems 0: eval_problems must be >= 1"),
    (["--eval-data", "/nonexistent/eval.jsonl"], "not found"),
    (["--eval-data", "gsm8k:test"], "cannot load openai/gsm8k test"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--backend", "vllm"], "backend must be one of"),
    (["--pool-updates", "--episode-gate"], "--pool-updates needs the round gate"),
])
def test_eval_bad_arguments_are_one_line_errors(tmp_path, args, needle):
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-random", "--embedder", "hash",
                                      "--run-dir", str(tmp_path / "run"), *args])
    assert result.exit_code == 1, result.output
    assert needle in result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]


def test_eval_overlapping_files_are_refused(tmp_path):
    learn = _write(tmp_path / "learn.jsonl", LEARN + EVAL[:1])
    scored = _write(tmp_path / "eval.jsonl", EVAL)
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-random", "--embedder", "hash", "--learn-data", learn,
                                      "--eval-data", scored, "--learn-problems", "5", "--eval-problems", "4",
                                      "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1 and "overlap" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_vote_arm_takes_the_majority_of_exactly_k_samples(tmp_path):
    import itertools
    from collections import Counter

    model = Model()
    answers = itertools.cycle(["41", "42", "42"])  # EVAL_Q[0]: one wrong sample, two right
    scripted = model.script

    def script(prompt, sampling, weights):
        if sampling.temperature > 0 and EVAL_Q[0] in prompt:
            return f"Counting.\nThe answer is {next(answers)}."
        return scripted(prompt, sampling, weights)

    model.script = script
    config = _config(tmp_path, arms=("frozen", "vote"), verifier=VerifierConfig(samples=3, temperature=0.8), plots=False)
    report = _evaluate(config, tmp_path / "run", model)
    sampled = [c for b in model.backends for c in b.calls if c["sampling"].temperature > 0]
    assert Counter(q for c in sampled for q in EVAL_Q if q in c["prompt"]) == {q: 3 for q in EVAL_Q}
    assert all(c["sampling"].temperature == 0.8 for c in sampled)
    scores = {s.id: s for s in report.arms["vote"].scores}
    first = scores[problem_id("eval", EVAL_Q[0])]
    assert first.correct and first.answer == "42" and first.strategy == "vote"
    assert report.arms["vote"].learning == {"samples_per_problem": 3, "temperature": 0.8}
    assert report.summary()["arms"]["vote"]["vs_frozen"]["flips"]["right_right"] == 1


def test_a_resumed_evaluation_reads_its_finished_arms_back(holdout):
    report, model, _, run_dir = holdout

    def no_model():
        raise AssertionError("a finished arm was computed again")

    again = _evaluate(_config(run_dir.parent), run_dir, types.SimpleNamespace(loader=no_model, backend=model.backend),
                      resume=True)
    assert again.summary()["arms"] == report.summary()["arms"]
    assert (run_dir / "arms" / "frozen" / "result.json").is_file()


def test_an_arm_killed_inside_scoring_resumes_after_its_last_finished_call(tmp_path):
    """The vote arm in four calls (batch size 1): a kill in the third; the resume makes calls three and four only."""
    config = _config(tmp_path, arms=("frozen", "vote"), batch_size=1, verifier=VerifierConfig(samples=3, temperature=0.8),
                     plots=False)
    whole = _evaluate(config, tmp_path / "whole", Model())

    model = Model()
    scripted, sampled_calls = model.script, {"n": 0}

    class Killed(BaseException):
        pass

    def dying(prompt, sampling, weights):
        if sampling.temperature > 0 and prompt != dying.last:
            sampled_calls["n"] += 1  # each vote call is one question's 3 samples, in a row
            if sampled_calls["n"] == 3:
                raise Killed("killed inside the vote arm's third scoring call")
        dying.last = prompt
        return scripted(prompt, sampling, weights)

    dying.last = None
    model.script = dying
    with pytest.raises(Killed):
        _evaluate(config, tmp_path / "run", model)
    assert not (tmp_path / "run" / "arms" / "vote" / "result.json").exists()
    again = Model()
    resumed = _evaluate(config, tmp_path / "run", again, resume=True)
    sampled = [c["prompt"] for b in again.backends for c in b.calls if c["sampling"].temperature > 0]
    assert len(sampled) == 2 * 3  # the calls not finished before the kill, 3 samples each
    assert resumed.arms["vote"].correct == whole.arms["vote"].correct
    assert [s.answer for s in resumed.arms["vote"].scores] == [s.answer for s in whole.arms["vote"].scores]


def test_a_resumed_evaluation_keeps_the_precision_it_started_in(tmp_path, monkeypatch):
    """Arms are compared answer by answer: a resume where the calibration would choose otherwise keeps the first choice."""
    import graph.evaluation.harness as harness
    from agents.lm.precision import PrecisionChoice

    config = _config(tmp_path)
    choices = iter([PrecisionChoice("auto", "float32", "calibrated"), PrecisionChoice("auto", "bfloat16", "calibrated")])
    monkeypatch.setattr(harness, "choose_precision", lambda *_a, **_k: next(choices))
    first = prepare_eval_dir(tmp_path / "e", config, prepare_problems(config), resume=False).precision
    again = prepare_eval_dir(tmp_path / "e", config, prepare_problems(config), resume=True).precision
    assert first.used == again.used == "float32" and "kept since the evaluation started" in again.reason
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["precision"]["used"] == "float32"
    fresh = prepare_eval_dir(tmp_path / "f", config, prepare_problems(config), resume=False).precision
    assert fresh.used == "bfloat16"  # a new evaluation calibrates afresh


def test_an_evaluation_resumed_by_other_code_says_so_in_its_report(tmp_path, monkeypatch):
    """eval.json lists every code version that ran the evaluation; the report warns when there are two."""
    import graph.evaluation.harness as harness
    from graph.evaluation.provenance import code_version

    assert code_version().startswith(("git ", "selfimprove "))
    model = Model()
    config = _config(tmp_path, arms=("frozen", "vote"), plots=False)
    monkeypatch.setattr(harness, "code_version", lambda: "git aaaa")
    first = _evaluate(config, tmp_path / "run", model)
    assert first.arms["vote"].code == "git aaaa" and "- code: git aaaa" in (tmp_path / "run" / "report.md").read_text()
    (tmp_path / "run" / "arms" / "vote" / "result.json").unlink()  # as if killed before vote finished
    monkeypatch.setattr(harness, "code_version", lambda: "git bbbb")
    again = _evaluate(config, tmp_path / "run", model, resume=True)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["code_versions"] == ["git aaaa", "git bbbb"]
    assert again.arms["frozen"].code == "git aaaa" and again.arms["vote"].code == "git bbbb"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "**the code changed while this evaluation ran**: git aaaa -> git bbbb" in md
    assert "frozen: git aaaa, vote: git bbbb" in md
    _evaluate(config, tmp_path / "run", model, resume=True)  # the same code again adds nothing
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["code_versions"] == ["git aaaa", "git bbbb"]


def test_an_arm_records_the_code_its_process_started_with_not_the_checkout_at_its_end(tmp_path, monkeypatch):
    """A long evaluation runs on while the checkout moves on: each arm names the code that made it."""
    import graph.evaluation.harness as harness

    versions = iter(["git aaaa"])
    monkeypatch.setattr(harness, "code_version", lambda: next(versions, "git cccc"))  # committed to after the start
    report = _evaluate(_config(tmp_path, arms=("frozen", "vote"), plots=False), tmp_path / "run", Model())
    assert report.arms["frozen"].code == report.arms["vote"].code == "git aaaa"
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["code_versions"] == ["git aaaa"]


def test_answer_forms_count_where_each_final_number_came_from_and_the_answers_at_the_cap():
    from graph.evaluation.results import ANSWER_FORMS, ArmResult, ItemScore

    scores = [ItemScore("a", True, "5", "answer_is", 100), ItemScore("b", False, "7", "answer_is", 384),
              ItemScore("c", True, "2", "boxed", 50), ItemScore("d", False, "9", "last_number", 384),
              ItemScore("e", False, None, "none", 384)]
    forms = ArmResult("adapters", scores, {"learn": 0, "score": 0}).answer_forms(cap=384)
    assert forms == {"answer_is": {"n": 2, "right": 1}, "boxed": {"n": 1, "right": 1}, "hash": {"n": 0, "right": 0},
                     "last_number": {"n": 1, "right": 0}, "none": {"n": 1, "right": 0},
                     "at_cap": {"n": 3, "right": 0}}
    assert sum(forms[f]["n"] for f in ANSWER_FORMS) == len(scores)  # every answer in one form
    vote = ArmResult("vote", [ItemScore("a", True, "5", "vote", 1200)], {"learn": 0, "score": 0})
    assert vote.answer_forms(cap=384) is None  # a majority has no text of its own


def test_a_learning_row_shows_each_count_and_a_dash_for_what_an_older_arm_lacks():
    from graph.evaluation.learning import LEARNING_COLUMNS, learning_cells

    learning = {"episodes": 40, "right_first_try": 13, "fixed": 4, "unfixed": 20, "failed": 3, "learned_from": 20,
                "rules_proposed": 81, "rules_validated": 5, "rules_refuted": 39, "rules_refused": 37,
                "updates_kept": 5, "updates_rolled_back": 0, "texts_replayed": 16,
                "texts_by_source": {"own_sample": 29, "rule_conditioned": 7, "variant": 3, "rationalization": 0},
                "episodes_timed": 40, "episode_seconds_median": 97.2, "episode_seconds_p90": 387.0,
                "forgetting": {"right_after": 25, "right_frozen": 22, "checked": 34}}
    assert learning_cells(learning) == ["40", "13", "4", "20", "3", "20", "81 / 5 / 39 / 37", "5 / 0",
                                        "29 / 7 / 3 / 0 (16)", "97 / 387 (40 timed)", "25 / 22 of 34"]
    older = {k: v for k, v in learning.items() if k not in ("learned_from", "forgetting", "episodes_timed")}
    cells = dict(zip(LEARNING_COLUMNS, learning_cells(older)))
    assert cells["learned from"] == cells["episode s median / p90"] == "—"
    assert cells["right at first try, again after learning / frozen"] == "—"


def test_time_left_is_estimated_from_the_rates_this_evaluation_has_run_and_unknown_without_one():
    from graph.evaluation.results import ArmResult, ItemScore
    from graph.evaluation.status import _seconds_left

    scores = [ItemScore(str(i), True, "1", "answer_is", 10) for i in range(10)]
    frozen = ArmResult("frozen", scores, {"learn": 0.0, "score": 20.0})  # 2 s a problem
    adapters = ArmResult("adapters", scores, {"learn": 5.0, "score": 40.0}, {"episodes": 4})  # 4 s a problem
    pending = {
        "vote": {"problems_scored": 0, "score_seconds": 0.0},  # no call yet, and no other arm samples like it
        "full": {"episodes": 4, "episodes_committed": 1, "learn_seconds": 30.0, "episodes_timed": 1,
                 "problems_scored": 0, "score_seconds": 0.0},
        "rules": {"episodes": 4, "episodes_committed": 0, "learn_seconds": 0.0, "episodes_timed": 0,
                  "problems_scored": 5, "score_seconds": 5.0},
    }
    timed = [(40.0, 4), (30.0, 1)]  # adapters' 4 episodes, full's first: 14 s an episode in all
    left = _seconds_left(pending, {"frozen": frozen, "adapters": adapters}, timed, 10, "holdout")
    assert left["vote"] is None
    assert left["full"] == 3 * 30.0 + 10 * 4.0  # its own episodes, a finished learning arm's scoring
    assert left["rules"] == 4 * 14.0 + 5 * 1.0  # every learning arm's episodes, its own scoring calls
    stream = _seconds_left({"full": pending["full"]}, {}, timed, 10, "stream")
    assert stream["full"] == 3 * 30.0  # a stream arm's score is its episodes' first tries


def test_eval_status_compares_the_finished_arms_and_counts_the_progress_of_the_others(tmp_path):
    """A long evaluation is read while it runs: finished arms compared so far, the others' progress."""
    config = _config(tmp_path, arms=("frozen", "vote", "adapters"), round_size=1, plots=False)
    report = _evaluate(config, tmp_path / "run", Model()).summary()
    from graph.evaluation.status import evaluation_status

    done = evaluation_status(tmp_path / "run")  # all finished: the report's comparisons, against frozen and vote
    assert done["pending"] == {} and list(done["arms"]) == ["frozen", "vote", "adapters"]
    assert "vs_vote" in report["arms"]["adapters"]  # the comparison below is not vacuous
    for arm in ("vote", "adapters"):
        assert {k: done["arms"][arm].get(k) for k in ("vs_frozen", "vs_vote")} == \
               {k: report["arms"][arm].get(k) for k in ("vs_frozen", "vs_vote")}
    (tmp_path / "run" / "arms" / "adapters" / "result.json").unlink()  # as if it were still scoring
    result = CliRunner().invoke(app, ["eval-status", "--run-dir", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert list(status["arms"]) == ["frozen", "vote"]
    assert status["arms"]["vote"]["vs_frozen"] == report["arms"]["vote"]["vs_frozen"]
    assert status["arms"]["vote"]["correct"] == report["arms"]["vote"]["correct"]
    # every episode committed, and the arm's scoring calls kept (scored.jsonl)
    learning = status["pending"]["adapters"].pop("learning")
    timing = {k: status["pending"]["adapters"].pop(k) for k in ("learn_seconds", "episodes_timed", "score_seconds")}
    assert status["pending"] == {"adapters": {"episodes_committed": 4, "episodes": 4, "problems_scored": 4,
                                              "seconds_left_estimate": 0.0}}  # all done but the result file
    assert timing["episodes_timed"] == 4 and timing["learn_seconds"] > 0 and timing["score_seconds"] > 0
    assert status["seconds_left_estimate"] == 0.0
    # what its learning did, read from its checkpoints and event log as the report counted it
    assert learning["updates"] >= 1 and learning["episodes_timed"] == 4
    assert learning == {k: done["arms"]["adapters"]["learning"][k] for k in learning}
    table = CliRunner().invoke(app, ["eval-status", "--run-dir", str(tmp_path / "run")]).output
    # the report's learning row, a column per arm: each count on the line of its name
    from graph.evaluation.learning import LEARNING_COLUMNS, learning_cells

    assert "adapters (so far)" in table
    lines = table.splitlines()
    for what, cell in zip(LEARNING_COLUMNS, learning_cells(learning)):
        assert any(line.lstrip("│ ").startswith(what) and line.rstrip(" │").endswith(cell) for line in lines), (what, cell)
    assert "adapters: not finished (4/4 learning episodes, 4/4 problems scored; about 0 min left)" in table
    events = tmp_path / "run" / "arms" / "adapters" / "events.jsonl"
    with events.open("a") as f:
        f.write('{"episode": 4, "node": "commit"}\n')  # a line the checkpoints do not back: they decide
    assert evaluation_status(tmp_path / "run")["pending"]["adapters"]["episodes_committed"] == 4
    events.write_text("".join(events.read_text().splitlines(keepends=True)[:-1]))
    # a folder kept without its checkpoints (as docs/ keeps finished arms) counts the event log's commits
    (tmp_path / "run" / "arms" / "adapters" / "checkpoints.sqlite").unlink()
    assert "learning" not in evaluation_status(tmp_path / "run")["pending"]["adapters"]
    with events.open("a") as f:
        f.write('{"episode": 4, "node": "commit"')  # a line being written counts when it is whole
    assert evaluation_status(tmp_path / "run")["pending"]["adapters"]["episodes_committed"] == 4
    events.write_text(events.read_text() + '}\n{"episode": 5, "node": "commit"}\n')
    assert evaluation_status(tmp_path / "run")["pending"]["adapters"]["episodes_committed"] == 6
    events.write_text('{"episode": 0, "no' + "\n" + events.read_text())  # cut short by a kill, then resumed
    damaged = CliRunner().invoke(app, ["eval-status", "--run-dir", str(tmp_path / "run")])
    assert damaged.exit_code == 0 and "6/4 learning episodes, 4/4 problems scored, 1 event lines cut short" in damaged.output
    scored = tmp_path / "run" / "arms" / "adapters" / "scored.jsonl"
    scored.write_text(scored.read_text() * 2)  # a call kept twice (once per process) counts once, as a resume reads it
    assert evaluation_status(tmp_path / "run")["pending"]["adapters"]["problems_scored"] == 4
    scored.unlink()  # not scored yet: at the frozen arm's seconds per problem (no learning arm finished)
    frozen = report["arms"]["frozen"]
    left = evaluation_status(tmp_path / "run")["pending"]["adapters"]["seconds_left_estimate"]
    assert left == pytest.approx(4 * frozen["seconds"]["score"] / frozen["n"])
    assert "about" in CliRunner().invoke(app, ["eval-status", "--run-dir", str(tmp_path / "run")]).output
    missing = CliRunner().invoke(app, ["eval-status", "--run-dir", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "holds no evaluation" in missing.output and len(missing.output.splitlines()) == 1


XEON = {"device": "cpu (Intel(R) Xeon(R) Processor)", "features": ["avx2", "fma", "avx512f", "amx_bf16"],
        "torch": "2.13.0+cpu"}
EPYC = {"device": "cpu (AMD EPYC)", "features": ["avx2", "fma"], "torch": "2.13.0+cpu"}


def _on_machine(monkeypatch, machine: dict) -> None:
    """What graph/evaluation/provenance.machine reports from now on, as the harness calls it."""
    import graph.evaluation.harness as harness

    monkeypatch.setattr(harness, "machine", lambda _device: machine)


def _evaluated_on_xeon(tmp_path, monkeypatch):
    """An evaluation (frozen and vote) run on XEON: (model, config, run folder)."""
    model = Model()
    config = _config(tmp_path, arms=("frozen", "vote"), plots=False)
    _on_machine(monkeypatch, XEON)
    _evaluate(config, tmp_path / "run", model)
    return model, config, tmp_path / "run"


def test_an_evaluation_resumed_on_another_machine_is_refused_unless_asked(tmp_path, monkeypatch):
    """Arms are compared answer by answer: another machine's rounding would flip answers by itself."""
    model, config, run_dir = _evaluated_on_xeon(tmp_path, monkeypatch)
    (run_dir / "arms" / "vote" / "result.json").unlink()  # as if killed before vote finished
    saved = (run_dir / "eval.json").read_bytes()
    _on_machine(monkeypatch, EPYC)
    with pytest.raises(RunDirError, match=r"was run on cpu \(Intel\(R\) Xeon\(R\) Processor\) \[avx2 fma avx512f amx_bf16\]"
                                          r", torch 2.13.0\+cpu; this machine is cpu \(AMD EPYC\) \[avx2 fma\].*--any-machine"):
        _evaluate(config, run_dir, model, resume=True)
    assert (run_dir / "eval.json").read_bytes() == saved and not (run_dir / "arms" / "vote" / "result.json").exists()
    again = _evaluate(config, run_dir, model, resume=True, any_machine=True)
    assert json.loads((run_dir / "eval.json").read_text())["machines"] == [XEON, EPYC]
    assert again.arms["frozen"].machine == XEON and again.arms["vote"].machine == EPYC
    md = (run_dir / "report.md").read_text()
    assert "**the machine changed while this evaluation ran**" in md
    assert "frozen: cpu (Intel(R) Xeon(R) Processor) [avx2 fma avx512f amx_bf16], torch 2.13.0+cpu; vote: cpu (AMD EPYC)" in md
    _evaluate(config, run_dir, model, resume=True)  # the last machine again: no flag needed, nothing added
    assert json.loads((run_dir / "eval.json").read_text())["machines"] == [XEON, EPYC]


def test_an_evaluation_saved_before_machines_were_kept_reads_them_from_its_arms(tmp_path, monkeypatch):
    """Older evaluations kept no machine: the finished arms' backend lines name the device, and that is compared."""
    model, config, run_dir = _evaluated_on_xeon(tmp_path, monkeypatch)
    saved = json.loads((run_dir / "eval.json").read_text())
    del saved["machines"]
    (run_dir / "eval.json").write_text(json.dumps(saved))
    result = json.loads((run_dir / "arms" / "frozen" / "result.json").read_text())
    del result["result"]["machine"]
    result["result"]["backend"] = ("torch 2.13.0+cpu (continuous batching, 64 slots), torch.bfloat16 weights on "
                                   "cpu (Intel(R) Xeon(R) Processor), 2 threads")
    (run_dir / "arms" / "frozen" / "result.json").write_text(json.dumps(result))
    (run_dir / "arms" / "vote" / "result.json").unlink()
    _on_machine(monkeypatch, EPYC)
    with pytest.raises(RunDirError, match=r"was run on cpu \(Intel\(R\) Xeon\(R\) Processor\), torch 2.13.0\+cpu; this machine is"):
        _evaluate(config, run_dir, model, resume=True)
    _on_machine(monkeypatch, XEON)
    report = _evaluate(config, run_dir, model, resume=True)
    legacy = {"device": XEON["device"], "features": None, "torch": "2.13.0+cpu"}  # read from frozen's backend line
    assert json.loads((run_dir / "eval.json").read_text())["machines"] == [legacy, XEON]
    assert report.arms["frozen"].machine is None and report.arms["vote"].machine == XEON
    md = (run_dir / "report.md").read_text()
    assert ("- machine: cpu (Intel(R) Xeon(R) Processor) [avx2 fma avx512f amx_bf16], torch 2.13.0+cpu (arms finished "
            "before machines were recorded, named by their CPU only: frozen)") in md
    assert "machine changed" not in md


def test_eval_resume_on_another_machine_is_a_one_line_error(tmp_path, monkeypatch):
    learn, scored = _write(tmp_path / "learn.jsonl", LEARN), _write(tmp_path / "eval.jsonl", EVAL)
    args = ["eval", "--model", "tiny-random", "--learn-data", learn, "--eval-data", scored, "--learn-problems", "1",
            "--eval-problems", "1", "--arms", "frozen", "--max-new-tokens", "2", "--embedder", "hash",
            "--no-plots", "--run-dir", str(tmp_path / "run")]
    _on_machine(monkeypatch, XEON)
    SharedSystemClient.clear_system_cache()
    assert CliRunner().invoke(app, args).exit_code == 0
    (tmp_path / "run" / "arms" / "frozen" / "result.json").unlink()
    _on_machine(monkeypatch, EPYC)
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--any-machine" in errors[0] and result.output.strip().endswith(errors[0])
    result = CliRunner().invoke(app, [*args, "--resume", "--any-machine"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["machines"] == [XEON, EPYC]


def test_an_evaluation_sets_the_canary_and_the_stress_scale_and_keeps_them(tmp_path):
    from graph.evaluation.config import EVAL_FILE, arm_settings, eval_config
    from graph.saved_settings import SettingsError

    config = eval_config(tmp_path, False, {"canary_size": 8, "canary_margin": 0.25, "stress.loss_scale": 0.3,
                                           "train_sources": ("variant", "own_sample")})
    settings = arm_settings(config, "adapters", 10)
    assert settings.loop.canary_size == 8 and settings.loop.canary_margin == 0.25 and settings.stress.loss_scale == 0.3
    assert settings.loop.train_sources == ("own_sample", "variant")  # canonical order
    saved = EvalConfig(model="tiny-random").to_dict()
    del saved["canary_margin"], saved["train_sources"]  # saved before the settings existed: what it ran with
    (tmp_path / EVAL_FILE).write_text(json.dumps({"config": saved}))
    assert eval_config(tmp_path, True, {}).canary_margin == 0.0
    assert arm_settings(eval_config(tmp_path, True, {}), "full", 10).loop.train_sources == SOURCES
    with pytest.raises(SettingsError, match="--train-sources"):
        eval_config(tmp_path, True, {"train_sources": ("own_sample",)})
    with pytest.raises(ValueError, match="canary_margin must be in"):
        EvalConfig(canary_margin=1.5)


def test_an_evaluation_may_change_the_canary_of_learning_arms_not_started(tmp_path):
    """Frozen and vote never learn: the canary's settings may change for the arms still to learn."""
    from graph.evaluation.config import EVAL_FILE, arm_settings, eval_config
    from graph.run_dir import RunDirError, check_run_dir, write_run_settings

    saved = EvalConfig(model="tiny-random").to_dict()
    del saved["canary_test"], saved["canary_alpha"]  # saved before the binomial test existed
    (tmp_path / EVAL_FILE).write_text(json.dumps({"config": saved}))
    assert eval_config(tmp_path, True, {}).canary_test == "margin"
    config = eval_config(tmp_path, True, {"canary_test": "binomial", "canary_alpha": 0.1, "canary_margin": 0.25})
    settings = arm_settings(config, "adapters", 10)
    assert (settings.loop.canary_test, settings.loop.canary_alpha, settings.loop.canary_margin) == ("binomial", 0.1, 0.25)
    # An arm that started learning keeps its own canary: its run folder refuses the change.
    started = tmp_path / "arms" / "adapters"
    started.mkdir(parents=True)
    write_run_settings(started, arm_settings(eval_config(tmp_path, True, {}), "adapters", 10))
    with pytest.raises(RunDirError, match="canary_test"):
        check_run_dir(started, settings, resume=True)
    # It may change a canary setting its own test never reads, and no other.
    margin_arm = arm_settings(eval_config(tmp_path, True, {}), "adapters", 10)
    check_run_dir(started, replace(margin_arm, loop=replace(margin_arm.loop, canary_alpha=0.2)), resume=True)
    with pytest.raises(RunDirError, match="canary_margin"):
        check_run_dir(started, replace(margin_arm, loop=replace(margin_arm.loop, canary_margin=0.5)), resume=True)
    binomial_arm = tmp_path / "arms" / "full"
    binomial_arm.mkdir()
    write_run_settings(binomial_arm, arm_settings(config, "full", 10))
    full = arm_settings(config, "full", 10)
    check_run_dir(binomial_arm, replace(full, loop=replace(full.loop, canary_margin=0.0)), resume=True)
    with pytest.raises(RunDirError, match="canary_alpha"):
        check_run_dir(binomial_arm, replace(full, loop=replace(full.loop, canary_alpha=0.01)), resume=True)


def test_folders_saved_before_a_setting_existed_resume_with_its_default(tmp_path):
    """An evaluation and a run saved without the newer settings (canary margin, training sources) resume."""
    from graph.context import LoopConfig
    from graph.run_dir import RUN_FILE, RunDirError, RunSettings, check_run_dir

    config = _config(tmp_path)
    prepare_eval_dir(tmp_path / "e", config, prepare_problems(config), resume=False)
    path = tmp_path / "e" / "eval.json"
    saved = json.loads(path.read_text())
    del saved["config"]["canary_margin"], saved["config"]["train_sources"]
    path.write_text(json.dumps(saved))
    prepare_eval_dir(tmp_path / "e", config, prepare_problems(config), resume=True)
    changed = _config(tmp_path, train_sources=("variant",))
    with pytest.raises(RunDirError, match="train_sources"):  # a real difference is still refused
        prepare_eval_dir(tmp_path / "e", changed, prepare_problems(changed), resume=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = RunSettings(model="tiny-random", data="inline", episodes=2)
    old = settings.to_dict()
    del old["loop"]["train_sources"]
    (run_dir / RUN_FILE).write_text(json.dumps(old))
    check_run_dir(run_dir, settings, resume=True)
    with pytest.raises(RunDirError, match="train_sources"):
        check_run_dir(run_dir, RunSettings(model="tiny-random", data="inline", episodes=2,
                                           loop=LoopConfig(train_sources=("own_sample",))), resume=True)


def test_bad_canary_and_stress_options_are_one_line_errors(tmp_path):
    for args, needle in [(["--canary-margin", "2"], "--canary-margin 2.0: canary_margin must be in [0, 1]"),
                         (["--canary-size", "-1"], "--canary-size -1: canary_size must be >= 0"),
                         (["--stress-scale", "0"], "--stress-scale 0.0: loss_scale must be > 0"),
                         (["--round-size", "0"], "--round-size 0: round_size must be >= 1"),
                         (["--canary-test", "vote"], "--canary-test vote: canary_test must be one of margin, binomial"),
                         (["--canary-alpha", "0"], "--canary-alpha 0.0: canary_alpha must be in (0, 1)"),
                         (["--train-sources", "own_sample,reference"], "--train-sources 'own_sample,reference'")]:
        result = CliRunner().invoke(app, ["eval", *args, "--run-dir", str(tmp_path / "e")])
        assert result.exit_code == 1 and needle in result.output, (args, result.output)
        assert not (tmp_path / "e").exists()


def test_machine_records_name_the_cpu_features_and_compare_only_what_both_have(tmp_path):
    from graph.evaluation.provenance import cpu_features, machine, machine_from_backend, machine_label, same_machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma avx512f amx_tile amx_bf16 sha_ni\n")
    assert cpu_features(cpuinfo) == ["avx2", "fma", "avx512f", "amx_bf16", "amx_tile"]
    assert cpu_features(tmp_path / "missing") is None
    cpuinfo.write_text("model name\t: Some ARM CPU\nFeatures\t: fp asimd\n")  # no x86 flags line: not known
    assert cpu_features(cpuinfo) is None
    cpuinfo.write_text("flags\t\t: fpu sse2\n")
    assert cpu_features(cpuinfo) == [] and machine_label({"device": "cpu (x)", "features": []}) == "cpu (x) [no AVX2 or later]"
    assert machine_label({"device": "cuda:0 (H100)", "features": None, "torch": "2.13.0"}) == "cuda:0 (H100), torch 2.13.0"
    here = machine("cpu")
    assert here["device"].startswith("cpu (") and set(here["features"]) <= set(cpu_features())
    torch_line = "torch 2.13.0+cpu (continuous batching, 64 slots), torch.float32 weights on cpu (AMD EPYC), 2 threads"
    llama_line = "llama.cpp (xllamacpp 0.2, f16 copy), 64 slots, 2 threads, KV f16, on cpu (Intel(R) Xeon(R) Processor)"
    assert machine_from_backend(torch_line) == {"device": "cpu (AMD EPYC)", "features": None, "torch": "2.13.0+cpu"}
    assert machine_from_backend(llama_line) == {"device": "cpu (Intel(R) Xeon(R) Processor)", "features": None, "torch": None}
    assert machine_from_backend("scripted") is None
    assert same_machine(XEON, machine_from_backend(llama_line)) and not same_machine(EPYC, machine_from_backend(llama_line))
    assert not same_machine(XEON, {**XEON, "features": ["avx2", "fma"]})  # same name, other features
    assert not same_machine(XEON, {**XEON, "torch": "2.14.0"})
    assert not same_machine(XEON, {"device": XEON["device"], "features": None, "torch": "2.14.0+cpu"})


def test_an_evaluation_on_llama_cpp_records_the_cpu_even_beside_a_gpu(tmp_path, monkeypatch):
    """llama.cpp serves from the CPU whatever torch would pick, so the CPU is the machine that answers."""
    import torch

    import graph.evaluation.harness as harness

    monkeypatch.setattr(harness, "pick_device", lambda _requested: torch.device("cuda"))
    monkeypatch.setattr(harness, "choose_precision", lambda *_a, **_k: harness.PrecisionChoice("auto", "bfloat16", "cuda"))
    monkeypatch.setattr(harness, "machine", lambda device_type: {"device": device_type, "features": None, "torch": "t"})
    for backend, device in (("llama.cpp", "cpu"), ("torch", "cuda")):
        config = _config(tmp_path, backend=backend)
        machines = prepare_eval_dir(tmp_path / backend, config, prepare_problems(config), resume=False).machines
        assert [m["device"] for m in machines] == [device]
