"""Where GSM8K problems come from: one resolver for a path, the names 'train' / 'test', and the hub.

The names ``train`` and ``test`` resolve, in this order, to
  1. the folder in ``SELFIMPROVE_GSM8K`` (its ``train.jsonl`` / ``test.jsonl``);
  2. the Hugging Face dataset ``openai/gsm8k`` (config ``main``) through ``datasets``, when it
     is in the local cache or the hub answers;
  3. the GSM8K sample bundled with the package (``agents/data/gsm8k``, MIT, see its README).
Any other spec is a path to a JSON-lines file (``.jsonl`` or ``.jsonl.gz``), and
``gsm8k:train`` / ``gsm8k:test`` mean the hub alone. Every source says what it is and how
many problems it holds (``DataSource.describe``), so commands can print it and reports record it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from agents.errors import DataError
from agents.gsm8k import Problem, parse_rows, read_problems

ENV_FOLDER = "SELFIMPROVE_GSM8K"
SPLITS = ("train", "test")
HUB_DATASET = "openai/gsm8k"
HUB_SPECS = {"gsm8k:train": "train", "gsm8k:test": "test"}
HUB_PROBE_SECONDS = 3.0  # one quick request decides whether the hub answers; datasets itself retries for ~25 s


@dataclass(frozen=True)
class DataSource:
    """A resolved problem source: what was asked for, what answered, and its problems."""

    spec: str  # as given: 'train', 'test', 'gsm8k:test' or a path
    kind: str  # 'file', 'folder' ($SELFIMPROVE_GSM8K), 'hub' or 'bundled'
    location: str  # the file read, or the hub dataset and split
    problems: list[Problem] = field(repr=False)
    passed_over: tuple[str, ...] = ()  # sources tried first, and why each was not used

    @property
    def size(self) -> int:
        return len(self.problems)

    @property
    def key(self) -> tuple[str, str]:
        """Two specs with the same key read the same problems."""
        return self.kind, self.location

    def describe(self) -> str:
        what = {"file": "file", "folder": f"${ENV_FOLDER}", "hub": "Hugging Face hub",
                "bundled": "the GSM8K sample bundled with selfimprove"}[self.kind]
        text = f"{self.spec}: {what} {self.location} ({self.size} problems)"
        return text + (f"; passed over: {'; '.join(self.passed_over)}" if self.passed_over else "")

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "location": self.location, "size": self.size,
                "passed_over": list(self.passed_over)}

    def take(self, n: int, what: str = "problems") -> list[Problem]:
        """The first n problems; asking for more than the source holds is a DataError naming it."""
        if n > self.size:
            raise DataError(f"asked for {n} {what} but {self.spec} ({self.kind} {self.location}) "
                            f"holds only {self.size}")
        return self.problems[:n]


def open_source(spec: str | Path) -> DataSource:
    """Resolve a data spec to its problems (see the module docstring for the order)."""
    spec = str(spec)
    if spec in HUB_SPECS:
        problems, location = _load_hub(HUB_SPECS[spec], cache_only=not hub_reachable())
        return DataSource(spec, "hub", location, problems)
    if spec not in SPLITS:
        return DataSource(spec, "file", str(Path(spec)), read_problems(Path(spec)))
    passed: list[str] = []
    folder = os.environ.get(ENV_FOLDER)
    if folder:
        path = Path(folder) / f"{spec}.jsonl"
        if not path.is_file():
            raise DataError(f"${ENV_FOLDER} is {folder}, which has no {spec}.jsonl")
        return DataSource(spec, "folder", str(path), read_problems(path, split=spec))
    reachable = hub_reachable()
    try:
        problems, location = _load_hub(spec, cache_only=not reachable)
        return DataSource(spec, "hub", location, problems)
    except DataError as err:
        passed.append(f"{HUB_DATASET} (not in the local datasets cache, and the hub did not answer)" if not reachable
                      else f"{HUB_DATASET} ({err})")
    return bundled_source(spec, tuple(passed))


def bundled_source(split: str, passed_over: tuple[str, ...] = ()) -> DataSource:
    """The sample shipped as package data: a few hundred problems per split, drawn from GSM8K's files."""
    if split not in SPLITS:
        raise DataError(f"the bundled GSM8K sample has splits {', '.join(SPLITS)}; got {split!r}")
    with resources.as_file(resources.files("agents") / "data" / "gsm8k" / f"{split}.jsonl.gz") as path:
        problems = read_problems(path, split=split)
    return DataSource(split, "bundled", f"agents/data/gsm8k/{split}.jsonl.gz", problems, passed_over)


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers one request in time; never when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set."""
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
           for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    import httpx  # imported here: only this probe needs it

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        return httpx.head(f"{endpoint}/api/datasets/{HUB_DATASET}", timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def _load_hub(split: str, *, cache_only: bool) -> tuple[list[Problem], str]:
    """GSM8K from the hub or, with cache_only, from the local datasets cache alone."""
    location = f"{HUB_DATASET} ({split}{', from the local cache' if cache_only else ''})"
    try:
        import datasets  # imported here: only the hub path needs it
    except ImportError as err:
        raise DataError(f"{HUB_DATASET} needs the 'datasets' package: pip install datasets") from err
    try:
        with _offline(datasets) if cache_only else contextlib.nullcontext():
            rows = datasets.load_dataset(HUB_DATASET, "main", split=split)
    except (OSError, ValueError) as err:  # ConnectionError and DatasetNotFoundError are OSErrors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "the local datasets cache (the hub did not answer)" if cache_only else "the Hugging Face hub"
        raise DataError(f"cannot load {HUB_DATASET} {split} from {where}: {first_line}") from err
    return parse_rows(rows, split, f"{HUB_DATASET} {split}"), location


@contextlib.contextmanager
def _offline(datasets_module):
    """datasets and huggingface_hub read their offline switches at import; set them for one call."""
    import huggingface_hub.constants as hub_constants

    config = getattr(datasets_module, "config", None)
    saved = [(obj, getattr(obj, "HF_HUB_OFFLINE")) for obj in (hub_constants, config)
             if obj is not None and hasattr(obj, "HF_HUB_OFFLINE")]
    for obj, _ in saved:
        obj.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for obj, value in saved:
            obj.HF_HUB_OFFLINE = value
