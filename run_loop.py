"""Command line for the self-improvement loop. Commands stay thin: they parse options and call the library.

Data goes to stdout, status and errors to stderr.
"""

from __future__ import annotations

import os

# llama.cpp shares torch's OpenMP runtime, whose threads busy-wait at every barrier. Spinning
# briefly then sleeping was fastest both alone (= full spin, 1.6x PASSIVE) and with two busy
# processes on the cores (1.3x PASSIVE, 3.7x full spin), measured here. Read when torch loads.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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

from agents.backend import DEFAULT_BATCH_SIZE
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


BACKEND_HELP = ("Generation backend: auto (= torch, the fastest measured here), torch (continuous batching in the "
                "model's own precision), or llama.cpp (the model's GGUF, expert mixtures as LoRA scales).")


def _check_backend(name: str) -> None:
    from agents.backend import BACKENDS

    if name not in BACKENDS:
        raise _fail(ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}"))


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
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "auto",
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
    _check_backend(backend)
    set_threads(threads)
    try:
        settings = RunSettings(
            model=model, data=data, episodes=episodes,
            loop=LoopConfig(cycles=cycles, label_free=label_free, seed=seed),
            solver=SolverConfig(max_new_tokens=max_new_tokens),
            memory_url=memory_url,
            backend=backend,
        )
        resolve_path(data)  # fail before anything is written
        loaded = load_model(model)
        prepare_run_dir(run_dir, settings, resume)
        problems = (problem_data(p, learning=True, label_free=label_free) for p in islice(iter_problems(data), episodes))
        ctx = build_context(loaded, settings, run_dir, embedder=HashEmbedding(dim=384) if embedder == "hash" else MiniLMEmbedding())
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    err.print(f"backend: {ctx.backend.description}; model {model} on {loaded.device} ({loaded.dtype}); run dir {run_dir}",
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


# ---------------------------------------------------------------- evaluation


def _ctrl_c_stops(stop, console: Console):
    """Install a SIGINT handler that sets stop once (a second Ctrl-C aborts); returns the previous handler."""

    def on_interrupt(*_) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)
        console.print("stopping after the running node finishes (Ctrl-C again to abort now)", markup=False)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    return previous


@app.command("eval")
def eval_command(
    protocol: Annotated[str, typer.Option(help="'holdout' (learn on --learn-data, score disjoint --eval-data), "
                                               "'stream' (online accuracy) or 'recovery' (re-score failed problems).")] = "holdout",
    arms: Annotated[str, typer.Option(help="Comma-separated arms: frozen, rules, adapters, full, single-lora; 'all' for every one. "
                                           "frozen is always scored.")] = "all",
    learn_data: Annotated[str, typer.Option(help="Learning problems (holdout): 'train', 'test', 'gsm8k:train' (hub) or a JSON-lines path.")] = "train",
    eval_data: Annotated[str, typer.Option(help="Scored problems: 'test', 'train', 'gsm8k:test' (hub) or a JSON-lines path.")] = "test",
    learn_problems: Annotated[int, typer.Option(help="Learning problems drawn from --learn-data by --seed (holdout).")] = 20,
    eval_problems: Annotated[int, typer.Option(help="Problems drawn from --eval-data by --seed.")] = 50,
    seed: Annotated[int, typer.Option(help="Draws the problems; seeds every arm's loop, bank and router.")] = 0,
    cycles: Annotated[int, typer.Option(help="Reflect/update rounds per failed learning problem.")] = 2,
    label_free: Annotated[bool, typer.Option("--label-free", help="Learn by agreement of sampled answers (scoring uses labels).")] = False,
    model: Annotated[str, typer.Option(help="Model spec: an alias, a folder, a .gguf file or a hub id.")] = DEFAULT_MODEL,
    run_dir: Annotated[Path, typer.Option(help="Evaluation directory: eval.json, report files, arms/<arm>/ run folders.")] = Path("runs/eval"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the evaluation in --run-dir where it stopped.")] = False,
    embedder: Annotated[str, typer.Option(help="'minilm' (all-MiniLM-L6-v2) or 'hash' (deterministic, for tests).")] = "minilm",
    experts: Annotated[int, typer.Option(help="Experts in each arm's bank.")] = 16,
    steps: Annotated[int, typer.Option(help="Optimizer steps per update burst.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Generation cap per answer, the same for every arm.")] = 384,
    batch_size: Annotated[int, typer.Option(help="Sequences generated together (torch and llama.cpp slots).")] = DEFAULT_BATCH_SIZE,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP + " Every arm scores and learns on this one backend.")] = "auto",
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: torch's default).")] = 0,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG plots.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON to stdout.")] = False,
) -> None:
    """Compare arms on GSM8K under one protocol; write report.json, report.md and plots to --run-dir.

    Every arm is scored on the same problems with the same greedy settings, and compared with
    the frozen model (Wilson 95% intervals, exact McNemar test, flip counts). Each learning arm
    learns in its own folder, DIR/arms/ARM, which `rules` and `export` can read.

    Example: python run_loop.py eval --learn-problems 20 --eval-problems 50 --run-dir runs/eval1
    """
    from adapters.bank import BankConfig
    from adapters.trainer import TrainerConfig
    from graph.harness import ARMS, EvalConfig, EvalInterrupted, evaluate, prepare_problems
    from graph.runner import StopFlag, set_threads

    err = Console(stderr=True, soft_wrap=True)
    if threads < 0:
        raise _fail(ValueError(f"--threads must be >= 0, got {threads}"))
    chosen = ARMS if arms.strip() == "all" else tuple(a.strip() for a in arms.split(",") if a.strip())
    try:
        config = EvalConfig(
            model=model, protocol=protocol, arms=chosen, learn_data=learn_data, eval_data=eval_data,
            learn_problems=learn_problems, eval_problems=eval_problems, seed=seed, cycles=cycles, label_free=label_free,
            max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend, embedder=embedder,
            bank=BankConfig(n_experts=experts), trainer=TrainerConfig(steps_per_update=steps), plots=plots,
        )
        problems = prepare_problems(config)  # data errors before anything is written or shown
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    set_threads(threads)
    err.print(f"backend: {config.backend} for every arm's scoring and learning "
              "(each arm's exact backend is recorded in report.json and report.md)", markup=False, highlight=False)
    stop = StopFlag()
    previous = _ctrl_c_stops(stop, err)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err) as progress:
            task = progress.add_task(f"{protocol}: loading", total=1)

            def on_progress(p) -> None:
                progress.update(task, description=f"{protocol}: {p.arm} {p.phase}", completed=p.done, total=p.total)

            report = evaluate(config, run_dir, resume=resume, on_progress=on_progress, stop=stop, problems=problems)
    except EvalInterrupted as error:
        err.print(f"{error}; resume with the same options and --resume", markup=False, highlight=False)
        raise typer.Exit(130) from error
    except (SelfImproveError, ValueError) as error:
        raise _fail(error) from error
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = report.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"GSM8K, protocol {report.protocol}: {report.protocol_note}")
    for column in ("arm", "right", "accuracy", "95% CI", "vs frozen", "w->r", "r->w", "McNemar p", "no answer", "tokens", "seconds"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, arm in summary["arms"].items():
        vs = arm.get("vs_frozen")
        low, high = arm["ci95"]
        table.add_row(
            name, f"{arm['correct']}/{arm['n']}", f"{100 * arm['accuracy']:.1f}%", f"{100 * low:.0f}-{100 * high:.0f}%",
            f"{100 * vs['delta']:+.1f}" if vs else "-", str(vs["flips"]["wrong_right"]) if vs else "-",
            str(vs["flips"]["right_wrong"]) if vs else "-", f"{vs['p_value']:.3f}" if vs else "-",
            str(arm["format_failures"]), f"{arm['tokens']:,}", f"{sum(arm['seconds'].values()):.0f}",
        )
    Console().print(table)
    typer.echo(f"report: {run_dir / 'report.md'} (protocol {report.protocol})")


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
    from graph.inspect import open_memory

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
    status: Annotated[Optional[str], typer.Option(help="Only rules with this status: new, trained, rolled_back, retired.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many rules, oldest first.")] = None,
    embedder: EmbedderOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Table of rules: id, created, expert, status, helped, hurt.

    Example: python run_loop.py rules list --run-dir runs/loop --status trained
    """
    from graph.inspect import list_rules

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
    from graph.inspect import show_rule

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
    from graph.inspect import search_rules

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
    from graph.inspect import rule_stats

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
    from graph.inspect import write_graph

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
    from graph.inspect import export_expert

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
