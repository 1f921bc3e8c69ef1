"""GSM8K-style problems from JSON-lines files (`question`, `answer` ending in `#### N`)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from agents.errors import DataError

_FINAL = re.compile(r"####\s*(.+?)\s*$")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>


@dataclass(frozen=True)
class Problem:
    id: str  # stable: split + sha256 of the question text
    question: str
    solution: str | None  # the reference solution without the final '#### N' line
    label: str | None  # the final answer as written after '####', commas removed
    split: str  # "train", "test", or the file's stem


def problem_id(split: str, question: str) -> str:
    digest = hashlib.sha256(" ".join(question.split()).encode()).hexdigest()[:12]
    return f"{split}-{digest}"


def parse_record(record: dict, split: str) -> Problem:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' is missing or empty")
    answer = record.get("answer")
    if answer is None:
        return Problem(problem_id(split, question), question.strip(), None, None, split)
    if not isinstance(answer, str):
        raise ValueError("'answer' is not a string")
    lines = answer.strip().splitlines()
    match = _FINAL.search(lines[-1]) if lines else None
    if not match:
        raise ValueError("'answer' does not end with a '#### N' line")
    solution = _CALCULATOR.sub("", "\n".join(lines[:-1])).strip()
    label = match.group(1).replace(",", "").strip()
    try:
        Fraction(label)  # answers are scored as numbers: a label that is none could never be matched
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"the final answer {label[:40]!r} after '####' is not a number") from None
    return Problem(problem_id(split, question), question.strip(), solution, label, split)


def read_problems(path: Path, split: str | None = None) -> list[Problem]:
    """Every problem of a JSON-lines file (gzip when it ends in .gz); a bad line is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GSM8K data file not found: {path}")
    split = split or Path(path.name.removesuffix(".gz")).stem
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    try:
        with opener(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{number}: not UTF-8 text (is it a JSON-lines file?)") from None
                if not line.strip():
                    continue
                try:
                    problems.append(parse_record(json.loads(line), split))
                except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as err:
                    raise DataError(f"{path}:{number}: bad GSM8K record: {_short(err)}") from err
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; EOFError: a truncated .gz
        raise DataError(f"{path}: cannot be read: {_short(err)}") from err
    if not problems:
        raise DataError(f"{path} holds no problems")
    return problems


def _short(err: BaseException) -> str:
    """One line of an error, at most 200 characters: a huge field never floods the terminal."""
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def parse_rows(rows, split: str, where: str) -> list[Problem]:
    """Problems from dict rows (a hub dataset); a bad row is a DataError naming ``where`` and the row."""
    problems = []
    for number, record in enumerate(rows):
        try:
            problems.append(parse_record(dict(record), split))
        except ValueError as err:
            raise DataError(f"{where} row {number}: bad GSM8K record: {err}") from err
    return problems


def sample_problems(problems: list[Problem], n: int, seed: int, source: str = "the data") -> list[Problem]:
    """n problems chosen by seed, independent of the input order.

    Problems are ranked by sha256(seed, id) and the first n kept, so the same seed and ids
    give the same subset from any copy of the data, and a larger n extends a smaller one.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > len(problems):
        raise DataError(f"asked for {n} problems but {source} holds only {len(problems)}")
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise DataError(f"the data holds the same question twice (id {problem.id}); remove the duplicate")
        seen.add(problem.id)
    rank = lambda p: hashlib.sha256(f"{seed}\x1f{p.id}".encode()).hexdigest()  # noqa: E731
    return sorted(problems, key=rank)[:n]


def normalise_question(question: str) -> str:
    """Lower case, single spaces: the text two problems are compared by for overlap."""
    return " ".join(question.lower().split())
