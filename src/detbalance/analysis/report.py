"""The `compare` report: tables and plots from a ``results.json``, as Markdown and HTML with the same content.

The report is built as a list of blocks (heading, paragraph, table, image) and rendered twice, so the two
files cannot drift. Every number comes from ``results.json``; nothing is computed here but summaries
(mean, standard deviation over seeds, differences to the suite's baseline).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MethodSummary", "summarize_method", "write_report"]

# Columns of each suite's table: (key in a run's metrics, header).
_METRIC_COLUMNS = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("APs", "APs"), ("rare_AP", "rare-class AP"))


@dataclass(frozen=True)
class MethodSummary:
    """Mean and standard deviation over seeds of every reported metric of one method.

    ``std`` is the sample standard deviation (``ddof=1``); it is ``nan`` with a single seed, where the
    seed spread is unknown.
    """

    key: str
    label: str
    num_seeds: int
    mean: dict[str, float]
    std: dict[str, float]
    images_per_s: float


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarize_method(method: dict[str, Any]) -> MethodSummary:
    """Summarise the runs (one per seed) of one method of a suite in ``results.json``."""
    runs = method["runs"]
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for key, _ in _METRIC_COLUMNS:
        mean[key], std[key] = _mean_std([run["metrics"].get(key, math.nan) for run in runs])
    ips, _ = _mean_std([run.get("images_per_s", math.nan) for run in runs])
    return MethodSummary(method["key"], method["label"], len(runs), mean, std, ips)


def _fmt(mean: float, std: float, *, scale: float = 100.0) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean * scale:.1f}"
    return f"{mean * scale:.1f} ± {std * scale:.1f}"


def _difference_note(diff: float, spread: float, num_seeds: int) -> str:
    """How to read a difference to the baseline: noise is the larger of the two methods' seed spreads."""
    if math.isnan(diff):
        return "–"
    text = f"{diff * 100:+.1f}"
    if num_seeds < 2 or math.isnan(spread):
        return text + " (1 seed: spread unknown)"
    if abs(diff) <= spread:
        return text + " (within seed noise)"
    return text


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg, imported lazily)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_ap(suite: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    methods = suite["methods"]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(methods) + 2), 3.6), constrained_layout=True)
    for i, method in enumerate(methods):
        aps = [run["metrics"]["AP"] * 100 for run in method["runs"]]
        ax.scatter([i] * len(aps), aps, color="C0", alpha=0.6, zorder=3, label="one seed" if i == 0 else None)
        mean = sum(aps) / len(aps)
        ax.hlines(mean, i - 0.3, i + 0.3, color="C3", lw=2, zorder=4, label="mean" if i == 0 else None)
    ax.set_xticks(range(len(methods)), [m["label"] for m in methods], rotation=20, ha="right")
    ax.set_ylabel("COCO AP (%)")
    ax.set_title(f"{suite['title']}: AP per method ({len(methods[0]['runs'])} seed(s))")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_curves(suite: dict[str, Any], path: Path) -> Path | None:
    plt = _pyplot()
    has_ap = any(p.get("AP") is not None for m in suite["methods"] for r in m["runs"] for p in r.get("curve", []))
    has_loss = any(p.get("loss") is not None for m in suite["methods"] for r in m["runs"] for p in r.get("curve", []))
    if not (has_ap or has_loss):
        return None
    ncols = int(has_ap) + int(has_loss)
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6), constrained_layout=True, squeeze=False)
    col = 0
    curves = (("loss", "training loss (own, smoothed)", has_loss), ("AP", "test AP (%)", has_ap))
    for key, ylabel, enabled in curves:
        if not enabled:
            continue
        ax = axes[0, col]
        col += 1
        for i, method in enumerate(suite["methods"]):
            for j, run in enumerate(method["runs"]):
                pts = [(p["iter"], p[key]) for p in run.get("curve", []) if p.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                if key == "AP":
                    ys = [y * 100 for y in ys]
                ax.plot(xs, ys, color=f"C{i}", alpha=0.85, lw=1.4, label=method["label"] if j == 0 else None,
                        marker="o" if key == "AP" else None, ms=3)
        ax.set_xlabel("training iteration")
        ax.set_ylabel(ylabel)
        if key == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{suite['title']}: learning curves")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_per_class(suite: dict[str, Any], path: Path) -> Path | None:
    plt = _pyplot()
    methods = suite["methods"]
    names = list(methods[0]["runs"][0]["metrics"].get("per_class", {}))
    if not names:
        return None
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) * len(methods) / 2 + 3), 3.6), constrained_layout=True)
    for i, method in enumerate(methods):
        vals = []
        for name in names:
            aps = [run["metrics"]["per_class"].get(name, math.nan) for run in method["runs"]]
            vals.append(_mean_std(aps)[0] * 100)
        ax.bar([k + (i - (len(methods) - 1) / 2) * width for k in range(len(names))], vals, width=width,
               color=f"C{i}", label=method["label"])
    freq = suite.get("train_class_frequency")
    labels = names if not freq else [f"{n}\n({freq.get(n, 0)} train)" for n in names]
    ax.set_xticks(range(len(names)), labels)
    ax.set_xlabel("class (training instances)")
    ax.set_ylabel("COCO AP (%)")
    ax.set_title(f"{suite['title']}: AP per class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(3, len(methods)))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_density(suite: dict[str, Any], path: Path) -> Path | None:
    plt = _pyplot()
    series = []
    for i, method in enumerate(suite["methods"]):
        dens = [run.get("grad_density") for run in method["runs"] if run.get("grad_density")]
        if dens:
            series.append((i, method["label"], dens[0]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.8), constrained_layout=True)
    for i, label, density in series:
        counts = density["counts"]
        m = len(counts)
        total = sum(counts) or 1.0
        # empty bins are left out (a log axis has no zero), so a line's gaps are bins with no example
        pts = [((k + 0.5) / m, c / total) for k, c in enumerate(counts) if c > 0]
        xs, ys = zip(*pts, strict=True) if pts else ((), ())
        ax.plot(xs, ys, color=f"C{i}", marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("gradient norm g = |sigmoid(x) - y| (one (anchor, class) output)")
    ax.set_ylabel("fraction of outputs (test images)")
    ax.set_title(f"{suite['title']}:\ngradient-norm density of the trained models")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Blocks and rendering


def _suite_blocks(name: str, suite: dict[str, Any], out_dir: Path) -> list[tuple]:
    blocks: list[tuple] = [("h2", f"Suite `{name}`: {suite['title']}"), ("p", suite.get("description", ""))]
    summaries = [summarize_method(m) for m in suite["methods"]]
    base = next((s for s in summaries if s.key == suite["baseline"]), summaries[0])
    header = ["method", *[h for _, h in _METRIC_COLUMNS], f"ΔAP vs {base.label}", "train img/s"]
    rows = []
    for s in summaries:
        cells = [s.label] + [_fmt(s.mean[k], s.std[k]) for k, _ in _METRIC_COLUMNS]
        if s is base:
            cells.append("baseline")
        else:
            spread = max(s.std["AP"], base.std["AP"])
            cells.append(_difference_note(s.mean["AP"] - base.mean["AP"], spread, min(s.num_seeds, base.num_seeds)))
        cells.append("–" if math.isnan(s.images_per_s) else f"{s.images_per_s:.0f}")
        rows.append(cells)
    blocks.append(("table", header, rows))
    blocks.append(("p", "AP columns are COCO AP in %, mean ± sample std over seeds (faster-coco-eval on the test split)."))
    for text in suite.get("findings", []):
        blocks.append(("p", text))
    for maker, suffix, alt in (
        (_plot_ap, "ap", "AP per method"),
        (_plot_curves, "curves", "learning curves"),
        (_plot_per_class, "per_class", "AP per class"),
        (_plot_density, "grad_density", "gradient-norm density"),
    ):
        png = maker(suite, out_dir / f"{name}_{suffix}.png")
        if png is not None:
            blocks.append(("img", png.name, f"{suite['title']}: {alt}"))
    return blocks


def _render_md(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            if block[1]:
                out.append(block[1] + "\n")
        elif kind == "code":
            out.append(f"```\n{block[1]}\n```\n")
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    # Only the inline markup the report uses: `code` spans.
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _render_html(blocks: list[tuple], title: str) -> str:
    out = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "p" and block[1]:
            out.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in block[1]) + "</tr>")
            for row in block[2]:
                out.append("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif kind == "img":
            out.append(f"<p><img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'></p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``report.md``, ``report.html`` and the plots (PNG) for a ``compare`` results dict.

    Args:
        results: the content of ``results.json`` (keys ``setup`` and ``suites``).
        out_dir: folder to write into (created if missing).

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup = results["setup"]
    blocks: list[tuple] = [("h1", "detbalance compare: imbalance remedies side by side")]
    blocks.append(("p", "Every method of a suite trains on the same data, from the same initial weights per seed, "
                        "for the same number of iterations with a cosine schedule, and is evaluated with the "
                        "official COCO metric on the same test split."))
    blocks.append(("h2", "Setup"))
    rows = [[k, str(v)] for k, v in setup.items() if k not in ("command", "data")]
    for k, v in setup.get("data", {}).items():
        rows.append([f"data: {k}", str(v)])
    blocks.append(("table", ["item", "value"], rows))
    blocks.append(("p", "Command:"))
    blocks.append(("code", setup.get("command", "")))
    for name, suite in results["suites"].items():
        blocks.extend(_suite_blocks(name, suite, out_dir))
    md_path = out_dir / "report.md"
    md_path.write_text(_render_md(blocks))
    (out_dir / "report.html").write_text(_render_html(blocks, "detbalance compare"))
    return md_path
