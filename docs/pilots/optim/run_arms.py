"""Run chosen arms of a compare suite into compare's own run folders (so `detbalance compare` reuses them).

python run_arms.py OUTPUT SUITE OPTIM ITERS SEED ARM [ARM ...]   (1 torch thread)
"""
import sys

import torch

from detbalance.compare.driver import _data_summary
from detbalance.compare.runs import run_dir, run_one
from detbalance.compare.suites import suite_configs

out, suite, optim, iters, seed, *arms = sys.argv[1:]
torch.set_num_threads(1)
cfgs = dict((m.key, c) for m, c in suite_configs(suite, iters=int(iters), seed=int(seed), optim=optim))
rare = _data_summary(next(iter(cfgs.values())))["rare"]
for arm in arms:
    folder = run_dir(out, suite, arm, cfgs[arm])
    res, reused = run_one(folder, cfgs[arm], on_step=lambda m: None, rare=rare)
    curve = [(p["iter"], round(100 * p["AP"], 1)) for p in res["curve"] if "AP" in p]
    print(suite, arm, optim, iters, seed, "reused" if reused else f"{res['wall_s'] / 60:.1f} min", curve, flush=True)
