"""An evaluation's report files: report.json, report.md and PNG plots, written into the run directory.

Plots use matplotlib's object API on the Agg canvas (no pyplot state, no display needed):
accuracy per arm with Wilson 95% error bars; first-try accuracy and the stress phi(t) over
the learning episodes; and a heatmap of expert usage (mean routing weight on the scored
problems, updates per expert). Every file names the protocol its numbers come from.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from agents.files import atomic_write_bytes
from agents.trajectories import SOURCES
from graph.evaluation.learning import LEARNING_COLUMNS, learning_cells
from graph.evaluation.provenance import machine_label, same_machine
from graph.evaluation.results import ANSWER_FORMS

ARM_COLOURS = {"frozen": "#7f7f7f", "vote": "#8c564b", "rules": "#1f77b4", "adapters": "#ff7f0e", "full": "#2ca02c", "single-lora": "#9467bd"}


def write_report(report, run_dir: str | Path, *, plots: bool = True) -> dict[str, str]:
    """Write report.json, report.md (and the plots) into run_dir; returns {kind: file name}."""
    run_dir = Path(run_dir)
    files = {"json": "report.json", "markdown": "report.md"}
    if plots:
        for kind, render in (("accuracy_plot", plot_accuracy), ("learning_plot", plot_learning), ("experts_plot", plot_experts)):
            png = render(report)
            if png is not None:
                name = kind.removesuffix("_plot") + ".png"
                atomic_write_bytes(run_dir / name, png)
                files[kind] = name
    report.files = files
    atomic_write_bytes(run_dir / "report.json", json.dumps(report.to_dict(), indent=2).encode())
    atomic_write_bytes(run_dir / "report.md", render_markdown(report).encode())
    return files


# ---------------------------------------------------------------- markdown


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _canary_line(canary: dict | None) -> str:
    """An arm's canary settings in words. An arm finished before they were recorded ran the margin
    test, with settings the evaluation may have changed since for arms not yet started."""
    if canary is None:
        return "canary settings not recorded (the margin test)"
    if canary["test"] == "binomial":
        return f"canary of {canary['size']} problems, binomial test at alpha {canary['alpha']}"
    return f"canary of {canary['size']} problems, margin {canary['margin']}"


def _answer_forms(report, protocol: str) -> list[str]:
    """Per arm, how its answers gave their final number and how many hit the token cap, with how many were right."""
    cap = report.config["max_new_tokens"]
    forms = {name: arm.answer_forms(cap) for name, arm in report.arms.items()}
    forms = {name: f for name, f in forms.items() if f is not None}
    if not forms:
        return []
    cell = lambda c: f"{c['n']} ({c['right']} right)"  # noqa: E731
    lines = ["", f"## How the arms answered ({protocol})", "",
             f"| arm | 'The answer is N' | \\boxed{{N}} | #### N | last number in the text | no number | "
             f"at the {cap}-token cap |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(cell(f[form]) for form in (*ANSWER_FORMS, "at_cap")) + " |"
              for name, f in forms.items()]
    lines += ["", "Where each answer's final number was read (`agents/answers.py`: a \\boxed{} first, then the "
                  "solver's answer line, then a `####` line, else the last number in the text), and how many answers "
                  "the token cap cut off; the vote arm answers by majority and is left out. Learning can change how "
                  "answers end without changing what they compute."]
    return lines


def _machine_lines(report) -> list[str]:
    """The machines that ran the evaluation (eval.json's list), and which finished each arm when they differ."""
    machines = report.extra.get("machines") or []
    if not machines:
        return []
    changed = any(not same_machine(a, b) for a, b in zip(machines, machines[1:]))
    if not changed:
        partial = [name for name, arm in report.arms.items() if arm.machine is None]
        note = f" (arms finished before machines were recorded, named by their CPU only: {', '.join(partial)})" if partial else ""
        return [f"- machine: {machine_label(machines[-1])}{note}"]
    finished = {name: machine_label(arm.machine) if arm.machine else "not recorded" for name, arm in report.arms.items()}
    return [f"- **the machine changed while this evaluation ran**: {' -> '.join(machine_label(m) for m in machines)}; "
            "arms finished on " + "; ".join(f"{n}: {m}" for n, m in finished.items())
            + "; compare only arms made on the same machine (each rounds its products its own way)"]


def render_markdown(report) -> str:
    cfg = report.config
    protocol = report.protocol
    lines = [
        f"# GSM8K evaluation, protocol: {protocol}",
        "",
        f"**Protocol: {protocol}.** {report.protocol_note[0].upper()}{report.protocol_note[1:]}.",
        "",
        f"- model `{cfg['model']}`, seed {cfg['seed']}, greedy decoding, at most {cfg['max_new_tokens']} new tokens "
        "per answer; every arm starts from the same base model and seed",
    ]
    for what, backends in (("scored answers", {n: a.backend for n, a in report.arms.items()}),
                           ("learning", {n: a.learning["backend"] for n, a in report.arms.items() if "backend" in a.learning})):
        by_backend: dict[str, list[str]] = {}
        for name, backend in backends.items():
            by_backend.setdefault(backend or "not recorded", []).append(name)
        lines += [f"- {what} generated by ({', '.join(names)}): {backend}" for backend, names in by_backend.items()]
        if what == "scored answers" and len(by_backend) > 1:
            lines.append("- **the arms' answers come from different engines or machines**: in reduced precision each "
                         "rounds its products differently, which flips answers by itself; compare arms scored by the same one")
    versions = report.extra.get("code_versions")
    if versions:
        finished = {name: arm.code or "not recorded" for name, arm in report.arms.items()}
        if len(versions) == 1:
            lines.append(f"- code: {versions[0]}")
        else:
            lines.append(f"- **the code changed while this evaluation ran**: {' -> '.join(versions)}; arms finished by "
                         + ", ".join(f"{n}: {v}" for n, v in finished.items())
                         + "; an arm that learned or scored across a change was not made by one program")
    lines += _machine_lines(report)
    precision = report.extra.get("precision")
    if precision:
        lines.append(f"- precision of the frozen weights: {precision['used']} ({precision['requested']}: {precision['reason']})")
    learned = {name: a.learning for name, a in report.arms.items() if a.learning.get("episodes")}
    if learned:
        # Old reports lack the newer settings: each is shown at the value those runs used, the default.
        # Round size and gate are per arm: an evaluation may change them for arms not yet started.
        sources = cfg.get("train_sources") or SOURCES
        rounds = "; ".join(
            f"{name}: rounds of {rec.get('round_size', cfg.get('round_size', 1))}, "
            f"{'gated per round' if rec.get('round_gate', cfg.get('round_gate')) else 'each update gated alone'}, "
            f"{'one pooled update per round, ' if rec.get('pool_updates') else ''}"
            f"{_canary_line(rec.get('canary'))}"
            for name, rec in learned.items())
        lines.append(f"- learning settings: {cfg['cycles']} cycle(s), {cfg.get('verifier', {}).get('samples', '?')} samples "
                     f"per problem, stress loss scale {cfg.get('stress', {}).get('loss_scale', 1.0)}, "
                     f"{cfg.get('trainer', {}).get('steps_per_update', '?')} steps per update; trained on texts from: "
                     f"{', '.join(sources)}; {rounds}")
    for role, source in report.data_sources.items():
        lines.append(f"- {role} data `{source['spec']}`: {source['kind']} {source['location']} ({source['size']} problems)")
    if protocol == "holdout":
        lines.append(f"- scored: {len(report.items)} problems from `{cfg['eval_data']}`; learned on: "
                     f"{len(report.learn_ids)} problems from `{cfg['learn_data']}`, disjoint by id and normalised text")
        leak = report.leak_check
        lines.append(f"- leak check: {leak['containing_an_evaluation_question']} of {leak['rules']} rules and "
                     f"{leak['training_texts']} training texts contain an evaluation question")
    elif protocol == "stream":
        lines.append(f"- stream: {len(report.items)} problems from `{cfg['eval_data']}`, in a seeded order; each scored "
                     "at its first attempt, then learned from")
    else:
        pool = report.extra["recovery_pool"]
        lines.append(f"- learned on {pool['n']} problems from `{cfg['eval_data']}` (with their reference solutions); "
                     f"the frozen model got {pool['frozen_correct']} right; the {pool['rescored_failed']} it failed "
                     "are re-scored (frozen is 0 on them by construction)")
    lines += [
        "- 95% intervals: Wilson score; paired test against frozen: exact McNemar (two-sided) on the flips",
        "",
        f"## Accuracy per arm ({protocol})",
        "",
        "| arm | right | accuracy | 95% CI | vs frozen | wrong→right | right→wrong | McNemar p | wrong | no answer | tokens | learn s | score s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in report.arms.items():
        s = arm.summary()
        low, high = s["ci95"]
        row = [name, f"{s['correct']}/{s['n']}", _pct(s["accuracy"]), f"{_pct(low)}–{_pct(high)}"]
        if name in report.comparisons:
            c = report.comparisons[name]
            row += [f"{100 * c.delta:+.1f} pts", str(c.flips.wrong_right), str(c.flips.right_wrong), _p(c.p_value)]
        else:
            row += ["—"] * 4
        row += [str(s["wrong"]), str(s["format_failures"]), f"{s['tokens']:,}",
                f"{s['seconds']['learn']:.1f}", f"{s['seconds']['score']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "'no answer': the output held no number (an answer-format failure), counted apart from 'wrong'."]
    lines += _answer_forms(report, protocol)
    vs_vote = report.extra.get("vs_vote") or {}
    if vs_vote:
        k = report.arms["vote"].learning["samples_per_problem"]
        lines += ["", f"## Against majority voting at equal samples ({protocol})", "",
                  f"The vote arm answers with the frozen model's majority over {k} sampled answers, the number "
                  "the loop samples per learning problem: the compute-matched baseline.", "",
                  "| arm | vs vote | wrong→right | right→wrong | McNemar p |", "|---|---|---|---|---|"]
        for name, c in vs_vote.items():
            lines.append(f"| {name} | {100 * c['delta']:+.1f} pts | {c['flips']['wrong_right']} | "
                         f"{c['flips']['right_wrong']} | {_p(c['p_value'])} |")
    learning = {name: arm.learning for name, arm in report.arms.items() if arm.learning and "episodes" in arm.learning}
    if learning:
        lines += [
            "",
            f"## Learning ({protocol})",
            "",
            "| arm | " + " | ".join(LEARNING_COLUMNS) + " |",
            "|---" * (len(LEARNING_COLUMNS) + 1) + "|",
        ]
        lines += [f"| {name} | " + " | ".join(learning_cells(l)) + " |" for name, l in learning.items()]
        lines += ["", "'right at first try, again after learning / frozen': the learning problems answered right at "
                      "their first try (against their labels), asked again greedily once learning is over, as the arm answers and by the "
                      "frozen model (an answer right by a narrow margin can flip without any forgetting)."]
        for name, l in learning.items():
            unsound = l.get("unsound_by_source")
            if unsound is not None:
                lines.append(f"\n{name}: right answers refused because their worked steps do not hold "
                             f"(a false equation, an answer no step reaches, or quoted program output; never trained): "
                             f"own {unsound['own_sample']} / rule-conditioned {unsound['rule_conditioned']} / "
                             f"variant {unsound['variant']} / rationalization {unsound['rationalization']}.")
    if "single-lora" in report.arms:
        l = report.arms["single-lora"].learning
        lines += ["", f"single-lora: {l['bursts']} update bursts on {l['texts']} texts ({l['source']}); "
                      f"{l['stress_rolled_back']} rolled back by the stress controller."]
    if report.files:
        plots = [(k, v) for k, v in report.files.items() if k.endswith("_plot")]
        if plots:
            lines += ["", "## Plots", ""]
            lines += [f"![{k.removesuffix('_plot')}]({v})" for k, v in plots]
    lines += ["", f"Total wall time {report.seconds:.1f} s. Per-problem answers: report.json (`per_item`)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # imported here: only the plots need matplotlib

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # Figure.savefig renders on the Agg canvas
    return buffer.getvalue()


def plot_accuracy(report) -> bytes:
    fig = _figure(1.3 * len(report.arms) + 2.5, 4.0)
    ax = fig.add_subplot()
    names = list(report.arms)
    summaries = [report.arms[n].summary() for n in names]
    acc = [100 * s["accuracy"] for s in summaries]
    low = [100 * (s["accuracy"] - s["ci95"][0]) for s in summaries]
    high = [100 * (s["ci95"][1] - s["accuracy"]) for s in summaries]
    # The counts go into the tick labels, where no error bar can hide them.
    labels = [f"{name}\n{s['correct']}/{s['n']} ({100 * s['accuracy']:.0f}%)" for name, s in zip(names, summaries)]
    ax.bar(labels, acc, yerr=[low, high], capsize=6, color=[ARM_COLOURS.get(n, "#333333") for n in names])
    n = summaries[0]["n"] if summaries else 0
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%), Wilson 95% CI")
    ax.set_title(f"GSM8K accuracy per arm, protocol {report.protocol} (n={n})")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_learning(report) -> bytes | None:
    curves = {name: arm.curve for name, arm in report.arms.items() if arm.curve}
    if not curves:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(7.5, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, curve in curves.items():
        x = [c["episode"] + 1 for c in curve]
        right = 0
        running = []
        for i, c in enumerate(curve, start=1):
            right += c["first_correct"]
            running.append(100 * right / i)
        colour = ARM_COLOURS.get(name)
        top.plot(x, running, marker=".", label=name, color=colour)
        phi = [math.nan if c["phi"] is None else c["phi"] for c in curve]
        bottom.step(x, phi, where="post", marker=".", label=name, color=colour)
    stress = report.config.get("stress", {})
    for key, style in (("theta_single", ":"), ("theta_mirror", "--")):
        if key in stress:
            bottom.axhline(stress[key], color="black", linestyle=style, linewidth=0.8, label=key)
    top.set_ylabel("right at first try,\nrunning %")
    top.set_ylim(0, 100)
    top.set_title(f"Learning episodes (protocol {report.protocol}): online first-try accuracy and stress phi(t)")
    top.legend(loc="best", fontsize=8)
    bottom.set_ylabel("phi(t) at the last update")
    bottom.set_xlabel("learning episode")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylim(0, 1)
    bottom.legend(loc="best", fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_experts(report) -> bytes | None:
    usage = {name: arm.expert_usage for name, arm in report.arms.items() if arm.expert_usage}
    if not usage:
        return None
    panels = [("updates", "updates per expert (learning)")]
    if any(u.get("mean_weight") is not None for u in usage.values()):
        panels.insert(0, ("mean_weight", "mean routing weight (scored problems)"))
    n_experts = len(next(iter(usage.values()))["updates"])
    fig = _figure(max(6.0, 0.45 * n_experts + 2.5), 1.1 * len(usage) * len(panels) + 1.6)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    names = list(usage)
    for ax, (key, title) in zip(axes, panels):
        rows = [u.get(key) or [0.0] * n_experts for u in usage.values()]
        top = max((max(r) for r in rows), default=0.0)
        image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=top if top > 0 else 1)
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(n_experts))
        ax.set_xlabel("expert")
        ax.set_title(f"{title}, protocol {report.protocol}")
        fig.colorbar(image, ax=ax)
        if n_experts <= 24:
            for i, row in enumerate(rows):
                for j, value in enumerate(row):
                    text = f"{value:.2f}" if key == "mean_weight" else str(int(value))
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="black" if top > 0 and value > 0.6 * top else "white")
    return _png(fig)
