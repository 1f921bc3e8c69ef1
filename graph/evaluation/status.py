"""Where an evaluation stands: its finished arms compared so far, and how far the others got.

An evaluation of the reported size runs for many hours and is resumed across sessions; its
report is written only when every arm is done. This reads what the running or stopped
evaluation has kept (eval.json, each finished arm's result.json, the scoring calls of
scored.jsonl, a learning arm's events.jsonl) and loads no model, so it is safe while the
evaluation runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from graph.evaluation.config import EVAL_FILE, EvalConfig, LEGACY_CONFIG, LOOP_ARMS
from graph.evaluation.results import SCORED_FILE, ArmResult, finished_arm
from graph.evaluation.stats import compare
from graph.episodes import EVENTS
from graph.run_dir import RunDirError
from graph.saved_settings import from_dict, read_saved


def evaluation_status(run_dir: str | Path) -> dict:
    """The finished arms' summaries, each compared with frozen and with vote where those are
    finished (on the problems both scored), and each unfinished arm's progress."""
    run_dir = Path(run_dir)
    saved = read_saved(run_dir / EVAL_FILE)
    if saved is None:
        raise RunDirError(f"{run_dir} holds no evaluation ({EVAL_FILE} is missing)")
    try:
        config = from_dict(EvalConfig, {**LEGACY_CONFIG, **saved.get("config", {})})
    except (TypeError, ValueError) as err:
        raise RunDirError(f"{run_dir / EVAL_FILE}: the saved settings are not valid ({err})") from None
    finished: dict[str, ArmResult] = {}
    pending: dict[str, dict] = {}
    for arm in config.arms:
        done = finished_arm(run_dir, arm)
        if done is not None:
            finished[arm] = done[0]
        else:
            pending[arm] = _progress(run_dir, arm, config)
    arms = {}
    for name, result in finished.items():
        arms[name] = result.summary()
        for baseline, key in (("frozen", "vs_frozen"), ("vote", "vs_vote")):
            if baseline in finished and name != baseline and not (baseline == "vote" and name == "frozen"):
                arms[name][key] = _paired(finished[baseline], result)
    return {
        "run_dir": str(run_dir), "protocol": config.protocol, "model": config.model,
        "n_scored": len(saved.get("scored_ids") or []), "n_learn": len(saved.get("learn_ids") or []),
        "precision": saved.get("precision"), "code_versions": saved.get("code_versions") or [],
        "machines": saved.get("machines") or [], "arms": arms, "pending": pending,
    }


def _paired(baseline: ArmResult, arm: ArmResult) -> dict:
    """arm against baseline on the problems both scored, in the baseline's order."""
    theirs = {s.id: s.correct for s in arm.scores}
    shared = [s for s in baseline.scores if s.id in theirs]
    return compare([s.correct for s in shared], [theirs[s.id] for s in shared]).to_dict()


def _progress(run_dir: Path, arm: str, config: EvalConfig) -> dict:
    """How far an unfinished arm got: learning episodes committed (learning arms), problems scored."""
    arm_dir = run_dir / "arms" / arm
    progress: dict = {}
    if arm in LOOP_ARMS:
        progress["episodes_committed"] = _count_lines(arm_dir / EVENTS, lambda event: event.get("node") == "commit")
        progress["episodes"] = config.learn_problems
    progress["problems_scored"] = sum(len(call.get("scores") or []) for call in _json_lines(arm_dir / SCORED_FILE))
    return progress


def _count_lines(path: Path, keep) -> int:
    return sum(1 for line in _json_lines(path) if keep(line))


def _json_lines(path: Path) -> list[dict]:
    """The whole JSON lines of a file another process may be appending to (a partial last line is skipped)."""
    if not path.is_file():
        return []
    texts = path.read_text(encoding="utf-8").splitlines()
    lines = []
    for number, text in enumerate(texts, 1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            if number == len(texts):
                break  # being written
            raise RunDirError(f"{path}: line {number} is not JSON") from None
        if isinstance(line, dict):
            lines.append(line)
    return lines
