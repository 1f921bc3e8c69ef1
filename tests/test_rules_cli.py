"""`rules list|show|search|stats|graph` and `export` through CliRunner, on a run the loop wrote (tiny-random)."""

import json
import re

import networkx as nx
import pytest
from chromadb.api.client import SharedSystemClient
from typer.testing import CliRunner

from adapters.bank import BankConfig, LoRABankLinear
from adapters.trainer import TrainerConfig
from agents.prompts import REFLECT_SYSTEM, SOLVER_SYSTEM, VARIANT_SYSTEM
from agents.solver import SolverConfig
from graph.context import LoopConfig
from graph.episodes import run_episodes
from graph.run_dir import RunSettings, prepare_run_dir
from graph.runner import build_context
from memory_store.config import MemoryConfig
from memory_store.embedding import HashEmbedding
from memory_store.store import MemoryStore
from run_loop import app
from tests.fakes import ScriptedBackend

PENS = {"id": "p-pens", "question": "A box holds 4 pens. How many pens are in 6 boxes?", "label": "24",
        "split": "train", "solution": "4 * 6 = 24"}
CAKES = {"id": "p-cakes", "question": "Ann bakes 7 cakes and sells 2. How many are left?", "label": "5",
         "split": "train", "solution": "7 - 2 = 5"}

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A loop run: pens is fixed by a trained expert (one trained rule); cakes stays wrong (two more rules)."""
    from agents.lm.models import load_model

    run_dir = tmp_path_factory.mktemp("rules") / "run"
    loaded = load_model("tiny-random")
    rules = ["RULE: Multiply the count per box by the number of boxes.",
             "RULE: Subtract what was sold from what was made.",
             "RULE: Check which quantity the question asks for before answering."]

    helpful = {"4 pens": "Multiply the count per box", "7 cakes": "Subtract what was sold"}

    def script(prompt, sampling, weights):
        if VARIANT_SYSTEM in prompt:
            return "Problem: " + re.search(r"Problem: (.*?)</user>", prompt, re.DOTALL).group(1).replace("A box", "A crate")
        if SOLVER_SYSTEM[:30] in prompt:
            trained = any(bool(m.lora_B.detach().any()) for m in loaded.model.modules() if isinstance(m, LoRABankLinear))
            if sampling.temperature > 0:  # sampled answers verify with a helpful rule in the prompt
                for needle, rule in helpful.items():
                    if needle in prompt and (rule in prompt or "Check which quantity" in prompt):
                        return f"Worked out: {'4 * 6 = 24' if needle == '4 pens' else '7 - 2 = 5'}.\nThe answer is {24 if needle == '4 pens' else 5}."
                return "The answer is 1."
            return "4 * 6 = 24.\nThe answer is 24." if trained and "4 pens" in prompt else "The answer is 1."
        if REFLECT_SYSTEM[:30] in prompt:  # one rule per problem and cycle (every row of a call alike)
            if "4 pens" in prompt:
                return rules[0]
            return rules[2] if "These rules were tried" in prompt else rules[1]
        raise AssertionError(prompt[:200])

    loop = LoopConfig(cycles=2, canary_size=2, keep_unfixed_updates=False, round_gate=False)
    settings = RunSettings(model="tiny-random", data="inline", episodes=2, loop=loop,
                           bank=BankConfig(n_experts=4), trainer=TrainerConfig(steps_per_update=2),
                           solver=SolverConfig(max_new_tokens=16))
    SharedSystemClient.clear_system_cache()
    prepare_run_dir(run_dir, settings, resume=False)
    ctx = build_context(loaded, settings, run_dir, embedder=HashEmbedding(dim=384), backend=ScriptedBackend(script))
    try:
        finals = list(run_episodes(ctx, [PENS, CAKES], run_dir=run_dir))
    finally:
        ctx.memory.close()
    assert [f["outcome"] for f in finals] == ["fixed", "unfixed"]
    return run_dir


def _invoke(*args):
    SharedSystemClient.clear_system_cache()
    return runner.invoke(app, [str(a) for a in args])


def _json(*args):
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_list_shows_every_rule_with_its_counters(run_dir):
    rows = _json("rules", "list", "--run-dir", run_dir)
    assert len(rows) == 3
    assert set(rows[0]) >= {"id", "created", "expert", "status", "helped", "hurt", "text"}
    (pens,) = [r for r in rows if "per box" in r["text"]]
    assert pens["status"] == "trained" and pens["expert"] is not None and pens["helped"] == 1
    assert _json("rules", "list", "--run-dir", run_dir, "--status", "trained", "--limit", "1")[0]["status"] == "trained"
    table = _invoke("rules", "list", "--run-dir", run_dir)
    assert table.exit_code == 0 and pens["id"] in table.stdout


def test_show_gives_the_provenance_chain(run_dir):
    (pens,) = [r for r in _json("rules", "list", "--run-dir", run_dir) if "per box" in r["text"]]
    chain = _json("rules", "show", pens["id"], "--run-dir", run_dir)
    assert chain["problem_id"] == "p-pens" and chain["problem_text"] == PENS["question"]
    assert chain["failure"]["verdict_before"] is False
    assert chain["update"]["update_id"].startswith("run-ep00000-c0") and chain["outcome"] == "helped"
    text = _invoke("rules", "show", pens["id"], "--run-dir", run_dir)
    assert text.exit_code == 0
    assert re.search(r"^update\s+run-ep00000-c0 into expert \d", text.stdout, re.MULTILINE)
    assert "problem  p-pens: A box holds 4 pens" in text.stdout


def test_search_and_stats(run_dir):
    hits = _json("rules", "search", "Subtract what was sold", "--run-dir", run_dir, "--k", "2")
    assert len(hits) == 2 and "Subtract" in hits[0]["text"]
    assert hits[0]["similarity"] >= hits[1]["similarity"]
    stats = _json("rules", "stats", "--run-dir", run_dir)
    assert stats["n_rules"] == 3 and stats["n_episodes"] >= 2 and stats["writable"] is False
    assert sum(stats["rules_by_status"].values()) == 3 and stats["rules_by_expert"]
    assert _invoke("rules", "stats", "--run-dir", run_dir).exit_code == 0


def test_graph_html_is_self_contained_and_graphml_reads_back(run_dir, tmp_path):
    page = tmp_path / "graph.html"
    result = _json("rules", "graph", "--run-dir", run_dir, "--out", page)
    assert result["format"] == "html" and result["nodes"] > 5
    html = page.read_text()
    assert "<svg" in html and "<script>" in html and "Multiply the count per box" in html
    assert not re.search(r"<script[^>]+src|<link|@import|https?://(?!www\.w3\.org/2000/svg)", html)  # nothing fetched
    data = json.loads(re.search(r"const DATA = (\{.*?\});\n", html, re.DOTALL).group(1))
    assert {n["kind"] for n in data["nodes"]} >= {"problem", "rule", "expert", "episode", "update"}
    graphml = tmp_path / "graph.xml"
    assert _json("rules", "graph", "--run-dir", run_dir, "--out", graphml, "--format", "graphml")["edges"] > 5
    graph = nx.read_graphml(graphml)
    kinds = {d["kind"] for _, d in graph.nodes(data=True)}
    assert {"rule", "expert", "update"} <= kinds


def test_rules_work_while_a_loop_holds_the_memory_open(run_dir):
    SharedSystemClient.clear_system_cache()
    writer = MemoryStore.open(MemoryConfig(run_dir=run_dir, n_experts=4), embedder=HashEmbedding(dim=384))
    try:
        writer.add_rule("Write the units next to every number.", problem_id="p-live")
        writer.flush()
        rows = _json("rules", "list", "--run-dir", run_dir)
        assert any("units next to every number" in r["text"] for r in rows)
    finally:
        writer.close()
    assert len(_json("rules", "list", "--run-dir", run_dir)) == 4


def test_export_writes_a_peft_folder_of_the_trained_expert(run_dir, tmp_path):
    from peft import PeftModel

    from agents.lm.models import load_model

    (pens,) = [r for r in _json("rules", "list", "--run-dir", run_dir) if "per box" in r["text"]]
    out = tmp_path / "peft"
    result = _json("export", "--run-dir", run_dir, "--expert", pens["expert"], "--out", out)
    assert result["trained"] is True and result["expert"] == pens["expert"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    model = PeftModel.from_pretrained(load_model("tiny-random").model, out)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    untrained = next(e for e in range(4) if e != pens["expert"] and e != 0)
    text = _invoke("export", "--run-dir", run_dir, "--expert", untrained, "--out", tmp_path / "other")
    assert text.exit_code == 0 and "never trained" in text.stdout


def test_bad_arguments_are_one_line_errors(run_dir, tmp_path):
    evaluation = tmp_path / "eval"
    (evaluation / "arms" / "full" / "memory").mkdir(parents=True)
    cases = [
        (["rules", "list", "--run-dir", tmp_path / "missing"], "does not exist"),
        (["rules", "list", "--run-dir", evaluation], "arms/full"),
        (["rules", "list", "--run-dir", run_dir, "--status", "happy"], "unknown rule status"),
        (["rules", "list", "--run-dir", run_dir, "--embedder", "bert"], "embedder must be"),
        (["rules", "show", "r-0000000000000000", "--run-dir", run_dir], "r-0000000000000000"),
        (["rules", "search", "x", "--run-dir", run_dir, "--k", "0"], "k must be >= 1"),
        (["rules", "graph", "--run-dir", run_dir, "--out", tmp_path / "g.txt"], "graph format must be"),
        (["export", "--run-dir", run_dir, "--out", tmp_path / "x"], "--expert is required"),
        (["export", "--run-dir", run_dir, "--expert", 9, "--out", tmp_path / "x"], "--expert must be in [0, 4)"),
        (["export", "--run-dir", tmp_path, "--expert", 0, "--out", tmp_path / "x"], "holds no bank"),
    ]
    for args, needle in cases:
        result = _invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        assert needle in result.output, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, result.output)
