"""Foreground/background imbalance of an anchor assignment: positives / negatives / ignored per FPN level
and per image, the pos:neg ratio (the focal paper's "1:1000"), and the ground-truth boxes no anchor
matches. :func:`detector_assignment_stats` takes the anchors and the matcher from a torchvision detector,
so the counts are those of its training step; ``compare`` and ``profile`` both count pos:neg with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from detbalance.types import DetectionTarget

__all__ = [
    "AssignmentStats",
    "UnmatchedBox",
    "assignment_stats",
    "dataset_assignment_stats",
    "detector_assignment_stats",
    "match_anchors",
    "sample_indices",
]

LowQualityMatches = Literal["all_ties", "best_anchor"]


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
    from torchvision.models.detection._utils import Matcher, SSDMatcher
    from torchvision.ops import box_iou

    if not low <= high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    if low_quality_matches not in ("all_ties", "best_anchor", None):
        raise ValueError(
            f"low_quality_matches must be 'all_ties', 'best_anchor' or None, got {low_quality_matches!r}"
        )
    if low_quality_matches == "best_anchor" and low != high:
        raise ValueError(f"'best_anchor' (torchvision SSDMatcher) has one threshold: need low == high, got {low}, {high}")
    batch, num_gt = gt_valid.shape
    if anchors.dim() == 2:
        anchors = anchors.expand(batch, -1, -1)
    num_anchors = anchors.shape[1]
    if anchor_valid is None:
        anchor_valid = torch.ones(batch, num_anchors, dtype=torch.bool, device=anchors.device)
    matches = torch.full((batch, num_anchors), -1, dtype=torch.int64, device=anchors.device)
    iou = anchors.new_full((batch, num_gt, num_anchors), -1.0)
    if num_gt == 0 or num_anchors == 0:
        return matches, iou
    if low_quality_matches == "best_anchor":
        matcher = SSDMatcher(high)
    else:
        matcher = Matcher(high, low, allow_low_quality_matches=low_quality_matches == "all_ties")
    for b in range(batch):  # torchvision's matcher is per image, as in the detectors' training step
        gt_idx = torch.nonzero(gt_valid[b]).flatten()
        a_idx = torch.nonzero(anchor_valid[b]).flatten()
        if len(gt_idx) == 0 or len(a_idx) == 0:
            continue
        iou_b = box_iou(gt_boxes[b, gt_idx].to(anchors.dtype), anchors[b, a_idx])
        iou[b, gt_idx[:, None], a_idx[None, :]] = iou_b
        m = matcher(iou_b)
        matches[b, a_idx] = torch.where(m >= 0, gt_idx[m.clamp_min(0)], m)
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




def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """``min(n, k)`` distinct indices of ``range(n)``, sorted, drawn with ``seed`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def dataset_assignment_stats(
    model: torch.nn.Module,
    dataset: Any,
    *,
    num_images: int = 500,
    seed: int = 0,
    targets: Sequence[DetectionTarget] | None = None,
) -> AssignmentStats:
    """The pos:neg count of ``compare`` and ``profile``: :func:`detector_assignment_stats` of ``model`` over
    the same :func:`sample_indices` of ``dataset`` (no image is decoded), so both report the same ratio.

    Args:
        model: a torchvision RetinaNet / Faster R-CNN / SSD.
        dataset: a :class:`detbalance.data.DetectionDataset` (its ``target`` and ``image_size``).
        num_images: images sampled (all when the dataset is smaller).
        seed: sampling seed.
        targets: the dataset's targets, if already read (``targets[i] == dataset.target(i)``).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    idx = sample_indices(len(dataset), num_images, seed)
    chosen = [targets[i] if targets is not None else dataset.target(i) for i in idx]
    return detector_assignment_stats(model, chosen, [dataset.image_size(i) for i in idx])
