r"""Adaptive training sample selection (ATSS; Zhang, Chi, Yao, Lei and Li, CVPR 2020, arXiv:1912.02424).

Which anchors are positive for an object is decided from the statistics of its candidates, not by a fixed
IoU threshold (the paper's Algorithm 1, mmdetection 3.3's ``ATSSAssigner``):

1. on every pyramid level, the ``topk`` anchors whose centres are closest (L2) to the object's centre are its
   candidates (``min(topk, anchors of the level)`` per level);
2. the object's IoU threshold is the mean plus the (unbiased) standard deviation of its candidates' IoU;
3. a candidate is positive if its IoU is ``>=`` the threshold and its centre lies inside the object
   (each of the four centre-to-side distances ``> 0.01``, mmdetection's margin);
4. an anchor positive for several objects goes to the one with the highest IoU.

The result is the matched index per anchor in torchvision's ``Matcher`` convention (``>= 0`` the object,
``-1`` background; ATSS ignores nothing, so ``-2`` never occurs), so a dense head takes it where it takes
torchvision's IoU matching. An image without objects gives all background, as mmdetection. Vectorised over
objects and levels: the levels are padded to one ``[L, A_max, G]`` distance tensor and one ``topk`` picks
every level's candidates of every object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detbalance.sampling.assign import check_boxes

__all__ = ["ATSSAssigner", "ATSSAssignment", "assign_atss"]


class ATSSAssignment(NamedTuple):
    """The result of :func:`assign_atss` for one image.

    Attributes:
        matched_idxs: ``Tensor[A] (int64)``: index of the matched object, ``-1`` background.
        threshold: ``Tensor[G]`` each object's IoU threshold (mean + std of its candidates' IoU).
        num_positive: ``Tensor[G] (int64)`` anchors finally matched to each object.
        iou: ``Tensor[A]`` each anchor's IoU with its matched object (0 for background).
    """

    matched_idxs: Tensor
    threshold: Tensor
    num_positive: Tensor
    iou: Tensor


def _check_levels(num_anchors_per_level: Sequence[int], total: int) -> list[int]:
    sizes = [int(n) for n in num_anchors_per_level]
    if not sizes or any(n < 0 for n in sizes) or sum(sizes) != total:
        raise ValueError(
            f"num_anchors_per_level must be non-negative counts summing to the {total} anchors, got {sizes}"
        )
    return sizes


def assign_atss(
    anchors: Tensor,
    gt_boxes: Tensor,
    num_anchors_per_level: Sequence[int],
    *,
    topk: int = 9,
) -> ATSSAssignment:
    """ATSS assignment of one image's anchors (see the module docstring).

    Args:
        anchors: ``Tensor[A, 4]`` ``(x1, y1, x2, y2)``, all levels concatenated in level order.
        gt_boxes: ``Tensor[G, 4]``; ``G`` may be 0 (all background).
        num_anchors_per_level: anchors of each level, summing to ``A``.
        topk: candidates per level and object (the paper and mmdetection: 9).

    Returns:
        :class:`ATSSAssignment`.

    Raises:
        ValueError: On bad boxes, level sizes that do not sum to ``A`` or ``topk < 1``.
    """
    check_boxes(anchors, "anchors")
    check_boxes(gt_boxes, "gt_boxes")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    a, g = anchors.shape[0], gt_boxes.shape[0]
    sizes = _check_levels(num_anchors_per_level, a)
    device, dtype = anchors.device, anchors.dtype
    if g == 0 or a == 0:
        return ATSSAssignment(
            matched_idxs=torch.full((a,), -1, dtype=torch.int64, device=device),
            threshold=anchors.new_zeros(g),
            num_positive=torch.zeros(g, dtype=torch.int64, device=device),
            iou=anchors.new_zeros(a),
        )
    gt = gt_boxes.to(dtype)
    iou = box_iou(anchors, gt)  # [A, G]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2.0
    g_ctr = (gt[:, :2] + gt[:, 2:]) / 2.0
    dist = (a_ctr[:, None, :] - g_ctr[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]

    # Candidates: per level the topk nearest centres, all levels in one topk over a padded tensor.
    num_levels, a_max = len(sizes), max(sizes)
    sizes_t = torch.tensor(sizes, device=device)
    level = torch.repeat_interleave(torch.arange(num_levels, device=device), sizes_t)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    within = torch.arange(a, device=device) - starts[level]
    padded = dist.new_full((num_levels, a_max, g), float("inf"))
    padded[level, within] = dist
    k = min(topk, a_max)
    _, top = padded.topk(k, dim=1, largest=False)  # [L, k, G]
    # Levels with fewer than k anchors contribute only min(topk, size) candidates (the rest is padding).
    taken = torch.arange(k, device=device)[None, :] < sizes_t.clamp(max=topk)[:, None]  # [L, k]
    cand = (top + starts[:, None, None]).reshape(num_levels * k, g)
    cand_valid = taken.reshape(num_levels * k, 1).expand(-1, g)
    cand = torch.where(cand_valid, cand, torch.zeros_like(cand))
    cand_iou = iou.gather(0, cand)  # [L k, G]

    n = cand_valid[:, 0].sum().to(dtype)
    vf = cand_valid.to(dtype)
    mean = (cand_iou * vf).sum(0) / n
    std = (((cand_iou - mean) ** 2) * vf).sum(0).div(n - 1).sqrt()
    threshold = mean + std

    c_ctr = a_ctr[cand]  # [L k, G, 2]
    sides = torch.stack([c_ctr[..., 0] - gt[:, 0], c_ctr[..., 1] - gt[:, 1],
                         gt[:, 2] - c_ctr[..., 0], gt[:, 3] - c_ctr[..., 1]], dim=-1)
    inside = sides.min(dim=-1).values > 0.01
    positive = cand_valid & (cand_iou >= threshold[None, :]) & inside  # [L k, G]

    # An anchor positive for several objects goes to the one of highest IoU.
    scored = torch.full_like(iou, -float("inf"))
    gt_col = torch.arange(g, device=device).expand_as(cand)
    scored[cand[positive], gt_col[positive]] = cand_iou[positive]
    best, best_gt = scored.max(dim=1)
    matched = torch.where(best != -float("inf"), best_gt, torch.full_like(best_gt, -1))
    num_positive = torch.zeros(g, dtype=torch.int64, device=device).index_add_(
        0, matched.clamp(min=0), (matched >= 0).to(torch.int64))
    return ATSSAssignment(matched, threshold, num_positive, torch.where(matched >= 0, best, torch.zeros_like(best)))


@dataclass(frozen=True)
class ATSSAssigner:
    """ATSS as an assigner of a dense head: ``assigner(anchors, gt_boxes, num_anchors_per_level) -> Tensor[A]``.

    Returns the matched index per anchor in torchvision's ``Matcher`` convention (``-1`` background), so
    :func:`~detbalance.detectors.balance_retinanet` takes it in place of its IoU matching
    (``assigner=ATSSAssigner()``).

    Args:
        topk: Candidates per pyramid level and object (the paper and mmdetection: 9).
    """

    topk: int = 9

    def __post_init__(self) -> None:
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {self.topk!r}")

    def __call__(self, anchors: Tensor, gt_boxes: Tensor, num_anchors_per_level: Sequence[int]) -> Tensor:
        """Matched object per anchor (``Tensor[A]`` int64, ``-1`` background)."""
        return assign_atss(anchors, gt_boxes, num_anchors_per_level, topk=self.topk).matched_idxs

    def assign(self, anchors: Tensor, gt_boxes: Tensor, num_anchors_per_level: Sequence[int]) -> ATSSAssignment:
        """The full :class:`ATSSAssignment` (thresholds and positives per object, for diagnostics)."""
        return assign_atss(anchors, gt_boxes, num_anchors_per_level, topk=self.topk)
