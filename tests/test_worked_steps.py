"""The worked-steps check: false equations are found, sound ones and wording are left alone."""

import pytest

from agents.worked_steps import false_steps, unsound_reason


@pytest.mark.parametrize("line", [
    "150 + 250 \\times 12 = 150 + 3000 = 3150",
    "Total hours flown so far: \\(50 + 9 + 121 = 180\\) hours",
    "1. 50 + 9 = 59",  # a list number before the step
    "\\[ \\frac{2}{3} \\times 12 = 8 \\]",
    "She pays $1,250 x 2 = $2,500.",
    "1300 / 6 = 216.67 hours",  # rounded as written
    "100 / 3 = 33",
    "60% \\times 8 = 4.8",
    "0.25 * 100 = 25%",
    "2(3 + 4) = 14",
    "x = 5, and 100 - 24 - x = 65",  # a side with a letter is not checked
    "12 crates \\times 150 oranges = 1800 oranges",  # words on a side: not checked
    "7.5 / 60 ≈ 0.13 hours",  # an approximation is not checked across its sign
    "if a == 3 then 3 <= 4",
    "- 12 * 3 = 36",  # a list bullet, not a minus sign
    "\\( 1{,}500 \\times 2 = 3{,}000 \\)",  # LaTeX thousands separators
    "50 / 3 = 16 full bags with 2 left over",  # whole things: the floor
    "-5 + 3 = -2",
])
def test_sound_steps_and_unchecked_wording_pass(line):
    assert false_steps(line) == []


@pytest.mark.parametrize("line, wrong", [
    ("3150 + 3000 + 300 = 3450", "3150 + 3000 + 300 = 3450"),
    ("Per month: \\(\\frac{1,300}{6} = 220\\)", "((1300)/(6)) = 220"),
    ("Time: 4.8 \\text{ books per hour} \\times 3 \\text{ books} = 15.6", "4.8 * 3 = 15.6"),
    ("150 + 250 \\times 12 = 150 + 3000 = 3450", "150 + 3000 = 3450"),
    ("so 2 + 2 = 5 apples", "2 + 2 = 5"),
    ("**3 + 4 = 8**", "3 + 4 = 8"),  # bold does not hide a step
    ("- 12 * 3 = 35", "12 * 3 = 35"),
])
def test_false_steps_are_found(line, wrong):
    assert false_steps(line) == [wrong]


def test_code_blocks_are_not_read_as_equations_but_quoted_output_refuses():
    code = "```python\ntotal = 3 + 4 * 2\n```\nSo 3 + 8 = 11.\nThe answer is 11."
    assert false_steps(code) == [] and unsound_reason(code, "11") is None
    assert unsound_reason(code.replace("```\nSo", "```\n```output\n11\n```\nSo"), "11").startswith("quotes the output")


def test_the_answer_must_be_reached_by_a_step():
    assert unsound_reason("3 + 5 = 8 apples.\nThe answer is 8.", "8") is None
    assert unsound_reason("3 + 5 = 8 apples, so about 1,200.\nThe answer is 1200.", "1200") is None
    assert unsound_reason("It is 15.6 hours.\nThe answer is 15.", "15") == "the answer 15 appears in none of its steps"
    assert unsound_reason("The answer is 15.", "15") == "the answer 15 appears in none of its steps"
    # a step on the answer line itself computes the answer; a bare boxed answer does not
    assert unsound_reason("Tom buys 10 more.\nSo he has 5 + 10 = \\boxed{15} apples.", "15") is None
    assert unsound_reason("It is 15.6 hours.\n\\boxed{15}", "15") == "the answer 15 appears in none of its steps"


@pytest.mark.parametrize("line", [
    "450 + 230 = 2x",  # the numeric part of an expression with a variable
    "3x + 2 * 4 = 14",
    "14 = 2 * 4 + x",
    "2 \\text{ nephews} \\times \\frac{1}{5} \\text{ of 50 cars} = \\frac{2}{5} \\times 50 = 20",
])
def test_algebra_and_worded_quantities_are_not_read_as_false_steps(line):
    assert false_steps(line) == []
