"""`--run-dir DIR --resume` needs nothing else; an option given again must match; the Ctrl-C hint works as printed."""

import json
import shlex

import pytest
from chromadb.api.client import SharedSystemClient
from typer.testing import CliRunner

import graph.episodes
from run_loop import app

runner = CliRunner()

ROWS = [{"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(6)]


def _data(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _invoke(args):
    SharedSystemClient.clear_system_cache()
    return runner.invoke(app, args)


class StopAfter(graph.episodes.StopFlag):
    """Set after it has been asked `n` times: the run stops after its n-th finished node."""

    n = 1

    def __init__(self):
        super().__init__()
        self.asked = 0

    def __bool__(self):
        self.asked += 1
        return self.asked > self.n or super().__bool__()


def _hint(output: str) -> list[str]:
    line = next(line for line in output.splitlines() if "resume with: " in line)
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["python", "run_loop.py"]
    return command[2:]


def test_run_resumes_from_its_folder_alone_after_a_stop(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = ["run", "--data", _data(tmp_path / "d.jsonl"), "--episodes", "2", "--cycles", "3", "--seed", "7",
            "--model", "tiny-random", "--embedder", "hash", "--max-new-tokens", "6", "--threads", "2",
            "--run-dir", str(run_dir)]
    monkeypatch.setattr(graph.episodes, "StopFlag", StopAfter)
    stopped = _invoke(args)
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    resumed = _invoke(_hint(stopped.output))  # the printed command, as printed
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 2
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["loop"]["cycles"] == 3 and saved["loop"]["seed"] == 7 and saved["embedder"] == "hash"
    assert saved["data_source"]["kind"] == "file"
    # 'auto' is kept as what it resolved to, so the resume ran in it whatever a new calibration says
    assert saved["precision"] in ("float32", "bfloat16", "int8")
    assert f"precision: {saved['precision']} (" in resumed.output


def test_run_option_that_differs_from_the_saved_one_names_both_values(tmp_path):
    run_dir = tmp_path / "run"
    first = _invoke(["run", "--data", _data(tmp_path / "d.jsonl"), "--episodes", "1", "--cycles", "1",
                     "--model", "tiny-random", "--embedder", "hash", "--max-new-tokens", "4", "--run-dir", str(run_dir)])
    assert first.exit_code == 0, first.output
    before = (run_dir / "run.json").read_text()
    differs = _invoke(["run", "--run-dir", str(run_dir), "--resume", "--cycles", "3"])
    assert differs.exit_code == 1
    assert differs.output.strip() == (f"error: --cycles 3 differs from the saved 1 in {run_dir / 'run.json'}; "
                                      "resume without it, or choose another --run-dir")
    assert (run_dir / "run.json").read_text() == before
    # the same value again, and the changeable ones (more episodes), are fine
    more = _invoke(["run", "--run-dir", str(run_dir), "--resume", "--cycles", "1", "--episodes", "2"])
    assert more.exit_code == 0, more.output
    assert json.loads(more.stdout.strip().splitlines()[-1])["episodes"] == 2


def test_asking_for_more_episodes_than_the_data_holds_is_one_line(tmp_path):
    result = _invoke(["run", "--data", _data(tmp_path / "d.jsonl"), "--episodes", "7", "--model", "tiny-random",
                      "--embedder", "hash", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "asked for 7 episodes but" in result.output and "holds only 6" in result.output
    assert not (tmp_path / "run").exists()


EVAL = ["--model", "tiny-random", "--embedder", "hash", "--max-new-tokens", "4", "--experts", "2", "--threads", "2",
        "--arms", "rules", "--cycles", "1", "--learn-problems", "2", "--eval-problems", "2", "--no-plots"]


def test_eval_resumes_from_its_folder_alone_and_refuses_a_changed_option(tmp_path, monkeypatch):
    run_dir = tmp_path / "eval"
    learn, scored = _data(tmp_path / "learn.jsonl", ROWS[:3]), _data(tmp_path / "eval.jsonl", ROWS[3:])
    monkeypatch.setattr(graph.episodes, "StopFlag", StopAfter)
    stopped = _invoke(["eval", *EVAL, "--learn-data", learn, "--eval-data", scored, "--run-dir", str(run_dir)])
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    hint = _hint(stopped.output)
    assert hint == ["eval", "--run-dir", str(run_dir), "--resume"]
    differs = _invoke([*hint, "--eval-problems", "3"])
    assert differs.exit_code == 1 and "--eval-problems 3 differs from the saved 2" in differs.output
    resumed = _invoke([*hint, "--json"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert set(summary["arms"]) == {"frozen", "rules"} and summary["arms"]["rules"]["n"] == 2
    assert summary["data_sources"]["learn"]["location"] == learn


@pytest.mark.parametrize("command", ["run", "eval"])
def test_every_data_source_is_named_in_the_output(tmp_path, command):
    path = _data(tmp_path / "d.jsonl")
    if command == "run":
        args = ["run", "--data", path, "--episodes", "1", "--model", "tiny-random", "--embedder", "hash",
                "--max-new-tokens", "2", "--run-dir", str(tmp_path / "r")]
        expected = [f"data: {path}: file {path} (6 problems)"]
    else:
        args = ["eval", *EVAL, "--learn-data", "train", "--eval-data", path, "--learn-problems", "1",
                "--run-dir", str(tmp_path / "r")]
        expected = [f"data: {path}: file {path} (6 problems)", "data: train: "]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    for line in expected:
        assert line in result.output, (line, result.output)
