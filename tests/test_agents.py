"""Solver, verifier, reflector and diversifier logic with a scripted fake LM."""

import pytest

from agents.diversifier import Diversifier, DiversifierConfig, quantity_problem
from agents.guard import leaks_answer, rule_problem
from agents.reflector import Reflector, parse_rule
from agents.solver import Attempt, Solver
from agents.trajectories import as_completion, usable, verified_share, verified_texts
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


def _propose(backend, **kw):
    args = dict(label="18", tried=[], seed=4)
    return Reflector(backend).propose("Eggs problem", "wrong work", "16 - 3 - 4 = 9; 9 * 2 = 18", **{**args, **kw})


def test_reflector_compares_with_the_verified_solution_and_shows_no_example_rule():
    backend = ScriptedBackend(lambda p, s, w: "RULE: Subtract what is eaten before multiplying by the price.")
    first, *others = _propose(backend)
    assert first.refused is None and first.text.startswith("Subtract")
    assert [c.refused for c in others] == ["it repeats a rule already tried on this problem"] * 2  # one call, deduplicated
    assert len(backend.calls) == 3 and all(c["sampling"].temperature > 0 for c in backend.calls)
    prompt = backend.calls[0]["prompt"]
    assert "wrong work" in prompt and "16 - 3 - 4 = 9" in prompt
    assert "The form, for a different mistake" not in prompt and "RULE: When" not in prompt  # nothing to copy


def test_reflector_candidates_are_refused_with_a_reason():
    drafts = iter(["RULE: The answer is always 18.", "I cannot think of a rule.",
                   "RULE: Find the first step where the wrong solution goes astray from the correct one."])
    candidates = _propose(ScriptedBackend(lambda p, s, w: next(drafts)))
    assert [c.refused for c in candidates] == [
        "it contains the problem's answer", "it has no 'RULE:' line",
        "it repeats the instructions or the example instead of stating a lesson"]


def test_reflector_lists_rules_already_tried_and_refuses_a_repeat():
    backend = ScriptedBackend(lambda p, s, w: "RULE: Add  carefully.")
    candidates = _propose(backend, tried=["Add carefully"])
    assert {c.refused for c in candidates} == {"it repeats a rule already tried on this problem"}
    prompt = backend.calls[0]["prompt"]
    assert "These rules were tried and did not help" in prompt and "- Add carefully" in prompt


def test_variants_keep_every_quantity_or_are_refused():
    question = "Tom has 3 boxes of 12 pens and gives away 5 pens. How many are left?"
    assert quantity_problem(question, "Sam has 3 crates of 12 pencils and gives away 5 pencils. How many remain?") is None
    assert "lost 5" in quantity_problem(question, "Sam has 3 crates of 12 pencils and gives some away. How many remain?")
    assert "added 7" in quantity_problem(question, question.replace("5 pens", "5 pens and 7 more"))
    assert "lost 12; added 13" in quantity_problem(question, question.replace("12", "13"))
    assert quantity_problem(question, question) == "it repeats the problem unchanged"
    outputs = iter(["Problem: Sam has 3 crates of 12 pencils and gives away 5 pencils. How many remain?",
                    "Problem: Ann has 3 boxes of 12 pens and gives away 6 pens. How many are left?"])
    backend = ScriptedBackend(lambda p, s, w: next(outputs))
    made = Diversifier(backend, DiversifierConfig(kinds=("paraphrase", "rename"))).variants(question, seed=3)
    assert made.kept == ["Sam has 3 crates of 12 pencils and gives away 5 pencils. How many remain?"]
    assert made.refused[0]["kind"] == "rename" and "numbers differ" in made.refused[0]["reason"]
    assert all(c["sampling"].temperature > 0 for c in backend.calls)


def test_verified_texts_are_distinct_usable_and_in_the_solver_format():
    attempts = [Attempt("3 + 5 = 8\nSo \\boxed{8}", "8", "boxed", 10),
                Attempt("3 + 5 = 8\nThe answer is 8.", "8", "answer_is", 10),  # the same solution once normalised
                Attempt("3 + 5 = 8, that is 8 apples", "8", "last_number", 10),  # no answer line of its own
                Attempt("3 + 5 = 8 " * 50 + "\nThe answer is 8.", "8", "answer_is", 384),  # hit the cap
                Attempt("3 + 4 = 7\nThe answer is 7.", "7", "answer_is", 10)]  # wrong
    found = verified_texts("Q?", attempts, "8", 384, "own_sample")
    assert [t.completion for t in found.texts] == ["3 + 5 = 8\nThe answer is 8."] and found.unsound == []
    assert verified_share(attempts, "8") == pytest.approx(0.8) and verified_share(attempts, None) == 0.0
    assert not usable(attempts[2], 384) and not usable(attempts[3], 384)
    assert as_completion("Work.\n#### 1,200", "1,200") == "Work.\nThe answer is 1200."
    with pytest.raises(ValueError, match="source must be"):
        verified_texts("Q?", attempts, "8", 384, "checklist")


def test_a_right_answer_reached_by_unsound_steps_is_refused_with_its_reason():
    """Rationalizations of the 0.5B model (pilot 2) reach the hinted answer by false arithmetic."""
    attempts = [Attempt("Hours per month: \\(\\frac{1,300}{6} = 220\\) hours\nThe answer is 220.", "220", "answer_is", 20),
                Attempt("Hours: 4.4 \\text{ hours} \\times 50 = 200, so 220\n\\boxed{220}", "220", "boxed", 20),
                Attempt("```python\nprint(1100 / 5)\n```\n```output\n220\n```\nThe answer is 220.", "220", "answer_is", 20),
                Attempt("1,500 - 200 = 1,300 hours; 1300 / 6 = 216.67 hours a month\nThe answer is 220.",
                        "220", "answer_is", 20),
                Attempt("Left: 1,500 - 400 = 1,100 hours. Per month: 1100 / 5 = 220.\nThe answer is 220.",
                        "220", "answer_is", 20)]
    found = verified_texts("Q?", attempts, "220", 384, "rationalization")
    assert [t.completion.splitlines()[0] for t in found.texts] == ["Left: 1,500 - 400 = 1,100 hours. Per month: 1100 / 5 = 220."]
    reasons = [u["reason"] for u in found.unsound]
    assert reasons[0] == "false step: ((1300)/(6)) = 220"
    assert reasons[1] == "false step: 4.4 * 50 = 200"
    assert reasons[2] == "quotes the output of code that was never run"
    assert reasons[3] == "the answer 220 appears in none of its steps"
    assert {u["source"] for u in found.unsound} == {"rationalization"}



def test_a_step_on_the_models_own_answer_line_counts_though_the_completion_rewrites_that_line():
    attempt = Attempt("Tom has 5 apples and buys 10 more.\nSo he has 5 + 10 = \\boxed{15} apples.", "15", "boxed", 20)
    found = verified_texts("Q?", [attempt], "15", 384, "own_sample")
    assert found.unsound == [] and [t.completion for t in found.texts] == [
        "Tom has 5 apples and buys 10 more.\nThe answer is 15."]
    bare = Attempt("It takes 15.6 hours.\n\\boxed{15}", "15", "boxed", 20)
    assert verified_texts("Q?", [bare], "15", 384, "own_sample").unsound[0]["reason"].startswith("the answer 15")
