"""Every benchmark script runs once in its --smoke mode (tiny sizes, no timing claims), so none can rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bm_*.py"))


def test_every_benchmark_is_listed():
    assert SCRIPTS == ["bm_longtail.py", "bm_losses.py", "bm_pisa_atss.py", "bm_sampling.py", "bm_threads.py",
                       "bm_train_step.py", "bm_zoo_step.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--device", "cpu", "--out", str(tmp_path / "out")]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|" in proc.stdout  # a markdown table was printed
