"""Solver, verifier, reflector and diversifier logic with a scripted fake LM."""

import pytest

from agents.diversifier import DiversifierConfig, Diversifier, DiversifyError
from agents.guard import leaks_answer, rule_problem
from agents.reflector import ReflectionError, Reflector, parse_rule
from agents.solver import Attempt, Solver
from agents.verifier import VerifierConfig, check, vote
from tests.fakes import ScriptedBackend


def test_solver_builds_prompts_with_rules_and_extracts_answers():
    backend = ScriptedBackend(lambda p, s, w: "3 + 5 = 8.\nThe answer is 8." if "apples" in p else "I am not sure.")
    solver = Solver(backend)
    attempts = solver.solve(["Tom has 3 apples and gets 5 more.", "Hard one"], rules=[["Add all parts."], []])
    assert attempts[0].answer == "8" and attempts[0].strategy == "answer_is"
    assert attempts[1].answer is None and attempts[1].strategy == "none"
    assert "Add all parts." in backend.calls[0]["prompt"] and "Rules learned" not in backend.calls[1]["prompt"]
    with pytest.raises(ValueError, match="rule lists"):
        solver.solve(["a", "b"], rules=[[]])


def test_verifier_checks_numerically_not_by_substring():
    assert check(Attempt("..", "18", "answer_is", 3), "18").correct
    assert not check(Attempt("..", "18", "answer_is", 3), "8").correct
    assert check(Attempt("..", "2.5", "answer_is", 3), "5/2").correct
    assert not check(Attempt("..", None, "none", 3), "8").correct


def test_label_free_majority_vote_reports_agreement():
    config = VerifierConfig(samples=5, min_agreement=0.6)
    samples = [Attempt("", a, "answer_is", 1) for a in ("12", "12.0", "12", "7", None)]
    verdict = vote(samples, config)
    assert verdict.label_free and verdict.answer == "12" and verdict.correct
    assert verdict.confidence == pytest.approx(0.6)
    split = vote([Attempt("", a, "answer_is", 1) for a in ("1", "2", "3", "1", "2")], config)
    assert not split.correct and split.confidence == pytest.approx(0.4)
    assert not vote([Attempt("", None, "none", 1)] * 3, config).correct


def test_leak_guard_matches_numbers_not_substrings():
    assert leaks_answer("so the total is 18 apples", "18")
    assert leaks_answer("the total is $1,080", "1080")
    assert not leaks_answer("multiply by 180 then add 8", "18")
    assert not leaks_answer("any text", None)
    assert rule_problem("", "5", 300, 2) == "it is empty"
    assert "too long" in rule_problem("x" * 400, "5", 300, 2)
    assert "sentences" in rule_problem("One. Two. Three.", "5", 300, 2)
    assert rule_problem("Always add 18 at the end.", "18", 300, 2) == "it contains the problem's answer"
    assert rule_problem("Check units before adding.", "18", 300, 2) is None


def test_parse_rule():
    assert parse_rule("Sure!\nRULE: Convert units first.\n\nMore text") == "Convert units first."
    assert parse_rule("no rule here") == ""


def test_reflector_retries_a_leaking_rule_and_never_shows_eval_solutions():
    drafts = iter(["RULE: The answer is always 18.", "RULE: Subtract what is eaten before multiplying by the price."])
    backend = ScriptedBackend(lambda p, s, w: next(drafts))
    reflection = Reflector(backend).reflect(
        "Eggs problem", "wrong work", label="18", reference_solution="16 - 3 - 4 = 9; 9 * 2 = 18", learning_split=True
    )
    assert reflection.rule.startswith("Subtract") and reflection.attempts == 2
    assert reflection.rejected == ["it contains the problem's answer"]
    assert "16 - 3 - 4" in backend.calls[0]["prompt"]  # learning split: the reference is shown
    assert "rejected because it contains" in backend.calls[1]["prompt"]
    assert backend.calls[1]["sampling"].temperature > 0
    with pytest.raises(ValueError, match="never reach"):
        Reflector(backend).reflect("q", "w", label="1", reference_solution="sol", learning_split=False)


def test_reflector_gives_up_after_bounded_attempts():
    backend = ScriptedBackend(lambda p, s, w: "I cannot think of a rule.")
    with pytest.raises(ReflectionError, match="3 attempts"):
        Reflector(backend).reflect("q", "w", label="1", learning_split=True)
    assert len(backend.calls) == 3


def test_reflector_shows_the_previous_rule():
    backend = ScriptedBackend(lambda p, s, w: "RULE: Read the question twice.")
    Reflector(backend).reflect("q", "w", label="4", learning_split=False, previous_rule="Add carefully.")
    assert "Earlier rule: Add carefully." in backend.calls[0]["prompt"]
    assert "reference" not in backend.calls[0]["prompt"].lower().split("rule")[0]


def test_diversifier_writes_four_shapes_and_drops_leaks():
    def script(prompt, sampling, w):
        if "NEW short math word problem" in prompt:
            return "Problem: A shop sells 4 pens at $2 each. What is the cost?\n\n4 * 2 = 8. The answer is 8."
        if "checklist" in prompt:
            return "1. Re-read. 2. The result must be 42." if sampling.temperature == 0 else "1. Re-read. 2. Check units."
        return "Explain and contrast the rule with care, step by step."

    backend = ScriptedBackend(script)
    result = Diversifier(backend).diversify("Multiply count by unit price.", label="42")
    shapes = [t.shape for t in result.texts]
    assert shapes == ["principle", "worked_example", "checklist", "contrast"]
    worked = result.texts[1]
    assert "A shop sells 4 pens" in worked.prompt and worked.completion.startswith("4 * 2 = 8")
    assert all(not leaks_answer(t.prompt + t.completion, "42") for t in result.texts)
    assert result.dropped == {}  # the leaking checklist was rewritten on the sampled retry


def test_diversifier_fails_when_every_text_leaks():
    backend = ScriptedBackend(lambda p, s, w: "Everything here says 42 again and again.")
    with pytest.raises(DiversifyError, match="no training text"):
        Diversifier(backend, DiversifierConfig(shapes=("principle", "checklist"))).diversify("r", label="42")


def test_reflector_refuses_a_rule_that_repeats_its_instructions():
    from agents.prompts import REFLECT_EXAMPLE

    drafts = iter([REFLECT_EXAMPLE, "RULE: Do not use this problem's specific numbers.", "RULE: Convert hours to minutes before adding times."])
    backend = ScriptedBackend(lambda p, s, w: next(drafts))
    reflection = Reflector(backend).reflect("q", "w", label="5", learning_split=True)
    assert reflection.rule == "Convert hours to minutes before adding times."
    assert reflection.rejected == ["it repeats the instructions or the example instead of stating a lesson"] * 2


def test_reflector_refuses_to_repeat_the_previous_rule():
    drafts = iter(["RULE: Add carefully.", "RULE: Check which quantities are per day."])
    backend = ScriptedBackend(lambda p, s, w: next(drafts))
    reflection = Reflector(backend).reflect("q", "w", label="5", learning_split=True, previous_rule="Add  carefully")
    assert reflection.rule == "Check which quantities are per day."
    assert reflection.rejected == ["it repeats the earlier rule that did not fix the mistake"]
