"""Command line for the self-improvement loop. Commands stay thin: they parse options and call the library.

Data goes to stdout, status and errors to stderr. The file is longer than most modules here
because every command declares its options, with their help texts, in its signature; each
command's body is options in, one library call (``LoopRun``, ``run_evaluation``, the
``graph.inspection`` queries), output out.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Nothing imported at the top may import torch or transformers: `--help` and the inspection
# commands stay fast. Each command imports the library it calls.
from agents.errors import SelfImproveError
from agents.lm.models import DEFAULT_MODEL
from agents.lm.openmp import bounded_openmp_wait

app = typer.Typer(
    help="Test-time self-improvement for frozen causal language models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")] = False,
) -> None:
    """Test-time self-improvement for frozen causal language models.

    Example: python run_loop.py models
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


BACKEND_HELP = ("Generation backend: auto (= torch; bench/bench_generation.py compares them), torch (continuous "
                "batching in the model's own precision), or llama.cpp (the model's GGUF, expert mixtures as LoRA "
                "scales). Default: auto.")


def _check_threads(threads: int) -> None:
    if threads < 0:
        raise _fail(ValueError(f"--threads must be >= 0, got {threads}"))


def _fail(err: Exception) -> typer.Exit:
    """One unwrapped line on stderr, then exit code 1."""
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list to stdout instead of a table.")] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Model cache folder. Default: $SELFIMPROVE_CACHE, else ~/.cache/selfimprove."),
    ] = None,
) -> None:
    """List the model aliases, and whether each can be loaded offline on this machine.

    Example: python run_loop.py models --json
    """
    from agents.lm.models import list_models

    try:
        infos = list_models(cache_dir)
    except SelfImproveError as err:
        raise _fail(err) from err
    if as_json:
        typer.echo(json.dumps([asdict(info) for info in infos], indent=2))
        return
    table = Table(title="Models")
    table.add_column("alias", no_wrap=True)
    table.add_column("description", overflow="fold")
    table.add_column("offline", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("note", overflow="fold")
    for info in infos:
        size = "-" if info.size_bytes is None else f"{info.size_bytes / 2**20:,.0f} MiB"
        table.add_row(info.alias, info.description, "yes" if info.available else "no", size, info.note)
    Console().print(table)


def _status(console: Console, message: str) -> None:
    console.print(message, markup=False, highlight=False)


class _Live:
    """Live progress on stderr and Ctrl-C handling for a long command: the first Ctrl-C sets ``stop``
    (the library ends after the running node), the second aborts. The bar appears at the first
    ``update``: lines before it (data sources, or an error in them) print alone."""

    def __init__(self, console: Console, description: str):
        from graph.episodes import StopFlag

        self.console, self.stop = console, StopFlag()
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                  TimeElapsedColumn(), console=console)
        self._task = self._progress.add_task(description, total=1)
        self._started = False

    def update(self, description: str | None = None, done: int | None = None, total: int | None = None) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        self._progress.update(self._task, description=description, completed=done, total=total)

    def line(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def _on_interrupt(self, *_) -> None:
        self.stop.set()
        # Not the previous handler: a process started in the background inherits SIGINT ignored,
        # and the second Ctrl-C would then do nothing.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.console.print("stopping after the running node finishes (Ctrl-C again to abort now)", markup=False)

    def __enter__(self) -> _Live:
        self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._progress.stop()
        signal.signal(signal.SIGINT, self._previous)


ModelOption = Annotated[Optional[str], typer.Option(
    help=f"Model spec: an alias, a folder, a .gguf file or a hub id. Default: {DEFAULT_MODEL}.")]
ThreadsOption = Annotated[int, typer.Option(help="Torch CPU threads (0: torch's default). Not saved with the run.")]
RESUME_NOTE = "On --resume every setting is read from --run-dir; an option given again must match it."
AnyMachineOption = Annotated[bool, typer.Option(
    "--any-machine", help="With --resume: go on although this is another kind of machine (CPU, its features, GPU or "
                          "torch) than the one the evaluation ran on; the report then says which arm ran where.")]
RoundSizeOption = Annotated[Optional[int], typer.Option(
    help="Learning episodes that sample together from the same bank, their generation calls pooled; each then "
         "trains in turn. 1: every episode sees all learning before it. Default: 8.")]
SamplesOption = Annotated[Optional[int], typer.Option(
    help="Sampled answers per problem besides the greedy one: verification, rule validation, the vote arm. Default: 6.")]
TrainSourcesOption = Annotated[Optional[str], typer.Option(
    help="Comma-separated verified texts that reach the gradient: own_sample, rule_conditioned, variant, "
         "rationalization (default: all), e.g. for a per-source ablation.")]
RoundGateOption = Annotated[Optional[bool], typer.Option(
    "--round-gate/--episode-gate",
    help="--round-gate (default): a round's updates run in turn, then their re-evaluations and one shared canary "
         "check go to the model as one call, and a broken canary undoes the round's updates together. "
         "--episode-gate: each update is re-evaluated and gated alone.")]
PoolUpdatesOption = Annotated[Optional[bool], typer.Option(
    "--pool-updates/--update-each",
    help="--pool-updates (needs the round gate): one update per round on the verified texts of all its episodes "
         "that learn, instead of one per episode (--update-each, default).")]
CanaryAlphaOption = Annotated[Optional[float], typer.Option(
    help="The binomial canary test's level: an update is rolled back when its canary breaks are less likely "
         "than this by chance. Default: 0.05.")]
CanaryTestOption = Annotated[Optional[str], typer.Option(
    help="How a broken canary is judged: 'margin' (default: accuracy may drop by the margin) or 'binomial' "
         "(undone only when that many breaks are unlikely by chance, given how many of each canary "
         "problem's samples were right at its first try).")]
PrecisionOption = Annotated[Optional[str], typer.Option(
    help="Frozen weights: auto (default: bfloat16 on CUDA; on CPU what a cached calibration measures faster), "
         "float32, bfloat16, or int8 (CPU: float32 weights decoded through 8-bit copies). Adapters stay float32.")]


def _sources(option: str | None) -> tuple[str, ...] | None:
    """--train-sources as a tuple of sources, or None when not given; a bad one is a one-line error naming the flag."""
    if option is None:
        return None
    from agents.trajectories import chosen_sources

    try:
        return chosen_sources(s.strip() for s in option.split(",") if s.strip())
    except ValueError as error:
        raise _fail(ValueError(f"--train-sources {option!r}: {error}")) from None


@app.command()
def run(
    data: Annotated[Optional[str], typer.Option(help="Problems: 'train', 'test' (GSM8K: $SELFIMPROVE_GSM8K, the hub "
                                                     "or the bundled sample) or a JSON-lines path. Default: train.")] = None,
    episodes: Annotated[Optional[int], typer.Option(help="Problems to run, from the start of the data. Default: 10.")] = None,
    cycles: Annotated[Optional[int], typer.Option(help="Reflect/update rounds per failed problem. Default: 2.")] = None,
    label_free: Annotated[Optional[bool], typer.Option(
        "--label-free/--with-labels", help="Verify by agreement of sampled answers, not labels. Default: with labels.")] = None,
    model: ModelOption = None,
    run_dir: Annotated[Path, typer.Option(help="Run directory: checkpoints, bank, memory, events.jsonl.")] = Path("runs/loop"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir where it stopped. " + RESUME_NOTE)] = False,
    memory_url: Annotated[Optional[str], typer.Option(help="A Chroma server URL to share memory (default: embedded).")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="'minilm' (all-MiniLM-L6-v2, default) or 'hash' (deterministic, for tests).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation cap per answer. Default: 384.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seeds sampling and expert choice. Default: 0.")] = None,
    threads: ThreadsOption = 0,
    backend: Annotated[Optional[str], typer.Option(help=BACKEND_HELP)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences generated together. Default: 64.")] = None,
    precision: PrecisionOption = None,
    samples: SamplesOption = None,
    round_size: RoundSizeOption = None,
    train_sources: TrainSourcesOption = None,
    round_gate: RoundGateOption = None,
    pool_updates: PoolUpdatesOption = None,
    canary_test: CanaryTestOption = None,
    canary_alpha: CanaryAlphaOption = None,
) -> None:
    """Run the self-improvement loop over a stream of problems, resumably.

    Each problem: solve, verify; when wrong, reflect a rule, diversify it into training texts,
    update the expert bank, re-evaluate (with a canary regression check); commit to memory.
    Ctrl-C stops after the running node; `--run-dir DIR --resume` continues from there.

    Example: python run_loop.py run --data train --episodes 5 --run-dir runs/first
    """
    bounded_openmp_wait()  # before torch loads
    from graph.episodes import describe_episode
    from graph.loop_run import LoopRun

    err = Console(stderr=True, soft_wrap=True)
    _check_threads(threads)
    options = {
        "model": model, "data": data, "episodes": episodes, "loop.cycles": cycles, "loop.label_free": label_free,
        "loop.seed": seed, "solver.max_new_tokens": max_new_tokens, "memory_url": memory_url, "backend": backend,
        "batch_size": batch_size, "embedder": embedder, "precision": precision, "verifier.samples": samples,
        "round_size": round_size, "loop.train_sources": _sources(train_sources), "loop.round_gate": round_gate,
        "loop.canary_test": canary_test, "loop.canary_alpha": canary_alpha, "loop.pool_updates": pool_updates,
    }
    try:
        loop = LoopRun.setup(run_dir, resume, options, threads=threads, on_status=lambda line: _status(err, line))
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    try:
        with loop, _Live(err, "starting") as live:
            trainer, total = loop.ctx.trainer, len(loop.problems)
            live.update("starting", 0, total)

            def on_event(event) -> None:
                n = loop.episodes_done
                right = f"{loop.right_at_end}/{n}" if n else "-"
                live.update(f"episode {event.episode + 1} {event.node:<10} right {right} phi {trainer.stress.phi:.2f} "
                            f"{trainer.stress.decide().mode.value}", n, total)

            for final in loop.episodes(stop=live.stop, on_event=on_event):
                live.update(done=loop.episodes_done)
                live.line(f"episode {loop.episodes_done}/{total}: {describe_episode(final)}")
    except SelfImproveError as error:
        raise _fail(error) from error
    if live.stop:
        _status(err, f"stopped after a finished node; resume with: python run_loop.py run --run-dir {run_dir} --resume")
        raise typer.Exit(130)
    typer.echo(json.dumps(loop.summary()))


# ---------------------------------------------------------------- evaluation


def _evaluate_with_progress(config, run_dir: Path, resume: bool, threads: int, err: Console, any_machine: bool = False):
    """The evaluation with live progress; its report."""
    from graph.evaluation.config import EvalInterrupted
    from graph.evaluation.harness import run_evaluation

    try:
        with _Live(err, f"{config.protocol}: loading") as live:

            def on_progress(p) -> None:
                what = " ".join(part for part in (p.arm, p.phase, p.detail) if part)
                live.update(f"{config.protocol}: {what}", p.done, p.total)
                if p.finished:
                    live.line(p.finished)

            return run_evaluation(config, run_dir, resume=resume, threads=threads, on_status=live.line,
                                  on_progress=on_progress, stop=live.stop, any_machine=any_machine)
    except EvalInterrupted as error:
        command = "demo" if config.arms == ("frozen", "full") else "eval"
        _status(err, f"{error}; resume with: python run_loop.py {command} --run-dir {run_dir} --resume")
        raise typer.Exit(130) from error
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error


@app.command("eval")
def eval_command(
    protocol: Annotated[Optional[str], typer.Option(help="'holdout' (default: learn on --learn-data, score disjoint --eval-data), "
                                                        "'stream' (online accuracy) or 'recovery' (re-score failed problems).")] = None,
    arms: Annotated[Optional[str], typer.Option(help="Comma-separated arms: frozen, vote, rules, adapters, full, single-lora; "
                                                    "'all' (default) for every one. frozen is always scored.")] = None,
    learn_data: Annotated[Optional[str], typer.Option(help="Learning problems (holdout): 'train' (default), 'test', "
                                                          "'gsm8k:train' (hub only) or a JSON-lines path.")] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="Scored problems: 'test' (default), 'train', 'gsm8k:test' "
                                                         "(hub only) or a JSON-lines path.")] = None,
    learn_problems: Annotated[Optional[int], typer.Option(help="Learning problems drawn by --seed (holdout). Default: 20.")] = None,
    eval_problems: Annotated[Optional[int], typer.Option(help="Problems drawn from --eval-data by --seed. Default: 50.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Draws the problems; seeds every arm's loop, bank and router. Default: 0.")] = None,
    cycles: Annotated[Optional[int], typer.Option(help="Reflect/update rounds per failed learning problem. Default: 2.")] = None,
    label_free: Annotated[Optional[bool], typer.Option(
        "--label-free/--with-labels", help="Learn by agreement of sampled answers (scoring uses labels).")] = None,
    model: ModelOption = None,
    run_dir: Annotated[Path, typer.Option(help="Evaluation directory: eval.json, report files, arms/<arm>/ run folders.")] = Path("runs/eval"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the evaluation in --run-dir where it stopped. " + RESUME_NOTE)] = False,
    any_machine: AnyMachineOption = False,
    embedder: Annotated[Optional[str], typer.Option(help="'minilm' (all-MiniLM-L6-v2, default) or 'hash' (deterministic, for tests).")] = None,
    experts: Annotated[Optional[int], typer.Option(help="Experts in each arm's bank. Default: 16.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps per update burst. Default: 3.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation cap per answer, the same for every arm. Default: 384.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences generated together. Default: 64.")] = None,
    backend: Annotated[Optional[str], typer.Option(help=BACKEND_HELP + " Every arm scores and learns on this one backend.")] = None,
    threads: ThreadsOption = 0,
    plots: Annotated[Optional[bool], typer.Option("--plots/--no-plots", help="Write the PNG plots (default: yes).")] = None,
    precision: PrecisionOption = None,
    samples: SamplesOption = None,
    round_size: RoundSizeOption = None,
    train_sources: TrainSourcesOption = None,
    round_gate: RoundGateOption = None,
    pool_updates: PoolUpdatesOption = None,
    canary_size: Annotated[Optional[int], typer.Option(
        help="Learning problems solved at the first try that every update is checked against. Default: 4.")] = None,
    canary_margin: Annotated[Optional[float], typer.Option(
        help="Drop in canary accuracy (0-1) an update may cause before it is rolled back (--canary-test margin). "
             "Default: 0.")] = None,
    canary_test: CanaryTestOption = None,
    canary_alpha: CanaryAlphaOption = None,
    stress_scale: Annotated[Optional[float], typer.Option(
        help="The stress controller's loss scale: phi = L/(L + scale) for the loss EMA L; below 0.3 an update trains "
             "the shared expert, above 0.7 it is guarded (Mirror). Default: 1.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON to stdout.")] = False,
) -> None:
    """Compare arms on GSM8K under one protocol; write report.json, report.md and plots to --run-dir.

    Every arm is scored on the same problems with the same greedy settings, and compared with
    the frozen model (Wilson 95% intervals, exact McNemar test, flip counts). Each learning arm
    learns in its own folder, DIR/arms/ARM, which `rules` and `export` can read.

    Example: python run_loop.py eval --learn-problems 20 --eval-problems 50 --run-dir runs/eval1
    """
    bounded_openmp_wait()  # before torch loads
    from graph.evaluation.config import ARMS, eval_config

    err = Console(stderr=True, soft_wrap=True)
    _check_threads(threads)
    chosen = None if arms is None else (
        ARMS if arms.strip() == "all" else tuple(a.strip() for a in arms.split(",") if a.strip()))
    options = {
        "model": model, "protocol": protocol, "arms": chosen, "learn_data": learn_data, "eval_data": eval_data,
        "learn_problems": learn_problems, "eval_problems": eval_problems, "seed": seed, "cycles": cycles,
        "label_free": label_free, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "backend": backend,
        "embedder": embedder, "bank.n_experts": experts, "trainer.steps_per_update": steps, "plots": plots,
        "precision": precision, "verifier.samples": samples, "round_size": round_size,
        "canary_size": canary_size, "canary_margin": canary_margin, "stress.loss_scale": stress_scale,
        "train_sources": _sources(train_sources), "round_gate": round_gate, "canary_test": canary_test,
        "canary_alpha": canary_alpha, "pool_updates": pool_updates,
    }
    try:
        config = eval_config(run_dir, resume, options)
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    report = _evaluate_with_progress(config, run_dir, resume, threads, err, any_machine)
    summary = report.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _wide_console().print(_arm_table(summary, f"GSM8K, protocol {report.protocol}: {report.protocol_note}"))
    typer.echo(f"report: {run_dir / 'report.md'} (protocol {report.protocol})")


def _wide_console() -> Console:
    """A console for the arm table: a file or pipe gets all 13 columns unclipped (rich's default is 80)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _arm_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("arm", "right", "accuracy", "95% CI", "vs frozen", "w->r", "r->w", "McNemar p", "vs vote", "p vs vote",
                   "no answer", "tokens", "seconds"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, arm in summary["arms"].items():
        vs, vv = arm.get("vs_frozen"), arm.get("vs_vote")
        low, high = arm["ci95"]
        table.add_row(
            name, f"{arm['correct']}/{arm['n']}", f"{100 * arm['accuracy']:.1f}%", f"{100 * low:.0f}-{100 * high:.0f}%",
            f"{100 * vs['delta']:+.1f}" if vs else "-", str(vs["flips"]["wrong_right"]) if vs else "-",
            str(vs["flips"]["right_wrong"]) if vs else "-", f"{vs['p_value']:.3f}" if vs else "-",
            f"{100 * vv['delta']:+.1f}" if vv else "-", f"{vv['p_value']:.3f}" if vv else "-",
            str(arm["format_failures"]), f"{arm['tokens']:,}", f"{sum(arm['seconds'].values()):.0f}",
        )
    return table


def _learning_table(learning: dict[str, dict], title: str) -> Table:
    """What each learning arm's episodes did: the report's learning table turned on its side (a
    column per arm), so that its eleven counts fit a terminal."""
    from graph.evaluation.learning import LEARNING_COLUMNS, learning_cells

    table = Table(title=title)
    table.add_column("")
    for name in learning:
        table.add_column(name, justify="right")
    cells = [learning_cells(l) for l in learning.values()]
    for index, what in enumerate(LEARNING_COLUMNS):
        table.add_row(what, *(arm_cells[index] for arm_cells in cells))
    return table


@app.command("eval-status")
def eval_status_command(
    run_dir: Annotated[Path, typer.Option(help="The evaluation directory (eval.json, arms/<arm>/).")] = Path("runs/eval"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON to stdout.")] = False,
) -> None:
    """Where an evaluation stands: its finished arms compared so far, and how far the others got.

    Reads the evaluation's files only, loading no model, so it is safe while the evaluation runs
    (a long one is resumed in parts; its report is written when every arm is done).

    Example: python run_loop.py eval-status --run-dir runs/eval1
    """
    from graph.evaluation.status import evaluation_status

    try:
        status = evaluation_status(run_dir)
    except SelfImproveError as error:
        raise _fail(error) from error
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    precision = (status["precision"] or {}).get("used", "not recorded")
    title = (f"{run_dir}: protocol {status['protocol']}, {status['model']}, {precision}, "
             f"{status['n_scored']} scored / {status['n_learn']} learning problems")
    if status["arms"]:
        _wide_console().print(_arm_table(status, title))
    else:
        typer.echo(f"{title}: no arm finished yet")
    if "recovery_pool" in status:
        pool = status["recovery_pool"]
        typer.echo(f"recovery: the frozen model failed {pool['rescored_failed']} of {pool['n']}; those are re-scored")
    for arm, progress in status["pending"].items():
        done = [f"{progress['episodes_committed']}/{progress['episodes']} learning episodes"] if "episodes" in progress else []
        scored = progress["problems_scored"]
        done.append("scoring progress not kept on disk" if scored is None else f"{scored}/{status['n_scored']} problems scored")
        if progress.get("damaged_event_lines"):
            done.append(f"{progress['damaged_event_lines']} event lines cut short")
        typer.echo(f"{arm}: not finished ({', '.join(done)}; {_time_left(progress['seconds_left_estimate'])})")
    learning = {arm: summary["learning"] for arm, summary in status["arms"].items() if "learning" in summary}
    learning |= {f"{arm} (so far)": progress["learning"] for arm, progress in status["pending"].items()
                 if "learning" in progress}
    if learning:
        _wide_console().print(_learning_table(learning, "learning episodes"))
    if len(status["code_versions"]) > 1:
        typer.echo(f"code versions that ran it: {' -> '.join(status['code_versions'])}")
    if status["pending"] and status["seconds_left_estimate"] is not None:
        typer.echo(f"in all: {_time_left(status['seconds_left_estimate'])}, at the rates this evaluation has run "
                   "so far (wall times vary with the machine and what else runs on it)")


def _time_left(seconds: float | None) -> str:
    if seconds is None:
        return "time left not known yet"
    return f"about {seconds / 3600:.1f} h left" if seconds >= 3600 else f"about {seconds / 60:.0f} min left"


# ---------------------------------------------------------------- the demo


def _fresh_dir(base: Path) -> Path:
    """base, or base-2, base-3, ... : the first that does not exist yet."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


@app.command()
def demo(
    model: ModelOption = None,
    learn_problems: Annotated[Optional[int], typer.Option(help="Train-split problems the loop learns from. Default: 2.")] = None,
    eval_problems: Annotated[Optional[int], typer.Option(help="Held-out test-split problems scored before and after. Default: 10.")] = None,
    cycles: Annotated[Optional[int], typer.Option(help="Reflect/update rounds per failed problem. Default: 1.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation cap per answer. Default: 320.")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="'minilm' (default) or 'hash' (deterministic, for tests).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Where the run goes. Default: runs/demo, or runs/demo-N if that exists.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the demo in --run-dir where it stopped. " + RESUME_NOTE)] = False,
    any_machine: AnyMachineOption = False,
    threads: ThreadsOption = 0,
    precision: PrecisionOption = None,
    samples: Annotated[Optional[int], typer.Option(help="Sampled answers per learning problem (verify, validate). Default: 4.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON to stdout.")] = False,
) -> None:
    """The self-improvement loop, short: score held-out problems, learn on a few others, score them again.

    1. before: the frozen model scores a few held-out GSM8K test problems;
    2. the LangGraph loop runs over a few train-split problems (solve, verify, reflect,
       diversify, update, reevaluate, commit) with live progress;
    3. after: the same held-out problems are scored with the learned rules and experts.
    Learning and scored problems are disjoint (protocol 'holdout'). So few problems show the
    loop at work on a real model; they cannot measure a gain (see `eval` for that).

    Example: python run_loop.py demo --learn-problems 3 --eval-problems 10
    """
    bounded_openmp_wait()  # before torch loads
    from graph.evaluation.config import eval_config

    err = Console(stderr=True, soft_wrap=True)
    _check_threads(threads)
    if resume and run_dir is None:
        raise _fail(ValueError("--resume needs the --run-dir of the demo to continue"))
    run_dir = run_dir if run_dir is not None else _fresh_dir(Path("runs/demo"))
    defaults = {"learn_problems": 2, "eval_problems": 10, "cycles": 1, "max_new_tokens": 320, "verifier.samples": 4}
    given = {"learn_problems": learn_problems, "eval_problems": eval_problems, "cycles": cycles,
             "max_new_tokens": max_new_tokens, "verifier.samples": samples}
    options = {"model": model, "embedder": embedder, "plots": False, "precision": precision, **given}
    if not (resume and (run_dir / "eval.json").exists()):
        options.update({"protocol": "holdout", "arms": ("frozen", "full"), "learn_data": "train", "eval_data": "test",
                        **{k: v if v is not None else defaults[k] for k, v in given.items()}})
    try:
        config = eval_config(run_dir, resume, options)
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    if config.arms != ("frozen", "full"):
        raise _fail(ValueError(f"{run_dir} holds an evaluation, not a demo; resume it with `eval --run-dir {run_dir} --resume`"))
    _status(err, f"demo: the loop learns on {config.learn_problems} train problem(s), {config.eval_problems} held-out "
                 f"test problems are scored before and after; run folder {run_dir}")
    report = _evaluate_with_progress(config, run_dir, resume, threads, err, any_machine)
    summary = report.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    before, after = summary["arms"]["frozen"], summary["arms"]["full"]
    learned = report.arms["full"].learning
    flips = after["vs_frozen"]["flips"]
    arm_dir = run_dir / "arms" / "full"
    lines = [
        f"before  the frozen model: {before['correct']}/{before['n']} held-out test problems right "
        f"({before['seconds']['score']:.0f} s)",
        f"loop    {learned['episodes']} learning episodes ({after['seconds']['learn']:.0f} s): "
        f"{learned['right_first_try']} right at the first try, {learned['fixed']} fixed by learning, "
        f"{learned['unfixed']} not fixed, {learned['failed']} with nothing verified to learn from; rule candidates: "
        f"{learned['rules_validated']} validated, {learned['rules_refuted']} refuted, {learned['rules_refused']} refused; "
        f"{learned['updates']} update(s) on {learned['texts']} verified texts "
        f"({', '.join(f'{n} {k}' for k, n in learned['texts_by_source'].items() if n) or 'none'}), "
        f"rolled back: {learned['mirror_rollbacks']} by stress, {learned['canary_rollbacks']} by the canary, "
        f"{learned['episode_rollbacks']} whole episodes",
        f"after   rules and experts: {after['correct']}/{after['n']} right ({flips['wrong_right']} wrong->right, "
        f"{flips['right_wrong']} right->wrong; McNemar p {after['vs_frozen']['p_value']:.2f}) "
        f"({after['seconds']['score']:.0f} s)",
        f"protocol holdout: {report.protocol_note}",
        f"run folder {run_dir} (report: {run_dir / 'report.md'}; the loop's events: {arm_dir / 'events.jsonl'})",
        f"inspect its rules: python run_loop.py rules list --run-dir {arm_dir}",
    ]
    typer.echo("\n".join(lines))


# ---------------------------------------------------------------- rule inspection

rules_app = typer.Typer(
    help="Inspect a run's rules, read-only (works while a loop writes to the same run directory).",
    no_args_is_help=True,
)
app.add_typer(rules_app, name="rules")

RunDirOption = Annotated[Path, typer.Option(help="A run directory (for an evaluation: DIR/arms/ARM).")]
EmbedderOption = Annotated[str, typer.Option(help="'auto' (the one the memory was built with), 'minilm' or 'hash'.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")]


def _read_memory(run_dir: Path, embedder: str, read):
    """Open the run's memory read-only, apply read(store), close it; errors become one line."""
    from graph.inspection.rules import open_memory

    try:
        store = open_memory(run_dir, embedder)
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    try:
        return read(store)
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    finally:
        store.close()


def _rule_table(title: str, rows: list[dict], extra: tuple[str, ...] = ()) -> Table:
    table = Table(title=title)
    for column in (*extra, "id", "created", "expert", "status", "helped", "hurt", "text"):
        table.add_column(column, overflow="fold", no_wrap=column in ("id", "created"))
    for row in rows:
        table.add_row(*[("-" if row[c] is None else str(row[c])) for c in (*extra, "id", "created", "expert", "status", "helped", "hurt", "text")])
    return table


@rules_app.command("list")
def rules_list(
    run_dir: RunDirOption = Path("runs/loop"),
    expert: Annotated[Optional[int], typer.Option(help="Only rules trained into this expert.")] = None,
    status: Annotated[Optional[str], typer.Option(help="Only rules with this status: new, trained, rolled_back, retired, refuted.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many rules, oldest first.")] = None,
    embedder: EmbedderOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Table of rules: id, created, expert, status, helped, hurt.

    Example: python run_loop.py rules list --run-dir runs/loop --status trained
    """
    from graph.inspection.rules import list_rules

    rows = _read_memory(run_dir, embedder, lambda store: list_rules(store, expert=expert, status=status, limit=limit))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    Console().print(_rule_table(f"{len(rows)} rules in {run_dir}", rows))


@rules_app.command("show")
def rules_show(
    rule_id: Annotated[str, typer.Argument(help="The rule id, as `rules list` shows it.")],
    run_dir: RunDirOption = Path("runs/loop"),
    embedder: EmbedderOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """One rule's provenance: problem -> failure -> rule -> training prompts -> update -> outcome.

    Example: python run_loop.py rules show r-0123456789abcdef --run-dir runs/loop
    """
    from graph.inspection.rules import show_rule

    chain = _read_memory(run_dir, embedder, lambda store: show_rule(store, rule_id))
    if as_json:
        typer.echo(json.dumps(chain, indent=2))
        return
    rule, failure, update = chain["rule"], chain["failure"], chain["update"]
    lines = [
        f"rule     {rule['rule_id']} ({rule['status']}, expert {rule['expert']}, helped {rule['helped']}, hurt {rule['hurt']})",
        f"         {rule['text']}",
        f"problem  {chain['problem_id']}: {chain['problem_text'] or '(text not stored)'}",
        f"failure  {failure['episode_id'] if failure else '-'} (split {failure['split'] if failure else '-'}, cycle {rule['cycle']})",
        f"prompts  {len(chain['prompts'])} training prompt(s)",
        f"update   {update['update_id'] if update else '- (not trained)'}"
        + (f" into expert {update['expert']}; fixed {update['fixed'] or '-'}; broke {update['broke'] or '-'}" if update else ""),
        f"outcome  {chain['outcome']}",
    ]
    lines += [f"merged   {m['problem_id']}: {m['text']}" for m in rule["merged_from"]]
    typer.echo("\n".join(lines))


@rules_app.command("search")
def rules_search(
    text: Annotated[str, typer.Argument(help="Text to find similar rules for.")],
    run_dir: RunDirOption = Path("runs/loop"),
    k: Annotated[int, typer.Option("--k", help="How many rules to return.")] = 5,
    embedder: EmbedderOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """The rules most similar to a text, best first.

    Example: python run_loop.py rules search "units before adding" --run-dir runs/loop
    """
    from graph.inspection.rules import search_rules

    rows = _read_memory(run_dir, embedder, lambda store: search_rules(store, text, k))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    Console().print(_rule_table(f"rules nearest to {text!r}", rows, extra=("similarity",)))


@rules_app.command("stats")
def rules_stats(
    run_dir: RunDirOption = Path("runs/loop"),
    embedder: EmbedderOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Counts of rules per expert, status and outcome, and of episodes and graph nodes.

    Example: python run_loop.py rules stats --run-dir runs/loop --json
    """
    from graph.inspection.rules import rule_stats

    stats = _read_memory(run_dir, embedder, rule_stats)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    table = Table(title=f"memory of {run_dir}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key in ("n_rules", "n_episodes", "n_problems", "retrieved", "helped", "hurt", "graph_nodes", "graph_edges"):
        table.add_row(key.removeprefix("n_"), str(stats[key]))
    for group in ("rules_by_status", "rules_by_expert", "rules_by_outcome"):
        for key, value in stats[group].items():
            table.add_row(f"rules, {group.removeprefix('rules_by_')} {key}", str(value))
    Console().print(table)


@rules_app.command("graph")
def rules_graph(
    run_dir: RunDirOption = Path("runs/loop"),
    out: Annotated[Path, typer.Option(help="Output file; .html (a self-contained page) or .graphml.")] = Path("memory_graph.html"),
    fmt: Annotated[Optional[str], typer.Option("--format", help="'html' or 'graphml' (default: from --out's suffix).")] = None,
    embedder: EmbedderOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Write the memory graph (problems, rules, experts, episodes, updates) for a browser or a graph tool.

    Example: python run_loop.py rules graph --run-dir runs/loop --out graph.html
    """
    from graph.inspection.memory_graph import write_graph

    def write(store):
        path = write_graph(store, out, fmt, title=str(run_dir))
        return {"out": str(path), "format": fmt or path.suffix.lstrip(".").lower(),
                "nodes": store.graph.nx_graph.number_of_nodes(), "edges": store.graph.nx_graph.number_of_edges()}

    result = _read_memory(run_dir, embedder, write)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"wrote {result['out']} ({result['nodes']} nodes, {result['edges']} edges)")


@app.command()
def export(
    run_dir: Annotated[Optional[Path], typer.Option(help="The run directory (for an evaluation: DIR/arms/ARM). Required.")] = None,
    expert: Annotated[Optional[int], typer.Option(help="The expert to export. Required.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="The PEFT folder to write. Required.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write one expert of a run's bank as a PEFT LoRA folder (loads with peft.PeftModel).

    Example: python run_loop.py export --run-dir runs/loop --expert 3 --out runs/loop/peft-expert3
    """
    from graph.inspection.expert_export import export_expert

    for name, value in (("--run-dir", run_dir), ("--expert", expert), ("--out", out)):
        if value is None:
            raise _fail(ValueError(f"{name} is required"))
    try:
        result = export_expert(run_dir, expert, out)
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    if as_json:
        typer.echo(json.dumps(result))
        return
    note = "" if result["trained"] else " (this expert was never trained: B = 0, it adds nothing)"
    typer.echo(f"wrote expert {result['expert']} of {run_dir} to {result['out']}{note}")


if __name__ == "__main__":
    app()
