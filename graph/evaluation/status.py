"""Where an evaluation stands: its finished arms compared so far, and how far the others got.

An evaluation of the reported size runs for many hours and is resumed across sessions; its
report is written only when every arm is done. This reads what the running or stopped
evaluation has kept (eval.json, each finished arm's result.json, the scoring calls of
scored.jsonl, a learning arm's events.jsonl and, read-only, its checkpoints) and loads no
model, so it is safe while the evaluation runs.
"""

from __future__ import annotations

from pathlib import Path

from graph.evaluation.config import EVAL_FILE, EvalConfig, LEGACY_CONFIG, LOOP_ARMS
from graph.evaluation.results import SCORED_FILE, ArmResult, ScoredCalls, compare_arms, finished_arm, keep_failed
from graph.evaluation.learning import episode_timing, learning_summary, timed_episodes
from graph.episodes import committed_states, read_events
from graph.run_dir import RunDirError
from graph.saved_settings import from_dict, read_saved


def evaluation_status(run_dir: str | Path) -> dict:
    """The finished arms' summaries, each compared with frozen and with vote where those are
    finished (on the problems both scored), and each unfinished arm's progress.

    Under the recovery protocol the scored problems are those the frozen model failed, known
    once frozen is finished (as the harness's report counts them); before that, the whole pool.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a folder")
    saved = read_saved(run_dir / EVAL_FILE)
    if saved is None:
        raise RunDirError(f"{run_dir} holds no evaluation ({EVAL_FILE} is missing)")
    try:
        config = from_dict(EvalConfig, {**LEGACY_CONFIG, **saved.get("config", {})})
    except (TypeError, ValueError, AttributeError) as err:
        raise RunDirError(f"{run_dir / EVAL_FILE}: the saved settings are not valid ({err})") from None
    finished: dict[str, ArmResult] = {}
    for arm in config.arms:
        done = finished_arm(run_dir, arm)
        if done is not None:
            finished[arm] = done[0]
    extra: dict = {}
    n_scored = len(saved.get("scored_ids") or [])
    if config.protocol == "recovery" and "frozen" in finished:
        extra["recovery_pool"] = keep_failed(finished["frozen"])
        n_scored = finished["frozen"].n
    vs_frozen, vs_vote = compare_arms(finished)
    arms = {}
    for name, result in finished.items():
        arms[name] = result.summary()
        if result.learning and "episodes" in result.learning:
            arms[name]["learning"] = result.learning
        if name in vs_frozen:
            arms[name]["vs_frozen"] = vs_frozen[name].to_dict()
        if name in vs_vote:
            arms[name]["vs_vote"] = vs_vote[name]
    n_learn = len(saved.get("learn_ids") or [])
    pending = {arm: _progress(run_dir, arm, config.protocol, n_learn) for arm in config.arms if arm not in finished}
    # Finished learning arms' episodes timed from their event logs, as a resumed arm's span every process
    timed = [timed_episodes(read_events(run_dir / "arms" / arm)[0], finished[arm].learning["episodes"])
             for arm in finished if arm in LOOP_ARMS and finished[arm].learning.get("episodes")]
    timed = [(sum(seconds), len(seconds)) for seconds in timed]
    timed += [(p["learn_seconds"], p["episodes_timed"]) for p in pending.values() if p.get("episodes_timed")]
    left = _seconds_left(pending, finished, timed, n_scored, config.protocol)
    for arm, seconds in left.items():
        pending[arm]["seconds_left_estimate"] = seconds
    return {
        "run_dir": str(run_dir), "protocol": config.protocol, "model": config.model, "n_scored": n_scored,
        "n_learn": n_learn, "precision": saved.get("precision"), "code_versions": saved.get("code_versions") or [],
        "machines": saved.get("machines") or [], **extra, "arms": arms, "pending": pending,
        "seconds_left_estimate": None if None in left.values() else sum(left.values()),
    }


def _seconds_left(pending: dict[str, dict], finished: dict[str, ArmResult], timed: list[tuple[float, int]],
                  n_scored: int, protocol: str) -> dict:
    """Each unfinished arm's remaining seconds at the rates this evaluation has run so far, or None
    where no rate is known yet: learning at the mean seconds of the episodes committed (the arm's
    own, else every learning arm's), scoring at the seconds per problem of the arm's own kept calls,
    else of a finished learning arm (for a learning arm) or greedy arm (vote samples several answers
    a problem: only its own calls count).
    Wall times vary from run to run and with what else shares the cores: a guide, not a promise.
    """
    def rate(seconds: float, count: int) -> float | None:
        return seconds / count if count else None

    any_episode = rate(sum(s for s, _ in timed), sum(n for _, n in timed))  # (seconds, episodes) of every learning arm
    def score_rate(names) -> float | None:  # seconds per problem of the first such finished arm
        return next((rate(f.seconds.get("score", 0.0), f.n) for name, f in finished.items()
                     if name in names and f.seconds.get("score")), None)

    greedy = score_rate(("frozen", *LOOP_ARMS))
    with_bank = score_rate(LOOP_ARMS) or greedy  # a learning arm scores through its bank, which costs more
    left = {}
    for arm, p in pending.items():
        parts = []
        if "episodes" in p:
            episodes_left = p["episodes"] - p["episodes_committed"]
            per_episode = rate(p["learn_seconds"], p["episodes_timed"]) or any_episode
            parts.append(0.0 if episodes_left <= 0 else None if per_episode is None else episodes_left * per_episode)
        if protocol != "stream" or arm not in LOOP_ARMS:
            scored = p["problems_scored"]
            own = rate(p.get("score_seconds", 0.0), scored or 0)
            per_problem = (own if own is not None else None if arm == "vote"
                           else with_bank if arm in LOOP_ARMS else greedy)
            parts.append(None if scored is None or per_problem is None else (n_scored - scored) * per_problem)
        left[arm] = None if None in parts else sum(parts)
    return left


def _progress(run_dir: Path, arm: str, protocol: str, n_learn: int) -> dict:
    """How far an unfinished arm got: learning episodes committed (learning arms), with what their
    learning did so far as the report counts it, and problems scored; None where the arm keeps no
    progress on disk (single-lora scores in one pass)."""
    arm_dir = run_dir / "arms" / arm
    progress: dict = {}
    if arm in LOOP_ARMS:
        events, damaged = read_events(arm_dir)
        progress.update(episodes_committed=sum(e.get("node") == "commit" for e in events), episodes=n_learn)
        if damaged:
            progress["damaged_event_lines"] = damaged  # cut short by a kill; the run itself ignores them
        states = committed_states(arm_dir)
        if states:  # the checkpoints, over the event log's lines
            progress["episodes_committed"] = len(states)
        seconds = timed_episodes(events, progress["episodes_committed"])
        if states:  # what the report will count, over the episodes finished so far
            progress["learning"] = {**learning_summary(states), **episode_timing(seconds)}
        progress.update(learn_seconds=sum(seconds), episodes_timed=len(seconds))
    if arm == "single-lora":
        progress["problems_scored"] = None
    elif protocol == "stream" and arm in LOOP_ARMS:
        progress["problems_scored"] = progress["episodes_committed"]  # its score is each episode's first try
    else:
        try:
            calls = ScoredCalls(run_dir, arm).calls  # the harness's own reading: one call per index
        except (KeyError, TypeError, AttributeError) as err:
            raise RunDirError(f"{arm_dir / SCORED_FILE}: a line is not a scoring call ({err!r})") from None
        progress["problems_scored"] = sum(len(call.get("ids") or []) for call in calls.values())
        progress["score_seconds"] = sum(float(call.get("seconds") or 0.0) for call in calls.values())
    return progress

