"""Find the final number in a model's answer and compare it numerically with a label.

Strategies, tried in order, each reported with the result:
  boxed       the last LaTeX \\boxed{...}
  answer_is   the last "The answer is N" / "Answer: N"
  hash        the last "#### N" (GSM8K's own format)
  last_number the last number anywhere (a fallback, flagged as such)
Numbers may carry commas, '$', units, a sign, decimals, fractions 'a/b' or \\frac{a}{b}.
Comparing parsed numbers, never substrings, keeps "8" from matching "18".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_NUMBER = r"-?\$?\s*-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d[\d,]*)?|-?\$?\s*-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_LATEX_FRAC = re.compile(r"\\d?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
# The tail is captured in a lookahead so that a later "answer is" in it is matched too.
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*[:=])\s*:?\s*(?=(.{0,80}))", re.IGNORECASE)
_HASH = re.compile(r"####\s*(?=(.{0,80}))")


@dataclass(frozen=True)
class Extraction:
    value: Fraction | None  # None: no number found
    strategy: str  # boxed | answer_is | hash | last_number | none
    text: str  # the matched text the value came from

    @property
    def found(self) -> bool:
        return self.value is not None


def parse_number(text: str) -> Fraction | None:
    """The first number in text as an exact Fraction, or None."""
    text = _LATEX_FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    match = _NUMBER_RE.search(text)
    if not match:
        return None
    cleaned = re.sub(r"[\s$,]", "", match.group(0))  # "-$1,250" -> "-1250", "3 / 4" -> "3/4"
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


_ANSWER_MARKER = re.compile(r"(the\s+(final\s+)?answer\s+is|answer\s*[:=]|####|\\boxed)", re.IGNORECASE)


def split_answer_line(text: str) -> tuple[str, str]:
    """A solution's steps, and its answer part: from the last line holding an answer marker
    ('The answer is', 'Answer:', '####', '\\boxed') on; the answer part is empty if none does."""
    lines = text.rstrip().splitlines()
    last = max((i for i, line in enumerate(lines) if _ANSWER_MARKER.search(line)), default=len(lines))
    return "\n".join(lines[:last]).rstrip(), "\n".join(lines[last:])


def steps_before_answer(text: str) -> str:
    """A solution without its answer part (split_answer_line)."""
    return split_answer_line(text)[0]


def extract_answer(text: str) -> Extraction:
    boxed = _last_boxed(text)
    if boxed is not None and (value := parse_number(boxed)) is not None:
        return Extraction(value, "boxed", boxed)
    for strategy, pattern in (("answer_is", _ANSWER_IS), ("hash", _HASH)):
        matches = list(pattern.finditer(text))
        for match in reversed(matches):
            tail = match.group(1)
            if (value := parse_number(tail)) is not None:
                return Extraction(value, strategy, tail.strip())
    numbers = list(_NUMBER_RE.finditer(_LATEX_FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)))
    for match in reversed(numbers):
        if (value := parse_number(match.group(0))) is not None:
            return Extraction(value, "last_number", match.group(0).strip())
    return Extraction(None, "none", "")


def same_number(a: Fraction | None, b: Fraction | None, tolerance: Fraction = Fraction(1, 10**6)) -> bool:
    """Numeric equality with a tiny relative tolerance for rounded decimals."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    return abs(a - b) <= tolerance * max(abs(a), abs(b), Fraction(1))


def is_correct(model_output: str, label: str) -> tuple[bool, Extraction]:
    extraction = extract_answer(model_output)
    return same_number(extraction.value, parse_number(label)), extraction
