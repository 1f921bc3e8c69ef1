"""What the commit node writes to the memory: the episode, its rules with their true status, the canary's edges.

A rule is recorded as trained into its expert only if that update survived every rollback
(the stress controller's mirror rollback, the canary gate, the episode's rollback); a
refuted rule is stored as refuted, never placed in a prompt. A rerun of the commit after a
kill writes the same records and counts each outcome once.
"""

from __future__ import annotations

from graph.context import RunContext
from graph.state import LoopState, ProblemData
from memory_store.records import Episode


def update_id(state: LoopState, cycle: int) -> str:
    return f"{state['run_id']}-ep{state['episode']:05d}-c{cycle}"


def update_survived(state: LoopState, update: dict) -> bool:
    """Whether an update's change is still in the bank: not undone by stress, the canary or the episode."""
    undone_by_canary = any(c.get("update_id") == update["update_id"] and c["canary_rolled_back"]
                           for c in state.get("canary_checks") or [])
    return not update.get("stress_rolled_back") and not undone_by_canary and state.get("episode_rolled_back_to") is None


def _written_by_this_commit(stored, rule: dict, episode_id: str) -> bool:
    return stored.episode_id == episode_id and stored.text == rule["text"].strip() and stored.cycle == rule["cycle"]


def remember(ctx: RunContext, state: LoopState, problem: ProblemData, outcome: str, updates: list[dict]) -> None:
    memory = ctx.memory
    final_update = updates[-1]["update_id"] if updates and outcome == "fixed" else None
    episode = Episode(
        problem_id=problem["id"],
        problem_text=problem["question"],
        split=problem.get("split") or "stream",
        cycle=len(updates),
        verdict_before=bool(state["first_try"]["correct"]),
        verdict_after=bool(state["verdict"]["correct"]) if updates and outcome != "unfixed" else (False if updates else None),
        expert_weights=[max(0.0, w) for w in state.get("weights", [])],
        rule_ids=[],
        update_id=final_update,
    )
    rule_ids = []
    chosen_id = None  # the last rule an update trained from: its outcome is the episode's
    by_cycle = {u["cycle"]: u for u in updates}
    for rule in state.get("rules") or []:
        validated = rule["status"] == "validated"
        trained = by_cycle.get(rule["cycle"]) if rule.get("chosen") else None
        rule_id, merged = memory.add_rule(
            rule["text"], problem_id=problem["id"], expert=trained["expert"] if trained else None,
            cycle=rule["cycle"], episode_id=episode.episode_id,
        )
        if merged and _written_by_this_commit(memory.get_rule(rule_id), rule, episode.episode_id):
            merged = False  # a rerun of this commit after a kill found its own rule, not a duplicate
        if not merged or validated:  # a refuted duplicate never demotes the rule it merged into
            memory.record_validation(rule_id, validated=validated, share_with=rule["share_with"],
                                     share_without=rule["share_without"])
        if trained:
            if update_survived(state, trained):
                memory.record_training(rule_id, expert=trained["expert"], update_id=trained["update_id"],
                                       prompts=[t["prompt"] for t in trained.get("texts") or []])
            elif not merged:  # a duplicate never demotes a rule another, surviving update trained
                memory.set_status(rule_id, "rolled_back")
        if validated:
            rule_ids.append(rule_id)
        if rule.get("chosen"):
            chosen_id = rule_id
    # Counted once per episode whatever reruns: a kill between these writes and the episode's
    # own resumes to the same counters. The mark names the run and the episode (memory shared
    # through --memory-url holds other runs' episodes of the same problem).
    if chosen_id is not None:
        memory.record_outcome(chosen_id, helped=outcome == "fixed", episode_id=update_id(state, 0))
    if state.get("memory_rule_ids"):
        memory.record_retrieved(state["memory_rule_ids"], episode_id=update_id(state, 0))
    memory.add_episode(episode.model_copy(update={"rule_ids": list(dict.fromkeys(rule_ids))}))
    # The run's canary set, and under the round gate the round's own problems that joined it.
    canary = [*(state.get("carry") or {}).get("canary", []), *(state.get("gate") or {}).get("canary", [])]
    questions = {c["id"]: c["question"] for c in canary}
    for check_result in state.get("canary_checks") or []:
        for broke_id in check_result["broke"] if check_result.get("update_id") else []:
            # A canary episode gives the graph its 'broke' edge from the rolled-back update.
            memory.add_episode(Episode(
                problem_id=broke_id, problem_text=questions.get(broke_id, broke_id), split="canary",
                verdict_before=True, verdict_after=False, update_id=check_result["update_id"],
            ))
    memory.flush()
