"""Pilot (issue 12): one losses-suite arm at 3000 iterations, seed 0, the compare recipe (AdamW), 1 thread."""
import json
import sys
import time

import torch

from detbalance.compare.suites import suite_configs
from detbalance.engine import fit

key = sys.argv[1]
torch.set_num_threads(1)
cfg = dict((m.key, c) for m, c in suite_configs("losses", iters=3000, seed=0))[key]
t = time.time()
res = fit(cfg, output=f"pilot/{key}", progress=False)
print(json.dumps({"arm": key, "AP": res.metrics["AP"], "wall_s": time.time() - t}))
