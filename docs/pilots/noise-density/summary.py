"""What the trained noise-suite models do with the training labels: the gradient-norm density of each run.

Reads the ``grad_density`` that ``compare`` stores in every run's ``result.json`` (g = |p - y| per
anchor-class element of the classifier, 30 bins over [0, 1], the run's own training images, 64 of them, at
the end of training) and prints, per arm and seed, the elements by range of g::

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
            edge = lambda x: round(x * bins)  # noqa: E731  (first bin index at or above g = x)
            fitted = counts[0]
            middle = sum(counts[1 : edge(0.5)])
            wrong = sum(counts[edge(0.5) : edge(0.8)])
            far = sum(counts[edge(0.8) :])
            top = max(i for i, c in enumerate(counts) if c > 0)
            print(
                f"| {arm} | {path.parent.name[4:]} | {100 * res['metrics']['AP']:.1f} | {fitted:.0f} | {middle:.0f} | "
                f"{wrong:.0f} | {far:.0f} | {top / bins:.2f}-{(top + 1) / bins:.2f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/study")
