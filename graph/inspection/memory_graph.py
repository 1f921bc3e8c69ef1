"""The memory graph for a browser (a self-contained HTML page) or a graph tool (GraphML).

The page's markup, style and script are the package file ``memory_graph.html``; the graph's
nodes, edges and positions are filled into it as JSON.
"""

from __future__ import annotations

import functools
import html
import io
import json
from importlib import resources
from pathlib import Path

import networkx as nx

from agents.files import atomic_write_bytes
from memory_store.store import MemoryStore

GRAPH_FORMATS = ("html", "graphml")
_KIND_COLOURS = {"problem": "#1f77b4", "rule": "#2ca02c", "expert": "#d62728", "episode": "#aaaaaa", "update": "#ff7f0e"}


@functools.lru_cache(maxsize=1)
def _page_template() -> str:
    return resources.files("graph.inspection").joinpath("memory_graph.html").read_text(encoding="utf-8")


def _labelled_graph(store: MemoryStore) -> nx.MultiDiGraph:
    """The memory graph with readable labels: rule texts and problem texts."""
    graph = store.graph.nx_graph.copy()
    for rule in store.list_rules():
        node = f"rule:{rule.rule_id}"
        if node in graph:
            graph.nodes[node]["text"] = rule.text
            graph.nodes[node].update(helped=rule.helped, hurt=rule.hurt)
    for episode in store.list_episodes():
        node = f"problem:{episode.problem_id}"
        if node in graph and episode.split != "canary":
            graph.nodes[node]["text"] = episode.problem_text
    return graph


def _scalar_attrs(attrs: dict) -> dict:
    """GraphML holds scalars only: drop None, write lists and dicts as JSON."""
    out = {}
    for key, value in attrs.items():
        if value is None:
            continue
        out[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return out


def graphml_bytes(store: MemoryStore) -> bytes:
    source = _labelled_graph(store)
    graph = nx.MultiDiGraph()
    for node, attrs in source.nodes(data=True):
        graph.add_node(node, **_scalar_attrs(attrs))
    for u, v, key, attrs in source.edges(keys=True, data=True):
        graph.add_edge(u, v, key=key, kind=key, **_scalar_attrs(attrs))
    buffer = io.BytesIO()
    nx.write_graphml(graph, buffer)
    return buffer.getvalue()


def html_bytes(store: MemoryStore, title: str) -> bytes:
    """A self-contained page (inline SVG and script, nothing fetched) drawing the memory graph.

    Positions come from networkx's spring layout with a fixed seed, so the same graph gives
    the same picture.
    """
    graph = _labelled_graph(store)
    positions = nx.spring_layout(nx.Graph(graph), seed=0) if graph.number_of_nodes() else {}
    nodes = []
    for node, attrs in graph.nodes(data=True):
        x, y = positions[node]
        nodes.append({"id": node, "kind": attrs.get("kind", "?"), "x": round(500 + 480 * float(x), 1),
                      "y": round(500 + 480 * float(y), 1), "attrs": _scalar_attrs({k: v for k, v in attrs.items() if k != "kind"})})
    edges = [{"source": u, "target": v, "kind": k} for u, v, k in graph.edges(keys=True)]
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n["kind"]] = counts.get(n["kind"], 0) + 1
    edge_colours = {"failed_on": "#d62728", "fixed": "#2ca02c", "broke": "#d62728", "trained_into": "#ff7f0e",
                    "trained_in": "#ff7f0e", "updated": "#ff7f0e", "similar_to": "#17becf"}
    data = {"nodes": nodes, "edges": edges, "counts": dict(sorted(counts.items())), "colours": _KIND_COLOURS,
            "edgeColours": edge_colours}
    # "</" would end the script element early; "<\\/" is the same string to JavaScript.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = _page_template().replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    return page.encode("utf-8")


def write_graph(store: MemoryStore, out: str | Path, fmt: str | None = None, title: str = "memory") -> Path:
    """Write the memory graph as GraphML or a self-contained HTML page; fmt from the suffix when None."""
    out = Path(out)
    fmt = fmt or {".graphml": "graphml", ".html": "html", ".htm": "html"}.get(out.suffix.lower())
    if fmt not in GRAPH_FORMATS:
        raise ValueError(f"graph format must be one of {', '.join(GRAPH_FORMATS)} (or an .html/.graphml file name); got {fmt!r}")
    data = graphml_bytes(store) if fmt == "graphml" else html_bytes(store, title)
    atomic_write_bytes(out, data)
    return out
