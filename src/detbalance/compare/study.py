"""The committed study: every suite at its full budget with 3 seeds, set against the papers' claims.

One command writes it (resumable: rerun it after an interruption)::

    detbalance compare --suite all --seeds 3 --budget full --study --output docs/study

:func:`write_study_readme` writes ``README.md`` there: the command, the wall time, and the table
"paper's claim | our result | agrees?" built from the paired verdicts in ``results.json``. Where a row
disagrees, the evidence for why is written by hand in ``disagreements.md`` beside it (never an untested
guess) and copied under the table, so rerunning the study never loses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detbalance.compare.stats import (
    PLATEAU_AP,
    PairedDifference,
    clean_twins,
    format_difference,
    metric_by_seed,
    paired_difference,
    plateau,
    robustness_difference,
    twin_of_labels,
)

__all__ = ["CLAIMS", "Claim", "claim_rows", "plateau_rows", "suite_tables", "write_study_readme"]


@dataclass(frozen=True)
class Claim:
    """A paper's claim as a paired comparison: ``arm`` vs ``reference`` in ``suite`` on ``metric``.

    ``expected`` is what the paper's claim predicts: ``better``, or ``not worse`` (a claim that one method
    can replace another: it holds when the 95 % interval of the difference excludes a loss of more than
    :data:`NONINFERIORITY_MARGIN`, a non-inferiority test; "no measurable difference" alone is not evidence
    that nothing is lost).
    ``robustness`` compares what the noise costs each arm instead (each arm minus its clean-label twin, the
    noise suite): ``arm``'s drop minus ``reference``'s, paired per seed; ``better`` means it loses less.
    """

    claim: str
    source: str
    suite: str
    arm: str
    reference: str
    metric: str = "AP"
    expected: str = "better"
    robustness: bool = False


CLAIMS: tuple[Claim, ...] = (
    Claim("FL above CE with prior initialisation (34.0 vs 30.2 AP)", "Lin et al. 2017, table 1", "losses", "focal", "ce"),
    Claim("FL above the best alpha-balanced CE (alpha = 0.75)", "Lin et al. 2017, table 1a/1b", "losses", "focal", "alpha_ce"),
    Claim("GHM-C above FL", "Li et al. 2019 (GHM), classification-loss comparison", "losses", "ghm_c", "focal"),
    Claim("GHM-R added to GHM-C improves AP", "Li et al. 2019 (GHM), GHM-C + GHM-R", "losses", "ghm_c_r", "ghm_c"),
    Claim(
        "QFL above FL (GFL's QFL ablation; its numbers were not found in the sources searched: the stored "
        "arXiv 2006.04388 pages gave the abstract only, implus/GFocal's README only full GFL, R-50 1x 40.2 AP "
        "minival, with ATSS and DFL)",
        "Li et al. 2020 (GFL), QFL ablation",
        "losses",
        "qfl",
        "focal",
    ),
    Claim(
        "VFL above FL on RetinaNet R-50 1x (37.4 vs 36.5 AP, COCO val)",
        "Zhang et al. 2021 (VarifocalNet), the authors' README (hyz-xmaster/VarifocalNet @ 03059ef), "
        "'RetinaNet + FL' vs 'RetinaNet + VFL'",
        "losses",
        "vfl",
        "focal",
    ),
    Claim("OHEM above fixed 1:3 sampling, 64 of ~1000 RoIs per image", "Shrivastava et al. 2016", "samplers", "ohem",
          "fixed"),
    Claim("S-OHEM above OHEM, 64 of ~1000 RoIs per image", "Li et al. 2017 (S-OHEM)", "samplers", "sohem", "ohem"),
    Claim("IoU-balanced sampling above random (fixed 1:3) sampling (a component of Libra R-CNN, whose full system "
          "claims +2.5 AP over FPN Faster R-CNN on COCO)", "Pang et al. 2019 (Libra R-CNN), sec. 3.1 and abstract",
          "samplers", "iou_balanced", "fixed"),
    Claim("balanced L1 above smooth L1 in the RoI head (a component of Libra R-CNN)",
          "Pang et al. 2019 (Libra R-CNN), sec. 3.3", "samplers", "balanced_l1", "fixed"),
    Claim("Libra's sampling + loss above the baseline (full Libra R-CNN, with its balanced feature pyramid: 38.6 box "
          "AP, R-50-FPN 1x, mmdetection model zoo; '2.5 points higher AP than FPN Faster R-CNN')",
          "Pang et al. 2019, abstract; mmdetection configs/libra_rcnn/README.md", "samplers", "libra", "fixed"),
    Claim("OHEM above fixed 1:3 sampling, 64 of ~130 RoIs per image (the earlier regime)", "Shrivastava et al. 2016",
          "samplers_pool128", "ohem", "fixed"),
    Claim("S-OHEM above OHEM, 64 of ~130 RoIs per image (the earlier regime)", "Li et al. 2017 (S-OHEM)",
          "samplers_pool128", "sohem", "ohem"),
    Claim(
        "3:1 hard-negative mining above all negatives (the paper: 'faster optimization and a more stable training')",
        "Liu et al. 2016 (SSD), sec. 2.2",
        "ssd",
        "mining",
        "all",
    ),
    Claim(
        "softmax focal loss can replace SSD's hard-negative mining (loses at most 1 AP)",
        "Lin et al. 2017 (focal loss as the alternative to sampling heuristics)",
        "ssd",
        "focal",
        "mining",
        expected="not worse",
    ),
    Claim("repeat-factor sampling raises rare-class AP", "Gupta et al. 2019 (LVIS), sec. 4", "classes", "repeat", "none", "rare_AP"),
    Claim("class-frequency weights raise rare-class AP", "Cui et al. 2019 (effective number)", "classes", "weights", "none", "rare_AP"),
    Claim(
        "repeat-factor sampling raises rare-class AP (LVIS v1, Mask R-CNN R-50 1x: AP_r 0.0 -> 11.5 with RFS)",
        "Gupta et al. 2019 (LVIS); the numbers from the EQLv2 authors' README (tztztztztz/eqlv2)",
        "longtail", "repeat", "ce", "rare_AP",
    ),
    Claim(
        "class-frequency weights raise rare-class AP (no LVIS AP_r reported: the paper measures classification)",
        "Cui et al. 2019 (effective number)", "longtail", "weights", "ce", "rare_AP",
    ),
    Claim(
        "Seesaw loss raises rare-class AP over CE (LVIS AP_r gain not verified here: the paper's tables were not "
        "reachable; mmdetection's README gives Mask R-CNN R-50 2x box AP 25.6 / mask AP 25.0 without AP_r)",
        "Wang et al., CVPR 2021", "longtail", "seesaw", "ce", "rare_AP",
    ),
    Claim(
        "EQLv2 raises rare-class AP (LVIS v1, Mask R-CNN R-50 1x: AP_r 0.0 -> 14.9, AP 16.1 -> 23.7)",
        "Tan et al., CVPR 2021; the authors' README (tztztztztz/eqlv2)", "longtail", "eqlv2", "ce", "rare_AP",
    ),
    Claim(
        "federated loss raises rare-class AP over softmax CE (LVIS AP_r gain not verified here: the paper's table "
        "was not reachable)",
        "Zhou et al. 2021 (Probabilistic two-stage detection); detectron2 use_fed_loss",
        "longtail", "federated", "ce", "rare_AP",
    ),
    Claim(
        "repeat factor + EQLv2 raises rare-class AP over repeat factor alone (ours: no paper reports this pair on "
        "LVIS; EQLv2 is the loss with the largest verified AP_r gain)",
        "ours", "longtail", "repeat_eqlv2", "repeat", "rare_AP",
    ),
    Claim("GHM-C above FL under 10 % label noise (outliers down-weighted)", "Li et al. 2019 (GHM), sec. 3", "noise", "ghm_c", "focal"),
    Claim(
        "GHM-C loses less AP to 10 % label noise than FL (outliers down-weighted)",
        "Li et al. 2019 (GHM), sec. 3",
        "noise",
        "ghm_c",
        "focal",
        robustness=True,
    ),
    Claim(
        "PISA above random sampling (mmdetection model zoo, Faster R-CNN R-50-FPN 1x: 36.4 -> 38.4 box AP)",
        "Cao et al. 2020 (PISA); mmdetection configs/pisa/README.md",
        "samplers",
        "pisa",
        "fixed",
    ),
    Claim(
        "ATSS assignment above IoU assignment, focal loss both (mmdetection model zoo, R-50 1x: RetinaNet 36.5, "
        "ATSS 39.4 box AP; the ATSS model also changes the head)",
        "Zhang et al. 2020 (ATSS); mmdetection configs/atss/README.md, configs/retinanet/README.md",
        "losses",
        "atss_focal",
        "focal",
    ),
)
"""The rows of the study's table (issue 12, item 5)."""


NONINFERIORITY_MARGIN = 0.01
"""A loss of at most 1 AP point (metrics are fractions): the margin of a ``not worse`` claim."""


def _agrees(expected: str, d: PairedDifference) -> str:
    """``yes``; ``no`` (the opposite was measured); ``not reproduced`` (a claimed gain that 3 seeds cannot
    tell from no difference); ``not shown`` (a claim of no loss whose interval allows a larger one);
    ``undecided`` (too few seeds for a verdict)."""
    if d.verdict == "needs seeds":
        return "undecided (needs 3 seeds)"
    if expected == "not worse":
        if d.low > -NONINFERIORITY_MARGIN:
            return "yes"
        if d.verdict == "worse":
            return "no"
        return f"not shown (the interval allows a loss of {-100 * d.low:.1f} AP)"
    if d.verdict == expected:
        return "yes"
    if expected == "better" and d.verdict == "no measurable difference":
        return "not reproduced"
    return "no"


def claim_rows(results: dict[str, Any]) -> list[list[str]]:
    """``[claim (source), our result, agrees?]`` for every claim whose suite is in ``results``."""
    rows = []
    for c in CLAIMS:
        suite = results.get("suites", {}).get(c.suite)
        if suite is None:
            rows.append([f"{c.claim} ({c.source})", "not run", "–"])
            continue
        methods = {m["key"]: m for m in suite["methods"]}
        needed = [c.arm, c.reference]
        twins = clean_twins(suite)
        if c.robustness:
            needed += [twins.get(c.arm, ""), twins.get(c.reference, "")]
        if any(key not in methods for key in needed):
            rows.append([f"{c.claim} ({c.source})", "an arm has no finished run", "–"])
            continue
        metric = "rare-class AP" if c.metric == "rare_AP" else "AP"
        arm, ref = methods[c.arm]["label"], methods[c.reference]["label"]
        if c.robustness:
            d = robustness_difference(suite, c.arm, c.reference, c.metric)
            what = f"({arm} − {methods[twins[c.arm]]['label']}) − ({ref} − {methods[twins[c.reference]]['label']})"
        else:
            d = paired_difference(metric_by_seed(methods[c.arm], c.metric), metric_by_seed(methods[c.reference], c.metric))
            what = f"{arm} − {ref}"
        ours = f"{what}: {format_difference(d)} {metric}"
        if d.n > 1:  # format_difference names a single seed itself
            ours += f" ({d.verdict}, {d.n} seeds)"
        rows.append([f"{c.claim} ({c.source})", ours, _agrees(c.expected, d)])
    return rows


def plateau_rows(results: dict[str, Any]) -> list[str]:
    """One markdown row per suite: its recipe, budget and the plateau check of its best arm."""
    rows = []
    for name, suite in results.get("suites", {}).items():
        p = plateau(suite)
        head = f"| {name} | {suite.get('optim', '–')} | {suite.get('iterations', '–')} |"
        if p is None:
            rows.append(head + " – | – | – | no curves yet |")
            continue
        rows.append(
            head + f" {p.arm} | {100 * p.start_ap:.1f} -> {100 * p.end_ap:.1f} ({p.start_iter} -> {p.end_iter}, "
            f"{p.seeds} seed{'s' if p.seeds != 1 else ''}) | {100 * p.change:+.1f} | "
            f"{'yes' if p.reached else 'no' if p.learned else 'no arm learnt (below 5 AP)'} |"
        )
    return rows


def suite_tables(results: dict[str, Any]) -> list[str]:
    """Markdown lines: per suite, every arm's AP and rare-class AP (mean ± std over seeds) and its paired
    difference to the baseline on the suite's primary metric, with the verdict."""
    from detbalance.analysis.report import format_mean_std, summarize_method
    from detbalance.compare.stats import suite_differences

    lines: list[str] = []
    for name, suite in results.get("suites", {}).items():
        primary = suite.get("primary", "AP")
        label = "rare-class AP" if primary == "rare_AP" else "AP"
        diffs = suite_differences(suite, primary)
        base = next(m for m in suite["methods"] if m["key"] == suite["baseline"])
        twin_of = twin_of_labels(suite)
        lines += [
            f"**{name}** ({suite['title']}; {suite.get('optim', '–')}, {suite.get('iterations', '–')} iterations; "
            f"verdicts on {label})",
            "",
            f"| method | seeds | AP | rare-class AP | Δ{label} vs {base['label']} [95 % CI] | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for method in suite["methods"]:
            s = summarize_method(method)
            if not method["runs"]:
                lines.append(f"| {method['label']} | 0 | not run | – | – | – |")
                continue
            if method is base:
                diff, verdict = "baseline", "–"
            elif method["key"] in twin_of:
                diff, verdict = f"clean-label twin of {twin_of[method['key']]}", "–"
            else:
                d = diffs[method["key"]]
                diff, verdict = format_difference(d), d.verdict
            lines.append(
                f"| {method['label']} | {len(method['runs'])} | {format_mean_std(s.mean['AP'], s.std['AP'])} | "
                f"{format_mean_std(s.mean['rare_AP'], s.std['rare_AP'])} | {diff} | {verdict} |"
            )
        lines.append("")
    return lines


EVIDENCE_FILE = "disagreements.md"
"""Hand-written evidence for the rows that disagree, kept beside the study and copied into its README."""


def _evidence(output: Path) -> list[str]:
    path = output / EVIDENCE_FILE
    if path.is_file():
        return [path.read_text(encoding="utf-8").strip()]
    return [
        "Generated tables cannot explain a disagreement: each row marked **no** stays unexplained until a "
        f"paragraph in `{EVIDENCE_FILE}` (copied here) gives the measurement that accounts for it, after the "
        "loss and sampler reference checks."
    ]


def write_study_readme(results: dict[str, Any], output: Path) -> Path:
    """Write ``output/README.md``: the command, the wall time, the claims table, and a link to the report."""
    setup = results["setup"]
    rows = claim_rows(results)
    command = setup.get("command", "")
    unfinished = setup.get("runs not finished (not in this report)", "none")
    status = []
    if unfinished != "none":
        status = [
            f"**In progress.** This snapshot was written with `--finished-only` from the runs finished so far; not "
            f"finished: {unfinished}. Rerun the command (one process per core shares the work) to continue.",
            "",
        ]
        command = command.replace(" --finished-only", "")
    lines = [
        "# The study: every suite at its full budget, 3 seeds, against the papers",
        "",
        *status,
        "Written by the command below (resumable: rerun it after an interruption; finished runs are reused):",
        "",
        "```",
        command,
        "```",
        "",
        f"Wall time: {setup.get('wall time', '–')}. Machine: {setup.get('machine', '–')}; trained on: "
        f"{setup.get('trained on', '–')}; load average "
        f"{setup.get('load average at start', '–')} at start, {setup.get('load average at end', '–')} at end.",
        "",
        "| paper's claim | our result (arm − reference, mean [95 % t-interval]) | agrees? |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "Differences are paired per seed (arms share initial weights), in AP points. **no**: the opposite of the "
        "claim was measured; **not reproduced**: the claimed gain cannot be told from no difference; **not "
        "shown**: a claim that one method can replace another (loses at most 1 AP) whose interval allows a "
        "larger loss. For each, the evidence follows below, after the loss and sampler reference checks.",
        "",
        "## Results per suite",
        "",
        "AP in %, mean ± sample std over the seeds run; Δ is the mean per-seed difference to the suite's "
        "baseline with its 95 % Student-t interval (3 seeds for a verdict).",
        "",
        *suite_tables(results),
        "## Budgets: is each suite at a plateau?",
        "",
        f"Issue 12's rule: the best arm's AP changes by less than {100 * PLATEAU_AP:.0f} AP over the last quarter "
        "of training (mean over the seeds run so far).",
        "",
        "| suite | recipe | iterations | best arm | AP at 3/4 -> end | change | plateau? |",
        "|---|---|---|---|---|---|---|",
        *plateau_rows(results),
        "",
        "## Where we disagree, and why",
        "",
        *_evidence(Path(output)),
        "",
        "The full report with every table, curve and plot: [report.md](report.md).",
        "",
    ]
    from detbalance.engine.files import OutputFolder

    return OutputFolder(output).write_text("README.md", "\n".join(lines))
