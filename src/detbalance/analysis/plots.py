"""Figures of the imbalance statistics and of a training run (matplotlib, imported lazily, Agg canvas).

Every ``plot_*`` function takes the dataclasses of :mod:`detbalance.analysis.stats` (or the records of a
:class:`~detbalance.detectors.BalanceRecorder` / the lines of ``metrics.jsonl``) and returns a
:class:`matplotlib.figure.Figure` built without ``pyplot``, so no global figure state or interactive
backend is touched; :func:`save_figure` writes a PNG. :func:`plot_run` draws whatever a run folder has
data for.

Figures reproduce the papers' diagnostics:

* :func:`plot_gradient_density`: GHM (Li et al., 2019) figure 1 (density of the gradient norm ``g``,
  log y) and figure 2 (per-example gradient norm after CE / focal / GHM-C reweighting), plus the share
  of the total gradient per ``g`` bin;
* :func:`plot_loss_cdfs`: focal loss (Lin et al., 2017) figure 4 (cumulative normalised loss of
  positives and negatives for several gamma);
* :func:`plot_quadrant_shares`: the easy/hard x positive/negative shares of the gradient under each loss.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detbalance.analysis.assignment import AssignmentStats
from detbalance.analysis.dataset import DatasetStats
from detbalance.analysis.gradients import QUADRANTS, GradientStats
from detbalance.analysis.libra import LibraStats
from detbalance.analysis.pisa_atss import ATSSStats, ISRStats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_LOSS_BIN_EDGES",
    "plot_assignment",
    "plot_box_sizes",
    "plot_class_ap",
    "plot_class_frequency",
    "plot_ghm_histogram",
    "plot_gradient_density",
    "plot_loss_cdfs",
    "plot_loss_curves",
    "plot_ohem_losses",
    "plot_quadrant_shares",
    "plot_run",
    "plot_sampled_counts",
    "read_jsonl",
    "save_figure",
]

_QUADRANT_LABELS = {
    "easy_positive": "easy positive",
    "hard_positive": "hard positive",
    "easy_negative": "easy negative",
    "hard_negative": "hard negative",
}
_QUADRANT_COLORS = {
    "easy_positive": "#9ecae1",
    "hard_positive": "#08519c",
    "easy_negative": "#fdae6b",
    "hard_negative": "#a63603",
}
_LOSS_COLORS = {"ce": "#444444", "focal": "#d62728", "ghm_c": "#2ca02c"}


def _loss_edges(bins: int = 32, low: float = 1e-6, high: float = 1e2) -> list[float]:
    return [
        10 ** (math.log10(low) + (math.log10(high) - math.log10(low)) * i / bins) for i in range(bins + 1)
    ]


DEFAULT_LOSS_BIN_EDGES: list[float] = _loss_edges()
"""The :class:`~detbalance.detectors.BalanceRecorder` default loss-histogram edges (32 bins, 1e-6..1e2)."""


def _figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (6.4, 4.4)) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (parents created) and return the path.

    Raises:
        WriteError: (an ``OSError``) naming the file and the cause.
    """
    from detbalance.engine.files import atomic_replace

    return atomic_replace(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))


def _loss_names(stats: GradientStats) -> dict[str, str]:
    alpha = "None" if stats.focal_alpha is None else f"{stats.focal_alpha:g}"
    return {
        "ce": "CE",
        "focal": f"focal (γ={stats.focal_gamma:g}, α={alpha})",
        "ghm_c": f"GHM-C (M={stats.bins})",
    }


def _spans_decades(values: Sequence[float], decades: float = 1.5) -> bool:
    pos = [v for v in values if v is not None and v > 0]
    return len(pos) > 1 and math.log10(max(pos) / min(pos)) >= decades


# ---------------------------------------------------------------------------------------------- dataset


def plot_class_frequency(stats: DatasetStats) -> Figure:
    """Instances and images per class, most frequent first, log y, with LVIS's repeat threshold ``t * N``."""
    fig, ax = _figure(size=(max(6.4, 0.28 * len(stats.class_names) + 3), 4.4))
    ax = ax[0, 0]
    order = sorted(range(len(stats.class_names)), key=lambda k: -stats.instance_counts[k])
    x = list(range(len(order)))
    inst = [max(stats.instance_counts[k], 0) for k in order]
    imgs = [stats.image_counts[k] for k in order]
    ax.bar(x, [v if v > 0 else float("nan") for v in inst], color="#4c72b0", label="instances (boxes)")
    ax.plot(
        x,
        [v if v > 0 else float("nan") for v in imgs],
        "o",
        color="#dd8452",
        ms=5,
        label="images containing the class",
    )
    thr = stats.repeat_threshold * stats.num_images
    ax.axhline(
        thr,
        ls="--",
        color="#555555",
        lw=1,
        label=f"repeat-factor threshold t·N = {stats.repeat_threshold:g}·{stats.num_images}",
    )
    ax.set_yscale("log")
    ratio = "n/a" if stats.imbalance_ratio is None else f"{stats.imbalance_ratio:.0f}x"
    ax.set_title(f"Class frequency ({stats.num_images} images; most/least frequent = {ratio})")
    ax.set_xlabel("class (most frequent first)")
    ax.set_ylabel("count (log scale)")
    if len(order) <= 60:
        ax.set_xticks(x, [stats.class_names[k] for k in order], rotation=90 if len(order) > 12 else 0)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    return fig


def plot_box_sizes(stats: DatasetStats) -> Figure:
    """Histogram of ``sqrt(box area)`` (log x) with COCO's small/medium/large boundaries (32 and 96 px)."""
    fig, ax = _figure()
    ax = ax[0, 0]
    edges = stats.sqrt_area_edges
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], stats.sqrt_area_hist, width=widths, align="edge", color="#4c72b0", edgecolor="white")
    for v, name in ((32, "small | medium"), (96, "medium | large")):
        ax.axvline(v, ls="--", color="#555555", lw=1)
        ax.text(
            v,
            1.0,
            f" {name}",
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            transform=ax.get_xaxis_transform(),
        )
    ax.set_xscale("log", base=2)
    nonzero = [i for i, c in enumerate(stats.sqrt_area_hist) if c > 0]
    lo = edges[max(0, nonzero[0] - 1)] if nonzero else 8.0
    hi = edges[min(len(edges) - 1, nonzero[-1] + 2)] if nonzero else 128.0
    ax.set_xlim(min(lo, 16.0), max(hi, 128.0))  # both COCO boundaries always visible
    s = stats.size_counts
    ax.set_title(f"Box sizes: small {s['small']}, medium {s['medium']}, large {s['large']} (COCO areas)")
    ax.set_xlabel("sqrt(box area) (pixels, log scale)")
    ax.set_ylabel("boxes")
    return fig


def plot_assignment(stats: AssignmentStats) -> Figure:
    """Positive / negative / ignored anchors per FPN level (log y, ratio above each level) and boxes' best IoU."""
    fig, axes = _figure(1, 2, size=(12.0, 4.6))
    ax = axes[0, 0]
    n = max(1, stats.num_images)
    levels = list(range(len(stats.level_names)))
    w = 0.27
    series = (
        ("positives", stats.positives_per_level, "#2ca02c"),
        ("negatives", stats.negatives_per_level, "#7f7f7f"),
        ("ignored", stats.ignored_per_level, "#ff7f0e"),
    )
    for i, (name, vals, color) in enumerate(series):
        ax.bar(
            [lv + (i - 1) * w for lv in levels],
            [v / n if v > 0 else float("nan") for v in vals],
            width=w,
            color=color,
            label=name,
        )
    for lv, (p, q) in enumerate(zip(stats.positives_per_level, stats.negatives_per_level)):
        text = f"1:{q / p:.0f}" if p else "no pos."
        ax.annotate(text, (lv, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(levels, stats.level_names)
    ratio = (
        "no positives" if stats.negatives_per_positive is None else f"1:{stats.negatives_per_positive:.0f}"
    )
    ax.set_title(f"Anchors per image by level (pos:neg above each level; all levels {ratio})", pad=16)
    ax.set_xlabel("FPN level")
    ax.set_ylabel("anchors per image (log scale)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=3)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[0, 1]
    edges = stats.gt_max_iou_edges
    ax.bar(
        edges[:-1],
        stats.gt_max_iou_hist,
        width=edges[1] - edges[0],
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        label="ground-truth boxes",
    )
    ax.axvline(stats.low, ls=":", color="#7f7f7f", label=f"low = {stats.low:g} (below: negative)")
    ax.axvline(stats.high, ls="--", color="#2ca02c", label=f"high = {stats.high:g} (at or above: positive)")
    ax.set_title(
        f"Best anchor IoU of each box: {stats.num_unmatched_gt} of {stats.num_gt} have no positive anchor"
    )
    ax.set_xlabel("max IoU with any anchor")
    ax.set_ylabel("ground-truth boxes")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    return fig


# ------------------------------------------------------------------------------------------ model grads


def plot_gradient_density(stats: GradientStats) -> Figure:
    """GHM figures 1 and 2: the density of ``g`` (log y) and the gradient after CE / focal / GHM-C reweighting.

    Left: examples per ``g`` bin (positives, negatives, all). Middle: mean per-example gradient magnitude
    ``|dL/dx|`` in each bin (GHM figure 2). Right: each bin's share of the total gradient magnitude.
    """
    fig, axes = _figure(1, 3, size=(15.0, 4.4))
    m = stats.bins
    centers = [(i + 0.5) / m for i in range(m)]
    edges = [i / m for i in range(m + 1)]
    ax = axes[0, 0]
    for vals, name, color, lw, ls in (
        (stats.density, "all", "#9ecae1", 4.0, "-"),
        (stats.density_negative, "negatives", "#555555", 1.4, "--"),
        (stats.density_positive, "positives", "#2ca02c", 1.4, "-"),
    ):
        ax.stairs(
            [v if v > 0 else float("nan") for v in vals],
            edges,
            label=name,
            color=color,
            lw=lw,
            ls=ls,
            baseline=None,
        )
    ax.set_yscale("log")
    ax.set_title(f"Gradient-norm density ({stats.num_examples:,} examples)")
    ax.set_xlabel("gradient norm g = |sigmoid(x) - y|")
    ax.set_ylabel("examples per bin (log scale)")
    ax.axvline(
        stats.easy_threshold,
        ls=":",
        color="black",
        lw=1,
        label=f"easy | hard at g = {stats.easy_threshold:g}",
    )
    ax.legend(fontsize=8)
    names = _loss_names(stats)
    ax = axes[0, 1]
    for key, name in names.items():
        vals = [v if v is not None and v > 0 else float("nan") for v in stats.mean_gradient[key]]
        ax.plot(centers, vals, "-o", ms=3, color=_LOSS_COLORS[key], label=name)
    ax.set_yscale("log")
    ax.set_title("Per-example gradient after reweighting")
    ax.set_xlabel("original gradient norm g")
    ax.set_ylabel("mean |dL/dx| per example (log scale)")
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    for key, name in names.items():
        ax.stairs(
            [v if v > 0 else float("nan") for v in stats.bin_share[key]],
            edges,
            color=_LOSS_COLORS[key],
            label=name,
            lw=1.6,
            baseline=None,
        )
    ax.set_yscale("log")
    ax.set_title("Share of the total gradient per g bin")
    ax.set_xlabel("original gradient norm g")
    ax.set_ylabel("fraction of sum |dL/dx| (log scale)")
    ax.legend(fontsize=8)
    return fig


def plot_loss_cdfs(stats: GradientStats) -> Figure:
    """Focal figure 4: cumulative normalised loss of positives and negatives, examples sorted by loss."""
    fig, axes = _figure(1, 2, size=(11.0, 4.4))
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, curves, what, n in (
        (axes[0, 0], stats.cdf_positive, "positive", stats.num_positive),
        (axes[0, 1], stats.cdf_negative, "negative", stats.num_negative),
    ):
        for i, (gamma, curve) in enumerate(zip(stats.cdf_gammas, curves)):
            color = cmap(i / max(1, len(stats.cdf_gammas) - 1) * 0.9)
            ax.plot(stats.cdf_fraction, curve, color=color, lw=1.8, label=f"γ = {gamma:g}")
        ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=1, label="equal share")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"Loss CDF of {what} examples ({n:,})")
        ax.set_xlabel(f"fraction of {what} examples (sorted by increasing loss)")
        ax.set_ylabel("cumulative normalised loss")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    return fig


def plot_quadrant_shares(stats: GradientStats) -> Figure:
    """Stacked bars: each quadrant's share of the examples and of the total gradient under each loss."""
    fig, ax = _figure(size=(9.0, 3.4))
    ax = ax[0, 0]
    total = max(1, sum(stats.quadrant_counts.values()))
    rows = [("examples", {q: stats.quadrant_counts[q] / total for q in QUADRANTS})]
    for key, name in _loss_names(stats).items():
        rows.append((f"gradient, {name}", stats.gradient_share[key]))
    labels = [r[0] for r in rows][::-1]
    rows = rows[::-1]
    left = [0.0] * len(rows)
    for q in QUADRANTS:
        vals = [r[1][q] for r in rows]
        bars = ax.barh(labels, vals, left=left, color=_QUADRANT_COLORS[q], label=_QUADRANT_LABELS[q])
        for bar, v in zip(bars, vals):
            if v >= 0.05:
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    bar.get_y() + bar.get_height() / 2,
                    f"{v:.0%}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if q in ("hard_positive", "hard_negative") else "black",
                )
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share (fraction of the row's total)")
    ax.set_title(f"Easy/hard x positive/negative shares (easy: g < {stats.easy_threshold:g})")
    ax.legend(ncols=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return fig


def plot_class_ap(stats: DatasetStats, class_ap: Sequence[float | None]) -> Figure:
    """Per-class AP against the class's training instances (log x); rare classes sit on the left."""
    if len(class_ap) != len(stats.class_names):
        raise ValueError(
            f"class_ap has {len(class_ap)} values, the dataset has {len(stats.class_names)} classes"
        )
    fig, ax = _figure()
    ax = ax[0, 0]
    pts = [
        (c, ap, n)
        for c, ap, n in zip(stats.instance_counts, class_ap, stats.class_names)
        if ap is not None and c > 0
    ]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#4c72b0", zorder=3)
    if len(pts) <= 30:
        for c, ap, name in pts:
            ax.annotate(name, (c, ap), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    if pts:  # whole decades, so there are at least two labelled major ticks and no crowded minor labels
        from matplotlib.ticker import NullFormatter

        lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
        ax.set_xlim(
            10 ** math.floor(math.log10(lo)),
            10 ** max(math.ceil(math.log10(hi)), math.floor(math.log10(lo)) + 1),
        )
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-0.02, 1.0)
    ax.set_title("Per-class AP vs class frequency")
    ax.set_xlabel("training instances of the class (log scale)")
    ax.set_ylabel("AP@[.5:.95]")
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------- training run


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file: :func:`detbalance.engine.files.read_jsonl`, the project's one reader (a torn
    last line, what a crash mid-append leaves, is dropped with a warning; any other bad line raises
    ``ValueError`` naming ``file:line``)."""
    from detbalance.engine.files import read_jsonl as _read

    return _read(path)


def _step(rec: dict[str, Any], i: int) -> float:
    for key in ("step", "global_step", "iteration", "iter"):
        if isinstance(rec.get(key), int | float):
            return float(rec[key])
    return float(i)


def _numeric_items(rec: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_numeric_items(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def plot_loss_curves(metrics: Sequence[dict[str, Any]]) -> Figure:
    """Loss curves against the training step; log y when they span more than 1.5 decades.

    Every numeric value whose key path contains ``loss`` is a curve (``loss``, ``losses/classification``
    in :func:`detbalance.engine.fit`'s ``metrics.jsonl``); values named ``AP*`` (``metrics/AP``,
    ``metrics/AP50``, ...; not ``per_class``) go in a second panel when present."""
    series: dict[str, list[tuple[float, float]]] = {}
    evals: dict[str, list[tuple[float, float]]] = {}
    for i, rec in enumerate(metrics):
        step = _step(rec, i)
        for k, v in _numeric_items(rec).items():
            if not math.isfinite(v) or "per_class" in k:
                continue
            name = k.rsplit("/", 1)[-1]
            if "loss" in k.lower():
                series.setdefault(k, []).append((step, v))
            elif name.startswith("AP"):
                evals.setdefault(k, []).append((step, v))
    if not series:
        raise ValueError("metrics have no numeric key containing 'loss'")
    fig, axes = _figure(1, 2 if evals else 1, size=(12.0 if evals else 7.0, 4.4))
    ax = axes[0, 0]
    for k, pts in sorted(series.items()):
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], lw=1.2, label=k, marker="o" if len(pts) < 3 else None
        )
    if _spans_decades([p[1] for pts in series.values() for p in pts]):
        ax.set_yscale("log")
    ax.set_title("Training losses")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0, 1]
        for k, pts in sorted(evals.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, label=k)
        ax.set_title("Evaluation")
        ax.set_xlabel("training step")
        ax.set_ylabel("AP")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def _sum(v: Any) -> float:
    return float(sum(v)) if isinstance(v, list) else float(v)


def plot_sampled_counts(records: Sequence[dict[str, Any]]) -> Figure:
    """Positives / negatives / ignored per step for every counts name of the recorder (log y)."""
    names = sorted({n for r in records for n in r.get("counts", {})})
    if not names:
        raise ValueError("records hold no 'counts'")
    fig, axes = _figure(1, len(names), size=(5.5 * len(names), 4.2))
    for ax, name in zip(axes[0], names):
        rows = [
            (_step(r, i), r["counts"][name]) for i, r in enumerate(records) if name in r.get("counts", {})
        ]
        steps = [s for s, _ in rows]
        for key, color in (("positives", "#2ca02c"), ("negatives", "#7f7f7f"), ("ignored", "#ff7f0e")):
            vals = [_sum(c[key]) if c.get(key) is not None else float("nan") for _, c in rows]
            if all(math.isnan(v) for v in vals):
                continue
            ax.plot(
                steps,
                [v if v > 0 else float("nan") for v in vals],
                lw=1.2,
                color=color,
                label=key,
                marker="o" if len(rows) < 3 else None,
            )
        ax.set_yscale("log")
        ax.set_title(f"Sampled examples: {name}")
        ax.set_xlabel("training step")
        ax.set_ylabel("examples per step (log scale)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def _heatmap(
    ax: Any, fig: Figure, matrix: list[list[float]], steps: list[float], y_edges: Sequence[float], label: str
) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm

    arr = np.asarray(matrix, dtype=float).T  # [bins, steps]
    arr[arr <= 0] = np.nan
    if len(steps) > 1:
        mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
        x_edges = [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]
    else:
        x_edges = [steps[0] - 0.5, steps[0] + 0.5]
    finite = arr[np.isfinite(arr)]
    norm = (
        LogNorm(vmin=float(finite.min()), vmax=float(max(finite.max(), finite.min() * 10)))
        if finite.size
        else None
    )
    mesh = ax.pcolormesh(x_edges, list(y_edges), arr, norm=norm, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label=label)


def plot_ghm_histogram(records: Sequence[dict[str, Any]], *, name: str | None = None) -> Figure:
    """GHM gradient density over training as a heatmap (step x ``g`` bin, log colour)."""
    names = sorted({n for r in records for n in r.get("ghm_density", {})})
    if not names:
        raise ValueError("records hold no 'ghm_density'")
    if name is None:
        name = names[0]
    elif name not in names:
        raise ValueError(f"name {name!r} not among the recorded GHM densities {names}")
    rows = [
        (_step(r, i), r["ghm_density"][name])
        for i, r in enumerate(records)
        if name in r.get("ghm_density", {})
    ]
    bins = len(rows[0][1])
    fig, ax = _figure(size=(8.0, 4.4))
    ax = ax[0, 0]
    _heatmap(
        ax,
        fig,
        [d for _, d in rows],
        [s for s, _ in rows],
        [i / bins for i in range(bins + 1)],
        "examples per bin (log colour)",
    )
    ax.set_title(f"GHM gradient density over training: {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient norm g")
    return fig


def plot_ohem_losses(
    records: Sequence[dict[str, Any]],
    *,
    name: str | None = None,
    loss_bin_edges: Sequence[float] | None = None,
) -> Figure:
    """Loss distribution of the selected examples (e.g. OHEM's hard RoIs) over training (heatmap, log y).

    Args:
        records: recorder records.
        name: which ``losses`` entry; default the first name containing ``ohem``, else the first.
        loss_bin_edges: the recorder's ``loss_bin_edges``; default :data:`DEFAULT_LOSS_BIN_EDGES` when the
            histograms have 32 bins, else ``ValueError``.
    """
    names = sorted({n for r in records for n in r.get("losses", {})})
    if not names:
        raise ValueError("records hold no 'losses'")
    if name is None:
        name = next((n for n in names if "ohem" in n.lower()), names[0])
    elif name not in names:
        raise ValueError(f"name {name!r} not among the recorded losses {names}")
    rows = [(_step(r, i), r["losses"][name]) for i, r in enumerate(records) if name in r.get("losses", {})]
    bins = len(rows[0][1]["histogram"])
    if loss_bin_edges is None:
        if bins != len(DEFAULT_LOSS_BIN_EDGES) - 1:
            raise ValueError(
                f"histograms have {bins} bins: pass loss_bin_edges (the recorder's loss_bin_edges)"
            )
        loss_bin_edges = DEFAULT_LOSS_BIN_EDGES
    if len(loss_bin_edges) != bins + 1:
        raise ValueError(f"loss_bin_edges has {len(loss_bin_edges)} edges, histograms have {bins} bins")
    fig, ax = _figure(size=(8.0, 4.4))
    ax = ax[0, 0]
    steps = [s for s, _ in rows]
    _heatmap(
        ax, fig, [h["histogram"] for _, h in rows], steps, loss_bin_edges, "examples per bin (log colour)"
    )
    means = [h["sum"] / h["count"] if h["count"] else float("nan") for _, h in rows]
    ax.plot(steps, means, color="#ff3030", lw=1.4, label="mean loss of the recorded examples")
    ax.set_yscale("log")
    hist_rows = [h["histogram"] for _, h in rows]
    nz = [i for i in range(bins) if any(r[i] for r in hist_rows)]
    if nz:
        ax.set_ylim(loss_bin_edges[nz[0]], loss_bin_edges[nz[-1] + 1])
    ax.set_title(f"Recorded per-example losses over training: {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel("per-example loss (log scale)")
    ax.legend(fontsize=8, loc="upper right")
    return fig


_RECORD_FILES = ("recorder.jsonl", "balance.jsonl")


def _find_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[float] | None]:
    for fname in _RECORD_FILES:
        path = run_dir / fname
        if path.is_file():
            recs = read_jsonl(path)
            edges = None
            if recs and "loss_bin_edges" in recs[0] and "step" not in recs[0]:
                edges = recs[0]["loss_bin_edges"]
                recs = recs[1:]
            return recs, edges
    for fname in ("recorder.json", "balance.json"):
        path = run_dir / fname
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return list(data.get("records", [])), data.get("loss_bin_edges")
            return list(data), None
    return [], None


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure a run folder has data for into ``run_dir/plots/`` and return the PNG paths.

    Reads ``metrics.jsonl`` (loss curves, evaluation) and the recorder's records (``recorder.jsonl``, as
    :func:`detbalance.engine.fit` writes it: one record per line, optionally preceded by a
    ``{"loss_bin_edges": [...]}`` line; or ``recorder.json``: ``{"loss_bin_edges": [...], "records": [...]}``)
    for sampled counts, the GHM histogram and the selected-loss distribution. Without saved edges the
    recorder's default edges are assumed.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: the folder has nothing to plot.
    """
    from detbalance.engine.files import OutputFolder

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} is not a directory")
    todo: list[tuple[str, Callable[[], Figure]]] = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = read_jsonl(metrics_path)
        if any("loss" in k.lower() for m in metrics for k in _numeric_items(m)):
            todo.append(("loss_curves.png", lambda: plot_loss_curves(metrics)))
    records, edges = _find_records(run_dir)
    if any(r.get("counts") for r in records):
        todo.append(("sampled_counts.png", lambda: plot_sampled_counts(records)))
    for name in sorted({n for r in records for n in r.get("ghm_density", {})}):
        fname = "ghm_density_" + name.replace("/", "_") + ".png"
        todo.append((fname, functools.partial(plot_ghm_histogram, records, name=name)))
    for name in sorted({n for r in records for n in r.get("losses", {})}):
        fname = "selected_losses_" + name.replace("/", "_") + ".png"
        todo.append((fname, functools.partial(plot_ohem_losses, records, name=name, loss_bin_edges=edges)))
    if not todo:
        raise ValueError(
            f"run_dir {str(run_dir)!r} has nothing to plot: expected metrics.jsonl with loss values or recorder "
            f"records ({', '.join(_RECORD_FILES)})"
        )
    # only the project's own files are replaced: a PNG of yours in plots/ is refused before any is drawn
    folder = OutputFolder(run_dir)
    folder.check([f"plots/{fname}" for fname, _ in todo], what="plot")
    return [folder.write_figure(f"plots/{fname}", make()) for fname, make in todo]


#: The figure names :func:`plot_run` may write into ``run_dir/plots/``.
RUN_PLOT_PATTERNS = ("loss_curves.png", "sampled_counts.png", "ghm_density_*.png", "selected_losses_*.png")


# ------------------------------------------------------------------------------------------ PISA / ATSS


def plot_atss(stats: ATSSStats) -> Figure:
    """ATSS per object: positives per object (histogram) and IoU threshold against object size."""
    fig, axes = _figure(1, 2, size=(12.0, 4.4))
    ax = axes[0, 0]
    pos = stats.positives_per_object
    top = max(pos) if pos else 0
    ax.hist(pos, bins=[x - 0.5 for x in range(top + 2)], color="#2ca02c", edgecolor="white")
    ax.set_title(f"Positive anchors per object (mean {stats.mean_positives:.1f}; "
                 f"{stats.num_without_positive} of {len(pos)} objects without one)")
    ax.set_xlabel(f"positive anchors (ATSS, top-{stats.topk} per level)")
    ax.set_ylabel("objects")
    ax = axes[0, 1]
    ax.scatter(stats.object_sizes, stats.thresholds, s=8, alpha=0.5, color="#4c72b0", label="objects")
    ax.axhline(0.5, ls="--", color="#7f7f7f", label="IoU assignment: positive at 0.5")
    ax.set_title("ATSS's IoU threshold per object (mean + std of its candidates' IoU)")
    ax.set_xlabel("object size sqrt(w h) (px, model input)")
    ax.set_ylabel("IoU threshold")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return fig


def plot_isr_weights(stats: ISRStats) -> Figure:
    """PISA's ISR-P: mean weight of the positives per normalised IoU-HLR rank bin (0 = most prime)."""
    fig, axes = _figure(1, 1, size=(6.4, 4.4))
    ax = axes[0, 0]
    edges = stats.bin_edges
    mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    vals = [float("nan") if v is None else v for v in stats.mean_weight]
    ax.bar(mids, vals, width=edges[1] - edges[0], color="#dd8452", edgecolor="white", label="mean ISR-P weight")
    ax.axhline(1.0, ls="--", color="#7f7f7f", label="unweighted (1)")
    ax.set_title(f"ISR-P weight by IoU-HLR (k {stats.k:g}, bias {stats.bias:g}; first bin carries "
                 f"{100 * stats.top_decile_share:.0f}% of the weight)", fontsize=10)
    ax.set_xlabel("IoU-HLR / n_max (0 = most prime)")
    ax.set_ylabel("mean weight")
    ax.legend(fontsize=8)
    return fig


def plot_libra_bins(stats: LibraStats) -> Figure:
    """Libra R-CNN: the share of negatives per IoU bin, available, randomly sampled and IoU-balanced."""
    fig, axes = _figure(1, 1, size=(6.4, 4.4))
    ax = axes[0, 0]
    x = list(range(len(stats.bin_labels)))
    width = 0.27
    for offset, (label, counts, color) in zip((-width, 0.0, width), (
        ("available", stats.available, "#b0b0b0"),
        ("random (fixed 1:3)", stats.random, "#4c72b0"),
        ("IoU-balanced", stats.balanced, "#dd8452"),
    )):
        ax.bar([i + offset for i in x], stats.share(counts), width=width, color=color, edgecolor="white", label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(stats.bin_labels, fontsize=8)
    ax.set_xlabel("negative RoI's max IoU with an object")
    ax.set_ylabel("share of the negatives")
    ax.set_title(f"Negatives per IoU bin ({stats.num_images} images, {stats.num_samples} RoIs per image)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


# -------------------------------------------------------------------------------- long-tail losses
_CLASS_VALUE_LABELS = {
    "seesaw/mitigation": "Seesaw mitigation factor M (mean as a negative)",
    "seesaw/compensation": "Seesaw compensation factor C (mean as a negative)",
    "eqlv2/pos_neg": "EQLv2 gradient ratio pos/neg (mean over steps; dashed: mu = 0.8)",
    "federated/in_loss": "federated loss: share of steps in the loss",
    "federated/sampled": "federated loss: share of steps drawn as a negative",
}


def plot_class_values(values: dict[str, Sequence[float | None]], class_names: Sequence[str]) -> Figure:
    """One bar chart per quantity a long-tail loss applied per class over training (Seesaw's factors, EQLv2's
    gradient ratio, the federated loss's draws), classes in the dataset's order; ``None`` bars are left out."""
    if not values:
        raise ValueError("values is empty: the run recorded no per-class values of a long-tail loss")
    for name, v in values.items():
        if len(v) != len(class_names):
            raise ValueError(f"{name!r} has {len(v)} values, the dataset has {len(class_names)} classes")
    fig, axes = _figure(len(values), 1, size=(6.4, 2.4 * len(values)))
    for ax, (name, v) in zip(axes[:, 0], values.items()):
        xs = [i for i, x in enumerate(v) if x is not None]
        ax.bar(xs, [v[i] for i in xs], color="#4c72b0")
        if name.startswith("seesaw") or name.startswith("eqlv2"):
            ax.axhline(1.0 if name.startswith("seesaw") else 0.8, color="#888888", lw=0.8, ls="--")
        ax.set_xticks(range(len(class_names)), list(class_names), fontsize=8, rotation=45 if len(class_names) > 12 else 0)
        ax.set_title(_CLASS_VALUE_LABELS.get(name, name), fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel("class")
    return fig
