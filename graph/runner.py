"""Build a run's dependencies and drive the loop over a stream of problems, resumably.

Each problem is one episode with its own thread id (``<run_id>-epNNNNN``) in a SqliteSaver
in the run directory. On resume, finished episodes are skipped, a half-done episode
continues from its last finished node, and the bank is reloaded from its last atomic save.
What one episode hands to the next (the canary set, expert usage) is part of its state,
so it is checkpointed too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from langgraph.checkpoint.sqlite import SqliteSaver

from adapters.bank import BankConfig
from adapters.router import RouterConfig
from adapters.stack import build_adapters
from adapters.stress import StressConfig
from adapters.trainer import TrainerConfig
from agents.diversifier import Diversifier, DiversifierConfig
from agents.errors import DataError, SelfImproveError
from agents.files import atomic_write_bytes
from agents.gsm8k import Problem
from agents.lm.backend import DEFAULT_BATCH_SIZE, GenerationBackend, make_backend
from agents.lm.generation import chat_prompt
from agents.lm.models import DEFAULT_MODEL, LoadedModel
from agents.lm.precision import PRECISIONS
from agents.prompts import SOLVER_SYSTEM
from agents.reflector import Reflector, ReflectorConfig
from agents.solver import Solver, SolverConfig, solver_turn
from agents.verifier import VerifierConfig
from graph.builder import build_graph, recursion_limit
from graph.context import LoopConfig, RunContext
from graph.nodes import align_bank, prune_snapshots
from graph.saved_settings import leaf_differences, read_saved, settings_with_options
from graph.state import EpisodeCarryOver, EpisodeInput, LoopState, ProblemData
from memory_store.config import MemoryConfig
from memory_store.locks import WriterLock
from memory_store.store import MemoryStore

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_LOCK = "run.lock"  # held by the process running in the folder
CHECKPOINTS = "checkpoints.sqlite"
EVENTS = "events.jsonl"


class RunDirError(SelfImproveError):
    """The run directory does not fit the request (exists without --resume, or another run's)."""


@dataclass
class RunSettings:
    """Everything that defines a run; saved in run.json and checked on resume."""

    model: str = DEFAULT_MODEL  # model spec: an alias, a folder, a .gguf file or a hub id
    data: str = "train"  # problems: 'train', 'test' (agents.data_sources) or a JSON-lines path
    episodes: int = 10  # problems to run, from the start of the data
    loop: LoopConfig = field(default_factory=LoopConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stress: StressConfig = field(default_factory=StressConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    reflector: ReflectorConfig = field(default_factory=ReflectorConfig)
    diversifier: DiversifierConfig = field(default_factory=DiversifierConfig)
    memory_url: str | None = None
    backend: str = "auto"  # generation backend: 'auto', 'torch' or 'llama.cpp' (agents.lm.backend.make_backend)
    batch_size: int = DEFAULT_BATCH_SIZE  # sequences generated together (torch and llama.cpp slots)
    embedder: str = "minilm"  # memory embedder: 'minilm' (all-MiniLM-L6-v2) or 'hash' (tests)
    precision: str = "auto"  # frozen weights: 'auto' (agents.lm.precision decides per device), 'float32', 'bfloat16'

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def run_id_for(run_dir: Path) -> str:
    return Path(run_dir).resolve().name


# Settings a resumed run may change: how many episodes, and how text is generated (backends
# give the same answers within their measured tolerance; none changes what was learned).
RESUMABLE_CHANGES = ("episodes", "backend", "batch_size")
# Settings added after runs were first saved, with the values those runs ran with.
LEGACY_SETTINGS = {
    "embedder": "minilm", "precision": "float32",
    "reflector": {"max_attempts": 3, "max_chars": 300, "max_sentences": 2, "max_new_tokens": 96, "temperature": 0.7},
    "diversifier": {"kinds": ["paraphrase", "rename"], "per_kind": 1, "max_new_tokens": 200, "temperature": 0.7},
}
# The layout of the loop state in a run's checkpoints: 2 named the first try `first_try` and the
# three rollbacks apart (stress_rolled_back, canary_rolled_back, episode_rolled_back_to).
STATE_FORMAT = 2
# The command-line option of each setting, for messages about them.
RUN_FLAGS = {
    "model": "--model", "data": "--data", "episodes": "--episodes", "loop.cycles": "--cycles",
    "loop.label_free": "--label-free", "loop.seed": "--seed", "solver.max_new_tokens": "--max-new-tokens",
    "memory_url": "--memory-url", "backend": "--backend", "batch_size": "--batch-size", "embedder": "--embedder",
    "precision": "--precision", "verifier.samples": "--samples",
}


def saved_run_settings(run_dir: Path) -> dict | None:
    """run.json of a run folder (older runs completed with LEGACY_SETTINGS), or None when there is none."""
    saved = read_saved(Path(run_dir) / RUN_FILE)
    return None if saved is None else {**LEGACY_SETTINGS, **saved}


def run_settings(run_dir: Path, resume: bool, options: dict) -> RunSettings:
    """The settings of a run: its saved ones on resume (options given again must agree), else the options."""
    saved = saved_run_settings(run_dir) if resume else None
    return settings_with_options(RunSettings, saved, options, flags=RUN_FLAGS, changeable=RESUMABLE_CHANGES,
                                 where=Path(run_dir) / RUN_FILE)


def usable_run_dir(run_dir: Path) -> None:
    """Create the run folder (an empty folder holds no run), or say in one line why it cannot be one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a folder")
    above = next((p for p in run_dir.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is under {above}, which is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"--run-dir {run_dir} cannot be written: {err.strerror or err}") from None


def claim_run_dir(run_dir: Path) -> WriterLock:
    """The run folder's lock, held until released: a second process on the same folder is refused at once."""
    usable_run_dir(run_dir)
    lock = WriterLock(Path(run_dir) / RUN_LOCK, what=f"run folder {run_dir}")
    lock.acquire()
    return lock


def check_run_dir(run_dir: Path, settings: RunSettings, resume: bool) -> None:
    """Refuse, before anything loads or is written, a folder holding another run (or a run without --resume)."""
    saved = saved_run_settings(run_dir)
    wanted = settings.to_dict()
    if saved is None:
        return
    if not resume:
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if saved.get("state_format", 1) != STATE_FORMAT and _has_checkpoints(run_dir):
        raise RunDirError(f"{run_dir} holds a run made by an older version, whose checkpoints this version cannot "
                          "resume; start it again in another --run-dir (`rules` and `export` still read it)")
    differs = leaf_differences({k: saved.get(k) for k in wanted if k not in RESUMABLE_CHANGES},
                               {k: v for k, v in wanted.items() if k not in RESUMABLE_CHANGES})
    if differs:
        shown = "; ".join(f"{path}: saved {a!r}, now {b!r}" for path, a, b in differs)
        raise RunDirError(f"{run_dir} holds a run with different settings ({shown}); use another --run-dir")


def _has_checkpoints(run_dir: Path) -> bool:
    path = Path(run_dir) / CHECKPOINTS
    if not path.is_file():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return db.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchone() is not None
        except sqlite3.OperationalError:  # no table yet: nothing was checkpointed
            return False


def write_run_settings(run_dir: Path, settings: RunSettings, notes: dict | None = None) -> None:
    """run.json, written once the run's parts exist: a run that failed to start leaves none behind.

    ``notes`` (where the data came from, say) are saved beside the settings, not compared.
    """
    saved = {**settings.to_dict(), "state_format": STATE_FORMAT, **(notes or {})}
    atomic_write_bytes(Path(run_dir) / RUN_FILE, json.dumps(saved, indent=2).encode())


def prepare_run_dir(run_dir: Path, settings: RunSettings, resume: bool, notes: dict | None = None) -> None:
    """Check that the folder can take this run (``usable_run_dir``, ``check_run_dir``), then save its settings."""
    usable_run_dir(run_dir)
    check_run_dir(run_dir, settings, resume)
    write_run_settings(run_dir, settings, notes)


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
