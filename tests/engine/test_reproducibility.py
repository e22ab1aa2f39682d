"""A short training run against a stored reference, each quantity at the tolerance it deserves.

What README's "Reproducibility" paragraph promises, held here: the same code trains the same numbers on
another CPU up to float rounding. Bit-identity is only promised on the same machine (same CPU ISA, same
thread count, same PyTorch): a CPU with other vector units, or another thread count, sums float32 in another
order, so every reduction may differ in its last bits (measured: 1 and 2 threads of this run agree to 1e-7
relative at step 4), and over hundreds of steps those bits grow into the seed-to-seed spread.

The tolerances, relative:

* ``FIRST``, 1e-5, the losses of step 1: a forward pass of the seeded initial weights on the seeded data,
  where only the summation order can differ (about 1e-7 between CPUs, as observed on the issue's two machines
  and between thread counts here); any change of the data, the initialisation, the anchors or the loss moves
  them by far more (1e-3 and up).
* ``LATER``, 1e-4, the losses of steps 2-4: they also check the backward pass and the optimiser; three updates
  may amplify the rounding of step 1 tenfold, still far below what a changed gradient or optimiser does.

Regenerate (after an intended change of the training numbers) with
``PYTHONPATH=src python tests/engine/test_reproducibility.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import torch

REFERENCE = Path(__file__).with_name("data") / "reproducibility_reference.json"
OVERRIDES = ["data.train=builtin:tiny", "engine.iterations=4", "engine.batch_size=4", "engine.device=cpu",
             "model.norm=gn", "engine.log_interval=1", "schedule.warmup_iters=1"]
FIRST = 1e-5
LATER = 1e-4


def _train(tmp: Path) -> list[dict[str, float]]:
    from detbalance.config import load_config
    from detbalance.engine import fit

    result = fit(load_config(None, overrides=OVERRIDES), output=tmp, progress=False)
    return [h["losses"] for h in result.history if h["type"] == "train"]


def test_a_short_run_matches_the_stored_reference(tmp_path: Path) -> None:
    reference = json.loads(REFERENCE.read_text())
    assert reference["overrides"] == OVERRIDES
    losses = _train(tmp_path / "run")
    assert [sorted(step) for step in losses] == [sorted(step) for step in reference["losses"]]
    for step, (ours, ref) in enumerate(zip(losses, reference["losses"], strict=True), 1):
        tol = FIRST if step == 1 else LATER
        for term, value in ref.items():
            assert math.isclose(ours[term], value, rel_tol=tol), (
                f"step {step} {term}: {ours[term]!r} vs the reference {value!r} (rel. tolerance {tol}; "
                f"reference made on {reference['machine']})"
            )


if __name__ == "__main__":  # regenerate the reference
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        losses = _train(Path(d))
    cpus = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    machine = next((line.split(":", 1)[1].strip() for line in cpus if line.startswith("model name")),
                   platform.processor() or platform.machine())
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps({
        "overrides": OVERRIDES,
        "losses": losses,
        "machine": f"{machine}, 1 thread, torch {torch.__version__}, python {platform.python_version()}",
    }, indent=1) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
