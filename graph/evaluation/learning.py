"""What the learning arms did, read from their finished episode states: counts, a curve, a leak check."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from adapters.trainer import TrainingExample
from agents.gsm8k import Problem, normalise_question
from agents.solver import Attempt
from agents.trajectories import SOURCES
from agents.verifier import check
from graph.episodes import episode_seconds
from graph.remember import update_survived


def learning_summary(states: list[dict]) -> dict:
    """What one arm's learning did, counted over its episodes."""
    outcomes = [s["outcome"] for s in states]
    # Each update once: a pooled one (graph/nodes.update) is also recorded by every episode whose
    # texts it trained, with those texts; it is counted where it trained.
    records = [(s, u) for s in states for u in s.get("updates") or []]
    updates = [u for _, u in records if not u.get("pooled_into")]
    checks = [c for s in states for c in s.get("canary_checks") or []]
    candidates = [c for s in states for c in s.get("candidates") or []]
    trained = [t for _, u in records for t in u.get("texts") or [] if t.get("source") != "replay"]
    kept = sum(update_survived(s, u) for s, u in records if not u.get("pooled_into"))
    return {
        "episodes": len(states),
        "right_first_try": sum(bool(s["first_try"]["correct"]) for s in states),
        **{k: outcomes.count(k) for k in ("correct", "fixed", "unfixed", "failed", "not_learned", "skipped")},
        "learned_from": sum(bool(s.get("updates")) for s in states),  # problems whose texts reached an update
        "rules": sum(len(s.get("rules") or []) for s in states),
        "rules_proposed": len(candidates),
        "rules_refused": sum(c["status"] == "refused" for c in candidates),
        "rules_validated": sum(c["status"] == "validated" for c in candidates),
        "rules_refuted": sum(c["status"] == "refuted" for c in candidates),
        "updates": len(updates),
        "updates_kept": kept,
        "updates_rolled_back": len(updates) - kept,
        "updates_pooled": sum(bool(u.get("pooled_texts")) for u in updates),  # trained on other episodes' texts too
        "mirror_rollbacks": sum(bool(u.get("stress_rolled_back")) for u in updates),
        # once per update undone: a pooled update's episodes each record the round's verdict
        "canary_rollbacks": len({c.get("update_id") for c in checks if c.get("canary_rolled_back")}),
        "episode_rollbacks": sum(s.get("episode_rolled_back_to") is not None for s in states),
        "texts": len(trained),
        "texts_by_source": {source: sum(t.get("source") == source for t in trained) for source in SOURCES},
        "texts_replayed": sum(t.get("source") == "replay" for u in updates for t in u.get("texts") or []),
        # right answers whose worked steps did not hold (agents/worked_steps.py), never trained
        "unsound_by_source": {source: sum(u.get("source") == source for s in states for u in s.get("unsound") or [])
                              for source in SOURCES},
    }


# The learning table's columns, as the report and eval-status both show them (``learning_cells``).
LEARNING_COLUMNS = (
    "episodes", "right first try", "fixed", "unfixed", "nothing verified", "learned from",
    "rules proposed / validated / refuted / refused", "updates kept / rolled back",
    "texts: own / rule-conditioned / variant / rationalization (replayed)", "episode s median / p90",
    "right at first try, again after learning / frozen",
)


def learning_cells(learning: dict) -> list[str]:
    """One arm's row of the learning table (``LEARNING_COLUMNS``), from its ``learning_summary``
    with timing and forgetting; a count an older arm lacks shows as a dash."""
    get = lambda key: str(learning.get(key, "—"))  # noqa: E731
    by = learning.get("texts_by_source") or {}
    timing = ("—" if not learning.get("episodes_timed") else
              f"{learning['episode_seconds_median']:.0f} / {learning['episode_seconds_p90']:.0f} "
              f"({learning['episodes_timed']} timed)")
    forgetting = learning.get("forgetting")  # absent: stream arms, unlabelled problems, arms not yet scored
    return [
        get("episodes"), get("right_first_try"), get("fixed"), get("unfixed"), get("failed"), get("learned_from"),
        " / ".join(get(k) for k in ("rules_proposed", "rules_validated", "rules_refuted", "rules_refused")),
        f"{get('updates_kept')} / {get('updates_rolled_back')}",
        " / ".join(str(by.get(k, 0)) for k in SOURCES) + f" ({learning.get('texts_replayed', 0)})",
        timing,
        "—" if not forgetting else
        f"{forgetting['right_after']} / {forgetting['right_frozen']} of {forgetting['checked']}",
    ]


def learning_curve(states: list[dict], learn: Sequence[Problem]) -> list[dict]:
    """Per learning episode: right at the first try (against the label), outcome, and the stress phi(t)."""
    labels = {p.id: p.label for p in learn}
    curve, phi = [], None
    for index, state in enumerate(states):
        updates = state.get("updates") or []
        if updates:
            phi = updates[-1]["phi"]  # the controller's reading at the episode's last update
        label = labels.get(state["problem"]["id"])
        first = Attempt(**state["first_try"]["attempt"])
        curve.append({
            "episode": index, "id": state["problem"]["id"],
            "first_correct": bool(check(first, label).correct) if label is not None else bool(state["first_try"]["correct"]),
            "outcome": state["outcome"], "updates": sum(not u.get("pooled_into") for u in updates), "phi": phi,
            "experts": [u["expert"] for u in updates],
        })
    return curve


def leak_check(scored: Sequence[Problem], states_by_arm: dict[str, list[dict]]) -> dict:
    """Rules and training texts (every loop arm) that contain an evaluation question, up to spacing and case."""
    questions = [normalise_question(p.question) for p in scored]
    states = [s for arm_states in states_by_arm.values() for s in arm_states]
    rules = [normalise_question(r["text"]) for s in states for r in s.get("rules") or []]
    texts = [normalise_question(t["prompt"] + "\n" + t["completion"])
             for s in states for u in s.get("updates") or [] for t in u.get("texts") or []]
    hits = sum(any(q in t for q in questions) for t in rules + texts)
    return {"rules": len(rules), "training_texts": len(texts), "containing_an_evaluation_question": hits}


def timed_episodes(events: list[dict], episodes: int) -> list[float]:
    """The seconds of an arm's first ``episodes`` episodes that its event log timed, each the sum
    of its nodes' seconds (graph.episodes.read_events: every process that ran it)."""
    seconds = episode_seconds(events)
    return [seconds[i] for i in range(episodes) if i in seconds]


def arm_episode_timing(events: list[dict], episodes: int) -> dict:
    """``episode_timing`` of an arm's first ``episodes`` episodes (``timed_episodes``)."""
    return episode_timing(timed_episodes(events, episodes))


def episode_timing(seconds: list[float]) -> dict:
    """Median and 90th percentile of episode wall times (nearest rank), over the episodes timed."""
    if not seconds:
        return {"episodes_timed": 0, "episode_seconds_median": None, "episode_seconds_p90": None}
    ordered = sorted(seconds)
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {"episodes_timed": len(ordered), "episode_seconds_median": statistics.median(ordered),
            "episode_seconds_p90": rank(0.9)}


def update_bursts(states: list[dict]) -> list[list[list[TrainingExample]]]:
    """A learning arm's own texts, per episode and update, as its updates trained them.

    A pooled update's burst gathers the texts every episode recorded for it (graph/nodes.update)
    and belongs to the last of them, so that a stream run, which scores each problem before
    training its episode's bursts, scores them all before training on any. Replayed texts are
    not trained twice.
    """
    texts_of: dict[str, list[TrainingExample]] = {}
    place: dict[str, tuple[int, int]] = {}  # update -> (episode, position) of its last record
    for index, state in enumerate(states):
        for position, u in enumerate(state.get("updates") or []):
            key = u.get("pooled_into") or u["update_id"]
            texts_of.setdefault(key, []).extend(
                TrainingExample(t["prompt"], t["completion"]) for t in u["texts"] if t.get("source") != "replay")
            place[key] = (index, position)
    bursts: list[list[list[TrainingExample]]] = [[] for _ in states]
    for key, (index, _) in sorted(place.items(), key=lambda kv: kv[1]):
        bursts[index].append(texts_of[key])
    return bursts
