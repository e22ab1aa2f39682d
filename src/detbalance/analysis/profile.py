"""``detbalance profile``: measure a dataset's and a detector's imbalance, draw it, and say what the papers did.

:func:`run_profile` writes into ``output``:

* ``profile.json``: every statistic (:mod:`detbalance.analysis.stats` dataclasses as dicts), the readings and
  the recommendations;
* one PNG per figure of :mod:`detbalance.analysis.plots`;
* ``profile.md``: the figures with a short plain-language reading and recommendations stated as rules
  with their numbers and their source (which remedy a paper found for the measured regime).

What is computed on what (so ``--data builtin`` runs in well under two minutes on two cores):

* dataset statistics on **every** training target (no image is decoded);
* the anchor assignment on a seeded sample of ``assignment_images`` training images (blank images of the
  right size go through the model's transform; nothing is decoded);
* model statistics on ``num_images`` decoded training images: the per-element gradient norms and losses of
  a RetinaNet's sigmoid classifier (from the checkpoint, or at initialisation when there is none), and,
  with a checkpoint, COCO AP per class on ``num_images`` images of the ``test`` split.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from detbalance.analysis import plots
from detbalance.analysis.assignment import AssignmentStats, dataset_assignment_stats
from detbalance.analysis.dataset import DatasetStats, dataset_stats
from detbalance.analysis.gradients import GradientStats, per_class_ap, probe_gradients
from detbalance.analysis.progress import Progress
from detbalance.sampling.roi_sampler import IoUBalancedSampler

__all__ = ["Recommendation", "class_values_over_training", "readings", "recommendations", "run_profile"]

# Thresholds of the rules below, named so the report and the tests quote the same numbers.
DENSE_RATIO = 100.0
"""negatives per positive from which a detector is in the dense, one-stage regime (focal paper: ~1:1000)."""
EASY_NEGATIVE_SHARE = 0.5
"""share of the CE gradient from easy negatives above which the easy negatives dominate training."""
OUTLIER_G = 0.9
"""``g`` above which a converged model's example is "very hard" (GHM's outliers)."""
UNMATCHED_SHARE = 0.01
"""share of ground-truth boxes without any positive anchor above which anchors must be changed."""


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """A rule that fired: what was measured, the remedy and where the number comes from."""

    rule: str
    evidence: str
    remedy: str
    source: str


# ----------------------------------------------------------------------------------------- the readings


def _pct(x: float) -> str:
    """A percentage with enough digits that small non-zero shares do not print as 0 (two significant)."""
    if x >= 0.01 or x == 0:
        return f"{100 * x:.0f}%"
    return f"{100 * x:.2g}%"


def _tail_share(curve: Sequence[float], fraction: Sequence[float], top: float = 0.2) -> float:
    """Share of the loss carried by the ``top`` fraction of examples with the highest loss."""
    target = 1.0 - top
    i = min(range(len(fraction)), key=lambda j: abs(fraction[j] - target))
    return 1.0 - curve[i]


def readings(
    data: DatasetStats,
    assignment: AssignmentStats | None,
    gradient: GradientStats | None,
    class_ap: Sequence[float | None] | None = None,
) -> list[str]:
    """Plain-language sentences, each quoting the measured numbers."""
    out = []
    out.append(
        f"{data.num_images:,} images, {data.num_objects:,} boxes ({data.objects_per_image_mean:.2f} per image, "
        f"at most {data.objects_per_image_max}); {data.num_empty_images:,} images have no box."
    )
    if data.imbalance_ratio is not None and data.rarest != data.most_common:
        out.append(
            f"Class '{data.rarest}' is {data.imbalance_ratio:.0f}x rarer than the most common class "
            f"'{data.most_common}' ({min(c for c in data.instance_counts if c > 0):,} vs "
            f"{max(data.instance_counts):,} boxes)."
        )
    if data.absent_classes:
        out.append(f"Classes without any box: {', '.join(repr(c) for c in data.absent_classes)}.")
    if data.num_objects:
        s = data.size_counts
        out.append(
            f"Box sizes (COCO areas): {_pct(s['small'] / data.num_objects)} small (< 32² px), "
            f"{_pct(s['medium'] / data.num_objects)} medium, {_pct(s['large'] / data.num_objects)} large."
        )
    repeated = sum(r > 1 for r in data.class_repeat_factors)
    if repeated:
        out.append(
            f"Repeat-factor sampling (t = {data.repeat_threshold:g}) would oversample {repeated} class(es), up to "
            f"r = {max(data.class_repeat_factors):.2f}; one epoch would draw {data.expected_epoch_size:,.0f} images "
            f"instead of {data.num_images:,}."
        )
    else:
        out.append(
            f"Every class is in at least {_pct(data.repeat_threshold)} of the images, so repeat-factor sampling at "
            f"t = {data.repeat_threshold:g} would repeat no image."
        )
    if assignment is not None:
        pos = sum(assignment.positives_per_level)
        total = sum(assignment.anchors_per_level)
        if pos:
            out.append(
                f"Anchors: 1 positive per {total / pos:,.0f} anchors "
                f"({assignment.negatives_per_positive:,.0f} negatives per positive; "
                f"{pos / assignment.num_images:.1f} positives and {total / assignment.num_images:,.0f} anchors per "
                f"image, over {assignment.num_images} images)."
            )
        else:
            out.append(f"Anchors: no positive anchor in {assignment.num_images} sampled images.")
        if assignment.num_gt:
            out.append(
                f"{assignment.num_unmatched_gt} of {assignment.num_gt} ground-truth boxes "
                f"({_pct(assignment.num_unmatched_gt / assignment.num_gt)}) get no positive anchor; "
                f"{assignment.num_low_quality_gt} ({_pct(assignment.num_low_quality_gt / assignment.num_gt)}) have "
                f"no anchor with IoU >= {assignment.high:g} and rely on the low-quality matching rule."
            )
    if gradient is not None:
        ce, fl, ghm = (gradient.gradient_share[k]["easy_negative"] for k in ("ce", "focal", "ghm_c"))
        out.append(
            f"{_pct(ce)} of the gradient comes from easy negatives (g < {gradient.easy_threshold:g}) under CE, "
            f"{_pct(fl)} under focal loss (γ = {gradient.focal_gamma:g}, α = {gradient.focal_alpha}) and "
            f"{_pct(ghm)} under GHM-C (M = {gradient.bins})."
        )
        q = gradient.quadrant_counts
        if gradient.num_negative:
            out.append(
                f"{_pct(q['easy_negative'] / gradient.num_negative)} of the {gradient.num_negative:,} negative "
                f"(anchor, class) outputs are easy; {_pct(q['hard_positive'] / max(1, gradient.num_positive))} of "
                f"the {gradient.num_positive:,} positive outputs are hard."
            )
        if 0.0 in gradient.cdf_gammas and gradient.num_negative:
            i0 = gradient.cdf_gammas.index(0.0)
            ig = len(gradient.cdf_gammas) - 1
            out.append(
                f"The 20% hardest negatives carry {_pct(_tail_share(gradient.cdf_negative[i0], gradient.cdf_fraction))} "
                f"of the negatives' loss under CE and "
                f"{_pct(_tail_share(gradient.cdf_negative[ig], gradient.cdf_fraction))} under γ = "
                f"{gradient.cdf_gammas[ig]:g} (focal paper figure 4)."
            )
    if class_ap is not None:
        pairs = [
            (c, a, n) for c, a, n in zip(data.instance_counts, class_ap, data.class_names) if a is not None
        ]
        if pairs:
            pairs.sort()
            lo, hi = pairs[0], pairs[-1]
            out.append(
                f"AP of the rarest class '{lo[2]}' ({lo[0]:,} training boxes): {lo[1]:.3f}; of the most common "
                f"'{hi[2]}' ({hi[0]:,}): {hi[1]:.3f}."
            )
    return out


def recommendations(
    data: DatasetStats,
    assignment: AssignmentStats | None,
    gradient: GradientStats | None,
    *,
    arch: str,
    trained: bool,
) -> list[Recommendation]:
    """The rules that fire for the measured numbers (each a threshold and the paper's setting)."""
    out: list[Recommendation] = []
    if (
        assignment is not None
        and assignment.negatives_per_positive is not None
        and arch in ("retinanet", "ssd")
    ):
        ratio = assignment.negatives_per_positive
        if ratio >= DENSE_RATIO:
            out.append(
                Recommendation(
                    rule=f"negatives per positive >= {DENSE_RATIO:g} in a dense one-stage detector",
                    evidence=f"1:{ratio:,.0f} measured",
                    remedy=(
                        "focal loss with γ = 2, α = 0.25, normalised by the number of positives, classifier bias at "
                        "the prior π = 0.01; at ~1:1000 it beat the best OHEM setting by 3.2 AP, and α-balanced CE "
                        "was best at α = 0.75"
                    ),
                    source="Lin et al., Focal Loss for Dense Object Detection (2017), table 1a and 1d, section 3.3",
                )
            )
    if assignment is not None and arch == "ssd":
        out.append(
            Recommendation(
                rule="the detector is SSD (dense anchors, softmax classifier)",
                evidence=f"1:{assignment.negatives_per_positive or float('nan'):,.0f} anchors before mining",
                remedy="hard negative mining at negatives:positives = 3:1 per image",
                source="Liu et al., SSD (2016), section 2.2",
            )
        )
    if arch == "faster_rcnn":
        out.append(
            Recommendation(
                rule="the detector is two-stage (the RPN and the RoI head each sample a fixed budget)",
                evidence="proposals filter most easy negatives before the second stage",
                remedy=(
                    "fixed ratio RPN 256 anchors/image at 50% positives, RoI head 512/image at 25% positives; OHEM "
                    "(128 hard RoIs per image by classification + box loss, NMS 0.7, no positive quota) "
                    "replaces the fixed ratio's heuristics"
                ),
                source="Ren et al., Faster R-CNN (2015); Shrivastava et al., OHEM (2016)",
            )
        )
    if gradient is not None:
        ce = gradient.gradient_share["ce"]["easy_negative"]
        if ce > EASY_NEGATIVE_SHARE:
            fl = gradient.gradient_share["focal"]["easy_negative"]
            out.append(
                Recommendation(
                    rule=f"easy negatives give more than {_pct(EASY_NEGATIVE_SHARE)} of the CE gradient",
                    evidence=f"{_pct(ce)} under CE, {_pct(fl)} under focal (γ = {gradient.focal_gamma:g})",
                    remedy="down-weight easy examples: focal loss (γ = 2) or GHM-C (M = 30 bins, momentum 0.75)",
                    source="Lin et al. (2017) section 3.2; Li et al., Gradient Harmonized Single-stage Detector (2019)",
                )
            )
        if trained:
            n = max(1, gradient.num_examples)
            m = gradient.bins
            very_hard = sum(gradient.density[int(math.floor(OUTLIER_G * m)) :]) / n
            mid = sum(gradient.density[m // 2 : int(math.floor(OUTLIER_G * m))]) / n
            if very_hard > mid:
                out.append(
                    Recommendation(
                        rule=(
                            f"more examples at g >= {OUTLIER_G:g} than at 0.5 <= g < {OUTLIER_G:g} (a U-shaped "
                            "density: very hard examples, likely outliers)"
                        ),
                        evidence=f"{_pct(very_hard)} vs {_pct(mid)} of the examples",
                        remedy=(
                            "GHM-C (M = 30, momentum 0.75) down-weights the dense very-hard region that focal loss "
                            "up-weights; GHM-R (μ = 0.02, M = 10, loss weight 10) does the same for box regression"
                        ),
                        source="Li et al. (2019), figures 1-2, section 4",
                    )
                )
    repeated = [n for n, r in zip(data.class_names, data.class_repeat_factors) if r > 1]
    if repeated:
        out.append(
            Recommendation(
                rule=f"classes in fewer than t = {data.repeat_threshold:g} of the images (LVIS's rare regime)",
                evidence=f"{len(repeated)} class(es): {', '.join(repeated[:10])}; r up to {max(data.class_repeat_factors):.2f}",
                remedy=(
                    f"repeat-factor sampling r(c) = max(1, sqrt(t / f(c))) with t = {data.repeat_threshold:g}; "
                    "each epoch then draws about {:,.0f} images".format(data.expected_epoch_size)
                ),
                source="Gupta et al., LVIS (2019), section 4 (repeat factor sampling)",
            )
        )
    elif data.imbalance_ratio is not None and data.imbalance_ratio >= 10 and data.image_counts:
        present = [c for c in data.image_counts if c > 0]
        f_min = min(present) / data.num_images
        out.append(
            Recommendation(
                rule=f"instance ratio >= 10 between classes, but no class below t = {data.repeat_threshold:g}",
                evidence=(
                    f"most/least frequent = {data.imbalance_ratio:.0f}x; the rarest class is in "
                    f"{_pct(f_min)} of the images"
                ),
                remedy=(
                    f"repeat-factor sampling repeats nothing at t = {data.repeat_threshold:g}; t = r² · f(rarest) "
                    f"= {4 * f_min:.3g} repeats the rarest class's images r = 2 times (or use class-frequency "
                    "loss weights, e.g. the effective number with β = 0.999)"
                ),
                source="Gupta et al., LVIS (2019); Cui et al., Class-Balanced Loss (2019)",
            )
        )
    if assignment is not None and assignment.num_gt:
        share = assignment.num_unmatched_gt / assignment.num_gt
        if share > UNMATCHED_SHARE:
            ious = ", ".join(f"{u.max_iou:.2f}" for u in assignment.unmatched[:5])
            out.append(
                Recommendation(
                    rule=f"more than {_pct(UNMATCHED_SHARE)} of the ground-truth boxes get no positive anchor",
                    evidence=(
                        f"{assignment.num_unmatched_gt} of {assignment.num_gt} ({_pct(share)}); best IoUs of "
                        f"the first ones: {ious}"
                    ),
                    remedy=(
                        "these boxes get no loss at all, whatever the loss: add anchor sizes / aspect ratios "
                        f"that reach IoU {assignment.high:g} with them, or lower the matcher's thresholds"
                    ),
                    source="measured (torchvision Matcher semantics)",
                )
            )
    return out


# ----------------------------------------------------------------------------------------- the pipeline


def _load_checkpoint(checkpoint: Path) -> dict[str, Any]:
    from detbalance.engine.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} not found")
    return load_checkpoint(checkpoint, purpose="model")


def _held_out(cfg: Any, evaluated: Any) -> Any:
    """The content check of ``evaluated`` against the checkpoint's training data (``None``: cannot open it)."""
    from detbalance.data import DatasetError, check_held_out, open_dataset

    try:
        train = open_dataset(cfg.data.train, split="train", seed=cfg.data.seed, images=cfg.data.train_images)
    except (OSError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        return None
    return check_held_out(train, evaluated)


def _checkpoint_config(state: dict[str, Any], checkpoint: Path) -> Any:
    """The resolved config saved in a checkpoint: TOML text (``dump_toml``) or a nested dict."""
    from detbalance.config import config_from_dict, load_toml

    saved = state["config"]
    return (
        load_toml(saved, source=f"{checkpoint}:config") if isinstance(saved, str) else config_from_dict(saved)
    )


def _build(cfg: Any, dataset: Any, checkpoint: Path | None) -> torch.nn.Module:
    """The model: the checkpoint's (the package's one loader, :func:`detbalance.engine.load_trained_model`),
    or a freshly initialised one of ``cfg``."""
    from detbalance.builders import (
        build_model,
        class_counts,
        class_image_counts,
        needs_image_counts,
        resolve_image_size,
    )

    if checkpoint is not None:
        from detbalance.engine.run import load_trained_model

        try:
            model, _, _ = load_trained_model(checkpoint)
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = " ".join(lines[:3])
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not fit a {cfg.model.arch} model with "
                f"{dataset.num_classes} classes (backbone {cfg.model.backbone!r}): {detail[:400]}"
            ) from None
        return model
    counts = class_counts(dataset) if cfg.remedy.class_weights is not None else None
    image_counts = class_image_counts(dataset) if needs_image_counts(cfg) else None
    model = build_model(cfg, num_classes=dataset.num_classes, image_size=resolve_image_size(cfg, dataset), counts=counts,
                        image_counts=image_counts)
    return model.eval()


@torch.no_grad()
def _class_ap(
    model: torch.nn.Module, dataset: Any, indices: Sequence[int], progress: Any, *, batch_size: int
) -> list[float | None]:
    progress.stage("model: per-class AP (test split)", total=len(indices))
    preds, targets, sizes = [], [], []
    for start in range(0, len(indices), batch_size):
        batch = [dataset[i] for i in indices[start : start + batch_size]]
        preds += model([b[0] for b in batch])
        targets += [b[1] for b in batch]
        sizes += [tuple(b[0].shape[-2:]) for b in batch]
        progress.advance(len(batch))
    return per_class_ap(preds, targets, num_classes=dataset.num_classes, image_sizes=sizes)


def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_json(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def class_values_over_training(records: Sequence[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per class, what a long-tail loss applied over a run: ``sum / count`` of each ``class_values`` entry.

    ``records`` are the steps of a run's ``balance.jsonl`` (:meth:`BalanceRecorder.to_records`). Seesaw: the
    mean mitigation / compensation factor each class received as a negative of other classes' foreground RoIs;
    EQLv2: the mean over the steps of its accumulated positive/negative gradient ratio; federated loss: the
    share of steps in which the class was in the loss / drawn as a negative. ``None`` where the count is 0.
    """
    sums: dict[str, list[float]] = {}
    counts: dict[str, list[float]] = {}
    for rec in records:
        for name, v in (rec.get("class_values") or {}).items():
            if name not in sums:
                sums[name], counts[name] = [0.0] * len(v["sum"]), [0.0] * len(v["count"])
            sums[name] = [a + b for a, b in zip(sums[name], v["sum"], strict=True)]
            counts[name] = [a + b for a, b in zip(counts[name], v["count"], strict=True)]
    return {name: [s / c if c > 0 else None for s, c in zip(sums[name], counts[name])] for name in sums}


def _run_class_values(checkpoint: Path | None) -> dict[str, list[float | None]]:
    """:func:`class_values_over_training` of the ``balance.jsonl`` beside a run's checkpoint (empty if none)."""
    if checkpoint is None:
        return {}
    path = Path(checkpoint).parent / "balance.jsonl"
    if not path.is_file():
        return {}
    records = [r for r in plots.read_jsonl(path) if "step" in r]
    return class_values_over_training(records)


def run_profile(
    *,
    data: str,
    config: Path | None,
    checkpoint: Path | None,
    output: Path,
    num_images: int = 200,
    progress: bool = True,
    assignment_images: int = 500,
    easy_threshold: float = 0.5,
    seed: int = 0,
) -> Path:
    """Profile the imbalance of ``data`` (and of a detector) and write ``output/profile.md``.

    Args:
        data: ``"builtin[:preset]"``, a COCO json path or a dataset folder (see
            :func:`detbalance.data.open_dataset`); its ``train`` split is profiled.
        config: experiment TOML giving the detector and remedy; ``None``: the checkpoint's config, else the
            defaults (RetinaNet).
        checkpoint: a ``detbalance train`` checkpoint (``{"model": state_dict, "config": TOML or dict, ...}``);
            ``None``
            profiles the model at initialisation and skips per-class AP.
        output: folder for ``profile.json``, the PNGs and ``profile.md``.
        num_images: decoded images for the model statistics and for per-class AP.
        progress: show a rich progress bar on stderr.
        assignment_images: training images sampled for the anchor assignment.
        easy_threshold: ``g`` below which an example is easy.
        seed: sampling seed (the images used for the assignment and the model statistics).

    Returns:
        The path of ``profile.md``.

    Raises:
        FileNotFoundError: ``checkpoint`` or ``config`` does not exist.
        ValueError: an empty dataset, a checkpoint that does not fit the model, bad arguments.
    """
    from detbalance.config import ExperimentConfig, load_config
    from detbalance.data import check_categories, open_dataset
    from detbalance.engine.files import OutputFolder

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if assignment_images < 1:
        raise ValueError(f"assignment_images must be >= 1, got {assignment_images}")
    state = _load_checkpoint(Path(checkpoint)) if checkpoint is not None else None
    saved_cfg = _checkpoint_config(state, Path(checkpoint)) if state is not None else None
    if config is not None:
        cfg = load_config(Path(config))
        if saved_cfg is not None and saved_cfg.model.name != cfg.model.name:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} holds a {saved_cfg.model.name} model but config "
                f"{str(config)!r} asks for {cfg.model.name}"
            )
    else:
        cfg = saved_cfg if saved_cfg is not None else ExperimentConfig()
    arch = cfg.model.arch
    if arch == "fcos":
        raise ValueError(
            f"model.name = {cfg.model.name!r}: profile's anchor statistics are IoU assignments (RetinaNet, Faster "
            "R-CNN's RPN, SSD); FCOS assigns locations by centre sampling and scale ranges, which profile does "
            "not describe yet; profile a retinanet, faster_rcnn or ssd model"
        )
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file, not a folder")
    folder = OutputFolder(output)
    folder.check(["profile.json", "profile.md", *[f"{key}.png" for key in _CAPTIONS],
                  *[f"{key}.png" for key in ("atss", "isr_weights", "libra_bins", "longtail_factors")]], what="profile")

    with Progress(progress, total=None, description=f"dataset: open {data}") as bar:
        train = open_dataset(data, split="train", seed=cfg.data.seed)
        n = len(train)
        if n == 0:
            raise ValueError(f"dataset {data!r} has no images to profile")
        if state is not None:  # a checkpoint meets a dataset: the same categories, or per-class AP is mislabelled
            check_categories(
                state["label_names"], state.get("category_ids"), train.label_names, train.category_ids(),
                expected=f"the checkpoint {str(checkpoint)!r}", got=f"--data {data!r}",
            )
        bar.stage("dataset: targets", total=n)
        targets = []
        for i in range(n):
            targets.append(train.target(i))
            if i % 500 == 499:
                bar.advance(500)
        dstats = dataset_stats(targets, num_classes=train.num_classes, class_names=train.label_names)

        model = _build(cfg, train, Path(checkpoint) if checkpoint is not None else None)
        bar.stage("anchors: assignment", total=None)
        astats = dataset_assignment_stats(model, train, num_images=assignment_images, seed=seed, targets=targets)

        atss = isr = libra = None
        head = getattr(model, "head", None)
        assigner = getattr(head, "assigner", None)
        if assigner is not None and hasattr(assigner, "topk"):  # ATSS: positives and threshold per object
            from detbalance.analysis.assignment import sample_indices
            from detbalance.analysis.pisa_atss import detector_atss_stats

            bar.stage("anchors: ATSS per object", total=None)
            idx = sample_indices(n, min(assignment_images, 100), seed)
            atss = detector_atss_stats(model, [targets[i] for i in idx], [train.image_size(i) for i in idx],
                                       topk=int(assigner.topk))
        pisa = getattr(head if head is not None else getattr(model, "roi_heads", None), "pisa", None)
        if pisa is not None and pisa.isr_k is not None:  # PISA: ISR-P weight by IoU-HLR rank
            from detbalance.analysis.assignment import sample_indices
            from detbalance.analysis.pisa_atss import detector_isr_stats

            bar.stage("model: ISR-P weights", total=None)
            isr = detector_isr_stats(model, train, sample_indices(n, num_images, seed + 3), k=pisa.isr_k,
                                     bias=pisa.isr_bias)

        roi_sampler = getattr(getattr(model, "roi_heads", None), "sampler", None)
        if isinstance(roi_sampler, IoUBalancedSampler):  # Libra: negatives per IoU bin, random vs IoU-balanced
            from detbalance.analysis.assignment import sample_indices
            from detbalance.analysis.libra import detector_libra_stats

            bar.stage("RoIs: negatives per IoU bin", total=None)
            libra = detector_libra_stats(model, train, sample_indices(n, num_images, seed + 4), sampler=roi_sampler,
                                         seed=seed)

        gstats: GradientStats | None = None
        notes: list[str] = []
        if atss is not None:
            notes.append(
                "The model assigns anchors with ATSS: the pos:neg counts and the anchor figure are those of the IoU "
                "matching the detector would use without it; ATSS's own positives per object are in the ATSS figure."
            )
        if state is None:
            notes.append(
                "No checkpoint: only what is meaningful at initialisation is shown (the data and the anchor "
                "assignment). Gradient-norm density, easy/hard shares and loss CDFs describe a trained model "
                "(at initialisation every output sits at the prior p = 0.01), and per-class AP is skipped."
            )
        elif arch == "retinanet":
            from detbalance.analysis.assignment import sample_indices

            indices = sample_indices(n, num_images, seed + 1)
            bar.stage("model: gradient norms", total=len(indices))
            gstats = probe_gradients(model, train, indices, batch_size=16, easy_threshold=easy_threshold,
                                     on_batch=bar.advance)
        else:
            notes.append(
                f"Gradient statistics are computed for RetinaNet's sigmoid classifier; {arch} is skipped."
            )
        class_ap: list[float | None] | None = None
        held_out = None
        if state is not None:
            from detbalance.analysis.assignment import sample_indices

            test = open_dataset(data, split="test", seed=cfg.data.seed)
            if len(test):
                held_out = _held_out(cfg, test)
                if held_out is not None and not held_out.held_out:
                    notes.append(
                        f"Per-class AP is a TRAINING-SET AP: the evaluated images of {data!r} "
                        f"{held_out.describe()} (the checkpoint's training data {cfg.data.train!r})."
                    )
                elif held_out is None:
                    notes.append(
                        f"Per-class AP: not checked against the checkpoint's training data {cfg.data.train!r} "
                        "(it cannot be opened here), so it may include training images."
                    )
                class_ap = _class_ap(
                    model, test, sample_indices(len(test), num_images, seed + 2), bar, batch_size=16
                )

        bar.stage("figures", total=None)
        figures = _figures(dstats, astats, gstats, class_ap, output)
        if atss is not None:
            figures.append(("atss", folder.write_figure("atss.png", plots.plot_atss(atss))))
        if isr is not None:
            figures.append(("isr_weights", folder.write_figure("isr_weights.png", plots.plot_isr_weights(isr))))
        if libra is not None:
            figures.append(("libra_bins", folder.write_figure("libra_bins.png", plots.plot_libra_bins(libra))))
        longtail = _run_class_values(Path(checkpoint) if checkpoint is not None else None)
        if longtail:
            figures.append(("longtail_factors", folder.write_figure("longtail_factors.png",
                plots.plot_class_values(longtail, dstats.class_names))))

    lines = readings(dstats, astats, gstats, class_ap)
    if atss is not None and atss.positives_per_object:
        thr = sorted(atss.thresholds)
        lines.append(
            f"ATSS gives each object {atss.mean_positives:.1f} positive anchors on average "
            f"({atss.num_without_positive} of {len(atss.positives_per_object)} objects get none); its IoU "
            f"threshold per object runs from {thr[0]:.2f} to {thr[-1]:.2f} (median {thr[len(thr) // 2]:.2f}), "
            "where the IoU assignment uses 0.5 for every object."
        )
    if isr is not None and isr.num_positives:
        lines.append(
            f"PISA's ISR-P puts {100 * isr.top_decile_share:.0f}% of the positives' classification weight on the "
            f"first tenth of the IoU-HLR ranks (over {isr.num_positives} positives; k {isr.k:g}, bias {isr.bias:g})."
        )
    if libra is not None and sum(libra.available):
        rand, bal = libra.share(libra.random), libra.share(libra.balanced)
        lines.append(
            f"Libra's IoU-balanced sampling takes {100 * (1 - bal[0]):.0f}% of its negatives above IoU 0, where "
            f"random sampling of the same RoIs takes {100 * (1 - rand[0]):.0f}% ({sum(libra.available)} negatives "
            f"available over {libra.num_images} images, {100 * libra.share(libra.available)[0]:.0f}% at IoU 0)."
        )
    for name, v in longtail.items():
        shown = ", ".join(f"{c} {x:.3g}" if x is not None else f"{c} –" for c, x in zip(dstats.class_names, v))
        lines.append(f"Over training, {plots._CLASS_VALUE_LABELS.get(name, name)}: {shown}.")
    recs = recommendations(dstats, astats, gstats, arch=arch, trained=state is not None)
    result = {
        "data": data,
        "config": str(config) if config is not None else None,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "arch": arch,
        "cls_loss": None if cfg.remedy.cls_loss is None else getattr(cfg.remedy.cls_loss, "name", None),
        "num_images": num_images,
        "assignment_images": astats.num_images,
        "seed": seed,
        "dataset": dstats,
        "assignment": astats,
        "gradient": gstats,
        "atss": atss,
        "isr": isr,
        "libra": libra,
        "class_ap": class_ap,
        "longtail_class_values": longtail,
        "held_out": None if held_out is None else held_out.to_dict(),
        "notes": notes,
        "readings": lines,
        "recommendations": recs,
        "figures": [p.name for _, p in figures],
    }
    folder.write_text("profile.json", json.dumps(_to_json(result), indent=1, allow_nan=False))
    cls_loss = cfg.remedy.cls_loss
    loss_name = (
        getattr(cls_loss, "name", type(cls_loss).__name__)
        if cls_loss is not None
        else ("focal (torchvision default)" if arch == "retinanet" else "softmax CE (torchvision default)")
    )
    md = _markdown(data, checkpoint, f"{arch}, classification loss {loss_name}", lines, recs, notes, figures)
    return folder.write_text("profile.md", md)


_CAPTIONS = {
    "class_frequency": "Class frequency (log scale) and LVIS's repeat threshold.",
    "box_sizes": "Box sizes with COCO's small / medium / large boundaries.",
    "assignment": "Anchors per image by FPN level (positives / negatives / ignored) and each box's best anchor IoU.",
    "gradient_density": "GHM figures 1 and 2: density of the gradient norm g, and the gradient after reweighting.",
    "quadrant_shares": "Easy/hard x positive/negative: share of the examples and of the gradient under each loss.",
    "loss_cdfs": "Focal figure 4: cumulative loss of positives and negatives for several γ.",
    "class_ap": "Per-class AP against training frequency.",
    "atss": "ATSS: positive anchors per object, and each object's IoU threshold (mean + std of its candidates).",
    "isr_weights": "PISA's ISR-P: the positives' classification weight by normalised IoU-HLR (0 = most prime).",
    "libra_bins": "Libra R-CNN: negatives per IoU bin of the training RoIs, available, randomly sampled and IoU-balanced.",
    "longtail_factors": "What the long-tail loss applied to each class over training (the run's balance.jsonl).",
}


def _figures(
    d: DatasetStats,
    a: AssignmentStats | None,
    g: GradientStats | None,
    class_ap: Sequence[float | None] | None,
    output: Path,
) -> list[tuple[str, Path]]:
    todo = [("class_frequency", lambda: plots.plot_class_frequency(d))]
    if d.num_objects:
        todo.append(("box_sizes", lambda: plots.plot_box_sizes(d)))
    if a is not None:
        todo.append(("assignment", lambda: plots.plot_assignment(a)))
    if g is not None:
        todo += [
            ("gradient_density", lambda: plots.plot_gradient_density(g)),
            ("quadrant_shares", lambda: plots.plot_quadrant_shares(g)),
            ("loss_cdfs", lambda: plots.plot_loss_cdfs(g)),
        ]
    if class_ap is not None and any(v is not None for v in class_ap):
        todo.append(("class_ap", lambda: plots.plot_class_ap(d, class_ap)))
    from detbalance.engine.files import OutputFolder

    folder = OutputFolder(output)
    return [(key, folder.write_figure(f"{key}.png", make())) for key, make in todo]


def _markdown(
    data: str,
    checkpoint: Path | None,
    detector: str,
    lines: list[str],
    recs: list[Recommendation],
    notes: list[str],
    figures: list[tuple[str, Path]],
) -> str:
    out = [f"# Imbalance profile: `{data}`", ""]
    out.append(
        f"Detector: **{detector}**; model: "
        + (f"checkpoint `{checkpoint}`." if checkpoint else "at initialisation.")
    )
    out += ["", "## Reading", ""]
    out += [f"- {ln}" for ln in lines]
    if notes:
        out += [""] + [f"> {n}" for n in notes]
    out += ["", "## Recommendations", ""]
    if recs:
        for r in recs:
            out.append(f"- **If {r.rule}** ({r.evidence}): {r.remedy}. *Source: {r.source}.*")
    else:
        out.append("- No rule fired: no imbalance beyond the thresholds these rules use.")
    out += ["", "## Figures", ""]
    for key, path in figures:
        out += [
            f"### {key.replace('_', ' ').capitalize()}",
            "",
            _CAPTIONS.get(key, ""),
            "",
            f"![{key}]({path.name})",
            "",
        ]
    out += ["Numbers: `profile.json`.", ""]
    return "\n".join(out)
