"""Command line for the self-improvement loop. Commands stay thin: they parse options and call the library.

Data goes to stdout, status and errors to stderr.
"""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.errors import SelfImproveError
from agents.models import DEFAULT_MODEL, list_models

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


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="Model spec: an alias, a folder, a .gguf file or a hub id.")] = DEFAULT_MODEL,
    eval_problems: Annotated[int, typer.Option(help="Test-split problems scored before and after.")] = 3,
    learn_problems: Annotated[int, typer.Option(help="Train-split solutions the expert is trained on.")] = 2,
    steps: Annotated[int, typer.Option(help="Optimizer steps in the update.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Generation cap per answer.")] = 320,
    run_dir: Annotated[Path, typer.Option(help="Where the bank and demo_report.json are written.")] = Path("runs/demo"),
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: torch's default).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON to stdout.")] = False,
) -> None:
    """Solve a few GSM8K test problems, train one LoRA expert on train-split solutions, solve again.

    Learning and scored problems come from disjoint splits (protocol 'holdout'). A handful of
    problems and steps shows the machinery on a real model; it does not measure a gain.

    Example: python run_loop.py demo --eval-problems 3 --learn-problems 2
    """
    import torch

    from agents.demo import DemoConfig, run_demo

    if threads < 0:
        raise _fail(ValueError(f"--threads must be >= 0, got {threads}"))
    if threads:
        torch.set_num_threads(threads)
    err_console = Console(stderr=True, soft_wrap=True)
    try:
        config = DemoConfig(
            model=model, eval_problems=eval_problems, learn_problems=learn_problems, steps=steps,
            max_new_tokens=max_new_tokens, run_dir=run_dir,
        )
        report = run_demo(config, status=lambda msg: err_console.print(msg, markup=False, highlight=False))
    except (SelfImproveError, ValueError) as err:
        raise _fail(err) from err
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2))
        return
    table = Table(title=f"demo on {report.model}: {report.protocol}")
    for column in ("problem", "label", "before", "after"):
        table.add_column(column)
    for b, a in zip(report.before, report.after):
        mark = lambda r: f"{r.answer} ({'right' if r.correct else 'wrong'}, {r.strategy})"  # noqa: E731
        table.add_row(b.problem_id, b.label, mark(b), mark(a))
    Console().print(table)
    u = report.update
    typer.echo(
        f"accuracy {report.accuracy('before'):.2f} -> {report.accuracy('after'):.2f} on {len(report.before)} problems; "
        f"update mode {u['mode']} (phi {u['phi']:.2f}), expert {u['expert']}, "
        f"loss {u['loss_before']:.3f} -> {u['loss_after']:.3f}; written to {run_dir}"
    )


@app.command()
def run(
    data: Annotated[str, typer.Option(help="Problems: 'train', 'test' (the GSM8K files) or a JSON-lines path.")] = "train",
    episodes: Annotated[int, typer.Option(help="Problems to run, from the start of the data.")] = 10,
    cycles: Annotated[int, typer.Option(help="Reflect/update rounds per failed problem.")] = 2,
    label_free: Annotated[bool, typer.Option("--label-free", help="Verify by agreement of sampled answers, not labels.")] = False,
    model: Annotated[str, typer.Option(help="Model spec: an alias, a folder, a .gguf file or a hub id.")] = DEFAULT_MODEL,
    run_dir: Annotated[Path, typer.Option(help="Run directory: checkpoints, bank, memory, events.jsonl.")] = Path("runs/loop"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir where it stopped.")] = False,
    memory_url: Annotated[Optional[str], typer.Option(help="A Chroma server URL to share memory (default: embedded).")] = None,
    embedder: Annotated[str, typer.Option(help="'minilm' (all-MiniLM-L6-v2) or 'hash' (deterministic, for tests).")] = "minilm",
    max_new_tokens: Annotated[int, typer.Option(help="Generation cap per answer.")] = 384,
    seed: Annotated[int, typer.Option(help="Seeds sampling and expert choice.")] = 0,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: torch's default).")] = 0,
) -> None:
    """Run the self-improvement loop over a stream of problems, resumably.

    Each problem: solve, verify; when wrong, reflect a rule, diversify it into training texts,
    update the expert bank, re-evaluate (with a canary regression check); commit to memory.
    Ctrl-C stops after the running node; --resume continues from there.

    Example: python run_loop.py run --data train --episodes 5 --run-dir runs/first
    """
    from agents.gsm8k import iter_problems, resolve_path
    from agents.models import load_model
    from agents.solver import SolverConfig
    from graph.context import LoopConfig
    from graph.runner import RunSettings, StopFlag, build_context, prepare_run_dir, problem_data, run_episodes, set_threads
    from memory_store.embedding import HashEmbedding, MiniLMEmbedding

    err = Console(stderr=True, soft_wrap=True)
    if embedder not in ("minilm", "hash"):
        raise _fail(ValueError(f"--embedder must be 'minilm' or 'hash', got {embedder!r}"))
    if episodes < 1:
        raise _fail(ValueError(f"--episodes must be >= 1, got {episodes}"))
    set_threads(threads)
    try:
        settings = RunSettings(
            model=model, data=data, episodes=episodes,
            loop=LoopConfig(cycles=cycles, label_free=label_free, seed=seed),
            solver=SolverConfig(max_new_tokens=max_new_tokens),
            memory_url=memory_url,
        )
        resolve_path(data)  # fail before anything is written
        loaded = load_model(model)
        prepare_run_dir(run_dir, settings, resume)
        problems = (problem_data(p, learning=True, label_free=label_free) for p in islice(iter_problems(data), episodes))
        ctx = build_context(loaded, settings, run_dir, embedder=HashEmbedding(dim=384) if embedder == "hash" else MiniLMEmbedding())
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    err.print(f"backend: {ctx.backend.name}; model {model} on {loaded.device} ({loaded.dtype}); run dir {run_dir}",
              markup=False, highlight=False)
    stop = StopFlag()

    def on_interrupt(*_) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C aborts at once
        err.print("stopping after the running node finishes (Ctrl-C again to abort now)", markup=False)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    done = {"n": 0, "first": 0, "final": 0}
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err) as progress:
            task = progress.add_task("starting", total=episodes)

            def on_event(event) -> None:
                phi = f"{ctx.trainer.stress.phi:.2f}"
                mode = ctx.trainer.stress.decide().mode.value
                acc = f"{done['final']}/{done['n']}" if done["n"] else "-"
                progress.update(task, description=f"episode {event.episode + 1} {event.node:<10} right {acc} phi {phi} {mode}")

            for final in run_episodes(ctx, problems, run_dir=run_dir, on_event=on_event, stop=stop):
                done["n"] += 1
                done["first"] += int(final["first"]["correct"])
                done["final"] += int(final["outcome"] in ("correct", "fixed"))
                progress.update(task, completed=done["n"])
    except SelfImproveError as error:
        raise _fail(error) from error
    finally:
        signal.signal(signal.SIGINT, previous)
        if ctx.memory is not None:
            ctx.memory.close()
    if stop:
        err.print(f"stopped after a finished node; resume with: python run_loop.py run --run-dir {run_dir} "
                  f"--data {data} --episodes {episodes} --model {model} --resume", markup=False, highlight=False)
        raise typer.Exit(130)
    typer.echo(json.dumps({
        "episodes": done["n"],
        # Scored before the loop learned from each problem: online accuracy.
        "stream_right_first_try": done["first"],
        # Re-scored after learning on the same problem: plasticity, not generalisation.
        "recovery_right_at_end": done["final"],
        "protocols": {"stream_right_first_try": "stream", "recovery_right_at_end": "recovery"},
        "run_dir": str(run_dir),
    }))


if __name__ == "__main__":
    app()
