"""GSM8K-style problems from JSON-lines files (`question`, `answer` ending in `#### N`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

from agents.errors import DataError

# The shared copy on this machine; users point elsewhere with SELFIMPROVE_GSM8K or a path.
_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
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


def data_dir() -> Path:
    return Path(os.environ.get("SELFIMPROVE_GSM8K", _SHARED))


def resolve_path(spec: str | Path) -> Path:
    """A file path, or 'train' / 'test' for the files in the GSM8K data folder."""
    if str(spec) in ("train", "test"):
        path = data_dir() / f"{spec}.jsonl"
    else:
        path = Path(spec)
    if not path.is_file():
        raise DataError(f"GSM8K data file not found: {path} (set SELFIMPROVE_GSM8K or pass a path)")
    return path


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
    return Problem(problem_id(split, question), question.strip(), solution, label, split)


def iter_problems(spec: str | Path, split: str | None = None) -> Iterator[Problem]:
    """Problems one line at a time; a bad line raises DataError naming the file and line when reached."""
    path = resolve_path(spec)
    split = split or path.stem
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield parse_record(json.loads(line), split)
            except (json.JSONDecodeError, ValueError, AttributeError) as err:
                raise DataError(f"{path}:{number}: bad GSM8K record: {err}") from err


def load_problems(spec: str | Path, limit: int | None = None, split: str | None = None) -> list[Problem]:
    """Read problems from a JSON-lines file; a bad line is an error naming the file and line."""
    return list(islice(iter_problems(spec, split), limit))


# ---------------------------------------------------------------- sources and subsets

HUB_SPLITS = {"gsm8k:train": "train", "gsm8k:test": "test"}  # Hugging Face hub specs -> split


def load_hub(split: str, limit: int | None = None) -> list[Problem]:
    """GSM8K from the Hugging Face hub (``datasets.load_dataset("gsm8k", "main")``), when one is reachable.

    Problems get the same ids as the local ``train.jsonl`` / ``test.jsonl`` files, since the
    id is the split plus the question text.
    """
    if split not in ("train", "test"):
        raise DataError(f"GSM8K hub split must be 'train' or 'test', got {split!r}")
    try:
        import datasets  # imported here: only the hub path needs it
    except ImportError as err:
        raise DataError("gsm8k:* data needs the 'datasets' package: pip install datasets") from err
    try:
        rows = datasets.load_dataset("gsm8k", "main", split=split)
    except (OSError, ValueError) as err:  # ConnectionError and DatasetNotFoundError are OSErrors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load gsm8k:{split} from the Hugging Face hub: {first_line}") from err
    problems = []
    for number, record in enumerate(islice(rows, limit)):
        try:
            problems.append(parse_record(dict(record), split))
        except ValueError as err:
            raise DataError(f"gsm8k:{split} row {number}: bad GSM8K record: {err}") from err
    return problems


def load_source(spec: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from 'gsm8k:train' / 'gsm8k:test' (the hub), 'train' / 'test' (the local files) or a path."""
    if str(spec) in HUB_SPLITS:
        return load_hub(HUB_SPLITS[str(spec)], limit)
    return load_problems(spec, limit=limit)


def sample_problems(problems: list[Problem], n: int, seed: int) -> list[Problem]:
    """n problems chosen by seed, independent of the input order.

    Problems are ranked by sha256(seed, id) and the first n kept, so the same seed and ids
    give the same subset from any copy of the data, and a larger n extends a smaller one.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > len(problems):
        raise DataError(f"asked for {n} problems but the data holds only {len(problems)}")
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
