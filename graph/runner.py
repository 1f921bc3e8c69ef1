"""Build a run's dependencies and drive the loop over a stream of problems, resumably.

Each problem is one episode with its own thread id (``<run_id>-epNNNNN``) in a SqliteSaver
in the run directory. On resume, finished episodes are skipped, a half-done episode
continues from its last finished node, and the bank is reloaded from its last atomic save.
What one episode hands to the next (the canary set, expert usage) is part of its state,
so it is checkpointed too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from langgraph.checkpoint.sqlite import SqliteSaver

from adapters.router import RouterConfig
from adapters.stack import build_adapters
from agents.diversifier import Diversifier
from agents.errors import DataError
from agents.gsm8k import Problem
from agents.lm.backend import GenerationBackend, make_backend
from agents.lm.generation import chat_prompt
from agents.lm.models import LoadedModel
from agents.prompts import SOLVER_SYSTEM
from agents.reflector import Reflector
from agents.solver import Solver, solver_turn
from graph.builder import build_graph, recursion_limit
from graph.context import RunContext
from graph.run_dir import CHECKPOINTS, RunDirError, RunSettings, run_id_for, saved_run_settings
from graph.snapshots import align_bank, prune_snapshots
from graph.state import EpisodeCarryOver, EpisodeInput, LoopState, ProblemData
from memory_store.config import MemoryConfig
from memory_store.store import MemoryStore

log = logging.getLogger(__name__)

EVENTS = "events.jsonl"


def check_questions_fit(problems: Iterable[Problem], loaded: LoadedModel, max_new_tokens: int, where: str) -> None:
    """Refuse a question whose solver prompt and answer budget exceed the model's context, naming it.

    A longer prompt would be cut or overrun the model's positions; refusing up front, before a
    call the size of the whole text runs for minutes, is what a user can act on.
    """
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if not context:
        return
    limit = context - max_new_tokens

    def prompt_tokens(question: str) -> int:
        prompt = chat_prompt(loaded.tokenizer, SOLVER_SYSTEM, solver_turn(question))
        return len(loaded.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])

    template = prompt_tokens("")
    for problem in problems:
        # A token covers at least one byte (byte-level BPE, or byte fallback): a question of
        # fewer bytes than the room left by the template fits without tokenizing it.
        if template + len(problem.question.encode("utf-8")) + 8 < limit:
            continue
        tokens = prompt_tokens(problem.question)
        if tokens > limit:
            raise DataError(f"{where}: problem {problem.id} is too long: its prompt is {tokens} tokens, and the model "
                            f"reads {context} with {max_new_tokens} kept for the answer (at most {limit}); shorten it")


def build_context(
    loaded: LoadedModel,
    settings: RunSettings,
    run_dir: Path,
    *,
    embedder=None,
    backend: GenerationBackend | None = None,
    with_memory: bool = True,
) -> RunContext:
    """Model, bank (reloaded if saved), router, trainer, memory and agents for one process."""
    memory = None
    memory_dim = 0
    if with_memory:
        # The memory returns as many rules as the solver's prompt takes (SolverConfig.max_rules).
        mem_config = MemoryConfig(run_dir=run_dir, url=settings.memory_url, n_experts=settings.bank.n_experts,
                                  n_rules=settings.solver.max_rules)
        memory = MemoryStore.open(mem_config, embedder=embedder)
        memory_dim = mem_config.feature_dim
    try:
        return _build_with_memory(loaded, settings, run_dir, memory, memory_dim, backend)
    except BaseException:
        if memory is not None:
            memory.close()
        raise


def _build_with_memory(loaded: LoadedModel, settings: RunSettings, run_dir: Path, memory, memory_dim: int,
                       backend: GenerationBackend | None) -> RunContext:
    model, tok = loaded.model, loaded.tokenizer
    router_config = RouterConfig(**{**asdict(settings.router), "memory_dim": memory_dim})
    adapters = build_adapters(model, tok, settings.bank, router_config, stress=settings.stress,
                              trainer=settings.trainer, bank_dir=run_dir / "bank")
    bank, router, trainer, store = adapters.bank, adapters.router, adapters.trainer, adapters.store
    if store.exists():
        store.load()
        log.info("reloaded the bank from %s", store.current)
    else:
        store.save(extra={"model": settings.model})
    backend = backend or make_backend(settings.backend, loaded, bank, batch_size=settings.batch_size,
                                      max_new_tokens=settings.solver.max_new_tokens)
    return RunContext(
        config=settings.loop,
        backend=backend,
        solver=Solver(backend, settings.solver),
        reflector=Reflector(backend, settings.reflector),
        diversifier=Diversifier(backend, settings.diversifier),
        verifier=settings.verifier,
        model=model,
        tokenizer=tok,
        bank=bank,
        router=router,
        trainer=trainer,
        bank_store=store,
        memory=memory,
    )


def build_fresh_context(loaded: LoadedModel, settings: RunSettings, run_dir: Path, **kwargs) -> RunContext:
    """``build_context``; if it fails, the parts it created in a folder with no run yet are removed.

    Otherwise a later run in that folder, with other settings, would start from this attempt's
    initial bank (a folder holds a run only once run.json is written).
    """
    run_dir = Path(run_dir)
    parts = [run_dir / "bank", MemoryConfig(run_dir=run_dir).memory_dir]
    created = [p for p in parts if not p.exists()] if saved_run_settings(run_dir) is None else []
    try:
        return build_context(loaded, settings, run_dir, **kwargs)
    except BaseException:
        for part in created:
            shutil.rmtree(part, ignore_errors=True)
        raise


def problem_data(problem: Problem, *, learning: bool, label_free: bool) -> ProblemData:
    """The state's view of a problem: no label when label-free, no solution unless it may be learned from."""
    return ProblemData(
        id=problem.id,
        question=problem.question,
        label=None if label_free else problem.label,
        split=problem.split,
        solution=problem.solution if learning and not label_free else None,
    )


@dataclass
class EpisodeEvent:
    episode: int
    node: str
    update: dict


class StopFlag:
    """Set by Ctrl-C; the driver stops after the node that is running, with its checkpoint written."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


def open_checkpointer(run_dir: Path) -> SqliteSaver:
    return SqliteSaver(sqlite3.connect(str(run_dir / CHECKPOINTS), check_same_thread=False))


def run_episodes(
    ctx: RunContext,
    problems: Iterable[ProblemData],
    *,
    run_dir: Path,
    learning: bool = True,
    checkpointer: SqliteSaver | None = None,
    on_event: Callable[[EpisodeEvent], None] | None = None,
    stop: StopFlag | None = None,
) -> Iterator[LoopState]:
    """Run (or resume) one episode per problem; yields each finished episode's final state."""
    checkpointer = checkpointer or open_checkpointer(run_dir)
    app = build_graph().compile(checkpointer=checkpointer)
    run_id = run_id_for(run_dir)
    limit = recursion_limit(ctx.config.cycles)
    carry = EpisodeCarryOver(canary=[], expert_updates=[0] * ctx.bank.n_experts)
    events = (run_dir / EVENTS).open("a", encoding="utf-8")
    try:
        for index, problem in enumerate(problems):
            thread = {"configurable": {"thread_id": f"{run_id}-ep{index:05d}"}, "recursion_limit": limit}
            snapshot = app.get_state(thread)
            # Finished only when commit's own write is in the checkpoint: a kill after a node's
            # writes were saved but before the next checkpoint leaves `next` empty too
            # (get_state omits a task whose writes are saved), and that episode must go on.
            if snapshot.values.get("committed"):
                carry = snapshot.values["carry"]
                yield snapshot.values  # finished in an earlier process
                continue
            if snapshot.values and snapshot.values["problem"]["id"] != problem["id"]:
                raise RunDirError(f"episode {index} of this run was problem {snapshot.values['problem']['id']}, "
                                  f"but the data now gives {problem['id']}: the data file changed")
            # A killed earlier try of this episode may have changed the bank before any checkpoint.
            align_bank(ctx, snapshot.values or {"episode": index})
            start: EpisodeInput | None = None if snapshot.values else EpisodeInput(
                run_id=run_id, episode=index, problem=problem, learning=learning, carry=carry,
                rules=[], updates=[], canary_checks=[],
            )
            mark = time.perf_counter()
            for chunk in app.stream(start, thread, context=ctx, stream_mode="updates"):
                # wall seconds since the previous node ended: the node and its checkpoint write
                now = time.perf_counter()
                seconds, mark = round(now - mark, 3), now
                for node, update in chunk.items():
                    event = EpisodeEvent(index, node, update or {})
                    line = {"episode": index, "node": node, "seconds": seconds, **_summary(update or {})}
                    events.write(json.dumps(line) + "\n")
                    events.flush()
                    if on_event:
                        on_event(event)
                if stop:
                    return
            final = app.get_state(thread).values
            carry = final["carry"]
            prune_snapshots(ctx, index)
            yield final
    finally:
        events.close()
        if ctx.memory is not None:
            ctx.memory.flush()


def describe_episode(state: LoopState) -> str:
    """One line on a finished episode: the first try, what was learned, the outcome."""
    updates = state.get("updates") or []
    return (f"{'right' if state['first_try']['correct'] else 'wrong'} at the first try; "
            f"{len(state.get('rules') or [])} rule(s), {len(updates)} update(s); outcome {state['outcome']}")


def _summary(update: dict) -> dict:
    """The event-log line for one node: small, readable fields only."""
    out = {}
    if "verdict" in update:
        out.update(correct=update["verdict"]["correct"], answer=update["verdict"]["answer"],
                   confidence=update["verdict"]["confidence"])
    if "verified_share" in update:
        out.update(verified_share=round(update["verified_share"], 4), target=update.get("target"),
                   unverifiable=update.get("unverifiable", False))
    if update.get("rule"):
        out["rule"] = update["rule"]["text"]
    if update.get("candidates"):
        # every rule candidate, accepted or refused, with its reason and shares
        out["rule_candidates"] = [{k: c.get(k) for k in ("text", "status", "reason", "share_with", "share_without")}
                                  for c in update["candidates"]]
    if "texts" in update and update["texts"]:
        out["texts_by_source"] = dict(Counter(t["source"] for t in update["texts"]))
    if update.get("variants"):
        out["variants"] = [{k: v.get(k) for k in ("text", "status", "reason")} for v in update["variants"]]
    if update.get("updates"):
        u = update["updates"][-1]
        out.update(expert=u["expert"], mode=u["mode"], phi=round(u["phi"], 4), lr=u["lr"],
                   loss_before=round(u["loss_before"], 4), loss_after=round(u["loss_after"], 4),
                   stress_rolled_back=u["stress_rolled_back"])
    if update.get("canary_checks"):
        c = update["canary_checks"][-1]
        out.update(canary_checked=c["checked"], canary_broke=c["broke"], canary_rolled_back=c["canary_rolled_back"])
    if "outcome" in update:
        out["outcome"] = update["outcome"]
    if update.get("error"):
        out["error"] = update["error"]
    return out


def set_threads(threads: int | None) -> None:
    """Torch threads: explicit, or all cores but never more than torch's default."""
    if threads:
        torch.set_num_threads(threads)
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
