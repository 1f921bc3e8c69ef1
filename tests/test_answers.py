"""Final-answer extraction and numeric comparison, on tricky model outputs."""

from fractions import Fraction

import pytest

from agents.answers import extract_answer, is_correct, parse_number, same_number

# (model output, label, should be judged correct, strategy that must fire)
CASES = [
    ("The answer is 18.", "18", True, "answer_is"),
    ("The answer is 18.", "8", False, "answer_is"),
    ("She has 8 apples. The answer is 18", "8", False, "answer_is"),
    ("The answer is 8", "18", False, "answer_is"),
    ("I counted 18 then 8. The answer is 8.", "8", True, "answer_is"),
    (r"The answer is \(\boxed{18}\)", "18", True, "boxed"),
    (r"So $x = 5$ and \boxed{12}.", "12", True, "boxed"),
    (r"\boxed{\frac{3}{4}}", "0.75", True, "boxed"),
    (r"\boxed{\dfrac{1}{2}}", "0.5", True, "boxed"),
    (r"\boxed{1,250}", "1250", True, "boxed"),
    (r"\boxed{\$18}", "18", True, "boxed"),
    (r"first \boxed{3} then \boxed{4}", "4", True, "boxed"),
    ("The answer is $1,250.", "1250", True, "answer_is"),
    ("The answer is $1,250.50.", "1250.5", True, "answer_is"),
    ("The answer is -7.", "-7", True, "answer_is"),
    ("The answer is -$7.", "-7", True, "answer_is"),
    ("The answer is 3/4.", "0.75", True, "answer_is"),
    ("The answer is 0.5 liters.", "1/2", True, "answer_is"),
    ("The answer is 42 dollars.", "42", True, "answer_is"),
    ("The answer is 42 km/h.", "42", True, "answer_is"),
    ("The final answer is 100.", "100", True, "answer_is"),
    ("Answer: 64", "64", True, "answer_is"),
    ("answer = 9", "9", True, "answer_is"),
    ("The answer is: 15", "15", True, "answer_is"),
    ("THE ANSWER IS 15", "15", True, "answer_is"),
    ("The answer is 5.0", "5", True, "answer_is"),
    ("The answer is 005", "5", True, "answer_is"),
    ("The answer is 10%.", "10", True, "answer_is"),
    ("The answer is 1,000,000.", "1000000", True, "answer_is"),
    ("The answer is 12. Wait, no. The answer is 14.", "14", True, "answer_is"),
    ("#### 72", "72", True, "hash"),
    ("48 + 24 = 72\n#### 72", "72", True, "hash"),
    ("#### 1,080", "1080", True, "hash"),
    ("So she sells 9 eggs for $18 in total.", "18", True, "last_number"),
    ("So she sells 9 eggs for $18 in total.", "9", False, "last_number"),
    ("It costs .5 dollars", "0.5", True, "last_number"),
    ("The total is 3 / 4 of the cake", "0.75", True, "last_number"),
    ("I don't know.", "5", False, "none"),
    ("", "5", False, "none"),
    ("The answer is unclear, maybe 7", "7", True, "answer_is"),
    ("The answer is 1/0", "5", False, "none"),
    ("He runs 18 miles, 8 more than before. The answer is 18", "18", True, "answer_is"),
    ("Total: 2.50 + 2.5 = 5\nThe answer is 5.", "5", True, "answer_is"),
    ("The answer is 33.333333", "33.333333", True, "answer_is"),
]


@pytest.mark.parametrize("output,label,correct,strategy", CASES)
def test_extraction_table(output, label, correct, strategy):
    ok, extraction = is_correct(output, label)
    assert extraction.strategy == strategy, extraction
    assert ok is correct, extraction


def test_table_is_large_enough():
    assert len(CASES) >= 40


def test_parse_number_forms():
    assert parse_number("$1,250.50") == Fraction(2501, 2)
    assert parse_number("-3/4") == Fraction(-3, 4)
    assert parse_number(r"\frac{6}{8}") == Fraction(3, 4)
    assert parse_number("no digits") is None
    assert parse_number("5/0") is None


def test_same_number_is_numeric_not_textual():
    assert same_number(Fraction(18), Fraction(36, 2))
    assert not same_number(Fraction(8), Fraction(18))
    assert not same_number(None, Fraction(1))
    assert extract_answer("The answer is 8").value == 8
