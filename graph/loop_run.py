"""One continuous loop run as an object with a fixed lifecycle: setup, episodes, summary, close.

``LoopRun.setup`` does, in an order that loses nothing already written, what a run needs
before its first episode: the settings (saved ones on resume), the data (its errors before
anything loads), the folder's lock, the model in its precision, the run context, run.json.
The CLI's ``run`` command only calls it (torchtune's recipes: one object owns the job).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

from agents.data_sources import DataSource, open_source
from agents.lm.precision import PrecisionChoice, reduced_for
from graph.context import RunContext
from graph.episodes import EpisodeEvent, StopFlag, run_episodes
from graph.run_dir import RunSettings, check_run_dir, claim_run_dir, run_settings, write_run_settings
from graph.runner import build_fresh_context, check_questions_fit, problem_data, set_threads
from graph.state import LoopState, ProblemData
from memory_store.embedding import make_embedder
from memory_store.locks import WriterLock


class LoopRun:
    """A loop over the first ``episodes`` problems of the run's data, in ``run_dir``, resumable."""

    def __init__(self, settings: RunSettings, source: DataSource, problems: list[ProblemData], run_dir: Path,
                 lock: WriterLock, ctx: RunContext, precision: PrecisionChoice):
        self.settings, self.source, self.problems, self.run_dir = settings, source, problems, run_dir
        self.lock, self.ctx, self.precision = lock, ctx, precision
        self.episodes_done = 0
        self.right_first_try = 0
        self.right_at_end = 0

    @classmethod
    def setup(cls, run_dir: Path, resume: bool, options: dict, *, threads: int = 0,
              on_status: Callable[[str], None] | None = None) -> LoopRun:
        """Everything before the first episode; ``options`` are the settings given (dotted keys, None = not given)."""
        from agents.lm.precision import load_in_precision  # looked up per call: tests replace it to catch early loads

        status = on_status or (lambda _line: None)
        settings = run_settings(run_dir, resume, options)
        source = open_source(settings.data)  # data errors before anything loads or is written
        status(f"data: {source.describe()}")
        chosen = source.take(settings.episodes, "episodes")
        # The folder, its saved settings and its lock, before the model loads (slow the first time: a GGUF is converted).
        lock = claim_run_dir(run_dir)
        try:
            check_run_dir(run_dir, settings, resume)  # under the lock: nobody writes run.json meanwhile
            set_threads(threads)
            # run.json keeps the precision 'auto' resolved to, so a resume runs in it whatever the
            # calibration says then; a run saved as 'auto' is from before int8 and never resumes in it.
            reduced = reduced_for(settings.backend, saved_auto=resume and settings.precision == "auto")
            loaded, precision = load_in_precision(settings.model, settings.precision, reduced)
            settings = dataclasses.replace(settings, precision=precision.used)
            status(f"precision: {precision.used} ({precision.requested}: {precision.reason})")
            check_questions_fit(chosen, loaded, settings.solver.max_new_tokens, where=source.location)
            label_free = settings.loop.label_free
            problems = [problem_data(p, learning=True, label_free=label_free) for p in chosen]
            ctx = build_fresh_context(loaded, settings, run_dir, embedder=make_embedder(settings.embedder))
        except BaseException:
            lock.release()
            raise
        try:
            write_run_settings(run_dir, settings, notes={"data_source": source.to_dict()})
        except BaseException:
            ctx.close()
            lock.release()
            raise
        status(f"backend: {ctx.backend.description}; model {settings.model} on {loaded.device} ({loaded.precision}); "
               f"run dir {run_dir}")
        return cls(settings, source, problems, run_dir, lock, ctx, precision)

    def episodes(self, *, stop: StopFlag | None = None,
                 on_event: Callable[[EpisodeEvent], None] | None = None) -> Iterator[LoopState]:
        """Each episode's final state, finished ones read back from the checkpoints; ``stop`` ends after a node."""
        for final in run_episodes(self.ctx, self.problems, run_dir=self.run_dir, round_size=self.settings.round_size,
                                  on_event=on_event, stop=stop):
            self.episodes_done += 1
            self.right_first_try += int(final["first_try"]["correct"])
            self.right_at_end += int(final["outcome"] in ("correct", "fixed"))
            yield final

    def summary(self) -> dict:
        """What the run did, each count labelled with the protocol it measures."""
        return {
            "episodes": self.episodes_done,
            # Scored before the loop learned from each problem: online accuracy.
            "stream_right_first_try": self.right_first_try,
            # Re-scored after learning on the same problem: plasticity, not generalisation.
            "recovery_right_at_end": self.right_at_end,
            "protocols": {"stream_right_first_try": "stream", "recovery_right_at_end": "recovery"},
            "data_source": self.source.to_dict(),
            "run_dir": str(self.run_dir),
        }

    def close(self) -> None:
        """Free the backend, close the memory, release the folder's lock."""
        try:
            self.ctx.close()
        finally:
            self.lock.release()

    def __enter__(self) -> LoopRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

