"""The scripts in examples/ run, and the own-loop example actually trains (its loss falls)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_own_loop_trains():
    sys.path.insert(0, str(EXAMPLES))
    try:
        own_loop = runpy.run_path(str(EXAMPLES / "own_loop.py"))
    finally:
        sys.path.pop(0)
    early, late = own_loop["main"](2), own_loop["main"](40)
    assert late["focal"] > early["focal"] + 0.2
    assert late["ghm_c"] > early["ghm_c"] + 0.2


def test_adapt_your_model_runs(capsys):
    runpy.run_path(str(EXAMPLES / "adapt_your_model.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "RetinaNet + GHM-C" in out and "Faster R-CNN + S-OHEM" in out
