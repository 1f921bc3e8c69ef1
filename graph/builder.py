"""The loop's edges:

    solve -> verify -> right (and often enough), unverifiable, or not a learning problem -> commit
                    -> right but rarely: verified own samples to learn from -> update
                    -> wrong -> reflect (rules validated by effect; else rationalization)
    reflect -> a rule validated -> diversify -> update -> reevaluate   (rules-only runs: -> commit)
            -> no rule, but verified texts -> update -> reevaluate
            -> nothing verified -> rollback -> commit
    reevaluate -> fixed (and no canary broke) -> commit
               -> not fixed, cycles left -> reflect (it sees the rules already tried)
               -> out of cycles -> rollback -> commit

``build_graph()`` returns the uncompiled builder; callers compile it with their checkpointer.
"""

from __future__ import annotations

from typing import Literal

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from graph import nodes
from graph.context import RunContext
from graph.state import EpisodeInput, LoopState

NODES_PER_CYCLE = 4  # reflect, diversify, update, reevaluate


def recursion_limit(cycles: int) -> int:
    """Steps one episode can take: solve, verify, the cycles, rollback, commit, and a margin."""
    return 2 + NODES_PER_CYCLE * cycles + 2 + 5


def after_verify(state: LoopState, runtime: Runtime[RunContext]) -> Literal["commit", "reflect", "update"]:
    if "verdict" not in state:
        raise ValueError("after_verify: the state has no verdict")
    if not state["learning"] or state.get("unverifiable"):
        return "commit"
    if not state["verdict"]["correct"]:
        return "reflect"
    return "update" if state.get("texts") and runtime.context.config.adapters else "commit"


def after_reflect(state: LoopState, runtime: Runtime[RunContext]) -> Literal["diversify", "update", "rollback", "commit"]:
    if not runtime.context.config.adapters:
        return "commit"  # rules only: a validated rule goes to memory, nothing is trained
    if state.get("rule") is not None:
        return "diversify"
    return "update" if state.get("texts") else "rollback"


def after_diversify(state: LoopState) -> Literal["update", "rollback"]:
    return "update" if state.get("texts") else "rollback"


def after_reevaluate(state: LoopState, runtime: Runtime[RunContext]) -> Literal["commit", "reflect", "rollback"]:
    checks = state.get("canary_checks") or []
    if not checks:
        raise ValueError("after_reevaluate: the state has no canary check")
    if state["verdict"]["correct"] and not checks[-1]["canary_rolled_back"]:
        return "commit"
    if state["first_try"]["correct"]:
        return "rollback"  # it learned from a problem it answered right, and that made things worse
    if state.get("cycle", 0) < runtime.context.config.cycles:
        return "reflect"
    return "rollback"


def build_graph() -> StateGraph:
    builder = StateGraph(LoopState, context_schema=RunContext, input_schema=EpisodeInput)
    for name in ("solve", "verify", "reflect", "diversify", "update", "reevaluate", "rollback", "commit"):
        builder.add_node(name, getattr(nodes, name))
    builder.add_edge(START, "solve")
    builder.add_edge("solve", "verify")
    builder.add_conditional_edges("verify", after_verify)
    builder.add_conditional_edges("reflect", after_reflect)
    builder.add_conditional_edges("diversify", after_diversify)
    builder.add_edge("update", "reevaluate")
    builder.add_conditional_edges("reevaluate", after_reevaluate)
    builder.add_edge("rollback", "commit")
    builder.add_edge("commit", END)
    return builder
