"""A run folder: its settings (run.json), its lock, and the checks before a run starts or resumes.

A folder holds a run once run.json is written. On resume every setting is read from it; an
option given again must match (``RESUMABLE_CHANGES`` may differ), and a run checkpointed in
an older layout of the loop state is refused with a clear message instead of misread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adapters.bank import BankConfig
from adapters.router import RouterConfig
from adapters.stress import StressConfig
from adapters.trainer import TrainerConfig
from agents.diversifier import DiversifierConfig
from agents.errors import SelfImproveError
from agents.files import atomic_write_bytes
from agents.lm.backend import BACKENDS, DEFAULT_BATCH_SIZE
from agents.lm.models import DEFAULT_MODEL
from agents.lm.precision import PRECISIONS, check_precision_for_backend
from agents.reflector import ReflectorConfig
from agents.solver import SolverConfig
from agents.verifier import VerifierConfig
from graph.canary import unused_canary_settings
from graph.context import LoopConfig
from graph.saved_settings import from_dict, leaf_differences, read_saved, settings_with_options
from memory_store.embedding import EMBEDDERS
from memory_store.locks import WriterLock

RUN_FILE = "run.json"
# A round of 8 episodes fills the batcher's 64 slots with their greedy answers and 6 samples each.
DEFAULT_ROUND_SIZE = 8
RUN_LOCK = "run.lock"  # held by the process running in the folder
CHECKPOINTS = "checkpoints.sqlite"


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
    precision: str = "auto"  # frozen weights: 'auto' (agents.lm.precision decides per device), 'float32', 'bfloat16', 'int8'
    # Episodes that sample together from the same bank, their calls pooled (graph/episodes.run_episodes)
    round_size: int = DEFAULT_ROUND_SIZE

    def __post_init__(self) -> None:
        for name in ("episodes", "round_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {', '.join(EMBEDDERS)}; got {self.embedder!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        check_precision_for_backend(self.precision, self.backend)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def run_id_for(run_dir: Path) -> str:
    return Path(run_dir).resolve().name


# Settings a resumed run may change: how many episodes, and how text is generated (backends
# give the same answers within their measured tolerance; none changes what was learned).
RESUMABLE_CHANGES = ("episodes", "backend", "batch_size")
# Settings added after runs were first saved, with the values those runs ran with.
LEGACY_SETTINGS = {
    "embedder": "minilm", "precision": "float32", "round_size": 1,
    "reflector": {"max_attempts": 3, "max_chars": 300, "max_sentences": 2, "max_new_tokens": 96, "temperature": 0.7},
    "diversifier": {"kinds": ["paraphrase", "rename"], "per_kind": 1, "max_new_tokens": 200, "temperature": 0.7},
    "loop": {"round_gate": False, "canary_test": "margin", "pool_updates": False},
}
# The layout of the loop state in a run's checkpoints: 2 named the first try `first_try` and the
# three rollbacks apart (stress_rolled_back, canary_rolled_back, episode_rolled_back_to).
STATE_FORMAT = 2
# The command-line option of each setting, for messages about them.
RUN_FLAGS = {
    "model": "--model", "data": "--data", "episodes": "--episodes", "loop.cycles": "--cycles",
    "loop.label_free": "--label-free", "loop.seed": "--seed", "solver.max_new_tokens": "--max-new-tokens",
    "memory_url": "--memory-url", "backend": "--backend", "batch_size": "--batch-size", "embedder": "--embedder",
    "precision": "--precision", "verifier.samples": "--samples", "round_size": "--round-size",
    "loop.train_sources": "--train-sources", "loop.round_gate": "--round-gate", "loop.canary_test": "--canary-test",
    "loop.canary_alpha": "--canary-alpha", "loop.pool_updates": "--pool-updates",
}


def saved_run_settings(run_dir: Path) -> dict | None:
    """run.json of a run folder (older runs completed with LEGACY_SETTINGS), or None when there is none."""
    saved = read_saved(Path(run_dir) / RUN_FILE)
    if saved is None:
        return None
    # A group of settings saved without a later member reads that member's legacy value.
    return {**LEGACY_SETTINGS, **saved, **{key: {**legacy, **saved[key]} for key, legacy in LEGACY_SETTINGS.items()
                                           if isinstance(legacy, dict) and isinstance(saved.get(key), dict)}}


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
    if saved.get("state_format", 1) != STATE_FORMAT and has_checkpoints(run_dir):
        raise RunDirError(f"{run_dir} holds a run made by an older version, whose checkpoints this version cannot "
                          "resume; start it again in another --run-dir (`rules` and `export` still read it)")
    # Through the settings class, so that a setting added since the folder was saved reads as its
    # default (what the run ran with; settings whose default changed are in LEGACY_SETTINGS).
    try:
        saved = {**saved, **from_dict(RunSettings, saved).to_dict()}
    except (TypeError, ValueError) as err:
        raise RunDirError(f"{Path(run_dir) / RUN_FILE}: the saved settings are not valid ({err})") from None
    kept = [k for k in wanted if k not in RESUMABLE_CHANGES]
    unused = _unused_canary_settings(saved, wanted)
    differs = leaf_differences(_compared(saved, kept, unused), _compared(wanted, kept, unused))
    if differs:
        shown = "; ".join(f"{path}: saved {a!r}, now {b!r}" for path, a, b in differs)
        raise RunDirError(f"{run_dir} holds a run with different settings ({shown}); use another --run-dir")


def _unused_canary_settings(saved: dict, wanted: dict) -> tuple[str, ...]:
    """The canary settings that a resume keeping the run's canary test may change: those the test
    never reads (graph/canary.unused_canary_settings). None when the test itself changes.

    The folder check of an evaluation's started arms; ``run --resume`` still refuses such an
    option given again, as it refuses any setting that differs from the saved one.
    """
    test = (saved.get("loop") or {}).get("canary_test")
    return unused_canary_settings(test) if test == (wanted.get("loop") or {}).get("canary_test") else ()


def _compared(settings: dict, keys: list[str], unused: tuple[str, ...]) -> dict:
    """``settings`` at ``keys``, less the ``unused`` loop settings."""
    kept = {k: settings.get(k) for k in keys}
    if "loop" in kept:
        kept["loop"] = {k: v for k, v in (kept["loop"] or {}).items() if k not in unused}
    return kept


def has_checkpoints(run_dir: Path) -> bool:
    """Whether the run folder's checkpoints hold anything, read through a read-only connection."""
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
