"""int8 greedy texts against the call they are decoded in: the first N GSM8K test problems in one
call, then in calls of 8 at 8 slots (the probe behind the README's int8 figures; its output is in
compose-48.log). Run from the repository root with SELFIMPROVE_GSM8K set:
python docs/int8-probe/compose.py 48"""
import os, sys, time, json
from pathlib import Path
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import torch
torch.set_num_threads(2)
from agents.data_sources import open_source
from agents.lm.backend import TorchBackend
from agents.lm.models import load_model
from agents.solver import Solver, SolverConfig
from agents.verifier import check
loaded = load_model("qwen2.5-coder-0.5b", dtype="int8")
problems = open_source("test").take(int(sys.argv[1]))
qs = [p.question for p in problems]
def run(slots, chunk):
    solver = Solver(TorchBackend(loaded.model, loaded.tokenizer, None, batch_size=slots, int8=True), SolverConfig(max_new_tokens=384))
    out = []
    for i in range(0, len(qs), chunk):
        out += solver.solve(qs[i:i + chunk])
    return [a.text for a in out], [bool(check(a, p.label).correct) for a, p in zip(out, problems)]
t = time.perf_counter(); a, ca = run(64, len(qs)); print(f"one call of {len(qs)}:", round(time.perf_counter() - t), "s, right", sum(ca), flush=True)
t = time.perf_counter(); b, cb = run(8, 8); print("calls of 8 at 8 slots:", round(time.perf_counter() - t), "s, right", sum(cb), flush=True)
print("identical texts:", sum(x == y for x, y in zip(a, b)), "/", len(qs), "; same verdict:", sum(x == y for x, y in zip(ca, cb)),
      "; wrong->right", sum((not x) and y for x, y in zip(ca, cb)), "right->wrong", sum(x and not y for x, y in zip(ca, cb)))
json.dump({"a": a, "b": b, "ca": ca, "cb": cb}, open(HERE / "compose.json", "w"))
