"""Build a run's dependencies for one process: model checks, bank (reloaded if saved), memory, agents.

The episodes themselves are driven by ``graph.episodes.run_episodes``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch

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
from graph.context import RunContext
from graph.run_dir import RunSettings, saved_run_settings
from graph.state import ProblemData
from memory_store.config import MemoryConfig
from memory_store.store import MemoryStore

log = logging.getLogger(__name__)

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


def set_threads(threads: int | None) -> None:
    """Torch threads: explicit, or all cores but never more than torch's default."""
    if threads:
        torch.set_num_threads(threads)
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
