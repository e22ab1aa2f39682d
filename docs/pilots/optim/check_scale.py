"""Check (issue 12): under SGD, does focal lag CE because its gradient is smaller? Focal x W under SGD."""
import sys
from dataclasses import replace
from pathlib import Path

import torch

from detbalance.compare.driver import _data_summary
from detbalance.compare.runs import run_one
from detbalance.compare.suites import suite_configs

w = float(sys.argv[1])
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
torch.set_num_threads(1)
cfgs = dict((m.key, c) for m, c in suite_configs("losses", iters=iters, seed=0, optim="sgd"))
cfg = cfgs["focal"]
cfg = replace(cfg, remedy=replace(cfg.remedy, cls_loss=replace(cfg.remedy.cls_loss, loss_weight=w)))
rare = _data_summary(cfg)["rare"]
res, _ = run_one(Path(sys.argv[3] if len(sys.argv) > 3 else f"lc/checks/focal_x{w:g}_sgd_{iters}"), cfg, on_step=lambda m: None, rare=rare)
print("focal x", w, "sgd", [(p["iter"], round(100 * p["AP"], 1)) for p in res["curve"] if "AP" in p], flush=True)
