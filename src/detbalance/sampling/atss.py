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
objects: one ``topk`` per pyramid level (a loop over the 5 levels, never over objects or anchors; a single
``topk`` over the levels padded to one tensor was measured 4x slower on CPU) picks the candidates of every
object at once, and the IoU is computed for the candidates only (the only entries ATSS reads), not for every
anchor and object as mmdetection does. Ties in centre distance (RetinaNet's 9 anchors per location share a
centre) are broken by ``torch.topk`` as in mmdetection; a test holds the result to mmdetection's with
torchvision's anchors and integer boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

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
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2.0
    g_ctr = (gt[:, :2] + gt[:, 2:]) / 2.0
    # squared centre distance [G, A] (same order as the distance; contiguous along the anchors for topk)
    dist = (g_ctr[:, None, 0] - a_ctr[None, :, 0]).square() + (g_ctr[:, None, 1] - a_ctr[None, :, 1]).square()

    # Candidates: per level the topk nearest centres of every object at once. The loop runs over the pyramid
    # levels (5), never over objects or anchors; each level is a view of ``dist``. One topk over the levels
    # padded to [G, L, A_max] was measured 4x slower on CPU (it ranks the padding too).
    cands = []
    start = 0
    for size in sizes:
        if size:
            cands.append(dist[:, start:start + size].topk(min(topk, size), dim=1, largest=False).indices + start)
        start += size
    cand = torch.cat(cands, dim=1).t()  # [C, G], C = sum_l min(topk, A_l)
    # IoU of the candidates only (the only entries ATSS reads): [C, G]
    cb = anchors[cand]  # [C, G, 4]
    lt = torch.maximum(cb[..., :2], gt[None, :, :2])
    rb = torch.minimum(cb[..., 2:], gt[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_c = (cb[..., 2] - cb[..., 0]) * (cb[..., 3] - cb[..., 1])
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    cand_iou = inter / (area_c + area_g[None, :] - inter)

    mean = cand_iou.mean(0)
    std = cand_iou.std(0)  # unbiased, as mmdetection
    threshold = mean + std

    c_ctr = a_ctr[cand]  # [C, G, 2]
    sides = torch.stack([c_ctr[..., 0] - gt[:, 0], c_ctr[..., 1] - gt[:, 1],
                         gt[:, 2] - c_ctr[..., 0], gt[:, 3] - c_ctr[..., 1]], dim=-1)
    inside = sides.min(dim=-1).values > 0.01
    positive = (cand_iou >= threshold[None, :]) & inside  # [C, G]

    # An anchor positive for several objects goes to the one of highest IoU (ties: the lowest object index).
    scored = torch.full((a, g), -float("inf"), dtype=dtype, device=device)
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
