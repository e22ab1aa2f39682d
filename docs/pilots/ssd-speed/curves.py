"""Paired per-seed AP differences of the SSD suite at every evaluation of the committed study runs: does 3:1
mining learn faster than all negatives (the SSD paper's words: "faster optimization and a more stable
training"), and where does softmax focal stand? Reads docs/study/runs/ssd/*/*/seed*/result.json.

    python docs/pilots/ssd-speed/curves.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RUNS = ROOT / "docs" / "study" / "runs" / "ssd"


def curves(arm: str) -> dict[int, dict[int, float]]:
    """{seed: {iteration: AP in points}} of the finished runs of ``arm``."""
    out = {}
    for f in sorted(RUNS.glob(f"{arm}/*/seed*/result.json")):
        run = json.loads(f.read_text())
        out[run["seed"]] = {p["iter"]: 100 * p["AP"] for p in run["curve"] if "AP" in p}
    return out


def main() -> None:
    arms = {a: curves(a) for a in ("mining", "all", "focal")}
    for a, b in (("mining", "all"), ("focal", "mining")):
        seeds = sorted(set(arms[a]) & set(arms[b]))
        print(f"\n{a} - {b}, AP points per evaluation (seeds {seeds}):")
        its = sorted(arms[a][seeds[0]])
        print("iteration | " + " | ".join(f"seed {s}" for s in seeds) + " | mean")
        for it in its:
            d = [arms[a][s][it] - arms[b][s][it] for s in seeds]
            print(f"{it} | " + " | ".join(f"{x:+.1f}" for x in d) + f" | {statistics.mean(d):+.1f}")
    print("\nstability: count of evaluations at which AP fell from the previous one, per arm and seed")
    for a, runs in arms.items():
        drops = {s: sum(1 for x, y in zip(list(c.values()), list(c.values())[1:]) if y < x) for s, c in runs.items()}
        print(a, drops)


if __name__ == "__main__":
    main()
