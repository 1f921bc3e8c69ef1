"""The README's quickstart, run as a new user would: from a copy of the repository with nothing beside it."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs a command-line call in a fresh interpreter and reports whether torch or transformers got imported.
IMPORT_PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['run_loop.py', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_path('run_loop.py', run_name='__main__')\n"
    "except SystemExit as stop:\n"
    "    code = stop.code\n"
    "print('heavy imports:', sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n"
)


def _quickstart_commands() -> list[str]:
    """The two commands of the README's Quickstart section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's files (tracked, and new ones git does not ignore) in a folder with no ../shared."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    dest = tmp_path_factory.mktemp("user") / "selfimprove"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    assert not (dest.parent / "shared").exists()
    return dest


def _user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SELFIMPROVE_GSM8K"}
    env["HF_HUB_OFFLINE"] = "1"  # a test never reaches a hub; the fallback order is tested in test_data_sources
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_user_env(), capture_output=True, text=True, timeout=600)


def test_the_readme_quickstart_runs_the_loop_from_a_bare_clone(clone):
    main_job, tests = _quickstart_commands()
    assert tests == (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]  # CI runs the README's test command
    install, command = main_job.split(" && ")
    assert install == "bash .ci/install.sh" and command == "python run_loop.py demo"
    # installing is what CI's own run does; here the copy runs on the installed packages, on tiny-random for speed
    where = _run([sys.executable, "-c", "import agents.data_sources as d; print(d.__file__)"], clone)
    assert Path(where.stdout.strip()).is_relative_to(clone), where  # the copy's code, not the checkout's
    demo = _run([sys.executable, *shlex.split(command)[1:], "--model", "tiny-random", "--threads", "2"], clone)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "test: the GSM8K sample bundled with selfimprove" in demo.stderr
    assert "train: the GSM8K sample bundled with selfimprove" in demo.stderr
    for stage in ("before  the frozen model: ", "loop    2 learning episodes", "after   rules and experts: "):
        assert stage in demo.stdout, demo.stdout
    assert (clone / "runs" / "demo" / "report.json").is_file()
    inspect = next(line for line in demo.stdout.splitlines() if line.startswith("inspect its rules: "))
    rules = shlex.split(inspect.removeprefix("inspect its rules: "))
    assert rules[:2] == ["python", "run_loop.py"]
    listed = _run([sys.executable, "-c", IMPORT_PROBE, *rules[2:]], clone)
    assert listed.returncode == 0, listed.stderr
    assert "rules in runs/demo/arms/full" in listed.stdout
    assert "heavy imports: []" in listed.stderr  # inspecting rules loads no model library


def test_help_imports_no_model_library(clone):
    result = _run([sys.executable, "-c", IMPORT_PROBE, "--help"], clone)
    assert "Usage" in result.stdout and "heavy imports: []" in result.stderr, result.stderr


def test_the_readme_engine_example_runs_as_written_on_the_tiny_model(tmp_path, monkeypatch):
    """The README's "The engine in Python" block, on the tiny test model instead of Qwen."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The engine in Python"):]
    start = section.index("```python\n") + len("```python\n")
    block = section[start:section.index("\n```", start)]
    assert 'load_model("qwen2.5-coder-0.5b")' in block and "runs/x/" in block  # what is replaced below is there
    block = block.replace('load_model("qwen2.5-coder-0.5b")', 'load_model("tiny-random")')
    monkeypatch.chdir(tmp_path)  # its files go under runs/x/ here
    setup = ("prompt, completion = 'What is 2 + 3?', 'The answer is 5.'\n"
             "inputs = None\n")
    namespace: dict = {}
    exec(setup, namespace)  # the names the example leaves to its reader
    source = block.replace("out = loaded.model.generate(**inputs)",
                           "inputs = loaded.tokenizer(prompt, return_tensors='pt')\n"
                           "    out = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)")
    exec(compile(source, "README.md (The engine in Python)", "exec"), namespace)
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert namespace["result"].steps and (tmp_path / "runs/x/bank/current/manifest.json").is_file()
    assert (tmp_path / "runs/x/peft-expert3/adapter_model.safetensors").is_file()
