"""The answer-leak guard: no rule or training text may carry a problem's final answer."""

from __future__ import annotations

import re

from agents.answers import _LATEX_FRAC, _NUMBER_RE, parse_number, same_number


def numbers_in(text: str) -> list:
    """Every number written in text, parsed (commas, '$', decimals, fractions, \\frac)."""
    text = _LATEX_FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    values = []
    for match in _NUMBER_RE.finditer(text):
        value = parse_number(match.group(0))
        if value is not None:
            values.append(value)
    return values


def leaks_answer(text: str, label: str | None) -> bool:
    """True if text contains the label's number as a number of its own ("8" is not in "18")."""
    if label is None:
        return False
    answer = parse_number(label)
    return answer is not None and any(same_number(v, answer) for v in numbers_in(text))


_WORD = re.compile(r"[a-z']{4,}")


def echoes_instructions(text: str, instructions: tuple[str, ...], threshold: float = 0.6) -> bool:
    """True if most of the rule's longer words come from one of the instruction texts.

    Small models often answer "write a rule" by repeating the request or its example.
    """
    words = set(_WORD.findall(text.lower()))
    if len(words) < 3:
        return False
    return any(len(words & set(_WORD.findall(i.lower()))) / len(words) >= threshold for i in instructions)


def rule_problem(
    text: str, label: str | None, max_chars: int, max_sentences: int, echoes: tuple[str, ...] = ()
) -> str | None:
    """Why a rule is unacceptable, or None if it passes."""
    body = text.strip()
    if not body:
        return "it is empty"
    if len(body) > max_chars:
        return f"it is too long ({len(body)} characters; at most {max_chars})"
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", body) if s.strip()]
    if len(sentences) > max_sentences:
        return f"it has {len(sentences)} sentences; at most {max_sentences}"
    if leaks_answer(body, label):
        return "it contains the problem's answer"
    if echoes and echoes_instructions(body, echoes):
        return "it repeats the instructions or the example instead of stating a lesson"
    return None
