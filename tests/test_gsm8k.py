"""Reading GSM8K-style JSON-lines files."""

import json

import pytest

from agents.errors import DataError
from agents.gsm8k import problem_id
from agents.gsm8k import read_problems as load_problems


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_reads_question_solution_and_label(tmp_path):
    path = _write(tmp_path / "mini.jsonl", [
        {"question": "Tom has 3 apples and buys 5. How many?", "answer": "3+5=<<3+5=8>>8\n#### 8"},
        {"question": "A farm has 1,200 cows.", "answer": "It has 1,200 cows.\n#### 1,200"},
    ])
    first, second = load_problems(path)
    assert first.solution == "3+5=8" and first.label == "8" and first.split == "mini"
    assert second.label == "1200"
    assert first.id == problem_id("mini", "Tom has 3 apples   and buys 5. How many?")  # whitespace-insensitive


def test_unlabelled_records_are_allowed(tmp_path):
    (problem,) = load_problems(_write(tmp_path / "q.jsonl", [{"question": "What is 2+2?"}]))
    assert problem.label is None and problem.solution is None


@pytest.mark.parametrize("bad,reason", [
    ("{not json", "bad GSM8K record"),
    (json.dumps({"answer": "#### 3"}), "'question' is missing"),
    (json.dumps({"question": "Q?", "answer": "no final line"}), "#### N"),
    (json.dumps(["a", "list"]), "bad GSM8K record"),
])
def test_bad_line_is_named(tmp_path, bad, reason):
    path = _write(tmp_path / "data.jsonl", [{"question": "Q?", "answer": "#### 1"}, bad])
    with pytest.raises(DataError, match=reason) as err:
        load_problems(path)
    assert f"{path}:2:" in str(err.value)


def test_gzip_files_and_missing_file(tmp_path):
    import gzip

    records = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(5)]
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    problems = load_problems(path)
    assert [p.label for p in problems] == ["0", "1", "2", "3", "4"] and problems[0].split == "d"
    with pytest.raises(DataError, match="not found"):
        load_problems(tmp_path / "missing.jsonl")
