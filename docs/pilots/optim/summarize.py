"""Issue 12's learning-curve study of the optimiser: each arm's curve under SGD and AdamW (seed 0).

Reads compare run folders (``<root>/runs/<suite>/<arm>/<key>/seed0/result.json``) under the roots given on
the command line, and writes ``curves.png`` (one panel per suite, SGD solid, AdamW dashed) and
``table.md`` (AP at every evaluation) next to this file::

    python docs/pilots/optim/summarize.py /work/out/lc/losses-sgd /work/out/lc/losses-adamw ...
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


ITERS = 3000  # the budget of the runs compared (other lengths under the same roots are left out)


def load(roots: list[str]) -> dict[str, dict[tuple[str, str], dict]]:
    """``{suite: {(arm, optim): result}}`` for every finished seed-0 run of ``ITERS`` iterations under the roots."""
    out: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for root in roots:
        for path in sorted(Path(root).glob("runs/*/*/*/seed0/result.json")):
            res = json.loads(path.read_text())
            cfg = tomllib.loads(res["config"])
            if cfg["engine"]["iterations"] != ITERS:
                continue
            suite, arm = path.parts[-5], path.parts[-4]
            out[suite][(arm, cfg["optim"]["name"])] = res
    return out


def main(roots: list[str]) -> None:
    runs = load(roots)
    suites = sorted(runs)
    fig, axes = plt.subplots(1, len(suites), figsize=(5.2 * len(suites), 4.2), squeeze=False)
    lines = []
    for ax, suite in zip(axes[0], suites):
        colors: dict[str, str] = {}
        for (arm, optim), res in sorted(runs[suite].items()):
            pts = [(p["iter"], 100 * p["AP"]) for p in res["curve"] if "AP" in p]
            color = colors.setdefault(arm, f"C{len(colors)}")
            ax.plot(*zip(*pts), color=color, ls="-" if optim == "sgd" else "--", marker="o", ms=3,
                    label=f"{arm}, {optim}")
            lines.append(f"| {suite} | {arm} | {optim} | " + ", ".join(f"{i}: {a:.1f}" for i, a in pts) + " |")
        ax.set_title(f"{suite} (seed 0)")
        ax.set_xlabel("iteration (batch 16)")
        ax.set_ylabel("val AP")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SGD (solid) vs AdamW (dashed), the compare recipe, cosine decay", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=110)
    table = ["| suite | arm | optimiser | AP at each evaluation (iteration: AP) |", "|---|---|---|---|", *lines]
    (HERE / "table.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main(sys.argv[1:])
