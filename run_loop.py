"""Command line for the self-improvement loop. Commands stay thin: they parse options and call the library.

Data goes to stdout, status and errors to stderr.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
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
    Console(stderr=True).print(f"error: {err}", markup=False, highlight=False)
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
    err_console = Console(stderr=True)
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


if __name__ == "__main__":
    app()
