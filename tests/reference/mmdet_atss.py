"""mmdetection's ``ATSSAssigner.assign`` (without ``alpha``, DDOD's cost), transcribed as a literal oracle.

Source (open-mmlab/mmdetection): ``mmdet/models/task_modules/assigners/atss_assigner.py`` at commit
0c5159285b4d69e75679c2e34a08415fe2bec8d8 (3.x: ``InstanceData`` inputs); ``bbox_center_distance`` from the
same file. Config: ``configs/atss/atss_r50_fpn_1x_coco.py`` at 18557a6f54ec487ec224a50388cb3604181e3551:
``assigner=dict(type='ATSSAssigner', topk=9)``, one anchor per location (``ratios=[1.0]``,
``octave_base_scale=8``, ``scales_per_octave=1``, strides 8..128). ``iou_calculator`` is ``BboxOverlaps2D``
(plain IoU, areas without +1), written out below; no ignored boxes.

Returns ``assigned_gt_inds`` (``0`` background, ``i + 1`` object ``i``), ``max_overlaps`` and, for the
diagnostics, the per-object threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bbox_overlaps(b1: Tensor, b2: Tensor) -> Tensor:
    """``BboxOverlaps2D`` (``mode='iou'``, not aligned, eps 1e-6): ``[N, M]``."""
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - overlap
    union = torch.max(union, union.new_tensor([1e-6]))
    return overlap / union


def bbox_center_distance(bboxes: Tensor, priors: Tensor) -> Tensor:
    bbox_cx = (bboxes[:, 0] + bboxes[:, 2]) / 2.0
    bbox_cy = (bboxes[:, 1] + bboxes[:, 3]) / 2.0
    bbox_points = torch.stack((bbox_cx, bbox_cy), dim=1)

    priors_cx = (priors[:, 0] + priors[:, 2]) / 2.0
    priors_cy = (priors[:, 1] + priors[:, 3]) / 2.0
    priors_points = torch.stack((priors_cx, priors_cy), dim=1)

    distances = (priors_points[:, None, :] - bbox_points[None, :, :]).pow(2).sum(-1).sqrt()
    return distances


def atss_assign(priors: Tensor, num_level_priors: list[int], gt_bboxes: Tensor, topk: int = 9
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(assigned_gt_inds, max_overlaps, overlaps_thr_per_gt)``."""
    INF = 100000000
    priors = priors[:, :4]
    num_gt, num_priors = gt_bboxes.size(0), priors.size(0)

    overlaps = bbox_overlaps(priors, gt_bboxes)

    assigned_gt_inds = overlaps.new_full((num_priors, ), 0, dtype=torch.long)

    if num_gt == 0 or num_priors == 0:
        max_overlaps = overlaps.new_zeros((num_priors, ))
        if num_gt == 0:
            assigned_gt_inds[:] = 0
        return assigned_gt_inds, max_overlaps, None

    distances = bbox_center_distance(gt_bboxes, priors)

    candidate_idxs = []
    start_idx = 0
    for level, priors_per_level in enumerate(num_level_priors):  # noqa: B007 (literal)
        end_idx = start_idx + priors_per_level
        distances_per_level = distances[start_idx:end_idx, :]
        selectable_k = min(topk, priors_per_level)
        _, topk_idxs_per_level = distances_per_level.topk(selectable_k, dim=0, largest=False)
        candidate_idxs.append(topk_idxs_per_level + start_idx)
        start_idx = end_idx
    candidate_idxs = torch.cat(candidate_idxs, dim=0)

    candidate_overlaps = overlaps[candidate_idxs, torch.arange(num_gt)]
    overlaps_mean_per_gt = candidate_overlaps.mean(0)
    overlaps_std_per_gt = candidate_overlaps.std(0)
    overlaps_thr_per_gt = overlaps_mean_per_gt + overlaps_std_per_gt

    is_pos = candidate_overlaps >= overlaps_thr_per_gt[None, :]

    for gt_idx in range(num_gt):
        candidate_idxs[:, gt_idx] += gt_idx * num_priors
    priors_cx = (priors[:, 0] + priors[:, 2]) / 2.0
    priors_cy = (priors[:, 1] + priors[:, 3]) / 2.0
    ep_priors_cx = priors_cx.view(1, -1).expand(num_gt, num_priors).contiguous().view(-1)
    ep_priors_cy = priors_cy.view(1, -1).expand(num_gt, num_priors).contiguous().view(-1)
    candidate_idxs = candidate_idxs.view(-1)

    l_ = ep_priors_cx[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 0]
    t_ = ep_priors_cy[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 1]
    r_ = gt_bboxes[:, 2] - ep_priors_cx[candidate_idxs].view(-1, num_gt)
    b_ = gt_bboxes[:, 3] - ep_priors_cy[candidate_idxs].view(-1, num_gt)
    is_in_gts = torch.stack([l_, t_, r_, b_], dim=1).min(dim=1)[0] > 0.01

    is_pos = is_pos & is_in_gts

    overlaps_inf = torch.full_like(overlaps, -INF).t().contiguous().view(-1)
    index = candidate_idxs.view(-1)[is_pos.view(-1)]
    overlaps_inf[index] = overlaps.t().contiguous().view(-1)[index]
    overlaps_inf = overlaps_inf.view(num_gt, -1).t()

    max_overlaps, argmax_overlaps = overlaps_inf.max(dim=1)
    assigned_gt_inds[max_overlaps != -INF] = argmax_overlaps[max_overlaps != -INF] + 1
    return assigned_gt_inds, max_overlaps, overlaps_thr_per_gt
