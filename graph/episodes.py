"""The episode driver: one LangGraph thread per problem, in rounds, resumable after a kill at any moment.

Each problem is one episode with its own thread id (``<run_id>-epNNNNN``) in a SqliteSaver
in the run directory. A round's episodes run their sampling nodes together, their generation
calls pooled (graph/pooling.py); under the round gate (LoopConfig.round_gate) their updates
then run in turn (or, with LoopConfig.pool_updates, as one update on all their texts) and their
re-evaluations together, one canary verdict for the round. Then
each in turn runs the nodes left (rollback and commit; without the gate, its updates and
re-evaluations too). On resume, finished episodes are read back, a round not done sampling
(under the gate: not done learning) samples again from its start (its event lines dropped),
a half-done episode continues from its last finished node, and without the gate the bank is
aligned with the checkpointed state. What one episode hands to the next (the canary set,
expert usage, replay) is part of its state, so it is checkpointed too. Every node's summary
goes to ``events.jsonl``.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command

from agents.files import atomic_write_bytes
from graph.builder import build_graph, recursion_limit
from graph.canary import canary_entry
from graph.context import RunContext
from graph.pooling import Lockstep
from graph.run_dir import CHECKPOINTS, RunDirError, has_checkpoints, run_id_for
from graph.snapshots import align_bank, prune_snapshots, snapshot_name
from graph.state import EpisodeCarryOver, EpisodeInput, LoopState, ProblemData

EVENTS = "events.jsonl"


@dataclass
class EpisodeEvent:
    episode: int
    node: str
    update: dict
    seconds: float = 0.0  # the node's wall time; in a pooled call, the episode's share of it by rows


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


# The first nodes that change the bank or the memory: a round's episodes sample together up to them.
AFTER_SAMPLING = ("update", "rollback", "commit")
SAMPLED = "sampled.json"  # how many episodes, from the first, have finished their sampling nodes


@dataclass
class _Episode:
    index: int
    problem: ProblemData
    thread: dict  # the LangGraph config: thread id and recursion limit


class _Driver:
    """The rounds of one ``run_episodes`` call: the compiled graph, the event log, the sampled mark."""

    def __init__(self, ctx: RunContext, run_dir: Path, checkpointer: SqliteSaver, learning: bool,
                 on_event: Callable[[EpisodeEvent], None] | None, stop: StopFlag | None):
        self.ctx, self.run_dir, self.checkpointer, self.learning = ctx, run_dir, checkpointer, learning
        self.on_event, self.stop = on_event, stop
        self.events = (run_dir / EVENTS).open("a", encoding="utf-8")
        self.app = build_graph().compile(checkpointer=checkpointer)
        self.run_id = run_id_for(run_dir)

    def episode(self, index: int, problem: ProblemData) -> _Episode:
        limit = recursion_limit(self.ctx.config.cycles)
        return _Episode(index, problem, {"configurable": {"thread_id": _thread_id(self.run_id, index)},
                                         "recursion_limit": limit})

    def sampled(self) -> dict | None:
        """The sampled mark: episodes sampled, from the first, and the event log's size when the next
        round began sampling; None for a run saved before rounds existed."""
        try:
            mark = json.loads((self.run_dir / SAMPLED).read_text())
            return {"episodes": int(mark["episodes"]), "events_bytes": int(mark["events_bytes"])}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunDirError(f"{self.run_dir / SAMPLED} is unreadable ({err}); the run cannot resume") from None

    def mark_sampled(self, episodes: int) -> None:
        self.events.flush()
        mark = {"episodes": episodes, "events_bytes": (self.run_dir / EVENTS).stat().st_size}
        atomic_write_bytes(self.run_dir / SAMPLED, json.dumps(mark).encode())

    def truncate_events(self, size: int) -> None:
        """The event log as it was when the round being sampled again began."""
        self.events.close()
        with (self.run_dir / EVENTS).open("r+b") as log:
            if log.seek(0, 2) < size:
                raise RunDirError(f"{self.run_dir / EVENTS} is shorter than when this round began: it was changed")
            log.truncate(size)
        self.events = (self.run_dir / EVENTS).open("a", encoding="utf-8")

    def write(self, index: int, node: str, update: dict, seconds: float) -> None:
        line = {"episode": index, "node": node, "seconds": seconds, **_summary(update)}
        self.events.write(json.dumps(line) + "\n")
        self.events.flush()
        if self.on_event:
            self.on_event(EpisodeEvent(index, node, update, seconds))

    def sample(self, episodes: list[_Episode], carry: EpisodeCarryOver, restart: bool) -> bool:
        """The round's sampling nodes, its calls pooled; False if stopped before every episode is done.

        ``restart``: a half-sampled round (killed or stopped in an earlier process) samples again
        from its start, its events since the round began dropped, so that every call pools with
        the same others as before (bank and memory are unchanged until sampling is done). Without
        the round gate a one-episode round pools with nobody and continues where it stopped. Under
        the round gate the round's updates and re-evaluations belong to its sampling too (``learn``):
        a round stopped in them starts again from its beginning, the bank set back to before its
        first update.
        """
        if restart:
            self.restart(episodes)
        self.mark_sampled(episodes[0].index)
        if not self.together(episodes, carry, AFTER_SAMPLING):
            return False
        if self.ctx.config.round_gate and not self.learn(episodes, carry):
            return False
        self.mark_sampled(episodes[-1].index + 1)
        return True

    def restart(self, episodes: list[_Episode]) -> None:
        """A round not finished sampling goes back to its start: its threads deleted, and under the round
        gate the bank as it was before the round's first update, the round's snapshots removed."""
        if self.ctx.config.round_gate:
            store = self.ctx.bank_store
            ours = [n for n in store.snapshots() if any(n.startswith(f"ep{e.index:05d}-") for e in episodes)]
            starts = [snapshot_name(e.index, 0) for e in episodes if snapshot_name(e.index, 0) in ours]
            if starts:
                store.rollback(starts[0])  # taken before the round's first update
            # The round's start goes last: a kill in between finds it again on the next resume.
            for name in sorted(ours, key=lambda n: n == starts[0]) if starts else ours:
                store.delete_snapshot(name)
        for episode in episodes:
            self.checkpointer.delete_thread(episode.thread["configurable"]["thread_id"])

    def together(self, episodes: list[_Episode], carry: EpisodeCarryOver, interrupt: tuple[str, ...]) -> bool:
        """Episodes run side by side up to the ``interrupt`` nodes, their generation calls pooled; False if stopped."""
        lockstep = Lockstep(self.ctx.backend)
        pooled = self.ctx.with_backend(lockstep.pooled_backend())

        def job(episode: _Episode):
            def run() -> bool:
                start = None if self.app.get_state(episode.thread).values else EpisodeInput(
                    run_id=self.run_id, episode=episode.index, problem=episode.problem, learning=self.learning,
                    carry=carry, rules=[], updates=[], canary_checks=[])
                return self.advance(episode, start, pooled, interrupt, clock=lockstep.current().seconds)
            return run

        turns = lockstep.run([job(e) for e in episodes], stop=lambda: bool(self.stop))
        return all(t.done and t.result is True for t in turns)

    def learn(self, episodes: list[_Episode], carry: EpisodeCarryOver) -> bool:
        """The round gate: the round's updates one after another, then its re-evaluations together.

        Each update gets the carry as the updates before it in the round left it (expert usage,
        for the pick) and the gate: the snapshot before the phase's first update, which a broken
        canary restores, and the round's problems right at the first try, which join the canary.
        The re-evaluations (and a further cycle's reflect and diversify) then run side by side,
        and any episode sent back to update starts another phase. With pooled updates a phase
        trains once, on the texts of all its waiting episodes (``update_gates``). False if stopped.
        """
        sampled = [self.app.get_state(e.thread) for e in episodes]
        right = [s for s in sampled if s.values["first_try"]["correct"] and not s.values.get("unverifiable")]
        # The round's problems right at the first try join the canary, as each would have for the
        # episodes after it without the gate (with canary_size 0, only those that train, whose
        # own update must not break them); any that trains undoes the round if broken.
        trained = [s.values["problem"]["id"] for s in right if s.next == ("update",)]
        guarded = [s.values for s in right
                   if self.ctx.config.canary_size > 0 or s.values["problem"]["id"] in trained]
        canary = [canary_entry(v) for v in guarded]
        running = carry
        while waiting := [e for e in episodes if self.app.get_state(e.thread).next == ("update",)]:
            cycle = self.app.get_state(waiting[0].thread).values.get("cycle", 0)
            gate = {"rollback_to": snapshot_name(waiting[0].index, cycle), "canary": canary, "trained": trained}
            self.ctx.round_verdicts.clear()  # decided anew by this phase's first re-evaluation
            for episode, phase_gate in self.update_gates(waiting, gate):
                handed = Command(update={"carry": running, "gate": phase_gate()})
                if not self.advance(episode, handed, self.ctx, ("reevaluate",)):
                    return False
                running = self.app.get_state(episode.thread).values["carry"]
            if not self.together(waiting, running, AFTER_SAMPLING):
                return False
        return True

    def update_gates(self, waiting: list[_Episode], gate: dict) -> Iterator[tuple[_Episode, Callable[[], dict]]]:
        """Each waiting episode with the gate its update gets, read when its turn comes.

        With pooled updates (LoopConfig.pool_updates) the first trains on the texts of all of them
        (``pool``), and the others record its update (``pooled_into``), read off its state once it ran.
        """
        if not self.ctx.config.pool_updates:
            yield from ((episode, lambda: gate) for episode in waiting)
            return
        first, *rest = waiting
        # each text with its problem's id and question (a variant's text carries the variant's wording)
        pool = [{**t, "problem_id": e.problem["id"], "problem_question": e.problem["question"]}
                for e in rest for t in self.app.get_state(e.thread).values["texts"]]
        yield first, lambda: {**gate, "pool": pool}

        def pooled_into() -> dict:
            trained = self.app.get_state(first.thread).values["updates"][-1]
            # its record less what was the trainer's own (texts, rule, the count of others' texts)
            return {**gate, "pooled_into": {k: v for k, v in trained.items() if k not in ("texts", "rule", "pooled_texts")}}
        yield from ((episode, pooled_into) for episode in rest)

    def advance(self, episode: _Episode, start, context: RunContext, interrupt: tuple[str, ...] = (),
                clock: Callable[[], float] = time.perf_counter) -> bool:
        """One episode's nodes from ``start`` up to the ``interrupt`` nodes or its end; False if stopped.

        Each node's seconds are read off ``clock`` (in a pooled round, the episode's own share of
        the pooled calls), from the end of the node before: the node and its checkpoint write.
        """
        mark = clock()
        for chunk in self.app.stream(start, episode.thread, context=context, stream_mode="updates",
                                     interrupt_before=list(interrupt)):
            now = clock()
            seconds, mark = round(now - mark, 3), now
            for node, update in chunk.items():
                # not nodes: an interrupt, and the marker LangGraph adds to a node's saved output replayed on a resume
                if node not in ("__interrupt__", "__metadata__"):
                    self.write(episode.index, node, update or {}, seconds)
            if self.stop:
                return False
        return True

    def finish(self, episode: _Episode, carry: EpisodeCarryOver) -> LoopState | None:
        """The episode's nodes after sampling, with the carry of the episode before it; None if stopped."""
        values = self.app.get_state(episode.thread).values
        if self.ctx.config.round_gate:
            # The round learned before any of its episodes finishes, and nothing from here changes the
            # bank; the carry comes from the episode before, whatever this one's updates wrote into
            # its own (commit counts them).
            handed = values.get("carry") != carry
        else:
            # A killed earlier try may have changed the bank before any checkpoint.
            align_bank(self.ctx, values)
            # Sampled before the episode before it ended: its carry comes in with the resume (no update
            # has run yet, so nothing of this episode has read or changed the carry).
            handed = not values.get("updates") and values.get("carry") != carry
        resume = Command(update={"carry": carry}) if handed else None
        if not self.advance(episode, resume, self.ctx):
            return None
        final = self.app.get_state(episode.thread).values
        prune_snapshots(self.ctx, episode.index)
        return final


def run_episodes(
    ctx: RunContext,
    problems: Iterable[ProblemData],
    *,
    run_dir: Path,
    learning: bool = True,
    round_size: int = 1,
    checkpointer: SqliteSaver | None = None,
    on_event: Callable[[EpisodeEvent], None] | None = None,
    stop: StopFlag | None = None,
) -> Iterator[LoopState]:
    """Run (or resume) one episode per problem, in rounds of ``round_size``; yields each finished episode's final state.

    A round's episodes first run their sampling nodes together, their generation calls pooled
    (graph/pooling.py), from the bank and memory as the round found them: rejection-sampling
    fine-tuning samples a batch of problems with one model, then trains (Yuan et al. 2023,
    arXiv 2308.01825). Then each episode in turn runs its nodes that change the bank and the
    memory (update, reevaluate, rollback, commit), handed the carry of the episode before it.
    With ``round_size`` 1 every episode sees everything learned before it.
    """
    if round_size < 1:
        raise ValueError(f"round_size must be >= 1, got {round_size}")
    driver = _Driver(ctx, run_dir, checkpointer or open_checkpointer(run_dir), learning, on_event, stop)
    carry = EpisodeCarryOver(canary=[], expert_updates=[0] * ctx.bank.n_experts)
    stream = iter(enumerate(problems))
    try:
        mark = driver.sampled()
        if mark is None and not driver.app.get_state(driver.episode(0, {}).thread).values:
            driver.mark_sampled(0)  # a new run; older runs (no mark) resume in place, as they ran
            mark = driver.sampled()
        while chunk := list(itertools.islice(stream, round_size)):
            episodes = [driver.episode(index, problem) for index, problem in chunk]
            states = [driver.app.get_state(e.thread).values for e in episodes]
            for episode, values in zip(episodes, states):
                if values and values["problem"]["id"] != episode.problem["id"]:
                    raise RunDirError(f"episode {episode.index} of this run was problem {values['problem']['id']}, "
                                      f"but the data now gives {episode.problem['id']}: the data file changed")
            # Sampled in an earlier process: counted in the mark, or (older runs) checkpointed at all.
            done = [e.index < mark["episodes"] if mark is not None else bool(v) for e, v in zip(episodes, states)]
            if not all(done):
                restart = (round_size > 1 or ctx.config.round_gate) and any(v for v, d in zip(states, done) if not d)
                if restart and mark is not None:
                    driver.truncate_events(mark["events_bytes"])
                if not driver.sample([e for e, d in zip(episodes, done) if not d], carry, restart):
                    return
                mark = driver.sampled()
            for episode, values in zip(episodes, states):
                if values.get("committed"):
                    # Finished only when commit's own write is in the checkpoint: a kill after a node's
                    # writes were saved but before the next checkpoint leaves `next` empty too
                    # (get_state omits a task whose writes are saved), and that episode must go on.
                    carry = values["carry"]
                    yield values  # finished in an earlier process
                    continue
                final = driver.finish(episode, carry)
                if final is None:
                    return
                carry = final["carry"]
                yield final
    finally:
        driver.events.close()
        if ctx.memory is not None:
            ctx.memory.flush()


def _thread_id(run_id: str, index: int) -> str:
    return f"{run_id}-ep{index:05d}"


def committed_states(run_dir: Path) -> list[LoopState]:
    """The final states of a run folder's finished episodes, from the first, as ``run_episodes``
    yields them: read from the checkpoints through a read-only connection and with no model, so
    that a run going on in another process can be read as it goes."""
    path = Path(run_dir) / CHECKPOINTS
    if not has_checkpoints(run_dir):  # none yet, or a file not yet set up, which a reader must not set up
        return []
    connection = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, check_same_thread=False)
    try:
        app = build_graph().compile(checkpointer=SqliteSaver(connection))
        run_id, states = run_id_for(run_dir), []
        while (values := app.get_state({"configurable": {"thread_id": _thread_id(run_id, len(states))}}).values) \
                and values.get("committed"):
            states.append(values)
        return states
    except sqlite3.Error as err:
        raise RunDirError(f"{path} is unreadable ({err})") from None
    finally:
        connection.close()


def read_events(run_dir: Path) -> tuple[list[dict], int]:
    """The event log's lines, and how many were not JSON (one being written by the process that
    runs the episodes, or one cut short by a kill)."""
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return [], 0
    events, damaged = [], 0
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(line, dict):
            events.append(line)
    return events, damaged


def episode_seconds(events: list[dict]) -> dict[int, float]:
    """Each episode's seconds, the sum of its nodes' in the event log (``read_events``), whichever
    process ran them (a round sampled again after a kill has its first try's lines dropped)."""
    seconds: dict[int, float] = {}
    for line in events:
        try:
            seconds[int(line["episode"])] = seconds.get(int(line["episode"]), 0.0) + float(line["seconds"])
        except (KeyError, TypeError, ValueError):
            continue
    return seconds


def describe_episode(state: LoopState) -> str:
    """One line on a finished episode: the first try, what was learned, the outcome."""
    updates = state.get("updates") or []
    pooled = sum(bool(u.get("pooled_into")) for u in updates)
    return (f"{'right' if state['first_try']['correct'] else 'wrong'} at the first try; "
            f"{len(state.get('rules') or [])} rule(s), {len(updates) - pooled} update(s)"
            f"{f', texts in {pooled} pooled update(s)' if pooled else ''}; outcome {state['outcome']}")


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
    if update.get("unsound"):
        out["unsound"] = [f"{u['source']}: {u['reason']}" for u in update["unsound"]]
    if update.get("variants"):
        out["variants"] = [{k: v.get(k) for k in ("text", "status", "reason")} for v in update["variants"]]
    if update.get("updates"):
        u = update["updates"][-1]
        out.update(expert=u["expert"], mode=u["mode"], phi=round(u["phi"], 4), lr=u["lr"],
                   loss_before=round(u["loss_before"], 4), loss_after=round(u["loss_after"], 4),
                   stress_rolled_back=u["stress_rolled_back"])
        if u.get("pooled_into"):
            # trained by another episode of the round: its update, named without the run id ("ep00001-c0")
            out["pooled_into"] = "-".join(u["pooled_into"].rsplit("-", 2)[1:])
        if u.get("pooled_texts"):
            out["pooled_texts"] = u["pooled_texts"]
    if update.get("canary_checks"):
        c = update["canary_checks"][-1]
        out.update(canary_checked=c["checked"], canary_broke=c["broke"], canary_rolled_back=c["canary_rolled_back"])
        if "p_value" in c:  # the binomial canary test's
            out["canary_p_value"] = c["p_value"]
    if "outcome" in update:
        out["outcome"] = update["outcome"]
    if update.get("error"):
        out["error"] = update["error"]
    return out
