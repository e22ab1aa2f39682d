"""Why does GHM-C + GHM-R stall in seeds 1 and 2? The study's losses-suite ghm_c_r arm (6000-iteration
recipe: AdamW, cosine over 6000), seed 1, with one GHM-R setting changed, stopped after the evaluation at 750.

    python docs/pilots/ghmr-stall/diag.py ARM [SEED]     # ARM: ref bins1 w1 alllevels mom0 sgd

Prints the AP at 750 and the logged box loss (its scale depends on the setting: compare within a run).
"""
import json, sys
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(1)
from detbalance.compare.suites import suite_configs
from detbalance.engine.run import fit

class Stop(Exception):
    pass

STOP = 750
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
arm = sys.argv[1]
optim = "sgd" if arm == "sgd" else None
cfg = dict((m.key, c) for m, c in suite_configs("losses", iters=6000, seed=seed, optim=optim))["ghm_c_r"]
box = cfg.remedy.box_loss
if arm == "bins1":
    box = replace(box, bins=1)
elif arm == "w1":
    box = replace(box, loss_weight=1.0)
elif arm == "alllevels":
    box = replace(box, per_level=False)
elif arm == "mom0":
    box = replace(box, momentum=0.0)
elif arm == "paper":
    box = replace(box, normalization="paper")
cfg = replace(cfg, remedy=replace(cfg.remedy, box_loss=box),
              engine=replace(cfg.engine, eval_interval=750, checkpoint_interval=10**6))
out = Path(f"docs/pilots/ghmr-stall/runs/{arm}-s{seed}")

def on_step(m):
    if m.step >= STOP:
        raise Stop
try:
    fit(cfg, output=out, on_step=on_step, progress=False, overwrite=True)
except Stop:
    pass
recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
tr = [r for r in recs if r["type"] == "train"]
ev = [r for r in recs if r["type"] == "eval"]
print(arm, seed, "AP@750", [round(100 * r["metrics"]["AP"], 1) for r in ev], [(r["step"], round(r["losses"]["bbox_regression"], 3)) for r in tr[::6]], flush=True)
