"""``evaluate``: every arm of an evaluation under its protocol, resumable, then the report.

Each learning arm learns in its own folder ``run_dir/arms/<arm>`` (its own bank, memory and
checkpoints, a valid run directory for ``rules`` and ``export``); a killed evaluation resumes
from those checkpoints and from the arms' kept scores. Evaluation problems never enter
``run_episodes`` in ``holdout``: they are only scored, so they cannot reach reflect, diversify
or update.

Python use::

    from graph.evaluation.config import EvalConfig
    from graph.evaluation.harness import evaluate
    report = evaluate(EvalConfig(model="qwen2.5-coder-0.5b", learn_problems=20, eval_problems=50), "runs/eval")
    report.summary()["arms"]["full"]["accuracy"]
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Callable, NamedTuple

from adapters.bank import ExpertBank
from agents.errors import DataError
from agents.files import atomic_write_bytes
from agents.lm.backend import GenerationBackend
from agents.lm.models import LoadedModel, pick_device
from agents.lm.precision import PrecisionChoice, choose_precision, reduced_for
from graph.episodes import StopFlag
from graph.evaluation.arms import ArmRunner
from graph.evaluation.config import (
    EVAL_FILE,
    LEGACY_CONFIG,
    LOOP_ARMS,
    PROTOCOL_NOTES,
    RESUMABLE_EVAL_CHANGES,
    EvalConfig,
)
from graph.evaluation.learning import leak_check, update_bursts
from graph.evaluation.problems import ProblemSets, check_disjoint, prepare_problems
from graph.evaluation.provenance import code_version, machine, machine_from_backend, machine_label, same_machine
from graph.evaluation.report import write_report
from graph.evaluation.results import (ArmResult, EvalProgress, EvalReport, compare_arms, finished_arm, keep_failed,
                                      result_path, save_arm)
from graph.run_dir import RunDirError, claim_run_dir
from graph.runner import set_threads
from graph.saved_settings import from_dict, leaf_differences, read_saved
from memory_store.embedding import make_embedder

log = logging.getLogger(__name__)


def _fixed_settings(config: dict) -> dict:
    """The settings a resumed evaluation must keep: all but ``RESUMABLE_EVAL_CHANGES``."""
    return {k: v for k, v in config.items() if k not in RESUMABLE_EVAL_CHANGES}


class EvalDir(NamedTuple):
    """What eval.json fixes for every arm: the precision they run in; the code versions and machines that ran them."""

    precision: PrecisionChoice
    code_versions: list[str]
    machines: list[dict]


def prepare_eval_dir(run_dir: Path, config: EvalConfig, sets: ProblemSets, resume: bool,
                     any_machine: bool = False) -> EvalDir:
    """eval.json checked against the saved one on resume and written; the precision every arm runs in.

    The precision 'auto' resolves to is fixed when the evaluation starts and kept in eval.json:
    arms are compared answer by answer, so a resume (where the calibration would choose
    otherwise) runs in the precision the first arms ran in. eval.json also lists every code
    version and every machine that has run this evaluation (graph/evaluation/provenance.py), one
    entry per change, so that the report can say when its arms were not made by one program on
    one kind of machine. A resume on another kind of machine is refused unless ``any_machine``:
    its answers would differ from the first arms' by the machine's rounding alone.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / EVAL_FILE
    wanted = {"config": {k: v for k, v in config.to_dict().items() if k != "plots"}, **sets.to_dict()}
    kept, versions, machines = None, [], []
    if path.exists():
        if not resume:
            raise RunDirError(f"{run_dir} already holds an evaluation; pass --resume to continue it or choose another --run-dir")
        saved = read_saved(path)
        # Through the config class: a setting added since reads as its default, what the evaluation ran with.
        try:
            saved["config"] = from_dict(EvalConfig, {**LEGACY_CONFIG, **saved.get("config", {})}).to_dict()
        except (TypeError, ValueError) as err:
            raise RunDirError(f"{path}: the saved settings are not valid ({err})") from None
        saved.pop("data_sources", None)  # a note of where the problems came from, not a setting
        versions = list(saved.pop("code_versions", None) or ["not recorded"])  # older evaluations kept none
        machines = list(saved.pop("machines", None) or _machines_of_finished_arms(run_dir, config))
        kept = saved.pop("precision", None)  # resolved at the start (absent in evaluations made before it was kept)
        saved_fixed, wanted_fixed = _fixed_settings(saved["config"]), _fixed_settings(wanted["config"])
        if {**saved, "config": saved_fixed} != {**wanted, "config": wanted_fixed}:
            differs = leaf_differences(saved_fixed, wanted_fixed)
            shown = "; ".join(f"{key}: saved {a!r}, now {b!r}" for key, a, b in differs) or "problem ids"
            raise RunDirError(f"{run_dir} holds an evaluation with different settings or problems ({shown}); "
                              "use another --run-dir")
    device_type = pick_device(None).type
    here = machine("cpu" if config.backend == "llama.cpp" else device_type)  # llama.cpp runs on the CPU
    if machines and not same_machine(machines[-1], here):
        if not any_machine:
            raise RunDirError(f"{run_dir} was run on {machine_label(machines[-1])}; this machine is {machine_label(here)}, "
                              "whose rounding alone would flip answers against the arms made there: resume it on that "
                              "kind of machine, or pass --any-machine to go on (the report will say which arm ran where)")
        log.warning("%s was run on %s; it resumes on %s: the report will say so", run_dir, machine_label(machines[-1]),
                    machine_label(here))
    if not machines or machines[-1] != here:
        machines.append(here)  # also after a record with fewer parts (read from an older arm's backend line)
    if kept is not None:
        precision = PrecisionChoice(kept["requested"], kept["used"], f"{kept['reason']}; kept since the evaluation started")
    else:  # a new evaluation, or one saved before its precision was kept (from before int8: never int8)
        precision = choose_precision(config.precision, device_type,
                                     reduced=reduced_for(config.backend, saved_auto=path.exists()))
        kept = precision.to_dict()
    running = code_version()
    if not versions or versions[-1] != running:
        if versions:
            log.warning("%s was run by %s; it resumes with %s: the report will say so", run_dir, versions[-1], running)
        versions.append(running)
    atomic_write_bytes(path, json.dumps({**wanted, "precision": kept, "data_sources": sets.sources,
                                         "code_versions": versions, "machines": machines}, indent=2).encode())
    return EvalDir(precision, versions, machines)


def _machines_of_finished_arms(run_dir: Path, config: EvalConfig) -> list[dict]:
    """The devices that finished arms' backend lines name, for an evaluation saved before machines were kept."""
    named = []
    for arm in ("frozen", *config.arms):
        done = finished_arm(run_dir, arm)
        found = machine_from_backend(done[0].backend) if done is not None else None
        if found is not None and found not in named:
            named.append(found)
    return named


def evaluate(
    config: EvalConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    loader: Callable[[], LoadedModel] | None = None,
    backend: Callable[[LoadedModel, ExpertBank | None], GenerationBackend] | None = None,
    embedder=None,
    on_progress: Callable[[EvalProgress], None] | None = None,
    stop: StopFlag | None = None,
    problems: ProblemSets | None = None,
    on_status: Callable[[str], None] | None = None,
    any_machine: bool = False,
) -> EvalReport:
    """Run every arm of ``config`` under its protocol; write report.json, report.md and plots to run_dir.

    ``loader`` gives a fresh model per arm (default: ``load_model(config.model)``; a bank is
    injected in place, so arms never share a model object). ``backend(loaded, bank)`` builds the
    generation backends of an arm once its bank exists (bank None for the frozen arm; default:
    ``make_backend(config.backend, ...)``, the same kind for scoring and learning in every arm:
    arms are compared answer by answer, so they must share numerics). ``embedder`` overrides
    ``config.embedder``. ``stop`` (a StopFlag) ends the run after the running node; call again
    with ``resume=True`` to continue. ``problems`` replaces the draw from the config's data
    (``prepare_problems(config)``); holdout sets are checked disjoint either way. ``on_status``
    is told the precision and backend chosen, one line each. ``any_machine`` lets a resume go on
    on another kind of machine than the one that ran the evaluation (``prepare_eval_dir``).
    """
    run_dir = Path(run_dir)
    begin = time.perf_counter()
    sets = problems if problems is not None else prepare_problems(config)
    if config.protocol == "holdout":
        check_disjoint(sets.learn, sets.scored)
    elif [p.id for p in sets.learn] != [p.id for p in sets.scored]:
        raise DataError(f"protocol {config.protocol} learns on the scored problems themselves: learn must equal scored")
    precision, code_versions, machines = prepare_eval_dir(run_dir, config, sets, resume, any_machine)
    status = on_status or (lambda _line: None)
    status(f"precision: {precision.used} ({precision.requested}: {precision.reason})")
    status(f"backend: {config.backend} for every arm's scoring and learning "
           "(each arm's exact backend is recorded in report.json and report.md)")
    if on_progress is not None:
        on_progress(EvalProgress("", "loading", 0, 1))
    run = ArmRunner(config, run_dir, sets, precision, embedder if embedder is not None else make_embedder(config.embedder),
                    loader=loader, backend=backend, on_progress=on_progress, stop=stop)

    arms: dict[str, ArmResult] = {}
    extra: dict = {"precision": precision.to_dict(), "code_versions": code_versions, "machines": machines}

    def once(arm: str, compute):
        """An arm computed, or read back when an earlier process of this evaluation finished it."""
        done = finished_arm(run_dir, arm) if resume else None
        if done is not None:
            log.info("%s arm: finished earlier, read from %s", arm, result_path(run_dir, arm))
            return done
        result, states = compute()
        result.code = code_versions[-1]  # this process's code, as eval.json lists it (with every one that ran)
        result.machine = machines[-1]  # and the machine
        save_arm(run_dir, result, states)
        gc.collect()  # each arm loads its own model: free the last one before the next loads
        return result, states

    frozen_pool, _ = once("frozen", lambda: (run.frozen(sets.scored), None))
    scored = sets.scored
    if config.protocol == "recovery":
        extra["recovery_pool"] = keep_failed(frozen_pool)
        failed = {s.id for s in frozen_pool.scores}
        scored = [p for p in sets.scored if p.id in failed]
        log.info("recovery: the frozen model failed %d of %d problems; those are re-scored", len(failed), len(sets.scored))
    arms["frozen"] = frozen_pool
    if "vote" in config.arms:
        arms["vote"], _ = once("vote", lambda: (run.vote(scored), None))

    states_by_arm: dict[str, list[dict]] = {}
    for arm in (a for a in config.arms if a in LOOP_ARMS):
        arms[arm], states_by_arm[arm] = once(arm, lambda arm=arm: run.loop_arm(arm, scored, resume))
    if "single-lora" in config.arms:
        missing = [u for s in states_by_arm["adapters"] for u in s.get("updates") or [] if "texts" not in u]
        if missing:
            raise RunDirError("the adapters arm's updates carry no training texts (made by an older version); "
                              "run the evaluation in a new --run-dir")
        bursts = update_bursts(states_by_arm["adapters"])
        arms["single-lora"], _ = once("single-lora", lambda: (run.single_lora(bursts, scored), None))

    comparisons, vs_vote = compare_arms(arms)
    if "vote" in arms:
        extra["vs_vote"] = vs_vote
    report = EvalReport(
        protocol=config.protocol,
        protocol_note=PROTOCOL_NOTES[config.protocol],
        config=config.to_dict(),
        items=[{"id": p.id, "question": p.question, "label": p.label} for p in scored],
        learn_ids=[p.id for p in sets.learn],
        arms=arms,
        comparisons=comparisons,
        leak_check=leak_check(scored, states_by_arm) if config.protocol == "holdout" else {"not_applicable": config.protocol},
        run_dir=str(run_dir),
        seconds=time.perf_counter() - begin,
        extra=extra,
        data_sources=sets.sources,
    )
    write_report(report, run_dir, plots=config.plots)
    return report


def run_evaluation(config: EvalConfig, run_dir: str | Path, *, resume: bool = False, threads: int = 0,
                   on_status: Callable[[str], None] | None = None,
                   on_progress: Callable[[EvalProgress], None] | None = None, stop: StopFlag | None = None,
                   any_machine: bool = False) -> EvalReport:
    """What the ``eval`` and ``demo`` commands run: the problems (each data source told to ``on_status``),
    the folder's lock (before any model loads: a second process on the folder is refused at once),
    the torch threads, then ``evaluate``."""
    status = on_status or (lambda _line: None)
    problems = prepare_problems(config, on_source=lambda source: status(f"data: {source.describe()}"))
    lock = claim_run_dir(Path(run_dir))
    try:
        set_threads(threads)
        return evaluate(config, run_dir, resume=resume, on_progress=on_progress, stop=stop, problems=problems,
                        on_status=status, any_machine=any_machine)
    finally:
        lock.release()
