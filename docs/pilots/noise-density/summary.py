"""What the trained noise-suite models do with the training labels: the gradient-norm density of each run.

Reads the ``grad_density`` that ``compare`` stores in every run's ``result.json`` (g = |p - y| per
anchor-class element of the classifier, 30 bins over [0, 1], the run's own training images, 64 of them, at
the end of training) and prints, per arm and seed, the elements by range of g, then the paired AP
differences quoted with it in ``docs/study/disagreements.md``::

    python docs/pilots/noise-density/summary.py docs/study > docs/pilots/noise-density/results.txt

g < 1/30: fitted; 1/30 <= g < 0.5: on the right side of 0.5 but not fitted; g >= 0.5: on the wrong side
(for a flipped label, the detector disagrees with the label: the outliers GHM-C claims to down-weight).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARMS = ("focal", "ghm_c", "focal_clean", "ghm_c_clean")


def main(study: str) -> None:
    print("| arm | seed | AP | g < 1/30 | 1/30 <= g < 0.5 | 0.5 <= g < 0.8 | g >= 0.8 | highest non-empty bin |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        for path in sorted(Path(study, "runs", "noise", arm).glob("*/seed*/result.json")):
            res = json.loads(path.read_text())
            counts = res["grad_density"]["counts"]
            bins = len(counts)
            fitted = counts[0]
            middle = sum(counts[1 : round(0.5 * bins)])
            wrong = sum(counts[round(0.5 * bins) : round(0.8 * bins)])
            far = sum(counts[round(0.8 * bins) :])
            top = max(i for i, c in enumerate(counts) if c > 0)
            print(
                f"| {arm} | {path.parent.name[4:]} | {100 * res['metrics']['AP']:.1f} | {fitted:.0f} | {middle:.0f} | "
                f"{wrong:.0f} | {far:.0f} | {top / bins:.2f}-{(top + 1) / bins:.2f} |"
            )


def paired(study: str) -> None:
    """The paired differences quoted with the table (per seed, 95 % t interval), from the same run folders."""
    from detbalance.compare.stats import (
        format_difference,
        noise_cost,
        paired_difference,
        robustness_difference,
    )

    methods = []
    for arm in ARMS:
        runs = [{"seed": int(path.parent.name[4:]), "metrics": json.loads(path.read_text())["metrics"]}
                for path in sorted(Path(study, "runs", "noise", arm).glob("*/seed*/result.json"))]
        methods.append({"key": arm, "label": arm, "runs": runs})
    suite = {"baseline": "focal", "clean": {"focal": "focal_clean", "ghm_c": "ghm_c_clean"}, "methods": methods}
    by_key = {m["key"]: m for m in methods}

    def ap(key):
        return {r["seed"]: r["metrics"]["AP"] for r in by_key[key]["runs"]}

    print()
    for arm in ("focal", "ghm_c"):
        print(f"noise cost of {arm}: {format_difference(noise_cost(suite, arm))} AP")
    print(f"GHM-C's drop minus focal's: {format_difference(robustness_difference(suite, 'ghm_c', 'focal'))} AP")
    print(f"GHM-C - focal, clean labels: {format_difference(paired_difference(ap('ghm_c_clean'), ap('focal_clean')))} AP")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/study")
    paired(sys.argv[1] if len(sys.argv) > 1 else "docs/study")
