"""Inspect what a run learned: its rules, their provenance, the memory graph, and its experts.

Everything here opens the memory read-only (``MemoryStore.open(..., writable=False)`` reads
a consistent snapshot), so it works while a loop is writing to the same run directory.
A run directory is one loop's folder (``run_loop.py run --run-dir``) or one arm of an
evaluation (``<eval dir>/arms/<arm>``).
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import logging
from pathlib import Path

import networkx as nx

from agents.errors import MemoryStoreError, SelfImproveError
from memory_store.config import MemoryConfig
from memory_store.embedding import EMBEDDERS, make_embedder
from memory_store.store import MemoryStore

log = logging.getLogger(__name__)

GRAPH_FORMATS = ("html", "graphml")


class RunDirNotFound(SelfImproveError):
    """The directory is not a run directory (or holds no memory yet)."""


def read_run_settings(run_dir: Path) -> dict:
    """The run's saved settings (run.json), or {} when it has none."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirNotFound(f"{path} is unreadable: {err}") from err


def _check_run_dir(run_dir: Path, needs: str) -> None:
    if not run_dir.is_dir():
        raise RunDirNotFound(f"run directory {run_dir} does not exist")
    if not (run_dir / needs).exists():
        if (run_dir / "arms").is_dir():
            arms = sorted(p.name for p in (run_dir / "arms").iterdir() if (p / needs).exists())
            raise RunDirNotFound(f"{run_dir} is an evaluation; pass one arm's folder, e.g. --run-dir {run_dir / 'arms' / (arms[0] if arms else 'full')}")
        raise RunDirNotFound(f"{run_dir} holds no {needs} (not a run directory, or nothing written yet)")


def open_memory(run_dir: str | Path, embedder: str = "auto") -> MemoryStore:
    """The run's memory, read-only. 'auto' uses the embedder the memory was built with.

    Chroma records the embedder of each collection and refuses another one, so 'auto' tries the
    cheap hash embedder first and opens with MiniLM when the collection says it was built with it.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir, "memory")
    settings = read_run_settings(run_dir)
    config = MemoryConfig(run_dir=run_dir, url=settings.get("memory_url"),
                          n_experts=settings.get("bank", {}).get("n_experts", 16))
    if embedder != "auto" and embedder not in EMBEDDERS:
        raise ValueError(f"embedder must be 'auto' or one of {', '.join(EMBEDDERS)}; got {embedder!r}")
    names = ["hash", "minilm"] if embedder == "auto" else [embedder]
    for i, name in enumerate(names):
        try:
            return MemoryStore.open(config, embedder=make_embedder(name), writable=False)
        except MemoryStoreError as err:
            if "another embedder" not in str(err) or i == len(names) - 1:
                raise
            log.info("memory in %s was not built with the %s embedder; trying %s", run_dir, name, names[i + 1])
    raise AssertionError("unreachable")


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def rule_row(rule) -> dict:
    return {"id": rule.rule_id, "created": _when(rule.created_at), "expert": rule.expert, "status": rule.status,
            "helped": rule.helped, "hurt": rule.hurt, "retrieved": rule.retrieved, "text": rule.text}


def list_rules(store: MemoryStore, *, expert: int | None = None, status: str | None = None,
               limit: int | None = None) -> list[dict]:
    return [rule_row(r) for r in store.list_rules(expert=expert, status=status, limit=limit)]


def show_rule(store: MemoryStore, rule_id: str) -> dict:
    """One rule's provenance chain: problem -> failure -> rule -> training prompts -> update -> outcome."""
    return store.show_rule(rule_id).model_dump(mode="json")


def search_rules(store: MemoryStore, text: str, k: int = 5) -> list[dict]:
    return [{"similarity": round(hit.similarity, 4), **rule_row(hit.rule)} for hit in store.search_rules(text, k)]


def rule_stats(store: MemoryStore) -> dict:
    stats = store.stats().model_dump(mode="json")
    stats["rules_by_expert"] = {str(k): v for k, v in sorted(store.stats().rules_by_expert.items())}
    return stats


# ---------------------------------------------------------------- the memory graph


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


_KIND_COLOURS = {"problem": "#1f77b4", "rule": "#2ca02c", "expert": "#d62728", "episode": "#aaaaaa", "update": "#ff7f0e"}

_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Memory graph: __TITLE__</title>
<style>
body{margin:0;font:13px system-ui,sans-serif;display:flex;flex-direction:column;height:100vh}
header{padding:6px 10px;border-bottom:1px solid #ddd;display:flex;gap:14px;align-items:center;flex-wrap:wrap}
main{flex:1;display:flex;min-height:0}svg{flex:1;background:#fcfcfc;cursor:grab}
aside{width:340px;overflow:auto;padding:8px 10px;border-left:1px solid #ddd;white-space:pre-wrap}
.dim{opacity:.08}.hit{stroke:#000;stroke-width:2.5}line{stroke-opacity:.45}
</style></head><body>
<header><b>__TITLE__</b><span id="counts"></span><span id="kinds"></span>
<input id="q" placeholder="search ids and texts" size="28"></header>
<main><svg id="svg"><g id="view"></g></svg><aside id="info">Click a node for its details and neighbours.
Drag to pan, wheel to zoom, tick kinds to show or hide them.</aside></main>
<script>
const DATA = __DATA__;
const NS = "http://www.w3.org/2000/svg", view = document.getElementById("view"), svg = document.getElementById("svg");
const info = document.getElementById("info"), byId = {}, hidden = new Set();
let tx = 0, ty = 0, scale = 1;
function el(tag, attrs) { const e = document.createElementNS(NS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); return e; }
function apply() { view.setAttribute("transform", `translate(${tx},${ty}) scale(${scale})`); }
DATA.nodes.forEach(n => { byId[n.id] = n; n.edges = []; });
DATA.edges.forEach(e => {
  e.el = el("line", {x1: byId[e.source].x, y1: byId[e.source].y, x2: byId[e.target].x, y2: byId[e.target].y,
                     stroke: DATA.edgeColours[e.kind] || "#999", "stroke-width": 1.2});
  const t = el("title", {}); t.textContent = e.kind; e.el.appendChild(t);
  view.appendChild(e.el); byId[e.source].edges.push(e); byId[e.target].edges.push(e);
});
DATA.nodes.forEach(n => {
  n.el = el("circle", {cx: n.x, cy: n.y, r: 4 + Math.min(8, Math.sqrt(n.edges.length) * 1.5), fill: DATA.colours[n.kind] || "#555"});
  const t = el("title", {}); t.textContent = n.id + (n.attrs.text ? "\\n" + n.attrs.text : ""); n.el.appendChild(t);
  n.el.addEventListener("click", ev => { ev.stopPropagation(); select(n); });
  view.appendChild(n.el);
});
function visible(n) { return !hidden.has(n.kind); }
function refresh() {
  DATA.nodes.forEach(n => n.el.style.display = visible(n) ? "" : "none");
  DATA.edges.forEach(e => e.el.style.display = visible(byId[e.source]) && visible(byId[e.target]) ? "" : "none");
}
function select(n) {
  const near = new Set([n.id]);
  n.edges.forEach(e => { near.add(e.source); near.add(e.target); });
  DATA.nodes.forEach(m => m.el.classList.toggle("dim", !near.has(m.id)));
  DATA.edges.forEach(e => e.el.classList.toggle("dim", e.source !== n.id && e.target !== n.id));
  const lines = [n.id, ""].concat(Object.entries(n.attrs).map(([k, v]) => k + ": " + v), ["", "edges:"],
    n.edges.map(e => (e.source === n.id ? "-> " + e.kind + " " + e.target : "<- " + e.kind + " " + e.source)));
  info.textContent = lines.join("\\n");
}
svg.addEventListener("click", () => { DATA.nodes.forEach(m => m.el.classList.remove("dim")); DATA.edges.forEach(e => e.el.classList.remove("dim")); });
let drag = null;
svg.addEventListener("mousedown", ev => { drag = [ev.clientX - tx, ev.clientY - ty]; });
window.addEventListener("mouseup", () => { drag = null; });
window.addEventListener("mousemove", ev => { if (drag) { tx = ev.clientX - drag[0]; ty = ev.clientY - drag[1]; apply(); } });
svg.addEventListener("wheel", ev => {
  ev.preventDefault(); const f = ev.deltaY < 0 ? 1.15 : 1 / 1.15, r = svg.getBoundingClientRect();
  const mx = ev.clientX - r.left, my = ev.clientY - r.top; tx = mx - (mx - tx) * f; ty = my - (my - ty) * f; scale *= f; apply();
}, {passive: false});
document.getElementById("q").addEventListener("input", ev => {
  const q = ev.target.value.toLowerCase();
  DATA.nodes.forEach(n => n.el.classList.toggle("hit", q.length > 1 && (n.id + " " + (n.attrs.text || "")).toLowerCase().includes(q)));
});
const kinds = document.getElementById("kinds");
Object.keys(DATA.counts).forEach(k => {
  const label = document.createElement("label"), box = document.createElement("input");
  box.type = "checkbox"; box.checked = true; box.onchange = () => { box.checked ? hidden.delete(k) : hidden.add(k); refresh(); };
  label.style.color = DATA.colours[k]; label.append(box, ` ${k} (${DATA.counts[k]}) `); kinds.appendChild(label);
});
document.getElementById("counts").textContent = `${DATA.nodes.length} nodes, ${DATA.edges.length} edges`;
const w = svg.clientWidth || 900, h = svg.clientHeight || 700; scale = Math.min(w, h) / 1100; tx = (w - 1000 * scale) / 2; ty = (h - 1000 * scale) / 2; apply();
</script></body></html>
"""


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
    page = _HTML.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    return page.encode("utf-8")


def write_graph(store: MemoryStore, out: str | Path, fmt: str | None = None, title: str = "memory") -> Path:
    """Write the memory graph as GraphML or a self-contained HTML page; fmt from the suffix when None."""
    from agents.files import atomic_write_bytes

    out = Path(out)
    fmt = fmt or {".graphml": "graphml", ".html": "html", ".htm": "html"}.get(out.suffix.lower())
    if fmt not in GRAPH_FORMATS:
        raise ValueError(f"graph format must be one of {', '.join(GRAPH_FORMATS)} (or an .html/.graphml file name); got {fmt!r}")
    data = graphml_bytes(store) if fmt == "graphml" else html_bytes(store, title)
    atomic_write_bytes(out, data)
    return out


# ---------------------------------------------------------------- export


def export_expert(run_dir: str | Path, expert: int, out: str | Path, *, loader=None) -> dict:
    """Write one expert of a run's saved bank as a PEFT LoRA folder.

    The bank is rebuilt on the run's model with the shapes in run.json (the router's from the
    bank manifest, which records the memory size it was built with), then ``bank/current`` is
    loaded, checked against those shapes, and the expert exported.
    """
    from adapters.bank import BankConfig
    from adapters.export import export_peft
    from adapters.router import RouterConfig
    from adapters.stack import build_adapters
    from adapters.store import read_manifest
    from agents.lm.models import load_model

    run_dir = Path(run_dir)
    _check_run_dir(run_dir, "bank")
    settings = read_run_settings(run_dir)
    if not settings.get("model"):
        raise RunDirNotFound(f"{run_dir} has no run.json naming its model")
    manifest = read_manifest(Path(run_dir) / "bank" / "current")
    bank_config = BankConfig(**settings.get("bank", manifest["bank_config"]))
    if not 0 <= expert < bank_config.n_experts:
        raise ValueError(f"--expert must be in [0, {bank_config.n_experts}) for this run, got {expert}")
    loaded = (loader or load_model)(settings["model"])
    adapters = build_adapters(loaded.model, loaded.tokenizer, bank_config, RouterConfig(**manifest["router_config"]),
                              bank_dir=run_dir / "bank")
    bank = adapters.bank
    adapters.store.load()
    norm = float(bank.expert_norms()[expert])
    path = export_peft(bank, out, expert=expert, base_model_name_or_path=loaded.source)
    return {"out": str(path), "expert": expert, "model": settings["model"], "base_model": loaded.source,
            "rank": bank_config.rank, "layers": len(bank.layer_names), "trained": norm > 0, "b_norm": norm}
