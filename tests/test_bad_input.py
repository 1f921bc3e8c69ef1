"""Bad input through the command line: one error line naming the input, exit code 1, nothing written lost.

And the checks that need no model come before the model loads: the loader is replaced by one
that fails the test if it is called.
"""

import json
import os
import random
import string

import pytest
from chromadb.api.client import SharedSystemClient
from typer.testing import CliRunner

from run_loop import app

runner = CliRunner()
TINY = ["--model", "tiny-random", "--embedder", "hash", "--max-new-tokens", "4", "--threads", "2"]
GOOD = [{"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(4)]


def _lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _invoke(args):
    SharedSystemClient.clear_system_cache()
    return runner.invoke(app, args)


def _error_line(result) -> str:
    """The one error line on stderr, after status lines only (a traceback would break both)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.split(":")[0] in STATUS for line in lines[:-1]), result.stderr
    assert lines[-1].startswith("error: "), result.stderr
    return lines[-1]


STATUS = ("data", "precision")  # what a command reports before it fails on what it read


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the refusal must come before it."""
    import agents.lm.precision

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(agents.lm.precision, "load_in_precision", refuse)


def _tree(folder):
    """Every file under a folder with its bytes: to show a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content, needle", [
    ('{"question": "Q?", "answer": "so\\n#### abc"}\n', "'abc' after '####' is not a number"),
    ("", "holds no problems"),
    ("\n\n  \n", "holds no problems"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not UTF-8 text"),
])
def test_bad_data_files_are_one_line_naming_the_file(tmp_path, no_model_load, content, needle):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = _error_line(_invoke(["run", "--data", str(data), "--run-dir", str(tmp_path / "r"), *TINY]))
    assert str(data) in line and needle in line
    assert not (tmp_path / "r").exists()


def test_a_question_longer_than_the_context_is_refused_before_any_generation(tmp_path):
    words = " ".join(random.Random(0).choice(["apples", "cost", "Tom", "3", "and"]) for _ in range(10_000))
    data = _lines(tmp_path / "long.jsonl", [GOOD[0], {"question": words + " How many?", "answer": "x\n#### 5"}])
    result = _invoke(["run", "--data", str(data), "--episodes", "2", "--run-dir", str(tmp_path / "r"), *TINY])
    line = _error_line(result)
    assert "is too long" in line and "tokens" in line and "at most" in line
    assert not (tmp_path / "r" / "run.json").exists()  # refused before the run started: the folder holds no run


@pytest.mark.parametrize("where, needle", [("file", "is a file, not a folder"), ("under_file", "which is a file")])
def test_run_dir_that_cannot_be_a_folder_is_one_line(tmp_path, no_model_load, where, needle):
    data = _lines(tmp_path / "d.jsonl", GOOD[:2])
    other = _lines(tmp_path / "e.jsonl", GOOD[2:])
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    run_dir = blocker if where == "file" else blocker / "sub" / "run"
    for command in (["run", "--data", str(data), "--episodes", "2"],
                    ["eval", "--learn-data", str(data), "--eval-data", str(other), "--learn-problems", "2",
                     "--eval-problems", "2"]):
        line = _error_line(_invoke([*command, "--run-dir", str(run_dir), *TINY]))
        assert str(run_dir) in line and needle in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_run_dir_is_one_line(tmp_path, no_model_load):
    data = _lines(tmp_path / "d.jsonl", GOOD)
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        line = _error_line(_invoke(["run", "--data", str(data), "--episodes", "2", "--run-dir", str(parent / "run"),
                                    *TINY]))
        assert "cannot be written" in line and str(parent / "run") in line
    finally:
        parent.chmod(0o700)


def test_a_second_process_on_the_run_folder_is_refused_before_the_model_loads(tmp_path, no_model_load):
    import multiprocessing

    from graph.run_dir import claim_run_dir

    data = _lines(tmp_path / "d.jsonl", GOOD)
    run_dir = tmp_path / "run"
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_run_dir, args=(run_dir, ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        line = _error_line(_invoke(["run", "--data", str(data), "--episodes", "2", "--run-dir", str(run_dir), *TINY]))
        assert f"run folder {run_dir} is in use by process {holder.pid}" in line
    finally:
        done.set()
        holder.join(30)
    claim_run_dir(run_dir).release()  # free again once the holder is gone


def _hold_run_dir(run_dir, ready, done):
    from graph.run_dir import claim_run_dir

    lock = claim_run_dir(run_dir)
    ready.set()
    done.wait(60)
    lock.release()


def test_a_folder_holding_a_run_is_refused_before_the_model_loads(tmp_path, no_model_load):
    data = _lines(tmp_path / "d.jsonl", GOOD)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"model": "tiny-random", "data": str(data)}))
    line = _error_line(_invoke(["run", "--data", str(data), "--episodes", "2", "--run-dir", str(run_dir), *TINY]))
    assert "already holds a run" in line


def test_a_failed_memory_url_leaves_no_run_behind(tmp_path):
    from graph.run_dir import saved_run_settings

    data = _lines(tmp_path / "d.jsonl", GOOD)
    run_dir = tmp_path / "run"
    line = _error_line(_invoke(["run", "--data", str(data), "--episodes", "1", "--run-dir", str(run_dir),
                                "--memory-url", "http://127.0.0.1:9", *TINY]))
    assert "127.0.0.1:9" in line
    assert saved_run_settings(run_dir) is None
    again = _invoke(["run", "--data", str(data), "--episodes", "1", "--run-dir", str(run_dir), *TINY])
    assert again.exit_code == 0, again.output  # the folder is free for the run the user meant


# ---- generated malformed files (a seeded property-style sweep)

def _malformed(rng: random.Random) -> bytes:
    """A JSON-lines file a user might really have: broken, truncated, mistyped, huge or odd text."""
    good = [json.dumps(r) for r in GOOD[:2]]
    kind = rng.choice(["bytes", "truncated", "types", "huge", "unicode", "not_object", "no_hash"])
    if kind == "bytes":
        bad = bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 200)))
        return ("\n".join(good) + "\n").encode() + bad + b"\n"
    if kind == "truncated":
        line = json.dumps(GOOD[2])
        return ("\n".join(good) + "\n" + line[: rng.randrange(1, len(line) - 1)] + "\n").encode()
    if kind == "types":
        value = rng.choice([None, 5, 2.5, [], {}, True])
        field = rng.choice(["question", "answer"])
        return ("\n".join(good) + "\n" + json.dumps({**GOOD[2], field: value}) + "\n").encode()
    if kind == "huge":
        text = "".join(rng.choice(string.ascii_letters) for _ in range(200_000))
        return ("\n".join(good) + "\n" + json.dumps({"question": "Q?", "answer": text}) + "\n").encode()
    if kind == "unicode":
        odd = "".join(chr(rng.choice([0x202E, 0x0301, 0x1F600, 0x00A0, 0xFEFF, 0x4E00 + rng.randrange(100)]))
                      for _ in range(30))
        return ("\n".join(good) + "\n" + json.dumps({"question": odd, "answer": f"{odd}\n#### {odd}"}) + "\n").encode()
    if kind == "not_object":
        return ("\n".join(good) + "\n" + json.dumps(rng.choice([[1, 2], "text", 7, None])) + "\n").encode()
    return ("\n".join(good) + "\n" + json.dumps({"question": "Q?", "answer": "no final line"}) + "\n").encode()


@pytest.mark.parametrize("seed", range(24))
def test_generated_malformed_files_are_one_line_and_change_nothing(tmp_path, no_model_load, seed):
    rng = random.Random(seed)
    data = tmp_path / "data.jsonl"
    data.write_bytes(_malformed(rng))
    # A run folder that already holds a run on this file (now corrupted): resuming it must not touch it.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"model": "tiny-random", "data": str(data), "episodes": 3}))
    (run_dir / "events.jsonl").write_text('{"episode": 0, "node": "commit"}\n')
    before = _tree(run_dir)
    line = _error_line(_invoke(["run", "--run-dir", str(run_dir), "--resume", "--threads", "2"]))
    assert str(data) in line and len(line) < 600
    eval_dir = tmp_path / "eval"
    line = _error_line(_invoke(["eval", "--eval-data", str(data), "--learn-data", str(data), "--run-dir", str(eval_dir),
                                *TINY]))
    assert str(data) in line and len(line) < 600
    assert _tree(run_dir) == before and not eval_dir.exists()


def test_a_file_named_gz_that_is_not_gzip_is_one_line(tmp_path, no_model_load):
    data = tmp_path / "bad.jsonl.gz"
    data.write_bytes(b'{"question": "Q?", "answer": "#### 1"}\n')  # plain text under a .gz name
    line = _error_line(_invoke(["run", "--data", str(data), "--run-dir", str(tmp_path / "r"), *TINY]))
    assert str(data) in line and "cannot be read" in line


def test_a_start_that_fails_after_the_bank_is_made_leaves_no_bank_behind(tmp_path):
    """llama.cpp cannot serve tiny-random (no GGUF): the failure comes after the initial bank was saved."""
    data = _lines(tmp_path / "d.jsonl", GOOD)
    run_dir = tmp_path / "run"
    line = _error_line(_invoke(["run", "--data", str(data), "--episodes", "1", "--run-dir", str(run_dir),
                                "--backend", "llama.cpp", "--seed", "1", *TINY]))
    assert "llama.cpp" in line
    assert not (run_dir / "bank").exists() and not (run_dir / "memory").exists() and not (run_dir / "run.json").exists()
