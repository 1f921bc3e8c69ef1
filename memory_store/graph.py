"""The memory graph: problems, rules, experts, episodes and updates, and how they connect.

Node ids are "kind:id" (``problem:p1``, ``rule:r-…``, ``expert:3``, ``episode:e-…``,
``update:u1``). Edges are keyed by kind in a MultiDiGraph, so adding the same fact twice is a
no-op. Edge kinds:

    failed_on     episode -> problem   the episode was wrong before its update
    attempted     episode -> problem   any other episode of that problem
    produced      episode -> rule      reflection on the episode wrote the rule
    from_problem  rule -> problem      the rule (or a duplicate merged into it) came from the problem
    trained_into  rule -> expert       the expert the rule is trained into
    trained_in    rule -> update       the training update that used the rule
    updated       update -> expert     the expert the update changed
    similar_to    problem <-> problem  cosine >= similar_threshold (stored both ways)
    fixed, broke  update -> problem    wrong->right / right->wrong in a re-evaluation or canary episode

Every fact comes from Chroma metadata (``from_records``), so a missing or unreadable graph file
is rebuilt, never trusted half-written: ``save`` writes a temp file and ``os.replace``s it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import networkx as nx

from agents.files import atomic_write_text
from memory_store.errors import MemoryStoreError
from memory_store.records import Episode, Rule

logger = logging.getLogger(__name__)

GRAPH_FORMAT = 1
NODE_KINDS = ("problem", "rule", "expert", "episode", "update")
EDGE_KINDS = (
    "failed_on",
    "attempted",
    "produced",
    "from_problem",
    "trained_into",
    "trained_in",
    "updated",
    "similar_to",
    "fixed",
    "broke",
)


def node_id(kind: str, key: str | int) -> str:
    return f"{kind}:{key}"


class MemoryGraph:
    def __init__(self, graph: nx.MultiDiGraph | None = None) -> None:
        self.nx_graph = graph if graph is not None else nx.MultiDiGraph()

    # -- building -------------------------------------------------------------------------

    def _node(self, kind: str, key: str | int, **attrs: Any) -> str:
        node = node_id(kind, key)
        if node in self.nx_graph:
            self.nx_graph.nodes[node].update(attrs)
        else:
            self.nx_graph.add_node(node, kind=kind, **attrs)
        return node

    def _edge(self, source: str, target: str, kind: str, **attrs: Any) -> None:
        self.nx_graph.add_edge(source, target, key=kind, **attrs)

    def _drop_out_edges(self, node: str, kinds: Iterable[str], keep_target: str | None = None) -> None:
        kinds = set(kinds)
        stale = [(u, v, k) for u, v, k in self.nx_graph.out_edges(node, keys=True) if k in kinds and v != keep_target]
        self.nx_graph.remove_edges_from(stale)

    def add_rule(self, rule: Rule) -> None:
        """Add or refresh a rule and the facts its metadata carries."""
        rule_node = self._node("rule", rule.rule_id, status=rule.status, expert=rule.expert, cycle=rule.cycle)
        sources = [(rule.problem_id, rule.episode_id)] + [(s.problem_id, s.episode_id) for s in rule.merged_from]
        for problem_id, episode_id in sources:
            self._edge(rule_node, self._node("problem", problem_id), "from_problem")
            if episode_id:
                self._edge(self._node("episode", episode_id), rule_node, "produced")
        if rule.expert is not None:
            expert_node = self._node("expert", rule.expert)
            self._drop_out_edges(rule_node, ["trained_into"], keep_target=expert_node)
            self._edge(rule_node, expert_node, "trained_into")
        if rule.update_id is not None:
            update_node = self._node("update", rule.update_id)
            self._drop_out_edges(rule_node, ["trained_in"], keep_target=update_node)
            self._edge(rule_node, update_node, "trained_in")
            if rule.expert is not None:
                self.nx_graph.nodes[update_node]["expert"] = rule.expert
                self._edge(update_node, node_id("expert", rule.expert), "updated")

    def add_episode(self, episode: Episode) -> None:
        """Add or refresh an episode; re-adding with new verdicts replaces its old edges."""
        ep_node = self._node("episode", episode.episode_id, split=episode.split, cycle=episode.cycle)
        problem_node = self._node("problem", episode.problem_id)
        self._drop_out_edges(ep_node, ["failed_on", "attempted"])
        self._edge(ep_node, problem_node, "failed_on" if episode.verdict_before is False else "attempted")
        for rule_id in episode.rule_ids:
            self._edge(ep_node, self._node("rule", rule_id), "produced")
        for other in episode.similar_problems:
            if other != episode.problem_id:
                other_node = self._node("problem", other)
                self._edge(problem_node, other_node, "similar_to")
                self._edge(other_node, problem_node, "similar_to")
        stale = [
            (u, v, k)
            for u, v, k, d in self.nx_graph.in_edges(problem_node, keys=True, data=True)
            if k in ("fixed", "broke") and episode.episode_id in d.get("episodes", ())
        ]
        for u, v, k in stale:
            episodes = [e for e in self.nx_graph.edges[u, v, k]["episodes"] if e != episode.episode_id]
            if episodes:
                self.nx_graph.edges[u, v, k]["episodes"] = episodes
            else:
                self.nx_graph.remove_edge(u, v, key=k)
        if episode.update_id is not None:
            update_node = self._node("update", episode.update_id)
            change = episode.change
            if change is not None:
                if self.nx_graph.has_edge(update_node, problem_node, key=change):
                    episodes = self.nx_graph.edges[update_node, problem_node, change]["episodes"]
                    if episode.episode_id not in episodes:
                        episodes.append(episode.episode_id)
                        episodes.sort()  # order-independent, so a rebuild equals the incremental graph
                else:
                    self._edge(update_node, problem_node, change, episodes=[episode.episode_id])

    @classmethod
    def from_records(cls, rules: Iterable[Rule], episodes: Iterable[Episode]) -> MemoryGraph:
        graph = cls()
        for episode in episodes:
            graph.add_episode(episode)
        for rule in rules:
            graph.add_rule(rule)
        return graph

    # -- queries --------------------------------------------------------------------------

    def targets(self, node: str, kind: str) -> list[str]:
        """Keys (without the "kind:" prefix) of the nodes ``node`` points to with edge ``kind``."""
        if node not in self.nx_graph:
            return []
        found = {v for _, v, k in self.nx_graph.out_edges(node, keys=True) if k == kind}
        return sorted(v.split(":", 1)[1] for v in found)

    def sources(self, node: str, kind: str) -> list[str]:
        """Keys of the nodes pointing to ``node`` with edge ``kind``."""
        if node not in self.nx_graph:
            return []
        found = {u for u, _, k in self.nx_graph.in_edges(node, keys=True) if k == kind}
        return sorted(u.split(":", 1)[1] for u in found)

    def fixed_by(self, update_id: str) -> list[str]:
        return self.targets(node_id("update", update_id), "fixed")

    def broke_by(self, update_id: str) -> list[str]:
        return self.targets(node_id("update", update_id), "broke")

    def rules_in_update(self, update_id: str) -> list[str]:
        return self.sources(node_id("update", update_id), "trained_in")

    def similar_problems(self, problem_id: str) -> list[str]:
        return self.targets(node_id("problem", problem_id), "similar_to")

    def count_nodes(self) -> dict[str, int]:
        counts = Counter(kind for _, kind in self.nx_graph.nodes(data="kind"))
        return {kind: counts.get(kind, 0) for kind in NODE_KINDS}

    def count_edges(self) -> dict[str, int]:
        counts = Counter(k for _, _, k in self.nx_graph.edges(keys=True))
        return {kind: counts.get(kind, 0) for kind in EDGE_KINDS}

    def same_as(self, other: MemoryGraph) -> bool:
        """Same nodes with the same attributes and the same keyed edges with the same attributes."""
        mine, theirs = self.nx_graph, other.nx_graph
        if dict(mine.nodes(data=True)) != dict(theirs.nodes(data=True)):
            return False
        edges = lambda g: {(u, v, k): d for u, v, k, d in g.edges(keys=True, data=True)}  # noqa: E731
        return edges(mine) == edges(theirs)

    # -- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write node-link JSON atomically (agents.files.atomic_write_text)."""
        data = nx.node_link_data(self.nx_graph, edges="edges")
        data["graph"] = {"format": GRAPH_FORMAT}
        atomic_write_text(Path(path), json.dumps(data, separators=(",", ":")))

    @classmethod
    def load(cls, path: Path) -> MemoryGraph:
        """Read a saved graph; MemoryStoreError if it is missing, unreadable or not ours."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MemoryStoreError(f"memory graph file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MemoryStoreError(f"memory graph file {path} is unreadable: {exc}") from None
        if not isinstance(data, dict) or data.get("graph", {}).get("format") != GRAPH_FORMAT:
            raise MemoryStoreError(f"memory graph file {path} is not a format-{GRAPH_FORMAT} memory graph")
        try:
            graph = nx.node_link_graph(data, directed=True, multigraph=True, edges="edges")
        except (KeyError, TypeError, nx.NetworkXError) as exc:
            raise MemoryStoreError(f"memory graph file {path} is malformed: {exc}") from None
        return cls(graph)
