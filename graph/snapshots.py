"""The bank snapshots of an episode, by name: what makes a node killed half-way rerun from the same bank.

The update node snapshots the bank under ``ep<episode>-c<cycle>`` before it trains and under
``...-done`` after it saved; a resumed episode first aligns the live bank with the one its
checkpointed state saw, and a committed episode's snapshots are deleted.
"""

from __future__ import annotations

from graph.context import RunContext
from graph.state import LoopState


def snapshot_name(episode: int, cycle: int) -> str:
    return f"ep{episode:05d}-c{cycle}"


def done_name(episode: int, cycle: int) -> str:
    return f"ep{episode:05d}-c{cycle}-done"


def align_bank(ctx: RunContext, state: LoopState) -> None:
    """Make the live bank the one the checkpointed state saw, before a half-done episode resumes.

    A kill can come after a node changed the bank on disk but before its checkpoint: the
    resumed episode reruns that node, so it must start from the bank as of the checkpoint:
    the episode's start (snapshot c0), or right after its last checkpointed update (``-done``),
    or that update's start if the canary gate or the rollback node undid it.
    """
    episode, updates = state["episode"], state.get("updates") or []
    if state.get("episode_rolled_back_to"):
        name = state["episode_rolled_back_to"]
    elif updates:
        last = updates[-1]
        undone = any(c.get("update_id") == last["update_id"] and c["canary_rolled_back"] for c in state.get("canary_checks") or [])
        name = last["snapshot"] if undone else done_name(episode, last["cycle"])
    else:
        name = snapshot_name(episode, 0)
    if name in ctx.bank_store.snapshots():
        ctx.bank_store.rollback(name)


def prune_snapshots(ctx: RunContext, episode: int) -> None:
    """A committed episode never reruns: its snapshots (a bank copy each) can go."""
    for name in ctx.bank_store.snapshots():
        if name.startswith(f"ep{episode:05d}-"):
            ctx.bank_store.delete_snapshot(name)
