"""`detbalance compare`: train a detector under each remedy of a suite and report which works.

The comparison is controlled: within a suite every method trains on the same generated data (the data
seed is fixed), from the same initial weights for a given seed (the model is built right after seeding,
and the remedies add no parameters), for the same number of iterations with the same cosine schedule,
and is evaluated with the official COCO metric (faster-coco-eval) on the same test split. Seeds change
the initial weights and the data order, which is what "seed spread" measures.

Runs are written to ``OUTPUT/runs/<suite>/<method>/seed<k>/``; a run whose ``result.json`` exists for the
same configuration is reused, and an interrupted run resumes from its checkpoint, so re-running the same
command finishes what is missing and rewrites the report.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from detbalance import __version__
from detbalance.config import (
    BootstrapConfig,
    CEConfig,
    ClassWeightsConfig,
    DataConfig,
    EngineConfig,
    ExperimentConfig,
    FixedRatioConfig,
    FocalConfig,
    GHMCConfig,
    GHMRConfig,
    ModelConfig,
    OHEMConfig,
    OptimConfig,
    RemedyConfig,
    RepeatFactorConfig,
    ScheduleConfig,
    SSDMiningConfig,
    StratifiedOHEMConfig,
    dump_toml,
)

__all__ = ["DEFAULT_ITERS", "SUITES", "Method", "Suite", "run_compare", "suite_configs"]

# Iterations per run of the default `detbalance compare` (RetinaNet, 5 losses, batch 16, one seed): sized
# to finish in about 10 minutes on 2 CPU cores (see README, "What `compare` shows").
DEFAULT_ITERS = 700


@dataclass(frozen=True)
class Method:
    """One arm of a suite: a name, a label for tables and the remedy it trains with."""

    key: str
    label: str
    remedy: RemedyConfig
    description: str = ""


@dataclass(frozen=True)
class Suite:
    """A set of methods compared on one detector and one data preset; ``baseline`` is the reference arm."""

    title: str
    arch: str
    preset: str
    baseline: str
    methods: tuple[Method, ...]
    description: str = ""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4, grad_clip=10.0))


# RoIs back-propagated per image in the samplers suite: the OHEM paper's B = 128 over N = 2 images. (At
# torchvision's 512 per image, RoIAlign's single-threaded CPU backward takes over half of a training step.)
_ROIS = 64

# The GHM authors' loss weights: GHM-C 1, GHM-R 10 (mmdetection configs/ghm); GHMRConfig defaults to 10.
SUITES: dict[str, Suite] = {
    "losses": Suite(
        title="RetinaNet: loss re-weighting",
        arch="retinanet",
        preset="default",
        baseline="ce",
        description=(
            "Dense one-stage detector, every anchor counts. CE uses the focal paper's prior initialisation "
            "(pi = 0.01) so that it trains at all; alpha-CE uses alpha = 0.75 (focal paper, table 1a); focal "
            "gamma = 2, alpha = 0.25; GHM-C M = 30 bins, momentum 0.75; GHM-R mu = 0.02, M = 10, weight 10."
        ),
        methods=(
            Method("ce", "CE", RemedyConfig(cls_loss=CEConfig())),
            Method("alpha_ce", "alpha-CE (0.75)", RemedyConfig(cls_loss=CEConfig(alpha=0.75))),
            Method("focal", "focal (2, 0.25)", RemedyConfig(cls_loss=FocalConfig(alpha=0.25, gamma=2.0))),
            Method("ghm_c", "GHM-C", RemedyConfig(cls_loss=GHMCConfig())),
            Method("ghm_c_r", "GHM-C + GHM-R", RemedyConfig(cls_loss=GHMCConfig(), box_loss=GHMRConfig())),
        ),
    ),
    "samplers": Suite(
        title="Faster R-CNN: RoI selection",
        arch="faster_rcnn",
        preset="default",
        baseline="fixed",
        description=(
            "Two-stage detector sized for 128 px images (RPN 128 proposals per image in training, 5x5 RoIAlign, "
            "128-unit box head; detectors/build.py). Every method back-propagates 64 RoIs per image, the OHEM "
            "paper's budget (B = 128 RoIs over N = 2 images): 64 sampled at 1:3 (fixed ratio, as Fast R-CNN), "
            "the 64 hardest by cls + loc loss after NMS at 0.7 over all ~130 RoIs (OHEM), 64 drawn from 4 "
            "loss strata (S-OHEM: stage-weighted ranking and loss as in Li et al.; the schedule w_cls 1.5 -> "
            "0.5, w_loc 0.5 -> 1.5 and the per-stratum distribution are ours, the paper's full text was not "
            "available), or fixed ratio with one round of offline bootstrapping (half the budget, then mine "
            "confident false positives on the un-augmented training set; they follow each image's flip and "
            "fill the background budget first)."
        ),
        methods=(
            Method("fixed", "fixed 1:3", RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS))),
            Method("ohem", "OHEM", RemedyConfig(roi_sampler=OHEMConfig(num_samples=_ROIS))),
            Method("sohem", "S-OHEM", RemedyConfig(roi_sampler=StratifiedOHEMConfig(num_samples=_ROIS))),
            Method(
                "bootstrap",
                "fixed 1:3 + bootstrapping",
                RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS), bootstrap=BootstrapConfig(rounds=1)),
            ),
        ),
    ),
    "ssd": Suite(
        title="SSD: negatives",
        arch="ssd",
        preset="default",
        baseline="mining",
        description="SSD with 3:1 hard negative mining, with every negative (no mining), and softmax focal loss over all anchors.",
        methods=(
            Method("mining", "3:1 hard negatives", RemedyConfig(ssd_mining=SSDMiningConfig(negative_ratio=3.0))),
            Method("all", "all negatives (CE)", RemedyConfig(ssd_mining=SSDMiningConfig(negative_ratio=None))),
            Method(
                "focal",
                "softmax focal",
                RemedyConfig(cls_loss=FocalConfig(alpha=0.25, gamma=2.0), ssd_mining=SSDMiningConfig(negative_ratio=None)),
            ),
        ),
    ),
    "classes": Suite(
        title="Long-tailed classes",
        arch="retinanet",
        preset="default",
        baseline="none",
        description=(
            "RetinaNet with focal loss on the long-tailed training split (100:1), balanced test split. "
            "Class-frequency weights: effective number (beta 0.999) on the classification loss; repeat-factor "
            "sampling r(c) = max(1, sqrt(t / f(c))) with t = 0.3, so the rarer classes' images repeat."
        ),
        methods=(
            Method("none", "no remedy", RemedyConfig(cls_loss=FocalConfig())),
            Method(
                "weights",
                "class weights",
                RemedyConfig(cls_loss=FocalConfig(), class_weights=ClassWeightsConfig(method="effective_number")),
            ),
            Method("repeat", "repeat factor", RemedyConfig(cls_loss=FocalConfig(), repeat_factor=RepeatFactorConfig(threshold=0.3))),
            Method(
                "both",
                "weights + repeat factor",
                RemedyConfig(
                    cls_loss=FocalConfig(),
                    class_weights=ClassWeightsConfig(method="effective_number"),
                    repeat_factor=RepeatFactorConfig(threshold=0.3),
                ),
            ),
        ),
    ),
    "noise": Suite(
        title="Label noise (outliers)",
        arch="retinanet",
        preset="noisy",
        baseline="focal",
        description="10% of training labels wrong or boxes jittered: the outliers GHM-C claims to down-weight.",
        methods=(
            Method("focal", "focal (2, 0.25)", RemedyConfig(cls_loss=FocalConfig())),
            Method("ghm_c", "GHM-C", RemedyConfig(cls_loss=GHMCConfig())),
        ),
    ),
}


def _suite_names(suite: str) -> list[str]:
    if suite == "all":
        return list(SUITES)
    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {', '.join([*SUITES, 'all'])}; got {suite!r}")
    return [suite]


def suite_configs(
    name: str, *, preset: str | None, iters: int, seed: int, batch_size: int = 16, device: str = "auto"
) -> list[tuple[Method, ExperimentConfig]]:
    """The experiment of every method of suite ``name`` for one seed (identical apart from the remedy)."""
    suite = SUITES[name]
    data_preset = preset if preset is not None else suite.preset
    base = ExperimentConfig(
        data=DataConfig(train=f"builtin:{data_preset}", seed=0),
        model=ModelConfig(arch=suite.arch),
        optim=suite.optim,
        schedule=ScheduleConfig(name="cosine", warmup_iters=min(100, max(1, iters // 10))),
        engine=EngineConfig(
            iterations=iters,
            batch_size=batch_size,
            seed=seed,
            device=device,
            log_interval=max(1, min(25, iters // 20)),
            eval_interval=max(1, iters // 2),  # one evaluation half way, for the learning curve
            record=False,
        ),
    )
    return [(m, replace(base, remedy=m.remedy)) for m in suite.methods]


def _rare_classes(class_counts: dict[str, int]) -> list[str]:
    """Classes with fewer than 10% of the most frequent class's training instances."""
    top = max(class_counts.values(), default=0)
    return [name for name, n in class_counts.items() if top > 0 and n < 0.1 * top]


def _train_class_counts(cfg: ExperimentConfig) -> dict[str, int]:
    from detbalance.builders import build_datasets, class_counts

    train, _ = build_datasets(cfg, seed=cfg.data.seed)
    counts = class_counts(train).tolist()
    return {name: int(n) for name, n in zip(train.label_names, counts, strict=True)}


def _curve(metrics_file: Path) -> list[dict[str, Any]]:
    """Learning-curve points from a run's ``metrics.jsonl``: the training loss (EMA-smoothed) and any AP."""
    points: list[dict[str, Any]] = []
    smooth = None
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("type") == "train" and rec.get("loss") is not None and math.isfinite(rec["loss"]):
            smooth = rec["loss"] if smooth is None else 0.7 * smooth + 0.3 * rec["loss"]
            points.append({"iter": int(rec["step"]), "loss": smooth})
        elif rec.get("type") == "eval" and rec.get("metrics", {}).get("AP") is not None:
            points.append({"iter": int(rec["step"]), "AP": float(rec["metrics"]["AP"])})
    return points


@torch.no_grad()
def _grad_density(run_dir: Path, *, num_images: int = 64, bins: int = 30) -> dict[str, Any] | None:
    """Gradient-norm density g = |sigmoid(x) - y| of a trained RetinaNet over the first test images."""
    from detbalance.analysis.stats import GradientAccumulator, sigmoid_targets
    from detbalance.builders import build_datasets
    from detbalance.detectors import anchor_outputs
    from detbalance.engine.run import load_trained_model

    model, cfg, _ = load_trained_model(run_dir / "checkpoint.pt")
    if cfg.model.arch != "retinanet":
        return None
    _, test = build_datasets(cfg, seed=cfg.data.seed)
    acc = GradientAccumulator(bins=bins)
    indices = list(range(min(num_images, len(test))))
    for start in range(0, len(indices), 16):
        batch = [test[i] for i in indices[start : start + 16]]
        out = anchor_outputs(model, [b[0] for b in batch], [b[1] for b in batch])
        tgt, valid = sigmoid_targets(out.labels, out.cls_logits.shape[-1], background_column=True)
        acc.update(out.cls_logits, tgt, valid)
    return {"counts": [float(c) for c in acc.result().density], "bins": bins, "images": len(indices)}


def _run_one(
    run_dir: Path, cfg: ExperimentConfig, *, on_step: Callable[[Any], None], rare: list[str]
) -> dict[str, Any]:
    from detbalance.engine import fit

    result_file = run_dir / "result.json"
    config_text = dump_toml(cfg)
    if result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved.get("config") == config_text:
            return saved
    resume = (run_dir / "checkpoint.pt").exists() and (run_dir / "config.toml").exists() and (
        (run_dir / "config.toml").read_text() == config_text
    )
    if (run_dir / "checkpoint.pt").exists() and not resume:
        # A stale run of another configuration: start it again from scratch.
        for p in run_dir.iterdir():
            if p.is_file():
                p.unlink()
    res = fit(cfg, output=run_dir, resume=resume, on_step=on_step, progress=False)
    metrics = dict(res.metrics)
    per_class = metrics.get("per_class", {})
    rare_aps = [per_class[c] for c in rare if c in per_class and not math.isnan(per_class[c])]
    metrics["rare_AP"] = sum(rare_aps) / len(rare_aps) if rare_aps else math.nan
    out = {
        "config": config_text,
        "seed": cfg.engine.seed,
        "metrics": metrics,
        "images_per_s": res.images_per_s,
        "curve": _curve(res.metrics_file),
        "grad_density": _grad_density(run_dir),
    }
    result_file.write_text(json.dumps(out, indent=1, allow_nan=True))
    return out


def _data_summary(preset: str, *, sample: int = 500) -> dict[str, Any]:
    """What the report says about the data: sizes, class balance and the RetinaNet anchor balance."""
    from detbalance.analysis.stats import dataset_stats, detector_assignment_stats
    from detbalance.data import make_benchmark
    from detbalance.detectors import build_detector

    train, test = make_benchmark(preset, split="train"), make_benchmark(preset, split="test")
    targets = [train.target(i) for i in range(len(train))]
    ds = dataset_stats(targets, num_classes=train.num_classes, class_names=train.label_names)
    n = min(sample, len(train))
    size = train.image_size(0)[0]
    model = build_detector("retinanet", num_classes=train.num_classes, image_size=size)
    assign = detector_assignment_stats(model, targets[:n], [train.image_size(i) for i in range(n)])
    return {
        "images": f"{len(train)} train / {len(test)} test, {size}x{size} px",
        "objects per train image": f"{ds.objects_per_image_mean:.2f}",
        "train instances per class": ", ".join(
            f"{c}: {k}" for c, k in zip(ds.class_names, ds.instance_counts, strict=True)
        )
        + (f" ({ds.imbalance_ratio:.0f}:1)" if ds.imbalance_ratio else ""),
        "RetinaNet anchors per image": f"{sum(assign.anchors_per_level) // max(1, assign.num_images)}",
        "positive anchors per image": f"{sum(assign.positives_per_level) / max(1, assign.num_images):.1f}",
        "pos:neg (RetinaNet assignment)": "–"
        if assign.negatives_per_positive is None
        else f"1:{assign.negatives_per_positive:.0f} (on {assign.num_images} train images)",
        "benchmark spec": ", ".join(f"{k}={v}" for k, v in train.describe().items()),
    }


def _setup(command: str, preset: str | None, iters: int, seeds: list[int], batch_size: int) -> dict[str, Any]:
    data_preset = preset or "default"
    return {
        "command": command,
        "preset": data_preset + " (the noise suite uses noisy)" if preset is None else data_preset,
        "iterations per run": iters,
        "batch size": batch_size,
        "seeds": ", ".join(map(str, seeds)),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        + ("CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"),
        "versions": f"detbalance {__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "data": _data_summary(data_preset),
    }


def run_compare(
    *,
    suite: str = "losses",
    preset: str | None = None,
    iters: int = DEFAULT_ITERS,
    seeds: int = 1,
    output: str | Path = "compare-out",
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train every method of ``suite`` for ``seeds`` seeds and write the report.

    Args:
        suite: ``losses`` | ``samplers`` | ``ssd`` | ``classes`` | ``noise`` | ``all``.
        preset: Built-in benchmark preset for every suite (``None``: each suite's own, ``default`` or
            ``noisy``).
        iters: Iterations per run (the same for every method).
        seeds: Number of seeds (0, 1, ...).
        output: Report folder.
        batch_size: Images per iteration.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        progress: Show a progress bar.
        command: The command line to print in the report (default: this process's argv).

    Returns:
        The path of ``report.md``.
    """
    from detbalance.analysis.report import write_report

    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    names = _suite_names(suite)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    seed_list = list(range(seeds))
    plan = []
    for name in names:
        for seed in seed_list:
            for method, cfg in suite_configs(name, preset=preset, iters=iters, seed=seed, batch_size=batch_size, device=device):
                plan.append((name, method, seed, cfg))

    command = command or "detbalance " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: dict[str, Any] = {"setup": _setup(command, preset, iters, seed_list, batch_size), "suites": {}}
    counts_cache: dict[str, dict[str, int]] = {}
    t0 = time.perf_counter()
    with _Bar(progress, total=len(plan) * iters) as bar:
        for name, method, seed, cfg in plan:
            if cfg.data.train not in counts_cache:
                counts_cache[cfg.data.train] = _train_class_counts(cfg)
            counts = counts_cache[cfg.data.train]
            suite_def = SUITES[name]
            entry = results["suites"].setdefault(
                name,
                {
                    "title": suite_def.title,
                    "description": suite_def.description,
                    "arch": suite_def.arch,
                    "preset": cfg.data.train.split(":", 1)[1],
                    "baseline": suite_def.baseline,
                    "train_class_frequency": counts,
                    "rare_classes": _rare_classes(counts),
                    "methods": [],
                },
            )
            mentry = next((m for m in entry["methods"] if m["key"] == method.key), None)
            if mentry is None:
                mentry = {"key": method.key, "label": method.label, "runs": []}
                entry["methods"].append(mentry)
            bar.describe(f"{name}/{method.key} seed {seed}")
            done_before = bar.completed
            run_dir = output / "runs" / name / method.key / f"seed{seed}"

            def on_step(m: Any, _base: int = done_before) -> None:
                bar.set_completed(_base + int(m.step))

            run = _run_one(run_dir, cfg, on_step=on_step, rare=entry["rare_classes"])
            bar.set_completed(done_before + iters)
            mentry["runs"].append(run)
            (output / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    results["setup"]["wall time"] = f"{time.perf_counter() - t0:.0f} s"
    for entry in results["suites"].values():
        entry["findings"] = _findings(entry)
    (output / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    return write_report(results, output)


def _findings(entry: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers show, including when a remedy did not help."""
    from detbalance.analysis.report import summarize_method

    summaries = [summarize_method(m) for m in entry["methods"]]
    base = next(s for s in summaries if s.key == entry["baseline"])
    best = max(summaries, key=lambda s: -math.inf if math.isnan(s.mean["AP"]) else s.mean["AP"])
    lines = []
    for s in summaries:
        if s is base:
            continue
        diff = (s.mean["AP"] - base.mean["AP"]) * 100
        spread = max(s.std["AP"], base.std["AP"]) * 100
        if s.num_seeds < 2 or math.isnan(spread):
            verdict = "with one seed, so whether this exceeds seed noise is unknown"
        elif abs(diff) <= spread:
            verdict = f"within the seed spread ({spread:.1f}): no measurable difference"
        else:
            verdict = f"beyond the seed spread ({spread:.1f})"
        word = "above" if diff > 0 else "below"
        lines.append(f"{s.label} is {abs(diff):.1f} AP {word} {base.label} ({verdict}).")
    lines.append(f"Best mean AP: {best.label} ({best.mean['AP'] * 100:.1f}).")
    return ["**Findings.** " + " ".join(lines)]


class _Bar:
    """A rich progress bar over all iterations of all runs (method, seed, iteration, ETA)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.completed = enabled, total, 0
        self._progress = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("iterations"),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task("compare", total=self.total)
        return self

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def set_completed(self, n: int) -> None:
        self.completed = n
        if self._progress is not None:
            self._progress.update(self._task, completed=n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
