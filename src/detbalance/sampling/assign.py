"""IoU-based assignment of anchors or proposals to ground truth (labels in the convention of ``types.py``).

The rule is the one of Faster R-CNN (Ren et al., NeurIPS 2015, section 3.1.2) and of torchvision's
``Matcher``: an anchor whose best IoU with any ground-truth box is ``>= high`` is foreground (the class of
that box), ``< low`` is background, and in between is ignored. With ``allow_low_quality`` every ground-truth
box also keeps the anchors with which it has its highest IoU (ties included), so that no object is left
without a positive anchor.

This module also holds the small argument checks shared by the samplers of this package.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detbalance.types import BACKGROUND, IGNORE

__all__ = ["Assignment", "assign_by_iou"]


class Assignment(NamedTuple):
    """The result of :func:`assign_by_iou`.

    Attributes:
        labels: ``Tensor[A] (int64)``: ``-1`` ignore, ``0`` background, ``1..K`` the class of the matched box.
        matched_gt: ``Tensor[A] (int64)``: index into ``gt_boxes`` of the matched box for foreground anchors,
            ``-1`` for background and ignored anchors.
        iou: ``Tensor[A]`` (float): each anchor's highest IoU with any ground-truth box (0 without ground truth).
    """

    labels: Tensor
    matched_gt: Tensor
    iou: Tensor


def assign_by_iou(
    anchors_or_proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    high: float,
    low: float,
    allow_low_quality: bool = True,
) -> Assignment:
    """Label anchors (or proposals) by their IoU with the ground truth.

    For anchor ``a`` let ``m(a) = max_g IoU(a, g)`` and ``g*(a) = argmax_g IoU(a, g)``. Then
    ``label(a) = gt_labels[g*(a)]`` if ``m(a) >= high``, ``0`` if ``m(a) < low`` and ``-1`` otherwise.
    With ``allow_low_quality``, for every ground-truth box ``g`` the anchors ``a`` with
    ``IoU(a, g) == max_a' IoU(a', g)`` become foreground, matched to their own ``g*(a)`` (exactly as
    torchvision's ``Matcher.set_low_quality_matches_``, so the result agrees with
    ``Matcher(high, low, allow_low_quality_matches=True)``).

    One deliberate difference from torchvision: a ground-truth box that overlaps *no* anchor (best IoU 0)
    has no "best anchors"; torchvision would then turn every anchor with IoU 0 into a foreground match.
    Here such a box simply gets no low-quality match.

    Defaults in the papers: RPN ``high=0.7, low=0.3``; Fast/Faster R-CNN RoI head ``high=0.5, low=0.5``
    (background from IoU 0 upward, as OHEM uses; Fast R-CNN used ``[0.1, 0.5)``); SSD ``high=low=0.5``.

    Args:
        anchors_or_proposals: ``Tensor[A, 4]`` boxes ``(x1, y1, x2, y2)``.
        gt_boxes: ``Tensor[G, 4]`` ground-truth boxes ``(x1, y1, x2, y2)``; ``G`` may be 0.
        gt_labels: ``Tensor[G] (int64)`` classes in ``1..K``.
        high: foreground threshold, IoU ``>= high`` is foreground.
        low: background threshold, IoU ``< low`` is background; ``low <= high``.
        allow_low_quality: keep each ground-truth box's best anchors as foreground.

    Returns:
        :class:`Assignment` ``(labels, matched_gt, iou)``. An image without ground truth gives all-background
        labels (not an error, unlike torchvision's ``Matcher``).

    Raises:
        ValueError: on wrong shapes, thresholds outside ``[0, 1]`` or ``low > high``, degenerate boxes
            (``x2 < x1`` or ``y2 < y1``) or labels outside ``1..K``.
    """
    check_boxes(anchors_or_proposals, "anchors_or_proposals")
    check_boxes(gt_boxes, "gt_boxes")
    if gt_labels.dim() != 1 or gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(
            f"gt_labels must have shape [G] with G = {gt_boxes.shape[0]} (the rows of gt_boxes), "
            f"got {tuple(gt_labels.shape)}"
        )
    if gt_labels.dtype.is_floating_point or gt_labels.dtype == torch.bool:
        raise ValueError(f"gt_labels must be an integer tensor, got dtype {gt_labels.dtype}")
    if gt_labels.numel() and int(gt_labels.min()) < 1:
        raise ValueError(f"gt_labels must lie in 1..K (0 is background), got min {int(gt_labels.min())}")
    check_fraction(high, "high")
    check_fraction(low, "low")
    if low > high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")

    num_anchors = anchors_or_proposals.shape[0]
    device = anchors_or_proposals.device
    if gt_boxes.shape[0] == 0:
        return Assignment(
            labels=torch.full((num_anchors,), BACKGROUND, dtype=torch.int64, device=device),
            matched_gt=torch.full((num_anchors,), -1, dtype=torch.int64, device=device),
            iou=torch.zeros(num_anchors, dtype=anchors_or_proposals.dtype, device=device),
        )
    if num_anchors == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return Assignment(empty, empty.clone(), torch.zeros(0, dtype=anchors_or_proposals.dtype, device=device))

    iou = box_iou(gt_boxes.to(anchors_or_proposals.dtype), anchors_or_proposals)  # [G, A]
    best_iou, best_gt = iou.max(dim=0)  # [A]
    foreground = best_iou >= high
    if allow_low_quality:
        best_per_gt = iou.max(dim=1, keepdim=True).values  # [G, 1]
        is_best = (iou == best_per_gt) & (best_per_gt > 0)
        foreground |= is_best.any(dim=0)
    background = (best_iou < low) & ~foreground

    labels = torch.full((num_anchors,), IGNORE, dtype=torch.int64, device=device)
    labels[background] = BACKGROUND
    labels = torch.where(foreground, gt_labels.to(torch.int64)[best_gt], labels)
    matched = torch.where(foreground, best_gt, torch.full_like(best_gt, -1))
    return Assignment(labels=labels, matched_gt=matched, iou=best_iou)


# --------------------------------------------------------------------------------------------------------
# Argument checks shared by the samplers (private to detbalance.sampling).


def check_boxes(boxes: Tensor, name: str, *, rows: int | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``boxes`` is ``Tensor[N, 4]`` with ``x2 >= x1, y2 >= y1``."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {tuple(boxes.shape)}")
    if rows is not None and boxes.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (one per label), got {boxes.shape[0]}")
    if not boxes.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {boxes.dtype}")
    if boxes.numel():
        if not bool(torch.isfinite(boxes).all()):
            first = int((~torch.isfinite(boxes)).any(1).nonzero()[0, 0])
            raise ValueError(f"{name} must have finite coordinates; row {first} is {boxes[first].tolist()}")
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name} must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; row {first} is "
                f"{boxes[first].tolist()}"
            )


def check_finite(values: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``values`` holds a NaN or an infinity (one host sync)."""
    if values.numel() and not bool(torch.isfinite(values).all()):
        first = int((~torch.isfinite(values)).flatten().nonzero()[0, 0])
        raise ValueError(
            f"{name} must be finite, got {values.flatten()[first].item()} at flat index {first} "
            "(a NaN or inf loss would be ranked as the hardest example)"
        )


def check_fraction(value: float, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 <= value <= 1``."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_count(value: int, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_labels(labels: Tensor, name: str = "labels", *, dim: int = 1) -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer tensor of ``dim`` dims with values ``>= -1``."""
    if labels.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must be an integer tensor (-1 ignore, 0 background, 1..K), got {labels.dtype}")
    if labels.numel() and int(labels.min()) < IGNORE:
        raise ValueError(f"{name} must be >= -1 (-1 ignore, 0 background, 1..K), got min {int(labels.min())}")


def check_same_length(tensor: Tensor, name: str, length: int, other: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` is 1-D with ``length`` elements (the length of ``other``)."""
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise ValueError(
            f"{name} must have shape [{length}] (the length of {other}), got {tuple(tensor.shape)}"
        )
