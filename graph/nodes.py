"""One function per node of the loop. Each reads the state, uses the run context, returns a partial state.

Nodes that change the bank save it before they return, and the update node snapshots it
first under a name fixed by (episode, cycle). A node killed half-way therefore reruns from
the same saved bank on resume and produces the same result.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from langgraph.runtime import Runtime

from adapters.trainer import TrainingExample
from agents.backend import Sampling
from agents.diversifier import DiversifyError
from agents.reflector import ReflectionError
from agents.solver import Attempt
from agents.verifier import check, vote
from graph.context import RunContext
from graph.state import LoopState, ProblemData
from memory_store.errors import UnknownIdError
from memory_store.records import Episode

log = logging.getLogger(__name__)


def _snapshot_name(episode: int, cycle: int) -> str:
    return f"ep{episode:05d}-c{cycle}"


def _update_id(state: LoopState, cycle: int) -> str:
    return f"{state['run_id']}-ep{state['episode']:05d}-c{cycle}"


def _seed(ctx: RunContext, state: LoopState, salt: int = 0) -> int:
    return ctx.config.seed + 1000 * state["episode"] + 10 * state.get("cycle", 0) + salt


def _route(ctx: RunContext, question: str):
    memory, prior, rules, rule_ids = ctx.memory_vectors([question])
    use = rules[0][: ctx.solver.config.max_rules] if ctx.config.rules_in_prompt else []
    used_ids = rule_ids[0][: len(use)]
    probs, weights = ctx.routing([ctx.solver.prompt(question, use)], memory, prior)
    return use, used_ids, probs[0], weights, memory


def solve(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    rules, rule_ids, _, weights, _ = _route(ctx, problem["question"])
    (attempt,) = ctx.solver.solve([problem["question"]], [rules], weights=weights)
    return {
        "attempt": asdict(attempt),
        "weights": [round(float(w), 6) for w in weights[0]],
        "memory_rule_ids": rule_ids,
        "cycle": state.get("cycle", 0),
    }


def verify(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    attempt = Attempt(**state["attempt"])
    verdict = _verdict(ctx, state, problem, attempt)
    update = {"verdict": verdict}
    if "first" not in state:
        update["first"] = verdict
    return update


def _verdict(ctx: RunContext, state: LoopState, problem: ProblemData, attempt: Attempt) -> dict:
    """The attempt checked against the label, or, label-free, a vote of sampled answers."""
    if ctx.config.label_free:
        (verdict,) = _judge_samples(ctx, state, problem, attempt)
        return verdict
    return {"attempt": asdict(attempt), **asdict(check(attempt, problem["label"]))}


def _judge_samples(ctx: RunContext, state: LoopState, problem: ProblemData, attempt: Attempt) -> list[dict]:
    rules, _, _, weights, _ = _route(ctx, problem["question"])
    sampling = Sampling(temperature=ctx.verifier.temperature, seed=_seed(ctx, state))
    samples = ctx.solver.solve([problem["question"]] * ctx.verifier.samples, [rules] * ctx.verifier.samples,
                               weights=weights, sampling=sampling)
    return [{"attempt": asdict(attempt), **asdict(vote(samples, ctx.verifier))}]


def reflect(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    label = None if ctx.config.label_free else problem.get("label")
    solution = problem.get("solution") if state["learning"] and not ctx.config.label_free else None
    previous = (state.get("rule") or {}).get("text")
    try:
        reflection = ctx.reflector.reflect(
            problem["question"], state["attempt"]["text"], label=label, reference_solution=solution,
            learning_split=state["learning"], previous_rule=previous, seed=_seed(ctx, state),
        )
    except ReflectionError as err:
        return {"rule": None, "error": str(err)}
    rule = {"text": reflection.rule, "attempts": reflection.attempts, "rejected": reflection.rejected,
            "cycle": state.get("cycle", 0)}
    return {"rule": rule, "rules": [rule], "error": None}


def diversify(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    label = None if ctx.config.label_free else problem.get("label")
    try:
        result = ctx.diversifier.diversify(state["rule"]["text"], label=label, seed=_seed(ctx, state))
    except DiversifyError as err:
        return {"texts": [], "error": str(err)}
    return {"texts": [asdict(t) for t in result.texts], "error": None}


def update(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    episode, cycle = state["episode"], state.get("cycle", 0)
    name = _snapshot_name(episode, cycle)
    store = ctx.bank_store
    if name in store.snapshots():
        # A rerun after a kill: start again from exactly the bank this update started from.
        store.rollback(name, ctx.bank, ctx.router, ctx.trainer.stress)
    else:
        store.snapshot(name, ctx.bank, ctx.router, ctx.trainer.stress)
    carry = dict(state.get("carry") or {})
    usage = list(carry.get("expert_updates") or [0] * ctx.bank.n_experts)
    _, _, probs, _, memory = _route(ctx, problem["question"])
    expert, reason = ctx.pick_expert(problem["id"], probs, usage)
    examples = [TrainingExample(t["prompt"], t["completion"]) for t in state["texts"]]
    result = ctx.trainer.update(examples, target_expert=expert, memory=None if memory is None else memory[0])
    store.save(ctx.bank, ctx.router, ctx.trainer.stress, extra={"update_id": _update_id(state, cycle)})
    usage[result.expert] += 1
    carry["expert_updates"] = usage
    info = {k: v for k, v in asdict(result).items() if k != "steps"}
    info.update(
        update_id=_update_id(state, cycle), snapshot=name, cycle=cycle, picked=expert, pick_reason=reason,
        step_losses=[s["loss_lm"] for s in result.steps],
        texts=state["texts"],  # every cycle's training texts, e.g. to train a comparison adapter on the same data
    )
    return {"updates": [info], "cycle": cycle + 1, "carry": carry}


def reevaluate(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    rules, _, _, weights, _ = _route(ctx, problem["question"])
    (attempt,) = ctx.solver.solve([problem["question"]], [rules], weights=weights)
    verdict = _verdict(ctx, state, problem, attempt)
    canary = [c for c in (state.get("carry") or {}).get("canary", []) if c["id"] != problem["id"]]
    result = {"checked": len(canary), "correct": len(canary), "broke": [], "rolled_back": False}
    if canary:
        routed = [_route(ctx, c["question"]) for c in canary]
        weights_batch = torch.cat([r[3] for r in routed])  # (n_canary, n_experts)
        attempts = ctx.solver.solve([c["question"] for c in canary], [r[0] for r in routed], weights=weights_batch)
        broke = [c["id"] for c, a in zip(canary, attempts) if not check(a, c["label"]).correct]
        accuracy = 1 - len(broke) / len(canary)
        result.update(correct=len(canary) - len(broke), broke=broke, accuracy=accuracy)
        if 1.0 - accuracy > ctx.config.canary_margin:
            last = state["updates"][-1]
            ctx.bank_store.rollback(last["snapshot"], ctx.bank, ctx.router, ctx.trainer.stress)
            result["rolled_back"] = True
            result["update_id"] = last["update_id"]
            log.info("canary check failed (%d of %d broke): update %s rolled back", len(broke), len(canary), last["update_id"])
    return {"attempt": asdict(attempt), "verdict": verdict, "canary_checks": [result]}


def rollback(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """Out of cycles (or a failed reflection): undo every update of this episode."""
    ctx = runtime.context
    start = _snapshot_name(state["episode"], 0)
    restored = None
    if start in ctx.bank_store.snapshots():
        ctx.bank_store.rollback(start, ctx.bank, ctx.router, ctx.trainer.stress)
        restored = start
    return {"outcome": "unfixed", "rolled_back_to": restored}


def outcome_of(state: LoopState) -> str:
    if state["first"]["correct"]:
        return "correct"
    if not state["learning"]:
        return "not_learned"
    if state.get("outcome") == "unfixed" or not state["verdict"]["correct"]:
        return "unfixed" if state.get("rules") else "failed"
    return "fixed"


def commit(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """Store the episode and its rules in memory and the graph; hand the carry to the next episode."""
    ctx, problem = runtime.context, state["problem"]
    outcome = outcome_of(state)
    updates = state.get("updates") or []
    if ctx.memory is not None:
        _remember(ctx, state, problem, outcome, updates)
    carry = dict(state.get("carry") or {})
    carry["episodes"] = carry.get("episodes", 0) + 1
    carry["solved_first"] = carry.get("solved_first", 0) + int(state["first"]["correct"])
    carry["solved_final"] = carry.get("solved_final", 0) + int(outcome in ("correct", "fixed"))
    canary = list(carry.get("canary") or [])
    if state["first"]["correct"] and ctx.config.canary_size > 0:
        # Label-free runs guard with the confident majority answer as the canary's label.
        label = state["first"]["answer"] if ctx.config.label_free else problem["label"]
        canary = (canary + [{"id": problem["id"], "question": problem["question"], "label": label}])[-ctx.config.canary_size :]
    carry["canary"] = canary
    return {"outcome": outcome, "carry": carry}


def _remember(ctx: RunContext, state: LoopState, problem: ProblemData, outcome: str, updates: list[dict]) -> None:
    memory = ctx.memory
    final_update = updates[-1]["update_id"] if updates and outcome == "fixed" else None
    episode = Episode(
        problem_id=problem["id"],
        problem_text=problem["question"],
        split=problem.get("split") or "stream",
        cycle=len(updates),
        verdict_before=bool(state["first"]["correct"]),
        verdict_after=bool(state["verdict"]["correct"]) if updates and outcome != "unfixed" else (False if updates else None),
        expert_weights=[max(0.0, w) for w in state.get("weights", [])],
        rule_ids=[],
        update_id=final_update,
    )
    try:
        memory.get_episode(episode.episode_id)
        already = True  # a rerun of this commit after a kill: counters were counted
    except UnknownIdError:
        already = False
    rule_ids = []
    by_cycle = {u["cycle"]: u for u in updates}
    for rule in state.get("rules") or []:
        trained = by_cycle.get(rule["cycle"])
        rule_id, _ = memory.add_rule(
            rule["text"], problem_id=problem["id"], expert=trained["expert"] if trained else None,
            cycle=rule["cycle"], episode_id=episode.episode_id,
        )
        if trained and not trained.get("rolled_back"):
            memory.record_training(rule_id, expert=trained["expert"], update_id=trained["update_id"])
        rule_ids.append(rule_id)
    if not already:
        if rule_ids:
            memory.record_outcome(rule_ids[-1], helped=outcome == "fixed")
        if state.get("memory_rule_ids"):
            memory.record_retrieved(state["memory_rule_ids"])
    memory.add_episode(episode.model_copy(update={"rule_ids": list(dict.fromkeys(rule_ids))}))
    questions = {c["id"]: c["question"] for c in (state.get("carry") or {}).get("canary", [])}
    for check_result in state.get("canary_checks") or []:
        for broke_id in check_result["broke"] if check_result.get("update_id") else []:
            # A canary episode gives the graph its 'broke' edge from the rolled-back update.
            memory.add_episode(Episode(
                problem_id=broke_id, problem_text=questions.get(broke_id, broke_id), split="canary",
                verdict_before=True, verdict_after=False, update_id=check_result["update_id"],
            ))
    memory.flush()
