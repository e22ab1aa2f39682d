"""Paired statistics of a suite: each arm against the baseline, seed by seed, and the verdict it supports.

Arms of a suite share their initial weights and data order per seed, so the per-seed difference
``d_s = metric(arm, s) - metric(baseline, s)`` removes what the seed does to both. The report gives the
mean difference with a two-sided 95 % Student-t interval over the seeds,
``mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)``, and one verdict word: ``better`` (the interval lies above
0), ``worse`` (below 0) or ``no measurable difference`` (it contains 0). A verdict needs at least
:data:`MIN_SEEDS` seeds; with fewer the verdict is ``needs seeds``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIN_BASELINE_AP",
    "MIN_SEEDS",
    "PLATEAU_AP",
    "RARE_FRACTION",
    "PairedDifference",
    "Plateau",
    "clean_twins",
    "findings",
    "identical_arms",
    "noise_cost",
    "paired_difference",
    "plateau",
    "rare_classes",
    "robustness_difference",
    "t_quantile_975",
    "twin_of_labels",
]

MIN_SEEDS = 3
"""Seeds needed for a verdict (with 2 the t interval has one degree of freedom and is 12.7 sd wide)."""

RARE_FRACTION = 0.1
"""A class is **rare** when it has fewer than this fraction of the most frequent class's training instances."""

MIN_BASELINE_AP = 0.25
"""Below this baseline AP a suite's detector has not learnt enough for its verdicts to speak to convergence."""

PLATEAU_AP = 0.01
"""A suite's budget is at a plateau when its best arm's AP changes by less than this over the last quarter."""

LEARNED_AP = 0.05
"""Below this final AP an arm has not learnt to detect: its AP can stay flat without any convergence, so the
plateau rule says nothing about it."""

VERDICTS = ("better", "worse", "no measurable difference", "needs seeds")

# t_{0.975, df} for df = 1..30 (the usual table, 4 decimals; beyond 30 the Cornish-Fisher series below
# is within 1e-4 of the exact quantile).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df >= 1`` degrees of freedom (two-sided 95 % intervals)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


@dataclass(frozen=True)
class PairedDifference:
    """Arm minus baseline over the seeds both have.

    Attributes:
        seeds: the paired seeds.
        diffs: per-seed differences (same order as ``seeds``).
        mean: mean difference (``nan`` without pairs).
        low, high: the 95 % t interval (``nan`` with fewer than 2 pairs).
        verdict: one of ``better``, ``worse``, ``no measurable difference``, ``needs seeds``.
    """

    seeds: list[int]
    diffs: list[float]
    mean: float
    low: float
    high: float
    verdict: str

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired_difference(
    arm: Mapping[int, float], baseline: Mapping[int, float], *, min_seeds: int = MIN_SEEDS
) -> PairedDifference:
    """Mean per-seed difference ``arm - baseline`` with its 95 % t interval and verdict.

    Args:
        arm: metric per seed of the arm (``nan`` values are left out).
        baseline: metric per seed of the baseline.
        min_seeds: pairs needed for a verdict.

    Returns:
        :class:`PairedDifference`.
    """
    seeds = sorted(s for s in arm if s in baseline and not _nan(arm[s]) and not _nan(baseline[s]))
    diffs = [float(arm[s]) - float(baseline[s]) for s in seeds]
    n = len(diffs)
    if n == 0:
        return PairedDifference([], [], math.nan, math.nan, math.nan, "needs seeds")
    mean = sum(diffs) / n
    if n < 2:
        return PairedDifference(seeds, diffs, mean, math.nan, math.nan, "needs seeds")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if n < min_seeds:
        verdict = "needs seeds"
    elif low > 0:
        verdict = "better"
    elif high < 0:
        verdict = "worse"
    else:
        verdict = "no measurable difference"
    return PairedDifference(seeds, diffs, mean, low, high, verdict)


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def rare_classes(class_counts: Mapping[str, int]) -> list[str]:
    """The classes with fewer than :data:`RARE_FRACTION` of the most frequent class's training instances."""
    top = max(class_counts.values(), default=0)
    return [name for name, n in class_counts.items() if top > 0 and n < RARE_FRACTION * top]


def metric_by_seed(method: Mapping[str, Any], metric: str) -> dict[int, float]:
    """``{seed: value}`` of one metric over a method's runs in ``results.json``."""
    out = {}
    for run in method["runs"]:
        v = run["metrics"].get(metric)
        out[int(run["seed"])] = math.nan if v is None else float(v)
    return out


def suite_differences(suite: Mapping[str, Any], metric: str) -> dict[str, PairedDifference]:
    """Every non-baseline arm's :class:`PairedDifference` to the suite's baseline, by method key."""
    methods = {m["key"]: m for m in suite["methods"]}
    base = metric_by_seed(methods[suite["baseline"]], metric)
    return {k: paired_difference(metric_by_seed(m, metric), base) for k, m in methods.items() if k != suite["baseline"]}


def clean_twins(suite: Mapping[str, Any]) -> dict[str, str]:
    """``{arm: its clean-label twin}`` of a suite in ``results.json`` (the noise suite; empty elsewhere)."""
    return dict(suite.get("clean") or {})


def twin_of_labels(suite: Mapping[str, Any]) -> dict[str, str]:
    """``{clean twin: label of the arm it is the twin of}``: the twins are not remedies, so the tables give
    them no difference to the baseline and no verdict."""
    labels = {m["key"]: m["label"] for m in suite["methods"]}
    return {twin: labels[arm] for arm, twin in clean_twins(suite).items()}


def noise_cost(suite: Mapping[str, Any], arm: str, metric: str = "AP") -> PairedDifference:
    """What the label noise costs ``arm``: its metric minus its clean-label twin's, paired per seed."""
    methods = {m["key"]: m for m in suite["methods"]}
    return paired_difference(metric_by_seed(methods[arm], metric), metric_by_seed(methods[clean_twins(suite)[arm]], metric))


def robustness_difference(suite: Mapping[str, Any], arm: str, reference: str, metric: str = "AP") -> PairedDifference:
    """``arm``'s noise cost minus ``reference``'s, paired per seed (a difference of differences).

    Positive: the noise costs ``arm`` less than ``reference``, i.e. ``arm`` is the more robust to it. Each
    seed's term, ``(arm - arm_clean) - (reference - reference_clean)``, pairs all four runs of that seed.
    """
    a, r = noise_cost(suite, arm, metric), noise_cost(suite, reference, metric)
    return paired_difference(dict(zip(a.seeds, a.diffs)), dict(zip(r.seeds, r.diffs)))


@dataclass(frozen=True)
class Plateau:
    """How much the best arm's AP moved over the last quarter of its runs (issue 12's plateau rule).

    ``start_iter`` is the last evaluation at or before 3/4 of the budget, ``end_iter`` the final one; the APs
    are means over the arm's seeds that have both points. ``learned`` is ``end_ap >= LEARNED_AP``; ``reached``
    is ``|end_ap - start_ap| < PLATEAU_AP`` for an arm that learned (never for one that did not: a curve
    stuck near 0 AP is flat without having converged).
    """

    arm: str
    start_iter: int
    end_iter: int
    start_ap: float
    end_ap: float
    seeds: int

    @property
    def change(self) -> float:
        return self.end_ap - self.start_ap

    @property
    def learned(self) -> bool:
        return self.end_ap >= LEARNED_AP

    @property
    def reached(self) -> bool:
        return self.learned and abs(self.change) < PLATEAU_AP

    def sentence(self) -> str:
        if not self.learned:
            return (
                f"Plateau check: none. The best arm, {self.arm}, ends at {100 * self.end_ap:.1f} AP (mean of "
                f"{self.seeds} seed{'s' if self.seeds != 1 else ''}), below {100 * LEARNED_AP:.0f} AP: no arm has "
                "learnt to detect at this budget, and a flat curve near 0 says nothing about convergence."
            )
        verdict = (
            f"a plateau by the < {100 * PLATEAU_AP:.0f} AP rule"
            if self.reached
            else f"not a plateau (the rule asks < {100 * PLATEAU_AP:.0f} AP): the ranking may still change with "
            "a longer budget"
        )
        return (
            f"Plateau check: the best arm, {self.arm}, went from {100 * self.start_ap:.1f} to {100 * self.end_ap:.1f} AP "
            f"({100 * self.change:+.1f}) between iterations {self.start_iter} and {self.end_iter}, the last quarter "
            f"(mean of {self.seeds} seed{'s' if self.seeds != 1 else ''}): {verdict}."
        )


def _quarter_points(run: Mapping[str, Any]) -> tuple[int, float, int, float] | None:
    points = [(int(p["iter"]), float(p["AP"])) for p in run.get("curve", []) if "AP" in p]
    if len(points) < 2:
        return None
    end_iter, end_ap = points[-1]
    before = [p for p in points if p[0] <= 0.75 * end_iter]
    if not before:
        return None
    start_iter, start_ap = before[-1]
    return start_iter, start_ap, end_iter, end_ap


def plateau(suite: Mapping[str, Any]) -> Plateau | None:
    """The :class:`Plateau` of the suite's best arm by mean final AP (clean arms aside); ``None`` without curves."""
    best, best_ap = None, -math.inf
    clean = set(clean_twins(suite).values())
    for m in suite["methods"]:
        if m["key"] in clean:
            continue
        aps = [v for v in metric_by_seed(m, "AP").values() if not math.isnan(v)]
        if aps and sum(aps) / len(aps) > best_ap:
            best, best_ap = m, sum(aps) / len(aps)
    if best is None:
        return None
    quarters = [q for q in (_quarter_points(r) for r in best["runs"]) if q is not None]
    if not quarters:
        return None
    n = len(quarters)
    return Plateau(
        arm=best["label"],
        start_iter=quarters[0][0],
        end_iter=quarters[0][2],
        start_ap=sum(q[1] for q in quarters) / n,
        end_ap=sum(q[3] for q in quarters) / n,
        seeds=n,
    )


def identical_arms(suite: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Pairs ``(arm, earlier arm)`` whose runs gave exactly the same metrics (every COCO number and per-class AP)
    in every seed: two arms that trained the same model, whatever their names say."""
    fingerprints: dict[str, Any] = {}
    pairs = []
    for m in suite["methods"]:
        if not m["runs"]:
            continue
        key = json.dumps(sorted((int(r["seed"]), r["metrics"]) for r in m["runs"]), sort_keys=True, default=str)
        if key in fingerprints:
            pairs.append((m["key"], fingerprints[key]))
        else:
            fingerprints[key] = m["key"]
    return pairs


def _why_identical(suite: Mapping[str, Any], arm: str) -> str:
    """The reason the runs themselves give for ``arm`` equalling another, or ``""``."""
    method = next(m for m in suite["methods"] if m["key"] == arm)
    rounds = [h for r in method["runs"] for h in r.get("hooks", []) if h.get("type") == "bootstrap"]
    if rounds and all(h.get("hard_negatives") == 0 for h in rounds):
        steps = sorted({int(h["step"]) for h in rounds})
        return (
            f"no false positives were mined (0 hard negatives in each of its {len(rounds)} bootstrapping "
            f"round{'s' if len(rounds) != 1 else ''}, at iteration {', '.join(map(str, steps))}), so its sampler "
            "had nothing to put first and drew exactly what the fixed ratio draws"
        )
    return ""


def identical_sentences(suite: Mapping[str, Any]) -> list[str]:
    """One sentence per pair of :func:`identical_arms`, with the reason the runs give (see ``_why_identical``)."""
    labels = {m["key"]: m["label"] for m in suite["methods"]}
    out = []
    for arm, other in identical_arms(suite):
        why = _why_identical(suite, arm) or _why_identical(suite, other)
        seeds = len(next(m for m in suite["methods"] if m["key"] == arm)["runs"])
        out.append(
            f"{labels[arm]} equals {labels[other]} exactly in every seed ({seeds}): "
            + (why if why else "the runs record no reason; the two arms trained the same model")
            + "."
        )
    return out


_METRIC_NAMES = {"AP": "AP", "rare_AP": "rare-class AP"}


def format_difference(d: PairedDifference, *, scale: float = 100.0) -> str:
    """``+1.2 [−0.3, +2.7]`` (AP points), or ``+1.2 (1 seed)`` without an interval."""
    if math.isnan(d.mean):
        return "–"
    if math.isnan(d.low):
        return f"{d.mean * scale:+.1f} ({d.n} seed)"
    return f"{d.mean * scale:+.1f} [{d.low * scale:+.1f}, {d.high * scale:+.1f}]"


def findings(suite: Mapping[str, Any]) -> list[str]:
    """The findings paragraph(s) of a suite, built from the verdicts of its primary metric.

    Used by ``compare`` and by the report (the one findings function). For the ``classes`` suite the primary
    metric is rare-class AP and the rare classes are named; for a suite with a clean arm (noise) each arm's
    drop from the clean arm is given too.
    """
    metric = suite.get("primary", "AP")
    name = _METRIC_NAMES.get(metric, metric)
    labels = {m["key"]: m["label"] for m in suite["methods"]}
    base = labels[suite["baseline"]]
    diffs = suite_differences(suite, metric)
    twins = clean_twins(suite)
    clean = set(twins.values())
    lines: list[str] = []
    seeds = max((d.n for d in diffs.values()), default=0)
    if metric == "rare_AP":
        rare = suite.get("rare_classes") or []
        lines.append(
            f"Rare classes (fewer than {RARE_FRACTION:.0%} of the most frequent class's training instances): "
            + (", ".join(rare) if rare else "none, so rare-class AP is undefined")
            + "."
        )
    by_verdict: dict[str, list[str]] = {v: [] for v in VERDICTS}
    for key, d in diffs.items():
        if key in clean:
            continue
        by_verdict[d.verdict].append(f"{labels[key]} ({format_difference(d)})")
    if by_verdict["better"]:
        lines.append(f"Better {name} than {base}: " + "; ".join(by_verdict["better"]) + ".")
    if by_verdict["worse"]:
        lines.append(f"Worse {name} than {base}: " + "; ".join(by_verdict["worse"]) + ".")
    if by_verdict["no measurable difference"]:
        lines.append(f"No measurable difference in {name} from {base}: " + "; ".join(by_verdict["no measurable difference"]) + ".")
    if by_verdict["needs seeds"]:
        seeds = max(d.n for key, d in diffs.items() if d.verdict == "needs seeds" and key not in clean)
        lines.append(
            f"Difference in {name} from {base}: " + "; ".join(by_verdict["needs seeds"])
            + f". With {seeds} seed{'s' if seeds != 1 else ''} there is no verdict: it needs at least {MIN_SEEDS} "
            f"seeds (`--seeds {MIN_SEEDS}`) for a 95 % interval."
        )
    if twins:
        drops = []
        for arm, twin in twins.items():
            d = noise_cost(suite, arm, metric)
            drops.append(f"{labels[arm]} {format_difference(d)} against {labels[twin]} ({d.verdict})")
        lines.append(f"What the noise costs each loss ({name}, noisy minus clean labels): " + "; ".join(drops) + ".")
        base_key = suite["baseline"]
        if base_key in twins:
            for arm in twins:
                if arm == base_key:
                    continue
                r = robustness_difference(suite, arm, base_key, metric)
                word = {"better": "more robust", "worse": "less robust", "no measurable difference":
                        "no measurable difference in robustness"}.get(r.verdict, f"no verdict without {MIN_SEEDS} seeds")
                lines.append(
                    f"Robustness: {labels[arm]}'s drop minus {base}'s = {format_difference(r)} {name} points "
                    f"(paired per seed; negative: the noise costs {labels[arm]} more): {word}."
                )
    base_ap = [v for v in metric_by_seed(next(m for m in suite["methods"] if m["key"] == suite["baseline"]), "AP").values()
               if not math.isnan(v)]
    if base_ap and sum(base_ap) / len(base_ap) < MIN_BASELINE_AP:
        lines.append(
            f"{base} reaches only {100 * sum(base_ap) / len(base_ap):.1f} AP (< {100 * MIN_BASELINE_AP:.0f}): at this "
            "budget the detector has not learnt enough, so the suite cannot decide whether a remedy helps at "
            "convergence (try `--budget full`)."
        )
    lines.extend(identical_sentences(suite))
    p = plateau(suite)
    if p is not None:
        lines.append(p.sentence())
    lines.append(
        f"Intervals are 95 % Student-t intervals of the per-seed difference to {base} (AP points; arms share "
        "initial weights per seed)."
    )
    return ["**Findings.** " + " ".join(lines)]


def differences_table(suite: Mapping[str, Any], metrics: Sequence[str] = ("AP", "rare_AP")) -> dict[str, dict[str, PairedDifference]]:
    """``{metric: {method key: PairedDifference}}`` for the report's table."""
    return {metric: suite_differences(suite, metric) for metric in metrics}
