"""Several episodes' generation calls pooled into one, so that decoding runs many rows at once.

An episode's calls are small (a greedy answer and k samples; a rule and k re-solves), and a
decode step costs about as much at one row as at the batcher's full width. A round of
episodes therefore runs its sampling nodes (solve, verify, reflect, diversify: none changes
the bank or the memory) side by side: each episode runs in its own thread, but only one
runs at a time, in episode order, until it asks the backend for something; when every
episode of the round is waiting or done, their requests go to the real backend as one
call, in episode order. The turns are fixed by the episodes' own call sequences, never by
timing, so the same round pools the same calls on every run.

``Lockstep.run`` drives the episodes; ``PooledBackend`` is the backend their nodes see.
"""

from __future__ import annotations

import contextvars
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from agents.lm.backend import GenerationBackend, generate_together
from agents.lm.generation import GREEDY, Generation, Request, Sampling


class PoolCancelled(Exception):
    """Raised in an episode's thread when the round stops (an error elsewhere, or a stop request)."""


@dataclass
class _Turn:
    """One episode's thread and what passes between it and the driver."""

    index: int
    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    requests: list[Request] | None = None  # waiting for these to be generated
    outputs: list[list[Generation]] | None = None
    result: object = None
    error: BaseException | None = None
    done: bool = False
    clock: float = 0.0  # seconds of its own work plus its share of pooled calls
    running_since: float | None = None

    def seconds(self) -> float:
        """The clock as of now: a running turn's current stretch included."""
        running = time.perf_counter() - self.running_since if self.running_since is not None else 0.0
        return self.clock + running


def _distinct(requests: list[Request]) -> tuple[list[Request], list[int]]:
    """The requests with repeated greedy ones left out, and where each request's completions are in them."""
    unique: list[Request] = []
    index: list[int] = []
    seen: dict[tuple, int] = {}
    for request in requests:
        key = None
        if request.sampling.greedy:
            weights = request.weights
            mixture = None if weights is None else (tuple(weights.shape), tuple(weights.flatten().tolist()))
            key = (request.prompts, mixture, request.max_new_tokens, request.stop_at_answer)
        if key is not None and key in seen:
            index.append(seen[key])
            continue
        if key is not None:
            seen[key] = len(unique)
        index.append(len(unique))
        unique.append(request)
    return unique, index


class PooledBackend:
    """The backend a round's episodes generate through: each call waits for the round's pooled call."""

    def __init__(self, backend: GenerationBackend, lockstep: Lockstep):
        self.backend, self.lockstep = backend, lockstep
        self.name = backend.name

    @property
    def description(self) -> str:
        return f"{self.backend.description}; calls pooled across a round's episodes"

    def chat_prompt(self, system: str | None, user: str) -> str:
        return self.backend.chat_prompt(system, user)

    def generate(self, prompts: Sequence[str], *, weights: torch.Tensor | None = None, max_new_tokens: int = 384,
                 stop_at_answer: bool = False, sampling: Sampling = GREEDY) -> list[Generation]:
        request = Request(tuple(prompts), weights, max_new_tokens, stop_at_answer, sampling)
        return self.generate_requests([request])[0]

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Generation]]:
        return self.lockstep.wait_for(list(requests))


class Lockstep:
    """Runs one function per episode in turn, pooling their backend calls (see the module docstring)."""

    def __init__(self, backend: GenerationBackend):
        self.backend = backend
        self._driver = threading.Semaphore(0)
        # The calling job's turn: a context variable, so that a node run on a worker thread of
        # LangGraph's (which copies the context) still finds its episode.
        self._turn: contextvars.ContextVar[_Turn] = contextvars.ContextVar("turn")
        self._cancelled = False

    def pooled_backend(self) -> PooledBackend:
        return PooledBackend(self.backend, self)

    def current(self) -> _Turn:
        """The turn of the calling episode."""
        return self._turn.get()

    def wait_for(self, requests: list[Request]) -> list[list[Generation]]:
        """Called in an episode's thread: hand the requests to the driver and sleep until they are generated."""
        if self._cancelled:  # a job that caught PoolCancelled and asked again
            raise PoolCancelled()
        turn = self.current()
        turn.requests = requests
        self._yield(turn)
        turn.go.acquire()
        self._resume(turn)
        if self._cancelled:
            raise PoolCancelled()
        outputs, turn.outputs = turn.outputs, None
        return outputs

    def run(self, jobs: Sequence[Callable[[], object]], stop: Callable[[], bool] = lambda: False) -> list[_Turn]:
        """Run every job to its end, one at a time, their backend calls pooled; the turns in job order.

        ``stop`` is asked after every turn and every pooled call; when it says so, the jobs still
        waiting are cancelled (PoolCancelled in their threads) and the turns returned as they
        are. An error in a job cancels the others and is raised here. A Lockstep runs once.
        """
        if self._cancelled:
            raise RuntimeError("this Lockstep has run; make one per round")
        turns = [_Turn(i) for i in range(len(jobs))]
        threads = [threading.Thread(target=self._job, args=(turn, job), daemon=True) for turn, job in zip(turns, jobs)]
        for thread in threads:
            thread.start()
        try:
            runnable = list(turns)
            while True:
                for turn in runnable:  # in job order, one at a time
                    turn.go.release()
                    self._driver.acquire()
                    if turn.error is not None:
                        raise turn.error
                    if stop():
                        return turns
                waiting = [t for t in turns if t.requests is not None]
                if not waiting:
                    return turns
                self._pooled_call(waiting)
                if stop():
                    return turns
                runnable = waiting
        finally:
            self._cancel(turns)
            for thread in threads:
                thread.join()

    def _pooled_call(self, waiting: list[_Turn]) -> None:
        """One backend call for every waiting turn's requests; each turn is charged its share by rows.

        A greedy request asked by several turns (the round's canary, under the round gate) is
        generated once and each asker gets the same completions.
        """
        requests = [r for t in waiting for r in t.requests]
        unique, index = _distinct(requests)
        started = time.perf_counter()
        generated = generate_together(self.backend, unique)
        outputs = [generated[i] for i in index]
        seconds = time.perf_counter() - started
        rows = sum(len(r.prompts) for r in requests) or 1
        at = 0
        for turn in waiting:
            n = len(turn.requests)
            turn.outputs, turn.requests = outputs[at : at + n], None
            turn.clock += seconds * sum(len(r.prompts) for r in requests[at : at + n]) / rows
            at += n

    def _job(self, turn: _Turn, job: Callable[[], object]) -> None:
        self._turn.set(turn)  # this thread's own context
        turn.go.acquire()
        self._resume(turn)
        try:
            if not self._cancelled:
                turn.result = job()
        except PoolCancelled:
            pass
        except BaseException as error:  # handed to the driver, which raises it
            turn.error = error
        finally:
            turn.done = True
            turn.requests = None
            self._yield(turn)

    def _cancel(self, turns: list[_Turn]) -> None:
        """Wake every thread still waiting for a pooled call; each ends with PoolCancelled."""
        self._cancelled = True
        for turn in turns:
            if not turn.done:
                turn.go.release()
                self._driver.acquire()

    def _resume(self, turn: _Turn) -> None:
        turn.running_since = time.perf_counter()

    def _yield(self, turn: _Turn) -> None:
        turn.clock = turn.seconds()
        turn.running_since = None
        self._driver.release()
