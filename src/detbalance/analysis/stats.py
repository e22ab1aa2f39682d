"""Imbalance statistics of a dataset, of an anchor assignment and of a model: pure functions -> dataclasses.

Three levels, following the three places the papers locate the imbalance:

* :func:`dataset_stats`: class imbalance (instances and images per class, the max/min ratio), objects per
  image, empty images, COCO box sizes, and the repeat factors of LVIS repeat-factor sampling
  (Gupta et al., 2019) that :class:`detbalance.sampling.RepeatFactorSampler` would use.
* :func:`assignment_stats`: foreground/background imbalance of a dense detector's anchor assignment:
  positives / negatives / ignored per FPN level and per image, the pos:neg ratio, and the ground-truth boxes
  that no anchor matches (the focal paper's "1:1000" regime and a common hidden failure).
  :func:`detector_assignment_stats` extracts anchors and IoU thresholds from a torchvision detector.
* :func:`gradient_stats` / :class:`GradientAccumulator`: easy/hard imbalance of a model's sigmoid outputs:
  the gradient norm ``g = |sigmoid(x) - y|`` per (anchor, class) element (GHM, Li et al., 2019, eq. 2),
  its density histogram (GHM figure 1), the easy/hard x positive/negative quadrants, the share of the total
  gradient each quadrant contributes under CE, focal and GHM-C, and the loss CDFs of the focal paper's
  figure 4 (Lin et al., 2017). :func:`per_class_ap` gives COCO AP per class from the official evaluator.

Every result is a frozen dataclass holding only JSON-native values (``dataclasses.asdict`` -> ``json``).
Undefined ratios are ``None``, never ``inf``/``nan``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from detbalance.types import DetectionTarget

__all__ = [
    "COCO_MEDIUM_AREA",
    "COCO_SMALL_AREA",
    "QUADRANTS",
    "AssignmentStats",
    "DatasetStats",
    "GradientAccumulator",
    "GradientStats",
    "UnmatchedBox",
    "assignment_stats",
    "class_repeat_factors",
    "detector_assignment_stats",
    "focal_gradient_magnitude",
    "gradient_stats",
    "match_anchors",
    "per_class_ap",
    "sigmoid_targets",
]

COCO_SMALL_AREA: float = 32.0**2
"""COCO "small": box area < 32^2 pixels."""
COCO_MEDIUM_AREA: float = 96.0**2
"""COCO "medium": 32^2 <= area < 96^2; "large": area >= 96^2."""

QUADRANTS: tuple[str, ...] = ("easy_positive", "hard_positive", "easy_negative", "hard_negative")
"""Quadrant names, in the order used by every quadrant field."""

LowQualityMatches = Literal["all_ties", "best_anchor"]


# ----------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class DatasetStats:
    """Class, size and density statistics of a detection dataset's ground truth.

    Attributes:
        num_images: number of images.
        num_objects: number of ground-truth boxes.
        num_empty_images: images without any box.
        objects_per_image_mean: mean boxes per image (empty images included).
        objects_per_image_max: most boxes in one image.
        objects_per_image_hist: ``hist[n]`` = number of images with exactly ``n`` boxes.
        class_names: ``K`` names, index ``k - 1`` for label ``k``.
        instance_counts: boxes per class (``K``).
        image_counts: images containing the class at least once (``K``); LVIS's ``f(c) * num_images``.
        imbalance_ratio: most frequent / least frequent instance count over the classes present
            (``None`` when fewer than one class is present).
        most_common: name of the class with the most instances (``None`` if no boxes).
        rarest: name of the present class with the fewest instances (``None`` if no boxes).
        absent_classes: names of classes with no instance.
        size_counts: ``{"small", "medium", "large"}`` box counts under COCO's area thresholds
            (area = box width x height in pixels; 32^2 and 96^2).
        sqrt_area_edges: bin edges (pixels) of ``sqrt_area_hist``, log2-spaced.
        sqrt_area_hist: boxes per ``sqrt(area)`` bin (values outside the edges go to the end bins).
        repeat_threshold: LVIS threshold ``t``.
        class_repeat_factors: ``r(c) = max(1, sqrt(t / f(c)))`` per class, ``f(c)`` = fraction of images
            containing ``c`` (``1.0`` for absent classes, which never enter an image's maximum).
        image_repeat_factors_mean: mean over images of ``r(i) = max_{c in i} r(c)`` (as the sampler uses).
        image_repeat_factors_max: largest image repeat factor.
        num_images_repeated: images with ``r(i) > 1``.
        expected_epoch_size: ``sum_i r(i)``, the images one repeat-factor epoch draws in expectation.
    """

    num_images: int
    num_objects: int
    num_empty_images: int
    objects_per_image_mean: float
    objects_per_image_max: int
    objects_per_image_hist: list[int]
    class_names: list[str]
    instance_counts: list[int]
    image_counts: list[int]
    imbalance_ratio: float | None
    most_common: str | None
    rarest: str | None
    absent_classes: list[str]
    size_counts: dict[str, int]
    sqrt_area_edges: list[float]
    sqrt_area_hist: list[int]
    repeat_threshold: float
    class_repeat_factors: list[float]
    image_repeat_factors_mean: float
    image_repeat_factors_max: float
    num_images_repeated: int
    expected_epoch_size: float


def class_repeat_factors(image_counts: Tensor, num_images: int, *, threshold: float = 0.001) -> Tensor:
    """LVIS class repeat factors ``r(c) = max(1, sqrt(t / f(c)))`` (Gupta et al., 2019, section 4).

    Args:
        image_counts: ``Tensor[K]``, images containing each class.
        num_images: dataset size (``f(c) = image_counts[c] / num_images``).
        threshold: ``t``; classes in fewer than ``t * num_images`` images are oversampled.

    Returns:
        ``Tensor[K]`` float64; ``1.0`` for classes with no image (they cannot raise any image's factor).
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    freq = image_counts.to(torch.float64) / num_images
    r = torch.sqrt(threshold / freq.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(1.0)
    return torch.where(image_counts > 0, r, torch.ones_like(r))


def _flatten_targets(targets: Sequence[DetectionTarget]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Concatenate targets: boxes[M, 4] float64, labels[M], image index[M], boxes per image[N]."""
    counts = torch.tensor([int(t["labels"].numel()) for t in targets], dtype=torch.int64)
    if int(counts.sum()) == 0:
        return (
            torch.zeros(0, 4, dtype=torch.float64),
            torch.zeros(0, dtype=torch.int64),
            counts.new_zeros(0),
            counts,
        )
    boxes = torch.cat([t["boxes"].reshape(-1, 4).to(torch.float64) for t in targets])
    labels = torch.cat([t["labels"].reshape(-1).to(torch.int64) for t in targets])
    image = torch.repeat_interleave(torch.arange(len(targets)), counts)
    return boxes, labels, image, counts


def dataset_stats(
    targets: Sequence[DetectionTarget],
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    repeat_threshold: float = 0.001,
) -> DatasetStats:
    """Class imbalance, box sizes and repeat factors of a dataset, from its targets alone (no images).

    Args:
        targets: one :class:`~detbalance.types.DetectionTarget` per image (``boxes: Tensor[G, 4]`` absolute
            ``x1y1x2y2`` pixels, ``labels: Tensor[G]`` in ``1..K``).
        num_classes: ``K``.
        class_names: ``K`` names (index ``k - 1`` for label ``k``); default ``"1".."K"``.
        repeat_threshold: LVIS repeat-factor threshold ``t`` (paper default 0.001).

    Returns:
        :class:`DatasetStats`.

    Raises:
        ValueError: empty dataset, labels outside ``1..K``, or ``class_names`` of the wrong length.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(targets) == 0:
        raise ValueError("targets is empty: the dataset has no images to profile")
    names = (
        [str(k) for k in range(1, num_classes + 1)] if class_names is None else [str(n) for n in class_names]
    )
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names, expected num_classes={num_classes}")
    boxes, labels, image, per_image = _flatten_targets(targets)
    num_images = len(targets)
    if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
        raise ValueError(
            f"target labels must lie in 1..{num_classes}, got min {int(labels.min())}, max {int(labels.max())}"
        )

    instance_counts = (
        torch.bincount(labels - 1, minlength=num_classes)
        if labels.numel()
        else torch.zeros(num_classes, dtype=torch.int64)
    )
    pairs = torch.unique(image * (num_classes + 1) + labels)  # distinct (image, class) pairs
    image_counts = (
        torch.bincount(pairs % (num_classes + 1) - 1, minlength=num_classes)
        if pairs.numel()
        else (torch.zeros(num_classes, dtype=torch.int64))
    )

    present = instance_counts > 0
    if bool(present.any()):
        big = int(instance_counts.argmax())
        masked = torch.where(present, instance_counts, instance_counts.max() + 1)
        small = int(masked.argmin())
        ratio: float | None = float(instance_counts[big]) / float(instance_counts[small])
        most_common, rarest = names[big], names[small]
    else:
        ratio, most_common, rarest = None, None, None

    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0)
    area = wh[:, 0] * wh[:, 1]
    size_counts = {
        "small": int((area < COCO_SMALL_AREA).sum()),
        "medium": int(((area >= COCO_SMALL_AREA) & (area < COCO_MEDIUM_AREA)).sum()),
        "large": int((area >= COCO_MEDIUM_AREA).sum()),
    }
    edges = torch.pow(2.0, torch.arange(0.0, 11.01, 0.5, dtype=torch.float64))  # 1 .. 2048 px
    idx = (torch.bucketize(area.sqrt(), edges, right=True) - 1).clamp(0, len(edges) - 2)
    sqrt_area_hist = torch.bincount(idx, minlength=len(edges) - 1)

    r_class = class_repeat_factors(image_counts, num_images, threshold=repeat_threshold)
    r_image = _image_repeat_factors(labels, image, num_images, repeat_threshold)

    return DatasetStats(
        num_images=num_images,
        num_objects=int(labels.numel()),
        num_empty_images=int((per_image == 0).sum()),
        objects_per_image_mean=float(per_image.double().mean()),
        objects_per_image_max=int(per_image.max()),
        objects_per_image_hist=torch.bincount(per_image).tolist(),
        class_names=names,
        instance_counts=instance_counts.tolist(),
        image_counts=image_counts.tolist(),
        imbalance_ratio=ratio,
        most_common=most_common,
        rarest=rarest,
        absent_classes=[n for n, p in zip(names, present.tolist()) if not p],
        size_counts=size_counts,
        sqrt_area_edges=edges.tolist(),
        sqrt_area_hist=sqrt_area_hist.tolist(),
        repeat_threshold=float(repeat_threshold),
        class_repeat_factors=r_class.tolist(),
        image_repeat_factors_mean=float(r_image.mean()),
        image_repeat_factors_max=float(r_image.max()),
        num_images_repeated=int((r_image > 1.0).sum()),
        expected_epoch_size=float(r_image.sum()),
    )


def _image_repeat_factors(labels: Tensor, image: Tensor, num_images: int, threshold: float) -> Tensor:
    """``r(i) = max_{c in image i} r(c)`` (1 for images without boxes), from the sampler's own function.

    :func:`detbalance.sampling.repeat_factors` is what :class:`~detbalance.sampling.RepeatFactorSampler`
    draws with, so the numbers reported are the sampler's.
    """
    from detbalance.sampling.repeat_factor import repeat_factors

    categories: list[list[int]] = [[] for _ in range(num_images)]
    for i, c in zip(image.tolist(), labels.tolist()):
        categories[i].append(c)
    return repeat_factors(categories, threshold=threshold, sqrt=True).to(torch.float64)


# -------------------------------------------------------------------------------------------- assignment


@dataclass(frozen=True)
class UnmatchedBox:
    """A ground-truth box that no anchor is assigned to as a positive.

    Attributes:
        image: position of the image in the sequence given to :func:`assignment_stats`.
        image_id: the target's ``image_id``.
        box: ``[x1, y1, x2, y2]`` in the anchors' frame (after the detector's resize).
        label: class label ``1..K``.
        max_iou: best IoU of the box with any anchor.
    """

    image: int
    image_id: int
    box: list[float]
    label: int
    max_iou: float


@dataclass(frozen=True)
class AssignmentStats:
    """Foreground/background balance of an anchor assignment over a sample of images.

    Attributes:
        num_images: images assigned.
        level_names: one name per FPN level.
        anchors_per_level: anchors per level, summed over the images.
        positives_per_level: positive (label ``> 0``) anchors per level, summed over the images.
        negatives_per_level: background (label ``0``) anchors per level.
        ignored_per_level: ignored (label ``-1``, between the thresholds) anchors per level.
        positives_per_image: positives in each image (``num_images``).
        negatives_per_image: negatives in each image.
        ignored_per_image: ignored anchors in each image.
        negatives_per_positive: total negatives / total positives (``None`` without positives): the focal
            paper's "1:1000" number.
        num_gt: ground-truth boxes.
        num_unmatched_gt: boxes with no positive anchor that overlaps them (they get no useful
            classification or box loss; a box overlapping no anchor at all counts here even though
            torchvision's low-quality rule then marks every anchor positive for it, all IoUs tying at 0).
        num_low_quality_gt: boxes whose best anchor IoU is below ``high`` (matched, if at all, only by the
            low-quality rule).
        unmatched: up to ``max_listed`` of the unmatched boxes.
        gt_max_iou_edges: edges of ``gt_max_iou_hist`` (IoU, 20 bins on [0, 1]).
        gt_max_iou_hist: histogram of each box's best anchor IoU.
        high: IoU at or above which an anchor is positive.
        low: IoU below which an anchor is negative (between: ignored).
        low_quality_matches: the low-quality rule (``"all_ties"``: torchvision ``Matcher``;
            ``"best_anchor"``: torchvision ``SSDMatcher``; ``None``: none).
    """

    num_images: int
    level_names: list[str]
    anchors_per_level: list[int]
    positives_per_level: list[int]
    negatives_per_level: list[int]
    ignored_per_level: list[int]
    positives_per_image: list[int]
    negatives_per_image: list[int]
    ignored_per_image: list[int]
    negatives_per_positive: float | None
    num_gt: int
    num_unmatched_gt: int
    num_low_quality_gt: int
    unmatched: list[UnmatchedBox]
    gt_max_iou_edges: list[float]
    gt_max_iou_hist: list[int]
    high: float
    low: float
    low_quality_matches: str | None


def _batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of ``Tensor[B, G, 4]`` with ``Tensor[B, A, 4]`` -> ``Tensor[B, G, A]`` (torchvision's formula)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union


def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    *,
    high: float,
    low: float,
    low_quality_matches: LowQualityMatches | None = "all_ties",
    anchor_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Batched IoU matching, with torchvision's ``Matcher`` / ``SSDMatcher`` semantics.

    For each anchor the best ground truth (first on ties) is taken; IoU ``< low`` -> background,
    ``low <= IoU < high`` -> ignored, ``>= high`` -> matched. ``"all_ties"`` (``Matcher(...,
    allow_low_quality_matches=True)``, RetinaNet and RPN) then restores, for every ground truth, each anchor
    whose IoU equals that box's best IoU to its own best box; ``"best_anchor"`` (``SSDMatcher``) forces each
    box's single best anchor onto that box.

    Args:
        anchors: ``Tensor[B, A, 4]`` (or ``Tensor[A, 4]`` shared by all images), ``x1y1x2y2``.
        gt_boxes: ``Tensor[B, G, 4]``, padded with anything where ``gt_valid`` is False.
        gt_valid: ``Tensor[B, G]`` bool.
        high: positive IoU threshold.
        low: negative IoU threshold (``low <= high``).
        low_quality_matches: ``"all_ties"``, ``"best_anchor"`` or ``None``.
        anchor_valid: ``Tensor[B, A]`` bool marking padded anchors (never matched); default all valid.

    Returns:
        ``(matches, iou)``: ``matches: Tensor[B, A]`` int64, the matched box index ``>= 0``, ``-1`` below
        ``low``, ``-2`` between the thresholds (and ``-1`` on padded anchors); ``iou: Tensor[B, G, A]``
        (``-1`` where the box or anchor is padding).
    """
    if not low <= high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    if low_quality_matches not in ("all_ties", "best_anchor", None):
        raise ValueError(
            f"low_quality_matches must be 'all_ties', 'best_anchor' or None, got {low_quality_matches!r}"
        )
    batch, num_gt = gt_valid.shape
    if anchors.dim() == 2:
        anchors = anchors.expand(batch, -1, -1)
    num_anchors = anchors.shape[1]
    if anchor_valid is None:
        anchor_valid = torch.ones(batch, num_anchors, dtype=torch.bool, device=anchors.device)
    matches = torch.full((batch, num_anchors), -1, dtype=torch.int64, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matches, anchors.new_full((batch, num_gt, num_anchors), -1.0)
    pair_valid = gt_valid[:, :, None] & anchor_valid[:, None, :]
    iou = torch.where(pair_valid, _batched_box_iou(gt_boxes.to(anchors.dtype), anchors), -1.0)
    best, all_matches = iou.max(dim=1)  # [B, A]
    has_gt = gt_valid.any(dim=1, keepdim=True) & anchor_valid
    matches = torch.where(best < high, -2, all_matches)
    matches = torch.where(best < low, -1, matches)
    if low_quality_matches == "all_ties":
        best_per_gt = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
        tie = ((iou == best_per_gt) & pair_valid).any(dim=1)  # [B, A]
        matches = torch.where(tie, all_matches, matches)
    elif low_quality_matches == "best_anchor":
        best_anchor = iou.argmax(dim=2)  # [B, G]
        rows = torch.arange(batch, device=anchors.device)[:, None].expand_as(best_anchor)
        gt_index = torch.arange(num_gt, device=anchors.device).expand_as(best_anchor)
        matches[rows[gt_valid], best_anchor[gt_valid]] = gt_index[gt_valid]
    matches = torch.where(has_gt, matches, -1)
    return matches, iou


def _pad_targets(targets: Sequence[DetectionTarget], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    num = max((int(t["labels"].numel()) for t in targets), default=0)
    boxes = torch.zeros(len(targets), num, 4, device=device)
    labels = torch.zeros(len(targets), num, dtype=torch.int64, device=device)
    valid = torch.zeros(len(targets), num, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = int(t["labels"].numel())
        boxes[b, :n] = t["boxes"].reshape(-1, 4).to(device=device, dtype=torch.float32)
        labels[b, :n] = t["labels"].reshape(-1).to(device)
        valid[b, :n] = True
    return boxes, labels, valid


def _pad_anchors(
    anchors: Tensor | Sequence[Tensor], levels: Tensor | Sequence[Tensor], batch: int
) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(anchors, Tensor):
        if not isinstance(levels, Tensor) or anchors.dim() != 2 or levels.shape != anchors.shape[:1]:
            raise ValueError(
                "anchors given as one Tensor[A, 4] need levels as one Tensor[A], got "
                f"anchors {tuple(anchors.shape)}"
            )
        return (
            anchors.expand(batch, -1, -1),
            levels.expand(batch, -1),
            levels.new_ones(batch, len(levels)).bool(),
        )
    if isinstance(levels, Tensor) or len(anchors) != batch or len(levels) != batch:
        raise ValueError(f"anchors and levels must be given per image ({batch} images) or shared")
    num = max(int(a.shape[0]) for a in anchors)
    out = anchors[0].new_zeros(batch, num, 4)
    lev = torch.zeros(batch, num, dtype=torch.int64, device=out.device)
    valid = torch.zeros(batch, num, dtype=torch.bool, device=out.device)
    for b, (a, lv) in enumerate(zip(anchors, levels)):
        out[b, : len(a)] = a
        lev[b, : len(a)] = lv
        valid[b, : len(a)] = True
    return out, lev, valid


def assignment_stats(
    anchors: Tensor | Sequence[Tensor],
    levels: Tensor | Sequence[Tensor],
    targets: Sequence[DetectionTarget],
    *,
    high: float,
    low: float,
    low_quality_matches: LowQualityMatches | None = "all_ties",
    level_names: Sequence[str] | None = None,
    max_listed: int = 20,
    max_pairs: int = 2**22,
) -> AssignmentStats:
    """Positives, negatives and ignored anchors per level and per image, and the boxes no anchor matches.

    The assignment is :func:`match_anchors` (torchvision's ``Matcher`` semantics), vectorised over images
    in chunks of at most ``max_pairs`` (box, anchor) pairs.

    Args:
        anchors: ``Tensor[A, 4]`` shared by every image, or one ``Tensor[A_b, 4]`` per image (as torchvision's
            ``AnchorGenerator`` returns), in the same frame as the targets' boxes.
        levels: FPN level index ``0..L-1`` per anchor, ``Tensor[A]`` or one ``Tensor[A_b]`` per image.
        targets: one target per image (boxes in the anchors' frame).
        high: IoU at or above which an anchor is positive (RetinaNet 0.5, RPN 0.7, SSD 0.5).
        low: IoU below which an anchor is background (RetinaNet 0.4, RPN 0.3, SSD 0.5).
        low_quality_matches: see :func:`match_anchors`.
        level_names: ``L`` names; default ``"P0".."P{L-1}"``.
        max_listed: unmatched boxes listed in the result (all are counted).
        max_pairs: memory bound of one chunk (``images x boxes x anchors``).

    Returns:
        :class:`AssignmentStats`.

    Raises:
        ValueError: no images, inconsistent anchors/levels, bad thresholds.
    """
    if len(targets) == 0:
        raise ValueError("targets is empty: no images to assign")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    batch = len(targets)
    anchors_b, levels_b, anchor_valid = _pad_anchors(anchors, levels, batch)
    num_levels = int(levels_b[anchor_valid].max()) + 1 if bool(anchor_valid.any()) else 0
    if level_names is None:
        level_names = [f"P{i}" for i in range(num_levels)]
    elif len(level_names) < num_levels:
        raise ValueError(f"level_names has {len(level_names)} names, levels go up to {num_levels - 1}")
    num_levels = len(level_names)

    pos_lv, neg_lv, ign_lv, all_lv = (torch.zeros(num_levels, dtype=torch.int64) for _ in range(4))
    pos_img, neg_img, ign_img = [], [], []
    gt_max_iou, gt_num_pos, gt_label, gt_image, gt_box = [], [], [], [], []
    num_anchors = anchors_b.shape[1]
    max_gt = max((int(t["labels"].numel()) for t in targets), default=0)
    chunk = max(1, max_pairs // max(1, num_anchors * max(1, max_gt)))
    for start in range(0, batch, chunk):
        sl = slice(start, min(batch, start + chunk))
        boxes, labels, valid = _pad_targets(targets[sl], anchors_b.device)
        a_valid = anchor_valid[sl]
        matches, iou = match_anchors(
            anchors_b[sl],
            boxes,
            valid,
            high=high,
            low=low,
            low_quality_matches=low_quality_matches,
            anchor_valid=a_valid,
        )
        lv = levels_b[sl]
        pos, neg, ign = matches >= 0, (matches == -1) & a_valid, matches == -2
        for total, mask in ((pos_lv, pos), (neg_lv, neg), (ign_lv, ign), (all_lv, a_valid)):
            total += torch.bincount(lv[mask], minlength=num_levels)[:num_levels].cpu()
        pos_img.append(pos.sum(1))
        neg_img.append(neg.sum(1))
        ign_img.append(ign.sum(1))
        if boxes.shape[1]:
            gt_max_iou.append(iou.amax(dim=2)[valid])
            # positives of each box that actually overlap it: torchvision's low-quality rule makes every anchor
            # "positive" for a box that overlaps no anchor at all (all IoUs tie at 0); such a box is unmatched
            onehot = matches[:, None, :] == torch.arange(boxes.shape[1], device=matches.device)[None, :, None]
            gt_num_pos.append((onehot & (iou > 0)).sum(dim=2)[valid])
            gt_label.append(labels[valid])
            gt_image.append(
                (torch.arange(sl.start, sl.stop, device=valid.device)[:, None].expand_as(valid))[valid]
            )
            gt_box.append(boxes[valid])

    pos_img_t, neg_img_t, ign_img_t = torch.cat(pos_img), torch.cat(neg_img), torch.cat(ign_img)
    if gt_max_iou:
        max_iou, num_pos, label, image, box = (
            torch.cat(x).cpu() for x in (gt_max_iou, gt_num_pos, gt_label, gt_image, gt_box)
        )
    else:
        max_iou = torch.zeros(0)
        num_pos = label = image = torch.zeros(0, dtype=torch.int64)
        box = torch.zeros(0, 4)
    unmatched_idx = torch.nonzero(num_pos == 0).flatten()
    unmatched = [
        UnmatchedBox(
            image=int(image[i]),
            image_id=int(targets[int(image[i])].get("image_id", int(image[i]))),
            box=[round(float(v), 2) for v in box[i]],
            label=int(label[i]),
            max_iou=float(max_iou[i]),
        )
        for i in unmatched_idx[:max_listed].tolist()
    ]
    edges = torch.linspace(0, 1, 21)
    hist = torch.bincount((max_iou.clamp(0, 1) * 20).long().clamp(max=19), minlength=20)
    total_pos, total_neg = int(pos_lv.sum()), int(neg_lv.sum())
    return AssignmentStats(
        num_images=batch,
        level_names=list(level_names),
        anchors_per_level=all_lv.tolist(),
        positives_per_level=pos_lv.tolist(),
        negatives_per_level=neg_lv.tolist(),
        ignored_per_level=ign_lv.tolist(),
        positives_per_image=pos_img_t.tolist(),
        negatives_per_image=neg_img_t.tolist(),
        ignored_per_image=ign_img_t.tolist(),
        negatives_per_positive=total_neg / total_pos if total_pos else None,
        num_gt=int(max_iou.numel()),
        num_unmatched_gt=int(unmatched_idx.numel()),
        num_low_quality_gt=int((max_iou < high).sum()),
        unmatched=unmatched,
        gt_max_iou_edges=edges.tolist(),
        gt_max_iou_hist=hist.tolist(),
        high=float(high),
        low=float(low),
        low_quality_matches=low_quality_matches,
    )


def _detector_parts(model: torch.nn.Module) -> tuple[Any, Any]:
    """``(anchor_generator, matcher)`` of a torchvision RetinaNet / Faster R-CNN (its RPN) / SSD."""
    if hasattr(model, "rpn") and hasattr(
        model.rpn, "anchor_generator"
    ):  # Faster R-CNN: the RPN assigns anchors
        return model.rpn.anchor_generator, model.rpn.proposal_matcher
    if hasattr(model, "anchor_generator") and hasattr(model, "proposal_matcher"):  # RetinaNet, SSD
        return model.anchor_generator, model.proposal_matcher
    raise ValueError(
        f"model {type(model).__name__} has no anchor generator and matcher: expected a torchvision RetinaNet, "
        "Faster R-CNN or SSD"
    )


def _matcher_settings(matcher: Any) -> tuple[float, float, LowQualityMatches | None]:
    from torchvision.models.detection._utils import SSDMatcher

    if isinstance(matcher, SSDMatcher):
        return float(matcher.high_threshold), float(matcher.low_threshold), "best_anchor"
    mode: LowQualityMatches | None = "all_ties" if matcher.allow_low_quality_matches else None
    return float(matcher.high_threshold), float(matcher.low_threshold), mode


@torch.no_grad()
def detector_assignment_stats(
    model: torch.nn.Module,
    targets: Sequence[DetectionTarget],
    image_sizes: Sequence[tuple[int, int]],
    *,
    batch_size: int = 32,
    max_listed: int = 20,
) -> AssignmentStats:
    """:func:`assignment_stats` for a torchvision detector, exactly as its training step assigns anchors.

    Images are never decoded: blank images of the given sizes go through the model's own transform (resize
    and padding, in eval mode so the size is deterministic), the backbone runs once per padded size to get
    the feature shapes, and the model's anchor generator and matcher (RetinaNet/SSD head, Faster R-CNN RPN)
    give the anchors and thresholds.

    Args:
        model: torchvision ``RetinaNet``, ``FasterRCNN`` or ``SSD`` (adapted or not).
        targets: ground truth in original image pixels.
        image_sizes: ``(height, width)`` of each image.
        batch_size: images per transform batch (anchors are per padded batch size, as in training).
        max_listed: see :func:`assignment_stats`.

    Returns:
        :class:`AssignmentStats` with boxes in the model's input frame and levels named by stride.
    """
    if len(targets) != len(image_sizes):
        raise ValueError(f"got {len(targets)} targets but {len(image_sizes)} image sizes")
    if len(targets) == 0:
        raise ValueError("targets is empty: no images to assign")
    generator, matcher = _detector_parts(model)
    high, low, mode = _matcher_settings(matcher)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        all_anchors, all_levels, all_targets = [], [], []
        feature_cache: dict[tuple[int, int], list[Tensor]] = {}
        names: list[str] = []
        for start in range(0, len(targets), batch_size):
            chunk_t = [
                {
                    "boxes": t["boxes"].to(device, torch.float32),
                    "labels": t["labels"].to(device),
                    "image_id": t.get("image_id", start + i),
                }
                for i, t in enumerate(targets[start : start + batch_size])
            ]
            blanks = [
                torch.zeros(3, int(h), int(w), device=device)
                for h, w in image_sizes[start : start + batch_size]
            ]
            image_list, chunk_t = model.transform(blanks, chunk_t)
            key = tuple(image_list.tensors.shape[-2:])
            if key not in feature_cache:
                feats = model.backbone(image_list.tensors[:1])
                feature_cache[key] = list(feats.values()) if isinstance(feats, dict) else [feats]
            feats = [f.expand(len(blanks), -1, -1, -1) for f in feature_cache[key]]
            anchors = generator(image_list, feats)
            per_loc = generator.num_anchors_per_location()
            counts = [int(f.shape[-2] * f.shape[-1]) * int(n) for f, n in zip(feats, per_loc)]
            level = torch.repeat_interleave(
                torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
            )
            names = [f"stride {int(round(key[0] / f.shape[-2]))}" for f in feats]
            all_anchors += list(anchors)
            all_levels += [level] * len(anchors)
            all_targets += chunk_t
    finally:
        model.train(was_training)
    return assignment_stats(
        all_anchors,
        all_levels,
        all_targets,
        high=high,
        low=low,
        low_quality_matches=mode,
        level_names=names,
        max_listed=max_listed,
    )


# ------------------------------------------------------------------------------------------ model / grads


@dataclass(frozen=True)
class GradientStats:
    """Gradient-norm and loss statistics of a model's sigmoid outputs, per (anchor, class) element.

    An *example* is one sigmoid output (anchor ``a``, class column ``c``) with target ``y`` in {0, 1}, the
    unit focal loss and GHM-C act on. ``g = |sigmoid(x) - y|`` is the norm of the CE gradient w.r.t. the
    logit (GHM eq. 2). Positive: ``y = 1``; negative: ``y = 0``; *easy*: ``g < easy_threshold``.

    Attributes:
        num_examples: valid (non-ignored) elements.
        num_positive: elements with ``y = 1``.
        num_negative: elements with ``y = 0``.
        easy_threshold: ``g`` below which an example is easy (0.5: ``p_t > 0.5``, the focal paper's
            "well-classified").
        bins: ``M``, equal-width ``g`` bins on [0, 1] (GHM default 30).
        focal_alpha: alpha of the focal loss compared (``None``: no alpha weighting).
        focal_gamma: gamma of the focal loss compared.
        quadrant_counts: examples per quadrant (keys :data:`QUADRANTS`).
        gradient_share: ``{"ce" | "focal" | "ghm_c": {quadrant: share}}``, the fraction of the summed
            gradient magnitude ``sum |dL/dx|`` each quadrant contributes; each loss's shares sum to 1.
        density: ``M`` counts of ``g`` per bin (:func:`detbalance.losses.gradient_density`).
        density_positive: the same over positives only.
        density_negative: the same over negatives only.
        mean_gradient: ``{loss: [M]}`` mean per-example gradient magnitude in each ``g`` bin (GHM figure 2;
            ``None`` for empty bins). GHM-C's is ``g * beta`` with ``beta = N / GD(g)``,
            ``GD(g) = count(bin(g)) * M`` (GHM eq. 7-8).
        bin_share: ``{loss: [M]}`` share of the total gradient magnitude contributed by each ``g`` bin.
        cdf_gammas: gammas of the loss CDFs (focal figure 4: 0, 0.5, 1, 2).
        cdf_fraction: ``P`` points in [0, 1], fraction of examples sorted by increasing loss.
        cdf_positive: ``[len(cdf_gammas)][P]`` cumulative share of the total loss ``(1 - p_t)^gamma CE``
            over positives, at each fraction.
        cdf_negative: the same over negatives.
    """

    num_examples: int
    num_positive: int
    num_negative: int
    easy_threshold: float
    bins: int
    focal_alpha: float | None
    focal_gamma: float
    quadrant_counts: dict[str, int]
    gradient_share: dict[str, dict[str, float]]
    density: list[float]
    density_positive: list[float]
    density_negative: list[float]
    mean_gradient: dict[str, list[float | None]]
    bin_share: dict[str, list[float]]
    cdf_gammas: list[float]
    cdf_fraction: list[float]
    cdf_positive: list[list[float]]
    cdf_negative: list[list[float]]


def focal_gradient_magnitude(
    logits: Tensor, targets: Tensor, *, alpha: float | None = 0.25, gamma: float = 2.0
) -> Tensor:
    """``|d FL / d x|`` per element for the sigmoid focal loss (Lin et al., 2017, appendix, eq. 9-10).

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``; its derivative has magnitude
    ``alpha_t (1 - p_t)^gamma (1 - p_t - gamma p_t log p_t)``; with ``gamma = 0`` and ``alpha = None`` this is
    CE's ``g = |p - y|``.

    Args:
        logits: ``Tensor[...]``.
        targets: ``Tensor[...]`` in {0, 1}, same shape.
        alpha: weight of positives (``1 - alpha`` for negatives); ``None`` disables.
        gamma: focusing parameter, ``>= 0``.

    Returns:
        ``Tensor[...]`` float32, non-negative.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    x = logits.float()
    y = targets.float()
    x_t = torch.where(y > 0.5, x, -x)
    one_minus_pt = torch.sigmoid(-x_t)
    p_t = torch.sigmoid(x_t)
    neg_log_pt = F.softplus(-x_t)
    mag = one_minus_pt.pow(gamma) * (one_minus_pt + gamma * p_t * neg_log_pt)
    if alpha is not None:
        mag = mag * torch.where(y > 0.5, alpha, 1.0 - alpha)
    return mag


class GradientAccumulator:
    """Streams :class:`GradientStats` over batches in O(bins) memory (one pass, exact).

    Everything is a per-bin sum: GHM-C's weight is constant within a ``g`` bin, so its gradient share is
    ``sum_bins (sum of g in bin) / count(bin)`` up to a constant; the loss CDFs are cumulative sums over
    ``cdf_bins`` log-spaced ``g`` bins (every ``(1 - p_t)^gamma CE`` is increasing in ``g``, so sorting by
    ``g`` sorts by loss). CDF points are therefore exact at bin edges (relative ``g`` resolution about
    1.2% with the defaults).

    Args:
        bins: ``M`` for the density and GHM-C (paper default 30).
        easy_threshold: ``g`` below which an example is easy.
        focal_alpha: alpha of the compared focal loss (``None`` disables).
        focal_gamma: gamma of the compared focal loss.
        cdf_gammas: gammas of the loss CDFs.
        cdf_bins: log-spaced ``g`` bins on ``[1e-12, 1]`` for the CDFs.
    """

    def __init__(
        self,
        *,
        bins: int = 30,
        easy_threshold: float = 0.5,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        cdf_gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
        cdf_bins: int = 2400,
    ) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not 0.0 < easy_threshold <= 1.0:
            raise ValueError(f"easy_threshold must lie in (0, 1], got {easy_threshold}")
        if focal_alpha is not None and not 0.0 <= focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must lie in [0, 1] or be None, got {focal_alpha}")
        if focal_gamma < 0 or any(g < 0 for g in cdf_gammas):
            raise ValueError(
                f"gammas must be >= 0, got focal_gamma={focal_gamma}, cdf_gammas={tuple(cdf_gammas)}"
            )
        self.bins = bins
        self.easy_threshold = easy_threshold
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cdf_gammas = tuple(float(g) for g in cdf_gammas)
        self.cdf_bins = cdf_bins
        self._log_lo = -12.0
        # [pos/neg, easy/hard, M] cells (pos = 0, neg = 1; easy = 0, hard = 1)
        self.count = torch.zeros(2, 2, bins, dtype=torch.float64)
        self.density = torch.zeros(bins, dtype=torch.float64)  # gradient_density over all valid examples
        self.sum_g = torch.zeros(2, 2, bins, dtype=torch.float64)
        self.sum_focal = torch.zeros(2, 2, bins, dtype=torch.float64)
        self.cdf_count = torch.zeros(2, cdf_bins, dtype=torch.float64)
        self.cdf_loss = torch.zeros(len(self.cdf_gammas), 2, cdf_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch (about 25 elementwise passes over it; no host synchronisation but the target check).

        Args:
            logits: ``Tensor[N, C]`` (or any shape) sigmoid logits.
            targets: same shape, one-vs-all targets in {0, 1} (:func:`sigmoid_targets`).
            valid: bool mask broadcastable to ``logits`` (``False`` = ignored); default all valid.
        """
        from detbalance.losses import gradient_density

        if logits.shape != targets.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape"
            )
        x = logits.detach().float().reshape(-1)
        y = targets.detach().float().reshape(-1)
        v = (
            torch.ones_like(x, dtype=torch.bool)
            if valid is None
            else valid.to(torch.bool).expand_as(logits).reshape(-1)
        )
        if bool(((y != 0) & (y != 1) & v).any()):
            raise ValueError("targets must be 0 or 1 on valid elements")
        m, c = self.bins, self.cdf_bins
        g = (torch.sigmoid(x) - y).abs()  # GHM eq. 2; g = 1 - p_t
        neg = (y < 0.5).long()
        ce = F.softplus(torch.where(neg.bool(), x, -x))  # -log p_t, stable
        # [pos/neg, easy/hard, M] cells; invalid elements go to a spare cell that is dropped
        idx = (g * m).floor().clamp(0, m - 1).long()  # the bin of gradient_density: min(floor(g M), M - 1)
        cell = (neg * 2 + (g >= self.easy_threshold).long()) * m + idx
        cell = torch.where(v, cell, 4 * m)
        dev = self.count.device

        def per_cell(weights: Tensor | None, size: int, index: Tensor) -> Tensor:
            out = torch.bincount(index, weights=weights, minlength=size + 1)[:size]
            return out.to(dev, torch.float64)

        self.count += per_cell(None, 4 * m, cell).view(2, 2, m)
        self.density += gradient_density(g, bins=m, valid=v).to(dev, torch.float64)
        self.sum_g += per_cell(g, 4 * m, cell).view(2, 2, m)
        # |d FL / dx| = alpha_t g^gamma (g + gamma p_t (-log p_t)), see focal_gradient_magnitude
        focal = g.pow(self.focal_gamma) * (g + self.focal_gamma * (1 - g) * ce)
        if self.focal_alpha is not None:
            focal = focal * torch.where(neg.bool(), 1.0 - self.focal_alpha, self.focal_alpha)
        self.sum_focal += per_cell(focal, 4 * m, cell).view(2, 2, m)
        # loss CDFs: log-spaced g bins (every (1 - p_t)^gamma CE increases with g)
        cidx = (torch.log10(g.clamp_min(10.0**self._log_lo)) - self._log_lo) * (c / -self._log_lo)
        ccell = torch.where(v, cidx.floor().clamp(0, c - 1).long() + neg * c, 2 * c)
        self.cdf_count += per_cell(None, 2 * c, ccell).view(2, c)
        for gi, gamma in enumerate(self.cdf_gammas):
            w = ce if gamma == 0 else ce * g.pow(gamma)
            self.cdf_loss[gi] += per_cell(w, 2 * c, ccell).view(2, c)

    def result(self, *, cdf_points: int = 101) -> GradientStats:
        """The statistics of everything added so far.

        Raises:
            ValueError: nothing (valid) was added.
        """
        n = float(self.count.sum())
        if n == 0:
            raise ValueError("no valid examples were added: cannot compute gradient statistics")
        count_bin = self.density
        # GHM-C per-example weight beta = N / GD(g), GD(g) = count(bin) * M (paper normalisation)
        beta = torch.where(count_bin > 0, n / (count_bin.clamp_min(1) * self.bins), 0.0)
        totals = {"ce": self.sum_g, "focal": self.sum_focal, "ghm_c": self.sum_g * beta}
        share, mean_grad, bin_share = {}, {}, {}
        for name, t in totals.items():
            tot = float(t.sum())
            quad = t.sum(dim=2).reshape(-1)
            share[name] = {q: (float(quad[i]) / tot if tot > 0 else 0.0) for i, q in enumerate(QUADRANTS)}
            per_bin = t.sum(dim=(0, 1))
            mean_grad[name] = [
                (float(s) / float(c) if c > 0 else None) for s, c in zip(per_bin.tolist(), count_bin.tolist())
            ]
            bin_share[name] = (per_bin / tot if tot > 0 else per_bin * 0).tolist()
        fraction = torch.linspace(0, 1, cdf_points, dtype=torch.float64)
        cdfs = [[], []]
        for gi in range(len(self.cdf_gammas)):
            for si in range(2):
                cdfs[si].append(_cdf_at(self.cdf_count[si], self.cdf_loss[gi, si], fraction))
        counts = self.count.sum(dim=2).reshape(-1)
        return GradientStats(
            num_examples=int(n),
            num_positive=int(self.count[0].sum()),
            num_negative=int(self.count[1].sum()),
            easy_threshold=float(self.easy_threshold),
            bins=self.bins,
            focal_alpha=self.focal_alpha,
            focal_gamma=float(self.focal_gamma),
            quadrant_counts={q: int(counts[i]) for i, q in enumerate(QUADRANTS)},
            gradient_share=share,
            density=count_bin.tolist(),
            density_positive=self.count[0].sum(0).tolist(),
            density_negative=self.count[1].sum(0).tolist(),
            mean_gradient=mean_grad,
            bin_share=bin_share,
            cdf_gammas=list(self.cdf_gammas),
            cdf_fraction=fraction.tolist(),
            cdf_positive=cdfs[0],
            cdf_negative=cdfs[1],
        )


def _cdf_at(count: Tensor, loss: Tensor, fraction: Tensor) -> list[float]:
    """Cumulative loss share at each fraction of examples sorted by loss, linear within a bin."""
    total_n, total_l = float(count.sum()), float(loss.sum())
    if total_n == 0 or total_l == 0:
        return [0.0] * len(fraction) if total_n == 0 else fraction.tolist()
    cn = torch.cat([count.new_zeros(1), count.cumsum(0)]) / total_n
    cl = torch.cat([loss.new_zeros(1), loss.cumsum(0)]) / total_l
    keep = torch.cat([torch.tensor([True]), count > 0])  # strictly increasing x for interpolation
    cn, cl = cn[keep], cl[keep]
    j = torch.searchsorted(cn, fraction, right=False).clamp(1, len(cn) - 1)
    x0, x1, y0, y1 = cn[j - 1], cn[j], cl[j - 1], cl[j]
    t = ((fraction - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
    return (y0 + t * (y1 - y0)).clamp(0, 1).tolist()


def gradient_stats(
    logits: Tensor,
    targets: Tensor,
    *,
    valid: Tensor | None = None,
    bins: int = 30,
    easy_threshold: float = 0.5,
    focal_alpha: float | None = 0.25,
    focal_gamma: float = 2.0,
    cdf_gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    cdf_points: int = 101,
) -> GradientStats:
    """Gradient-norm density, easy/hard quadrants, per-loss gradient shares and loss CDFs (pure).

    Args:
        logits: ``Tensor[N, C]`` sigmoid logits (any shape works; every element is one example).
        targets: ``Tensor[N, C]`` one-vs-all targets in {0, 1}.
        valid: bool mask broadcastable to ``logits`` (e.g. ``Tensor[N, 1]`` from ``labels >= 0``).
        bins, easy_threshold, focal_alpha, focal_gamma, cdf_gammas: see :class:`GradientAccumulator`.
        cdf_points: points of each CDF.

    Returns:
        :class:`GradientStats`.
    """
    acc = GradientAccumulator(
        bins=bins,
        easy_threshold=easy_threshold,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
        cdf_gammas=cdf_gammas,
    )
    acc.update(logits, targets, valid)
    return acc.result(cdf_points=cdf_points)


def sigmoid_targets(labels: Tensor, num_columns: int, *, background_column: bool) -> tuple[Tensor, Tensor]:
    """One-vs-all targets and the valid mask of a sigmoid head from anchor labels.

    Args:
        labels: ``Tensor[...]`` int64 (-1 ignore / 0 background / 1..K, :mod:`detbalance.types`).
        num_columns: ``C``, the head's output columns.
        background_column: ``True`` when label ``k`` is column ``k`` (torchvision RetinaNet with
            ``num_classes = K + 1``, column 0 never positive); ``False`` when label ``k`` is column ``k - 1``.

    Returns:
        ``(targets, valid)``: ``Tensor[..., C]`` float in {0, 1} and ``Tensor[..., 1]`` bool (labels >= 0).
    """
    k = num_columns - 1 if background_column else num_columns
    if labels.numel() and int(labels.max()) > k:
        raise ValueError(f"labels go up to {int(labels.max())} but the head has {num_columns} columns")
    cols = num_columns + (0 if background_column else 1)
    onehot = F.one_hot(labels.clamp_min(0), cols).float() * (labels > 0)[..., None]
    if not background_column:
        onehot = onehot[..., 1:]
    return onehot, (labels >= 0)[..., None]


# ------------------------------------------------------------------------------------------- per-class AP


def per_class_ap(
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[DetectionTarget],
    *,
    num_classes: int,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[float | None]:
    """COCO AP@[.5:.95] per class from the official evaluator (:func:`detbalance.engine.evaluate.coco_metrics`,
    faster-coco-eval), never a hand-written AP.

    Args:
        predictions: per image ``{"boxes": Tensor[D, 4] x1y1x2y2, "scores": Tensor[D], "labels": Tensor[D]}``
            (torchvision's eval output), in the frame of ``targets`` and in the same order.
        targets: ground truth per image.
        num_classes: ``K`` (category ids ``1..K``).
        image_sizes: ``(h, w)`` per image, written into the COCO image records.

    Returns:
        ``K`` values in [0, 1]; ``None`` for classes without ground truth in ``targets``.
    """
    from detbalance.engine.evaluate import coco_metrics

    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
    images, anns, dets = [], [], []
    for i, t in enumerate(targets):
        h, w = image_sizes[i] if image_sizes is not None else (0, 0)
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for box, lab in zip(t["boxes"].reshape(-1, 4).double().tolist(), t["labels"].tolist()):
            bw, bh = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(lab),
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], bw, bh],
                    "area": bw * bh,
                }
            )
        p = predictions[i]
        boxes = p["boxes"].detach().reshape(-1, 4).double().cpu().tolist()
        for box, s, lab in zip(boxes, p["scores"].detach().cpu().tolist(), p["labels"].cpu().tolist()):
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": int(lab),
                    "score": float(s),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    names = [str(k) for k in range(1, num_classes + 1)]
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k, "name": names[k - 1]} for k in range(1, num_classes + 1)],
    }
    per_class = coco_metrics(gt, dets, label_names=names)["per_class"]
    return [None if per_class[n] != per_class[n] else float(per_class[n]) for n in names]
