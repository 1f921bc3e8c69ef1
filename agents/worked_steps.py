"""Whether a solution's worked steps hold: its arithmetic, its answer, and no made-up program output.

A final answer that equals the label does not make the reasoning right. A small model asked
to reach a given answer (STaR's rationalization, Zelikman et al. 2022, arXiv 2203.14465)
often writes steps that do not produce it ("1300 / 6 = 220", "15.6 hours ... The answer is
15"), and a coder model quotes the "output" of code that never ran. Training on such texts
teaches the model to assert answers. GSM8K's own solutions carry calculator annotations for
the same reason (Cobbe et al. 2021, arXiv 2110.14168): every step is an equation that can be
checked. This module checks the equations a solution writes out, with exact rational
arithmetic, and refuses the solution when one is false, when its answer appears nowhere in
its steps, or when it quotes program output.

Only purely numeric sides are checked (``150 + 250 * 12 = 3150``); a side with words in it
is left alone, so the check refuses false steps, never unusual wording.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

from agents.answers import parse_number, split_answer_line

_CODE_OUTPUT = re.compile(r"```\s*output", re.IGNORECASE)
_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES_X = re.compile(r"(?<=\d)\s*[xX]\s*(?=[\d(])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_IMPLICIT_TIMES = (re.compile(r"(\d|\))\s*\("), re.compile(r"\)\s*(\d)"))
_SIDE_TAIL = re.compile(r"[\d.+\-*/()%\s]+$")  # the numeric end of a left side
_SIDE_HEAD = re.compile(r"^[\d.+\-*/()%\s]+")  # the numeric start of a right side
_EQUALS = re.compile(r"(?<![<>=!])=(?!=)")
_APPROX = re.compile(r"≈|\\approx|~=|≃|\\sim")
_BULLET = re.compile(r"^\s*[-*+•]\s+")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def _normalise(line: str) -> str:
    for _ in range(3):  # nested fractions, innermost first
        line = _LATEX_FRAC.sub(r"((\1)/(\2))", line)
    # A unit between quantities is dropped ("4.8 \\text{ books} \\times 3"); words holding a number
    # stay, so that side is not read as arithmetic ("\\frac{1}{5} \\text{ of 50 cars}").
    line = _LATEX_TEXT.sub(lambda m: m.group(1) if re.search(r"\d", m.group(1)) else " ", line)
    for mark, op in (("{,}", ","), ("\\,", ""), ("**", " "), ("\\times", "*"), ("\\cdot", "*"), ("×", "*"),
                     ("·", "*"), ("÷", "/"), ("\\div", "/"), ("−", "-"), ("–", "-"), ("\\left", ""), ("\\right", ""), ("\\%", "%"), ("\\$", ""), ("$", ""),
                     ("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "), ("{", " "), ("}", " ")):
        line = line.replace(mark, op)
    line = _THOUSANDS.sub("", line)
    return _TIMES_X.sub("*", line)


def _value(expression: str) -> Fraction | None:
    """The exact value of a numeric expression (+ - * / parentheses, % as hundredths); None if it is not one."""
    expression = _PERCENT.sub(r"(\1/100)", expression.strip())
    for pattern in _IMPLICIT_TIMES:
        expression = pattern.sub(lambda m: m.group(1) + "*(" if m.group(0).endswith("(") else ")*" + m.group(1),
                                 expression)
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> Fraction | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _evaluate(node.operand)
        return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return None if right == 0 else left / right
    return None


def _parsed_side(text: str, from_left: bool) -> tuple[str, Fraction] | None:
    """The longest numeric expression at the inner edge of one side of '=', and its value.

    Words are trimmed off token by token ("1. 50 + 9" -> "50 + 9"); a side that never parses
    is not checked."""
    tokens = text.split()
    while tokens:
        candidate = " ".join(tokens).rstrip(".")  # a full stop ends the sentence, not the number
        if candidate.count("(") != candidate.count(")"):
            candidate = candidate.strip("()")
        value = _value(candidate)
        if value is not None:
            return candidate, value
        tokens = tokens[1:] if from_left else tokens[:-1]
    return None


def _holds(left: Fraction, right_text: str, right: Fraction) -> bool:
    """Equal up to the rounding the right side was written with (216.67 for 1300/6; 217 too)."""
    decimals = len(right_text.split(".")[1].rstrip("%").strip()) if "." in right_text else 0
    tolerance = Fraction(1, 2 * 10 ** decimals) + Fraction(1, 10 ** 6) * max(1, abs(right))
    if abs(left - right) <= tolerance:
        return True
    if decimals == 0 and right.denominator == 1 and right in (math.floor(left), math.ceil(left)):
        return True  # whole things: "50 / 3 = 16 full bags", "= 17 trips"
    return "%" in right_text and abs(left - right * 100) <= tolerance * 100  # "0.25 * 100 = 25%"


def _cut_from_algebra(left_text: str, tail: re.Match, right_text: str, head: re.Match) -> bool:
    """A side that is the numeric part of an expression with a variable ("3x + 2 * 4", "= 2x")."""
    before = left_text[:tail.start()].rstrip()
    if tail.group(0).strip()[:1] in "+-*/" and before and (before[-1].isalnum() or before[-1] in ")}"):
        return True
    after = right_text[head.end():]
    glued = after[:1].isalpha() and not head.group(0)[-1:].isspace()  # "2x", not "5 apples"
    return bool(head.group(0).strip()[-1:] in "+-*/" and after.strip()) or glued


def false_steps(text: str) -> list[str]:
    """The equations written in ``text`` (code blocks aside) whose numeric sides are not equal."""
    return [f"{left} = {right}" for left, right, holds, _ in _steps(text) if not holds]


def _steps(text: str):
    """Each computed equation in ``text``: its two sides as written, whether it holds, the right side's value."""
    for raw in _CODE_BLOCK.sub("\n", text).splitlines():
        raw = _BULLET.sub("", raw)  # a list's "- " is not a minus sign
        for chunk in _APPROX.split(_normalise(raw)):  # an approximation is not checked across its sign
            sides = _EQUALS.split(chunk)
            for left_text, right_text in zip(sides, sides[1:]):
                tail, head = _SIDE_TAIL.search(left_text), _SIDE_HEAD.search(right_text)
                if not tail or not head or _cut_from_algebra(left_text, tail, right_text, head):
                    continue
                left = _parsed_side(tail.group(0), from_left=True)
                right = _parsed_side(head.group(0), from_left=False)
                if left is None or right is None or not re.search(r"\d\s*[-+*/]\s*[\d(]|\)\s*[-+*/]", left[0]):
                    continue  # only a computed left side is a step ("x = 5" states, it does not compute)
                yield left[0], right[0], _holds(left[1], right[0], right[1]), right[1]


def _answer_in_steps(text: str, answer: str) -> bool:
    """The final answer appears as a number in the steps before the answer line, or is what a
    step computes on the answer line itself ("So 5 + 10 = \\boxed{15} apples")."""
    target = parse_number(answer)
    if target is None:
        return False
    steps, answer_part = split_answer_line(text)
    if any(holds and value == target for _, _, holds, value in _steps(_BOXED.sub(r" \1 ", answer_part))):
        return True
    for number in _NUMBERS.findall(_normalise(steps)):
        try:
            if Fraction(number) == target:
                return True
        except (ValueError, ZeroDivisionError):
            continue
    return False


def unsound_reason(text: str, answer: str) -> str | None:
    """Why a solution's worked steps cannot be trusted, or None when they hold."""
    if _CODE_OUTPUT.search(text):
        return "quotes the output of code that was never run"
    wrong = false_steps(text)
    if wrong:
        return f"false step: {wrong[0]}"
    if not _answer_in_steps(text, answer):
        return f"the answer {answer} appears in none of its steps"
    return None
