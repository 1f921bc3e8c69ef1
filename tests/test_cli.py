"""The command line, through typer's CliRunner, on tiny-random."""

import json

import pytest
from chromadb.api.client import SharedSystemClient
from typer.testing import CliRunner

from run_loop import app

runner = CliRunner()


def _data(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = [{"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(3)]
TINY = ["--model", "tiny-random", "--embedder", "hash", "--max-new-tokens", "8", "--threads", "2"]


def _run(args):
    SharedSystemClient.clear_system_cache()
    return runner.invoke(app, ["run", *args])


def test_run_writes_a_resumable_run(tmp_path):
    data = _data(tmp_path / "d.jsonl", GOOD)
    run_dir = tmp_path / "run"
    result = _run(["--data", str(data), "--episodes", "2", "--run-dir", str(run_dir), *TINY])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 2 and summary["protocols"]["recovery_right_at_end"] == "recovery"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["node"] for e in events if e["node"] == "commit"] == ["commit", "commit"]
    assert (run_dir / "bank" / "current" / "manifest.json").is_file()
    # the same directory again needs --resume; with it, finished episodes are skipped and one more runs
    again = _run(["--data", str(data), "--episodes", "2", "--run-dir", str(run_dir), *TINY])
    assert again.exit_code == 1 and "--resume" in again.output
    more = _run(["--data", str(data), "--episodes", "3", "--run-dir", str(run_dir), "--resume", *TINY])
    assert more.exit_code == 0, more.output
    commits = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["node"] == "commit" for e in commits) == 3


def test_bad_data_line_is_named_and_earlier_episodes_stay_stored(tmp_path):
    from memory_store.config import MemoryConfig
    from memory_store.embedding import HashEmbedding
    from memory_store.store import MemoryStore

    data = _data(tmp_path / "d.jsonl", [GOOD[0], GOOD[1]])
    run_dir = tmp_path / "run"
    assert _run(["--data", str(data), "--episodes", "2", "--run-dir", str(run_dir), *TINY]).exit_code == 0
    _data(data, [GOOD[0], GOOD[1], "{broken json"])  # the file grows a bad line; the whole file is read first
    result = _run(["--episodes", "3", "--run-dir", str(run_dir), "--resume"])
    assert result.exit_code == 1
    assert f"{data}:3: bad GSM8K record" in result.output
    SharedSystemClient.clear_system_cache()
    store = MemoryStore.open(MemoryConfig(run_dir=run_dir), embedder=HashEmbedding(dim=384), writable=False)
    try:
        assert store.stats().n_episodes == 2
    finally:
        store.close()


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, needle in [
        (["--episodes", "0"], "--episodes 0: episodes must be >= 1"),
        (["--round-size", "0"], "--round-size 0: round_size must be >= 1"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--embedder", "nope"], "--embedder nope: embedder must be one of minilm, hash"),
        (["--backend", "nope"], "--backend nope: backend must be one of"),
        (["--pool-updates", "--episode-gate"], "(--pool-updates) needs round_gate (--round-gate)"),
        (["--data", str(tmp_path / "missing.jsonl")], "not found"),
        (["--model", "no-such-model", "--embedder", "hash"], "unknown model spec"),
    ]:
        result = _run([*args, "--run-dir", str(tmp_path / "r")])
        assert result.exit_code == 1, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_models_and_demo_help():
    assert runner.invoke(app, ["models", "--json"]).exit_code == 0
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "LangGraph loop" in result.output


def test_demo_runs_the_loop_then_scores_held_out_problems(tmp_path):
    SharedSystemClient.clear_system_cache()
    run_dir = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--model", "tiny-random", "--embedder", "hash", "--max-new-tokens", "4",
                                 "--eval-problems", "2", "--learn-problems", "1", "--run-dir", str(run_dir),
                                 "--threads", "2"])
    assert result.exit_code == 0, result.output
    for stage in ("before  the frozen model: ", "loop    1 learning episodes", "after   rules and experts: ",
                  f"rules list --run-dir {run_dir / 'arms' / 'full'}"):
        assert stage in result.stdout, (stage, result.stdout)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["protocol"] == "holdout" and set(report["arms"]) == {"frozen", "full"}
    assert not set(report["learn_ids"]) & {item["id"] for item in report["items"]}
    assert report["data_sources"]["eval"]["spec"] == "test" and report["data_sources"]["learn"]["spec"] == "train"
    events = [json.loads(line) for line in (run_dir / "arms" / "full" / "events.jsonl").read_text().splitlines()]
    assert events[0]["node"] == "solve" and events[-1]["node"] == "commit"


def test_a_second_ctrl_c_aborts_even_when_sigint_started_ignored():
    """A run started in the background inherits SIGINT ignored; the second Ctrl-C must still abort."""
    import os
    import signal
    import time

    from rich.console import Console

    from run_loop import _Live

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _Live(Console(file=open(os.devnull, "w")), "running") as live:
            assert live._previous is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after the running node
            deadline = time.monotonic() + 5
            while not live.stop and time.monotonic() < deadline:
                time.sleep(0.01)
            assert live.stop
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the second: abort now
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the handler it found is back
    finally:
        signal.signal(signal.SIGINT, before)


def test_demo_bad_threads_is_a_one_line_error_before_the_run_folder_is_made(tmp_path):
    result = runner.invoke(app, ["demo", "--threads", "-2", "--run-dir", str(tmp_path / "d")])
    assert result.exit_code == 1 and "--threads must be >= 0, got -2" in result.output, result.output
    assert not (tmp_path / "d").exists()


def test_the_gate_flags_are_saved_with_the_run_and_kept_on_resume(tmp_path):
    data = _data(tmp_path / "d.jsonl", GOOD)
    run_dir = tmp_path / "run"
    result = _run(["--data", str(data), "--episodes", "1", "--episode-gate", "--canary-test", "binomial",
                   "--canary-alpha", "0.1", "--run-dir", str(run_dir), *TINY])
    assert result.exit_code == 0, result.output
    loop = json.loads((run_dir / "run.json").read_text())["loop"]
    assert loop["round_gate"] is False and loop["canary_test"] == "binomial" and loop["canary_alpha"] == 0.1
    again = _run(["--episodes", "2", "--round-gate", "--run-dir", str(run_dir), "--resume", *TINY])
    assert again.exit_code == 1 and "--round-gate True differs from the saved False" in again.output
    again = _run(["--episodes", "2", "--canary-test", "margin", "--run-dir", str(run_dir), "--resume", *TINY])
    assert again.exit_code == 1 and "--canary-test margin differs from the saved binomial" in again.output


def test_openmp_threads_wait_briefly_unless_the_user_chose_how_and_torch_is_not_loaded_before(monkeypatch):
    import os
    import subprocess
    import sys

    from agents.lm.openmp import bounded_openmp_wait

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    bounded_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == "10000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    bounded_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    bounded_openmp_wait()
    assert "GOMP_SPINCOUNT" not in os.environ
    # The runtime reads the setting once, when torch loads: the CLI must set it first.
    loaded = subprocess.run([sys.executable, "-c", "import sys, run_loop; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"
