"""`detbalance compare`: train a detector under each remedy of a suite and report which works.

* :mod:`~detbalance.compare.suites`: the suites, their arms and the one training recipe (:func:`recipe`)
  shared with ``configs/``;
* :mod:`~detbalance.compare.runs`: one run on disk, in a folder keyed by its settings (never deleted,
  resumed where it stopped);
* :mod:`~detbalance.compare.stats`: paired differences with 95 % t-intervals, verdicts and findings;
* :mod:`~detbalance.compare.driver`: :func:`run_compare`, the orchestrator;
* :mod:`~detbalance.compare.study`: the committed study against the papers' claims.
"""

from detbalance.compare.driver import run_compare, select_suites
from detbalance.compare.stats import (
    MIN_SEEDS,
    RARE_FRACTION,
    PairedDifference,
    findings,
    paired_difference,
    rare_classes,
)
from detbalance.compare.suites import (
    DEFAULT_ITERS,
    MIN_CURVE_POINTS,
    SUITES,
    Method,
    Suite,
    recipe,
    suite_configs,
)

__all__ = [
    "DEFAULT_ITERS",
    "MIN_CURVE_POINTS",
    "MIN_SEEDS",
    "RARE_FRACTION",
    "SUITES",
    "Method",
    "PairedDifference",
    "Suite",
    "findings",
    "paired_difference",
    "rare_classes",
    "recipe",
    "run_compare",
    "select_suites",
    "suite_configs",
]
