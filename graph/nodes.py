"""One function per node of the loop. Each reads the state, uses the run context, returns a partial state.

What the nodes do follows the published results for small models: learn only from
trajectories a verifier accepted (the model's own samples, rule-conditioned samples,
variants, rationalizations), and keep a rule only when it helps in context.

  solve       the greedy answer (what is scored) and k sampled answers (one batched call)
  verify      every answer against the target: the label, or label-free the majority answer
              when enough samples agree (TTRL, Zuo et al. 2025, arXiv 2504.16084); the distinct
              verified solutions of a problem solved wrongly or rarely become training texts (RFT)
  reflect     a failure: the model compares its wrong attempt with a verified solution and writes
              a rule; each rule is validated by its effect (k samples with the rule in the prompt
              must verify more often than without); if none validates, STaR's rationalization;
              variants of the problem with the same quantities are drafted in the same call
  diversify   the drafted variants, solved with the validated rule in the prompt; verified
              solutions train with rule-free prompts (context distillation, Snell et al. 2022,
              arXiv 2209.15189)
  update      the routed expert trains on the verified texts plus a replay of its earlier ones
              (with pooled updates, once per round on the texts of all its learning episodes)
  reevaluate  the problem again, and the canary set; a regression rolls the update back

Requests that do not wait on each other go to the backend together (``ask_together``), so
that decoding runs many rows at once: an episode that fails and learns makes five calls.

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
from agents.lm.backend import ask_together
from agents.lm.generation import Ask, Sampling
from agents.rationalizer import ask_rationalizations
from agents.solver import Attempt
from agents.trajectories import Text, as_completion, distinct, matches, verified_share, verified_texts
from agents.verifier import check, vote
from graph.canary import CanaryVerdict, canary_entry, canary_regressed, trained_break_undoes
from graph.context import RunContext
from graph.remember import remember, update_id, update_survived
from graph.routing import Route, route
from graph.snapshots import done_name, snapshot_name
from graph.state import LoopState

log = logging.getLogger(__name__)


def _seed(ctx: RunContext, state: LoopState, salt: int = 0) -> int:
    return ctx.config.seed + 1000 * state["episode"] + 10 * state.get("cycle", 0) + salt


def _route(ctx: RunContext, question: str, state: LoopState) -> Route:
    """The question routed on its own, blind to the episode's own problem in memory."""
    (routed,) = route(ctx, [question], exclude=[state["problem"]["id"]], with_rules=ctx.config.rules_in_prompt)
    return routed


def _sampling(ctx: RunContext, state: LoopState) -> Sampling:
    """The sampling of the first solve's k answers; validation reuses it, so shares are paired."""
    return Sampling(temperature=ctx.verifier.temperature, seed=ctx.config.seed + 1000 * state["episode"])


def _ask_samples(ctx: RunContext, questions: list[str], rules: list[str], weights, sampling: Sampling) -> Ask[list[Attempt]]:
    """k sampled answers to each question, ``rules`` in every prompt; flat, question-major."""
    k = ctx.verifier.samples
    flat = [q for q in questions for _ in range(k)]
    return ctx.solver.ask(flat, [rules] * len(flat), weights=weights, sampling=sampling)


def _cap(ctx: RunContext) -> int:
    return ctx.solver.config.max_new_tokens


def _with_rule(ctx: RunContext, state: LoopState, rule: str) -> list[str]:
    """The first solve's remembered rules with ``rule`` added, within the prompt's rule budget."""
    return ctx.solver.with_rule(state.get("memory_rules") or [], rule)


def _mixture(state: LoopState) -> torch.Tensor:
    return torch.tensor([state["weights"]])  # (1, n_experts): the mixture the first solve's samples used


def solve(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    routed = _route(ctx, problem["question"], state)
    rules, rule_ids, weights = routed.rules, routed.rule_ids, routed.weights
    asks = [ctx.solver.ask([problem["question"]], [rules], weights=weights)]
    if state["learning"] or ctx.config.label_free:
        asks.append(_ask_samples(ctx, [problem["question"]], rules, weights, _sampling(ctx, state)))
    (attempt,), *sampled = ask_together(ctx.backend, asks)  # the greedy answer and the samples, in one call
    out = {
        "attempt": asdict(attempt),
        "weights": [round(float(w), 6) for w in weights[0]],
        "memory_rule_ids": rule_ids,
        "memory_rules": rules,
        "cycle": state.get("cycle", 0),
    }
    if sampled:
        out["samples"] = [asdict(a) for a in sampled[0]]
    return out


def verify(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    ctx, problem = runtime.context, state["problem"]
    attempt = Attempt(**state["attempt"])
    samples = [Attempt(**s) for s in state.get("samples") or []]
    if ctx.config.label_free:
        majority = vote(samples, ctx.verifier) if samples else None
        target = majority.answer if majority is not None and majority.correct else None
        agreement = majority.confidence if majority is not None else 0.0
    else:
        target, agreement = problem["label"], 1.0
    verdict = {"attempt": asdict(attempt), **asdict(check(attempt, target)), "confidence": agreement,
               "label_free": ctx.config.label_free} if target is not None else \
        {"attempt": asdict(attempt), "correct": False, "answer": attempt.answer, "strategy": attempt.strategy,
         "confidence": agreement, "label_free": True, "votes": {}}
    share = verified_share(samples, target)
    update = {"verdict": verdict, "target": target, "verified_share": share, "unverifiable": target is None,
              "texts": []}
    if state["learning"] and target is not None and (not verdict["correct"] or share < ctx.config.low_share):
        # RFT: the distinct verified solutions, greedy included, in the solver's answer format.
        own = verified_texts(problem["question"], [attempt, *samples], target, _cap(ctx), "own_sample")
        update["texts"] = [t.to_dict() for t in own.texts] if _trains(ctx, "own_sample") else []
        update["own_verified"] = [t.completion for t in own.texts]  # what reflect compares with, trained or not
        update["unsound"] = own.unsound
    if "first_try" not in state:
        update["first_try"] = verdict
    return update


def _verified_solution(ctx: RunContext, state: LoopState) -> str | None:
    """What the reflector compares the wrong attempt with: an own verified sample, else the reference solution."""
    own = state.get("own_verified") or []
    if own:
        return own[0]
    problem = state["problem"]
    if state["learning"] and not ctx.config.label_free and problem.get("solution") and problem.get("label"):
        return as_completion(problem["solution"], problem["label"])
    return None


def reflect(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """Rules proposed (with the problem's variants drafted alongside), then validated, all in two calls."""
    ctx, problem = runtime.context, state["problem"]
    question, target, cycle = problem["question"], state["target"], state.get("cycle", 0)
    label = None if ctx.config.label_free else problem.get("label")
    weights = _mixture(state)
    texts = [Text(**t) for t in (state.get("texts") or [])] if cycle == 0 else []
    verified = _verified_solution(ctx, state)
    candidates: list[dict] = []
    tested: list[dict] = []
    rule = None
    variants: list[dict] = []
    proposed = []
    # First call: rule candidates, and the variants diversify will solve if a rule validates
    # (drafting them needs only the question, so they need not wait for a call of their own).
    first: list[Ask] = []
    if verified is not None:
        tried = [c["text"] for c in state.get("candidates") or [] if c["text"]]
        first.append(ctx.reflector.ask(question, state["first_try"]["attempt"]["text"], verified, label=label, tried=tried,
                                       seed=_seed(ctx, state, 1)))
    if verified is not None and ctx.config.adapters and _trains(ctx, "variant"):
        first.append(ctx.diversifier.ask(question, seed=_seed(ctx, state, 3)))
    if first:
        drafted = ask_together(ctx.backend, first)
        proposed = drafted[0]
        if len(drafted) > 1:
            made = drafted[1]
            variants = [{"text": v, "status": "kept"} for v in made.kept] + [{**r, "status": "refused"} for r in made.refused]
    for cand in proposed:
        if cand.refused:
            candidates.append({"text": cand.text, "cycle": cycle, "status": "refused", "reason": cand.refused})
    accepted = [c.text for c in proposed if not c.refused]
    # Second call: k samples per accepted candidate with the rule in the prompt (the first
    # solve's mixture and sampling, so shares are paired); after an update, k rule-free samples
    # again for the share without; and STaR's rationalizations, used only if no rule validates.
    second: list[Ask] = [_ask_samples(ctx, [question], _with_rule(ctx, state, text), weights, _sampling(ctx, state))
                         for text in accepted]
    if accepted and cycle > 0:
        second.append(_ask_samples(ctx, [question], state.get("memory_rules") or [], weights, _sampling(ctx, state)))
    if _may_rationalize(ctx, state):
        second.append(ask_rationalizations(ctx.solver, question, problem["label"], ctx.verifier.samples,
                                           ctx.verifier.temperature, _seed(ctx, state, 7), weights=weights))
    answered = ask_together(ctx.backend, second) if second else []
    with_rules, rest = answered[:len(accepted)], answered[len(accepted):]
    share_without = state["verified_share"]
    if accepted and cycle > 0:
        share_without, rest = verified_share(rest[0], target), rest[1:]  # under the bank as it is now
    k = ctx.verifier.samples
    for text, with_rule in zip(accepted, with_rules):
        share_with = verified_share(with_rule, target)
        # counts of the k samples that verified, with and without the rule
        validated = round(share_with * k) >= round(share_without * k) + ctx.config.validate_min_gain
        result = {"text": text, "cycle": cycle, "status": "validated" if validated else "refuted",
                  "share_with": share_with, "share_without": share_without,
                  "reason": None if validated else f"verified share {share_with:.2f} with it, {share_without:.2f} without"}
        candidates.append(result)
        tested.append(result)
        if validated and (rule is None or share_with > rule["share_with"]):
            rule, best = result, with_rule
    unsound: list[dict] = []
    if rule is not None:
        rule["chosen"] = True  # the one the episode trains from; other validated rules stay in memory
        if _trains(ctx, "rule_conditioned"):
            found = verified_texts(question, best, target, _cap(ctx), "rule_conditioned")
            texts, unsound = texts + found.texts, found.unsound
    elif _may_rationalize(ctx, state):
        found = verified_texts(question, rest[0], problem["label"], _cap(ctx), "rationalization")
        # A solution that talks about its hint would teach the model to expect one.
        texts += [t for t in found.texts if "hint" not in t.completion.lower()]
        unsound = found.unsound
    error = None if rule is not None else (
        "no verified solution to compare with" if verified is None else "no rule helped in context")
    return {"rule": rule, "rules": tested, "candidates": candidates, "texts": [t.to_dict() for t in distinct(texts)],
            "variants": variants, "unsound": unsound, "error": error}


def _trains(ctx: RunContext, source: str) -> bool:
    """Whether texts of this source reach the gradient (LoopConfig.train_sources)."""
    return source in ctx.config.train_sources


def _may_rationalize(ctx: RunContext, state: LoopState) -> bool:
    """STaR's rationalization needs the label: learning-split problems only, never label-free."""
    problem = state["problem"]
    return (ctx.config.rationalize and _trains(ctx, "rationalization") and state["learning"]
            and not ctx.config.label_free and problem.get("label") is not None)


def diversify(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """The variants reflect drafted, solved with the validated rule in the prompt; verified solutions train rule-free."""
    ctx = runtime.context
    rule = state["rule"]["text"]
    kept = [v["text"] for v in state.get("variants") or [] if v["status"] == "kept"]
    texts = [Text(**t) for t in state.get("texts") or []]
    unsound: list[dict] = []
    if kept:
        (answers,) = ask_together(ctx.backend, [_ask_samples(ctx, kept, _with_rule(ctx, state, rule), _mixture(state),
                                                             _sampling(ctx, state))])
        k = ctx.verifier.samples
        for i, variant in enumerate(kept):
            # The label holds for the variant: it has exactly the original's numbers.
            found = verified_texts(variant, answers[i * k:(i + 1) * k], state["target"], _cap(ctx), "variant")
            texts += found.texts
            unsound += found.unsound
    return {"texts": [t.to_dict() for t in distinct(texts)], "unsound": unsound}


def _examples(ctx: RunContext, texts: list[dict]) -> list[TrainingExample]:
    """Training pairs: the solver's prompt with no rules and no hint, and the verified solution."""
    return [TrainingExample(ctx.solver.prompt(t["question"], []), t["completion"]) for t in texts]


def update(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """The routed expert trains on the verified texts plus a replay of its earlier ones.

    With pooled updates (LoopConfig.pool_updates) the round's first episode waiting to train also
    trains on the texts the driver hands it from the others (``gate["pool"]``); each of those then
    records that update as its own (``gate["pooled_into"]``) and trains nothing. Every episode's
    record lists only the texts it contributed, so each text is counted, replayed and remembered once.
    """
    ctx, problem = runtime.context, state["problem"]
    episode, cycle = state["episode"], state.get("cycle", 0)
    gate = state.get("gate") or {}
    if gate.get("pooled_into"):
        return _pooled_into(ctx, state, gate["pooled_into"])
    name = snapshot_name(episode, cycle)
    store = ctx.bank_store
    if name in store.snapshots():
        # A rerun after a kill: start again from exactly the bank this update started from.
        store.rollback(name)
    else:
        store.snapshot(name)
    carry = dict(state.get("carry") or {})
    usage = list(carry.get("expert_updates") or [0] * ctx.bank.n_experts)
    replay = carry.get("replay") or {}
    routed = _route(ctx, problem["question"], state)
    expert, reason = ctx.pick_expert(problem["id"], routed.probs, usage)
    texts, pooled = state["texts"], gate.get("pool") or []
    # The replay of whichever expert the stress controller trains: the picked one, or the shared one in Single mode.
    candidates = (expert, ctx.bank.config.shared_expert)
    replay_texts = {int(k): v[-ctx.config.replay:] for k, v in replay.items() if int(k) in candidates} if ctx.config.replay else {}
    result = ctx.trainer.update(_examples(ctx, texts + pooled), target_expert=expert,
                                memory=_memory_features(ctx, routed, len(texts), pooled),
                                replay={k: _examples(ctx, v) for k, v in replay_texts.items()},
                                replay_memory=_replay_memory(ctx, routed, replay_texts))
    replayed = replay_texts.get(result.expert, [])
    store.save(extra={"update_id": update_id(state, cycle)})
    store.snapshot(done_name(episode, cycle))  # for a resume after it
    usage[result.expert] += 1
    carry["expert_updates"] = usage
    info = {k: v for k, v in asdict(result).items() if k != "steps"}
    info.update(
        update_id=update_id(state, cycle), snapshot=name, cycle=cycle, picked=expert, pick_reason=reason,
        step_losses=[s["loss_lm"] for s in result.steps],
        # every cycle's training texts, as trained (prompt, completion, source), e.g. for a comparison adapter
        texts=_trained_texts(ctx, texts + [{**r, "source": "replay"} for r in replayed]),
        rule=(state.get("rule") or {}).get("text"),
    )
    if pooled:
        info["pooled_texts"] = len(pooled)  # the other episodes' texts, listed in their own records
    if state.get("gate") is not None:
        info["gate_rollback_to"] = state["gate"]["rollback_to"]  # what the round's canary undoes it to
    return {"updates": [info], "cycle": cycle + 1, "carry": carry, "texts": []}


def _memory_features(ctx: RunContext, routed: Route, own: int, pooled: list[dict]) -> torch.Tensor | None:
    """The router's memory features for the texts an update trains: this problem's vector for
    its own texts; with pooled texts, each its own problem's, looked up as that problem's own
    update would have (blind to itself), one row per text (len(texts), memory_dim)."""
    if routed.memory is None:
        return None
    if not pooled:
        return routed.memory[0]  # (memory_dim,), for every row
    others, *_ = ctx.memory_vectors([t["problem_question"] for t in pooled], exclude=[t["problem_id"] for t in pooled])
    return torch.cat([routed.memory.expand(own, -1), others.to(routed.memory.dtype)])  # (own + pooled, memory_dim)


def _replay_memory(ctx: RunContext, routed: Route, replay: dict[int, list[dict]]) -> dict[int, torch.Tensor] | None:
    """Each replayed text's memory features, (texts, memory_dim) per expert: its own problem's, looked
    up blind to that problem as for a pooled text, once per problem. A text kept before problems were
    recorded with it (an older run's carry) takes the updating problem's, as it then trained."""
    if routed.memory is None:
        return None
    problems = {t["problem_id"]: t["problem_question"] for texts in replay.values() for t in texts if "problem_id" in t}
    vectors, *_ = ctx.memory_vectors(list(problems.values()), exclude=list(problems)) if problems else (None,)
    row_of = {pid: vectors[i].to(routed.memory) for i, pid in enumerate(problems)}
    return {expert: torch.stack([row_of[t["problem_id"]] if "problem_id" in t else routed.memory[0] for t in texts])
            for expert, texts in replay.items() if texts}


def _trained_texts(ctx: RunContext, texts: list[dict]) -> list[dict]:
    return [{"question": t["question"], "prompt": e.prompt, "completion": e.completion, "source": t["source"]}
            for e, t in zip(_examples(ctx, texts), texts)]


def _pooled_into(ctx: RunContext, state: LoopState, trained: dict) -> dict:
    """This episode's record of the pooled update that trained on its texts: the update's record as
    the driver hands it (id, expert, losses: graph/episodes.py), and its own texts and rule.
    Nothing trains, and expert usage is counted once, by the episode that trained (graph/nodes.commit)."""
    cycle = state.get("cycle", 0)
    info = {**trained, "cycle": cycle, "pooled_into": trained["update_id"], "gate_rollback_to": state["gate"]["rollback_to"],
            "texts": _trained_texts(ctx, state["texts"]), "rule": (state.get("rule") or {}).get("text")}
    return {"updates": [info], "cycle": cycle + 1, "texts": []}


def reevaluate(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """The problem again and the canary set, greedy, in one call; a regression rolls the update back.

    Under the round gate the canary is the round's (the run's canary set and the round's problems
    right at the first try), asked as a request of its own that is the same for every episode of the
    round, so the pooled call computes it once; the round's first episode to re-evaluate decides for
    all, and a broken canary undoes the round's updates, back to the bank before its first one.
    """
    ctx, problem, gate = runtime.context, state["problem"], state.get("gate")
    carried = (state.get("carry") or {}).get("canary", [])
    if gate is None:
        canary = [c for c in carried if c["id"] != problem["id"]]
        questions = [problem["question"]] + [c["question"] for c in canary]
        routed = [_route(ctx, q, state) for q in questions]
        weights = torch.cat([r.weights for r in routed])  # (1 + n_canary, n_experts)
        attempt, *attempts = ctx.solver.solve(questions, [r.rules for r in routed], weights=weights)
    else:
        canary = list({c["id"]: c for c in [*carried, *gate["canary"]]}.values())
        own = _route(ctx, problem["question"], state)
        asks = [ctx.solver.ask([problem["question"]], [own.rules], weights=own.weights)]
        if canary:
            # Routed blind to no problem (none of the round's is in memory yet), so that the
            # request is the same in every episode of the round.
            routed = route(ctx, [c["question"] for c in canary], with_rules=ctx.config.rules_in_prompt)
            asks.append(ctx.solver.ask([c["question"] for c in canary], [r.rules for r in routed],
                                       weights=torch.cat([r.weights for r in routed])))  # (n_canary, n_experts)
        (attempt,), *rest = ask_together(ctx.backend, asks)
        attempts = rest[0] if rest else []
    verdict = {"attempt": asdict(attempt), **asdict(check(attempt, state["target"]))}
    result = {"checked": len(canary), "correct": len(canary), "broke": [], "canary_rolled_back": False}
    last = state["updates"][-1]
    undo = last["snapshot"] if gate is None else gate["rollback_to"]
    broke: list[str] = []
    if canary:
        broke = [c["id"] for c, a in zip(canary, attempts) if not matches(a, c["label"])]
        accuracy = 1 - len(broke) / len(canary)
        result.update(correct=len(canary) - len(broke), broke=broke, accuracy=accuracy)
    test = _canary_test(ctx, canary, broke)
    regressed = test.regressed
    if test.p_value is not None:
        result["p_value"] = float(f"{test.p_value:.6g}")
    if gate is not None:
        # A round's own problem that it trained on and broke (graph/canary.trained_break_undoes). One
        # verdict per phase: the first episode to re-evaluate decides, the others record the same.
        trained_broken = [c for c in canary if c["id"] in broke and c["id"] in gate["trained"]]
        regressed = regressed or trained_break_undoes(ctx.config.canary_test, trained_broken,
                                                      alpha=ctx.config.canary_alpha, in_canary=True)
        decided = undo in ctx.round_verdicts
        regressed = ctx.round_verdicts.setdefault(undo, regressed)
        if decided:
            undo = None  # rolled back already, if at all
    if regressed:
        if undo is not None:
            ctx.bank_store.rollback(undo)
        result["canary_rolled_back"] = True
        result["update_id"] = last["update_id"]
        log.info("canary check failed (%d of %d broke): update %s rolled back", len(broke), len(canary), last["update_id"])
    return {"attempt": asdict(attempt), "verdict": verdict, "canary_checks": [result]}


def _canary_test(ctx: RunContext, canary: list[dict], broke: list[str]) -> CanaryVerdict:
    config = ctx.config
    return canary_regressed(config.canary_test, canary, broke, margin=config.canary_margin, alpha=config.canary_alpha)


def rollback(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """Out of cycles (or nothing verified to learn from): undo this episode's updates, unless kept.

    Updates trained on verified texts that passed the canary gate are kept by default
    (``keep_unfixed_updates``): the texts are right whether or not the greedy answer to this
    one problem flipped, and rejection-sampling fine-tuning gains across problems, not per problem.
    """
    ctx = runtime.context
    start = snapshot_name(state["episode"], 0)
    restored = None
    # Updates that made a problem answered right at first wrong (graph/canary.trained_break_undoes);
    # under the round gate that problem is in the round's canary, which judges the round's updates.
    own = [canary_entry(state)] if state["first_try"]["correct"] else []
    broken = trained_break_undoes(ctx.config.canary_test, own, alpha=ctx.config.canary_alpha, in_canary=False)
    undo = state.get("gate") is None and (not ctx.config.keep_unfixed_updates or broken)
    if undo and start in ctx.bank_store.snapshots():
        ctx.bank_store.rollback(start)
        restored = start
    return {"outcome": "unfixed", "episode_rolled_back_to": restored}


def outcome_of(state: LoopState) -> str:
    if state.get("unverifiable"):
        return "skipped"
    if state["first_try"]["correct"]:
        return "correct"
    if not state["learning"]:
        return "not_learned"
    if state.get("outcome") == "unfixed" or not state["verdict"]["correct"]:
        return "unfixed" if state.get("rules") or state.get("updates") else "failed"
    return "fixed"


def commit(state: LoopState, runtime: Runtime[RunContext]) -> dict:
    """Store the episode and its rules in memory and the graph; hand the carry to the next episode."""
    ctx, problem = runtime.context, state["problem"]
    outcome = outcome_of(state)
    updates = state.get("updates") or []
    if ctx.memory is not None:
        remember(ctx, state, problem, outcome, updates)
    carry = dict(state.get("carry") or {})
    if state.get("gate") is not None:
        # Under the round gate the carry was handed on from the episode before after this one's
        # updates ran (graph/episodes.py): its updates are counted here instead.
        usage = list(carry.get("expert_updates") or [0] * ctx.bank.n_experts)
        for u in updates:
            if not u.get("pooled_into"):  # a pooled update is counted by the episode that trained it
                usage[u["expert"]] += 1
        carry["expert_updates"] = usage
    carry["episodes"] = carry.get("episodes", 0) + 1
    carry["solved_first"] = carry.get("solved_first", 0) + int(state["first_try"]["correct"])
    carry["solved_final"] = carry.get("solved_final", 0) + int(outcome in ("correct", "fixed"))
    canary = list(carry.get("canary") or [])
    if state["first_try"]["correct"] and ctx.config.canary_size > 0:
        # Label-free runs guard with the confident majority answer as the canary's label.
        canary = (canary + [canary_entry(state)])[-ctx.config.canary_size:]
    carry["canary"] = canary
    # Replay only texts whose update is still in the bank (not undone by stress, canary or episode).
    replay = {k: list(v) for k, v in (carry.get("replay") or {}).items()}
    for u in updates:
        if update_survived(state, u):
            # with its problem, whose memory features a replay of the text is routed with
            fresh = [{**{k: t[k] for k in ("question", "completion", "source")}, "problem_id": state["problem"]["id"],
                      "problem_question": state["problem"]["question"]} for t in u["texts"] if t["source"] != "replay"]
            replay[str(u["expert"])] = (replay.get(str(u["expert"]), []) + fresh)[-ctx.config.replay_keep:]
    carry["replay"] = replay
    return {"outcome": outcome, "carry": carry, "committed": True}
