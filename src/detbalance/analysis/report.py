"""The `compare` report: tables and plots from a ``results.json``, as Markdown and HTML with the same content.

The report is built as a list of blocks (heading, paragraph, table, image) and rendered twice, so the two
files cannot drift; the HTML renders the inline Markdown the blocks use (``**bold**``, ``*italic*``,
`` `code` ``, ``[text](url)``) with a small escaping converter (:func:`inline_html`). Every number comes
from ``results.json``; nothing is computed here but summaries (mean, standard deviation over seeds) and the
paired differences and findings of :mod:`detbalance.compare.stats`.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MethodSummary", "format_mean_std", "inline_html", "summarize_method", "write_combined_report", "write_report"]

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


def format_mean_std(mean: float, std: float, *, scale: float = 100.0) -> str:
    """``mean ± std`` in points (``scale`` 100: a fraction shown in %); the mean alone when the std is
    unknown (one seed), ``–`` when there is no value."""
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean * scale:.1f}"
    return f"{mean * scale:.1f} ± {std * scale:.1f}"


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg, imported lazily)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: The figures :func:`write_report` writes per suite: ``<suite>_<suffix>.png``.
REPORT_FIGURES = ("ap", "curves", "per_class", "grad_density")


def report_files(suites: list[str]) -> list[str]:
    """The names ``compare`` may write for ``suites`` besides ``results.json`` (checked before it starts): the
    combined report, and per suite its report, results and figures."""
    per_suite = [
        name
        for s in suites
        for name in (f"report-{s}.md", f"report-{s}.html", f"results-{s}.json",
                     *[f"{s}_{suffix}.png" for suffix in REPORT_FIGURES])
    ]
    return ["report.md", "report.html", *per_suite]


def _save(fig: Any, path: Path) -> None:
    """PNG through the folder's manifest: written atomically, never over a file the project did not write."""
    from detbalance.engine.files import OutputFolder

    OutputFolder(path.parent).write_with(path.name, lambda f: fig.savefig(f, dpi=120, format="png"))


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
    ax.set_ylim(bottom=0)  # from 0, so that the gaps are not exaggerated
    n_seeds = max(len(m["runs"]) for m in methods)
    ax.set_title(f"{suite['title']}: AP per method ({n_seeds} seed{'s' if n_seeds != 1 else ''})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


def _plot_curves(suite: dict[str, Any], path: Path) -> Path | None:
    """Validation AP against training iteration, every seed of every arm (the loss panel is left out: each
    arm's own loss is a different function, so the values are not comparable across arms)."""
    plt = _pyplot()
    has_ap = any(p.get("AP") is not None for m in suite["methods"] for r in m["runs"] for p in r.get("curve", []))
    if not has_ap:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
    for i, method in enumerate(suite["methods"]):
        for j, run in enumerate(method["runs"]):
            pts = [(p["iter"], p["AP"] * 100) for p in run.get("curve", []) if p.get("AP") is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=f"C{i}", alpha=0.85, lw=1.4, marker="o", ms=3,
                    label=method["label"] if j == 0 else None)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("validation AP (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{suite['title']}: learning curves (one line per seed)")
    _save(fig, path)
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
    _save(fig, path)
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
    ax.set_ylabel("fraction of outputs (training images)")
    ax.set_title(f"{suite['title']}:\ngradient-norm density of the trained models")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Blocks and rendering


def _loads(runs: list[dict[str, Any]]) -> list[float]:
    """The load-average samples of ``runs`` (start, every few seconds during the run, end)."""
    return [float(x) for r in runs for x in (r.get("load_average") or []) if x is not None]


def _runs_line(method: dict[str, Any]) -> str:
    parts = []
    for run in method["runs"]:
        loads = _loads([run])
        wall, cpu = run.get("wall_s"), run.get("cpu_s")
        parts.append(
            f"seed {run['seed']}: `{run.get('folder', '?')}`"
            + (f", {wall / 60:.1f} min" if wall else "")
            + (f" (CPU {cpu / 60:.1f} min at {run.get('threads', '?')} threads)" if wall and cpu is not None else "")
            + (f", load {min(loads):.1f}–{max(loads):.1f} over {len(loads)} samples" if loads else "")
        )
    return f"{method['label']}: " + "; ".join(parts)


def _throughput(s: MethodSummary, method: dict[str, Any]) -> str:
    if math.isnan(s.images_per_s):
        return "–"
    loads = _loads(method["runs"])
    devices = {r.get("device", "unrecorded") for r in method["runs"]}
    # img/s on a GPU and on a CPU are not one quantity: name the device unless every run was on a CPU
    where = "" if devices == {"CPU"} else f" on {', '.join(sorted(devices))}"
    return f"{s.images_per_s:.0f}{where}" + (f" (load {sum(loads) / len(loads):.1f})" if loads else "")


def _suite_blocks(name: str, suite: dict[str, Any], out_dir: Path, *, plots: bool = True) -> list[tuple]:
    from detbalance.compare.stats import findings, format_difference, suite_differences, twin_of_labels

    blocks: list[tuple] = [("h2", f"Suite `{name}`: {suite['title']}"), ("p", suite.get("description", ""))]
    if suite.get("recipe"):
        blocks.append(("p", suite["recipe"]))
    if suite.get("data_summary"):
        blocks.append(("table", ["data", "value"], [[k, str(v)] for k, v in suite["data_summary"].items()]))
    summaries = [summarize_method(m) for m in suite["methods"]]
    base = next((s for s in summaries if s.key == suite["baseline"]), summaries[0])
    primary = suite.get("primary", "AP")
    diff_metrics = ["AP"] + (["rare_AP"] if primary == "rare_AP" else [])
    diffs = {metric: suite_differences(suite, metric) for metric in diff_metrics}
    header = ["method", *[h for _, h in _METRIC_COLUMNS]]
    for metric in diff_metrics:
        label = "AP" if metric == "AP" else "rare AP"
        header += [f"Δ{label} vs {base.label} [95 % CI]", f"verdict ({label})"]
    header += ["seeds", "train img/s (load)"]
    twin_of = twin_of_labels(suite)
    rows = []
    for s, method in zip(summaries, suite["methods"], strict=True):
        cells = [s.label] + [format_mean_std(s.mean[k], s.std[k]) for k, _ in _METRIC_COLUMNS]
        for metric in diff_metrics:
            if s is base:
                cells += ["baseline", "–"]
            elif s.key in twin_of:
                cells += [f"clean-label twin of {twin_of[s.key]} (findings: the noise cost)", "–"]
            else:
                d = diffs[metric][s.key]
                cells += [format_difference(d), d.verdict]
        cells += [str(s.num_seeds), _throughput(s, method)]
        rows.append(cells)
    blocks.append(("table", header, rows))
    blocks.append((
        "p",
        "AP columns are COCO AP in %, mean ± sample std over seeds (faster-coco-eval on the validation split). "
        "Δ is the mean per-seed difference to the baseline (arms share initial weights per seed) with its 95 % "
        "Student-t interval; a verdict needs 3 seeds. Throughput is training images/s, with the mean of the "
        "1-minute load average sampled over the runs (at the start, every 15 s, and at the end).",
    ))
    for text in suite.get("findings") or findings(suite):
        blocks.append(("p", text))
    for maker, suffix, alt in (
        (_plot_ap, "ap", "AP per method"),
        (_plot_curves, "curves", "learning curves"),
        (_plot_per_class, "per_class", "AP per class"),
        (_plot_density, "grad_density", "gradient-norm density"),
    ):
        png = maker(suite, out_dir / f"{name}_{suffix}.png") if plots else out_dir / f"{name}_{suffix}.png"
        if png is not None and png.is_file():
            blocks.append(("img", png.name, f"{suite['title']}: {alt}"))
    blocks.append(("p", "**Runs used.** " + " ".join(_runs_line(m) + "." for m in suite["methods"])))
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


_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|\*([^*\s][^*]*?)\*|\[([^\]]+)\]\(([^)\s]+)\)")


def inline_html(text: str) -> str:
    """HTML of the inline Markdown the report uses: `` `code` ``, ``**bold**``, ``*italic*``, ``[text](url)``;
    everything else is escaped (a ``javascript:`` link is left as text)."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        code, bold, italic, label, url = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{inline_html(bold)}</strong>")
        elif italic is not None:
            out.append(f"<em>{inline_html(italic)}</em>")
        elif url.lower().startswith(("http://", "https://", "#")) or ":" not in url:
            out.append(f"<a href=\"{html.escape(url)}\">{inline_html(label)}</a>")
        else:
            out.append(html.escape(m.group(0)))
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


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
            out.append(f"<{kind}>{inline_html(block[1])}</{kind}>")
        elif kind == "p" and block[1]:
            out.append(f"<p>{inline_html(block[1])}</p>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in block[1]) + "</tr>")
            for row in block[2]:
                out.append("<tr>" + "".join(f"<td>{inline_html(str(c))}</td>" for c in row) + "</tr>")
            out.append("</table>")
        elif kind == "img":
            out.append(f"<p><img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'></p>")
    out.append("</body></html>")
    return "\n".join(out)


def _setup_blocks(setup: dict[str, Any], heading: str = "Setup") -> list[tuple]:
    rows = [[k, ", ".join(v) if isinstance(v, list) else str(v)] for k, v in setup.items() if k not in ("command", "data")]
    for k, v in setup.get("data", {}).items():
        rows.append([f"data: {k}", str(v)])
    return [("h2", heading), ("table", ["item", "value"], rows), ("p", "Command:"), ("code", setup.get("command", ""))]


_INTRO = (
    "Every method of a suite trains on the same data, from the same initial weights per seed, for the same number "
    "of iterations with the same recipe, and is evaluated with the official COCO metric on the same validation "
    "split, never on its training images."
)


def write_report(results: dict[str, Any], out_dir: Path, *, name: str = "report") -> Path:
    """Write ``<name>.md``, ``<name>.html`` and the plots (PNG) for a ``compare`` results dict.

    Args:
        results: the content of ``results.json`` (keys ``setup`` and ``suites``).
        out_dir: folder to write into (created if missing). Only the project's own files there are replaced
            (its manifest, see :class:`~detbalance.engine.files.OutputFolder`).
        name: the reports' file name without its suffix (``compare`` writes ``report-<suite>`` per suite).

    Returns:
        The path of ``<name>.md``.

    Raises:
        ForeignFilesError: a file of the report's names there is not the project's (listed; nothing written).
    """
    from detbalance.engine.files import OutputFolder

    out_dir = Path(out_dir)
    folder = OutputFolder(out_dir)
    folder.check([f"{name}.md", f"{name}.html",
                  *[f"{s}_{suffix}.png" for s in results["suites"] for suffix in REPORT_FIGURES]], what="the report")
    blocks: list[tuple] = [("h1", "detbalance compare: imbalance remedies side by side"), ("p", _INTRO)]
    blocks += _setup_blocks(results["setup"])
    for suite_name, suite in results["suites"].items():
        blocks.extend(_suite_blocks(suite_name, suite, out_dir))
    md_path = folder.write_text(f"{name}.md", _render_md(blocks))
    folder.write_text(f"{name}.html", _render_html(blocks, "detbalance compare"))
    return md_path


def write_combined_report(parts: list[dict[str, Any]], out_dir: Path) -> Path:
    """Write ``report.md`` / ``report.html``: every suite whose results are in ``out_dir``, with links to each
    suite's own report.

    Each suite's results are kept in ``results-<suite>.json`` and its report in ``report-<suite>.md`` /
    ``.html``, so a second ``compare`` into the same folder adds its suites instead of replacing the first's.

    Args:
        parts: one results dict per suite (``{"setup", "suites": {name: suite}}``, the content of its
            ``results-<suite>.json``), in the order to show; suites that share a setup (one invocation) are
            shown under one setup table.
        out_dir: the compare output folder (the plots of each suite are already there).

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    blocks: list[tuple] = [("h1", "detbalance compare: imbalance remedies side by side"), ("p", _INTRO)]
    rows = []
    for part in parts:
        for suite_name, suite in part["suites"].items():
            rows.append([
                f"`{suite_name}`", suite["title"], f"`{part['setup'].get('command', '')}`",
                f"[report-{suite_name}.md](report-{suite_name}.md), [html](report-{suite_name}.html)",
            ])
    blocks += [("h2", "Suites in this folder"), ("table", ["suite", "what", "command", "its own report"], rows)]
    groups: list[tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]] = []
    for part in parts:
        for suite_name, suite in part["suites"].items():
            if groups and groups[-1][0] == part["setup"]:
                groups[-1][1].append((suite_name, suite))
            else:
                groups.append((part["setup"], [(suite_name, suite)]))
    for setup, suites in groups:
        heading = "Setup" if len(groups) == 1 else "Setup of " + ", ".join(f"`{n}`" for n, _ in suites)
        blocks += _setup_blocks(setup, heading)
        for suite_name, suite in suites:
            blocks.extend(_suite_blocks(suite_name, suite, out_dir, plots=False))
    from detbalance.engine.files import OutputFolder

    folder = OutputFolder(out_dir)
    md_path = folder.write_text("report.md", _render_md(blocks))
    folder.write_text("report.html", _render_html(blocks, "detbalance compare"))
    return md_path
