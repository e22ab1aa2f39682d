"""mmdetection's PISA (ISR-P, CARL, the Score-HLR sampler's ISR-N and mmcv's NMS-match), transcribed as literal oracles.

Sources (open-mmlab/mmdetection; ``fetch`` of the whole repository was refused for size, so the files were read
one by one from the stored snapshots, each at the commit named):

* ``mmdet/models/losses/pisa_loss.py`` at commit 23cdfd4cf40351586afc57e0d7ce166dcf825c46 (fork
  Jion-Oshima/mmdetection, the 2.x file with ``num_class``) and at 03066029ec1c0adbaaf596ee6fc700977c8d9b1f
  (open-mmlab): ``isr_p`` and ``carl_loss``. The arithmetic is the same in both and in 3.3 (3.x adds type
  hints and ``num_class``; labels ``0..K-1``, background ``K``);
* ``mmdet/models/task_modules/samplers/score_hlr_sampler.py`` at commit
  041b372b22b70f35da33893805af511fc37832f7 (3.x): ``ScoreHLRSampler._sample_neg`` / ``sample``;
* ``mmdet/models/roi_heads/pisa_roi_head.py`` at 03066029ec1c0adbaaf596ee6fc700977c8d9b1f: the negatives'
  weights replace ``label_weights`` of the sampled negatives, then ``isr_p``, ``bbox_head.loss``, ``carl_loss``
  (``avg_factor = None`` -> number of sampled RoIs);
* ``mmdet/models/dense_heads/pisa_retinanet_head.py`` at 366f6d3c87c15273c9097d550557e27841323463: ``isr_p``
  under ``no_grad`` on the flattened anchors of all levels and images, then one focal loss and one box loss
  with ``avg_factor = num_total_pos``, ``carl_loss(..., avg_factor=num_total_pos, sigmoid=True)``;
* ``configs/pisa/faster-rcnn_r50_fpn_pisa_1x_coco.py`` at 19bceba56284d440278e80cfde1d95460330ccbb:
  ``ScoreHLRSampler(num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True, k=0.5, bias=0.)``,
  ``isr=dict(k=2, bias=0)``, ``carl=dict(k=1, bias=0.2)``, ``SmoothL1Loss(beta=1.0)``, RPN 2000 proposals;
* mmcv ``mmcv/ops/csrc/pytorch/cpu/nms.cpp`` at 62dd2a8ea92c300ae9e619d9820398eddf82abab: ``nms_match_cpu``
  (areas without +1, ``ovr >= iou_threshold`` joins the group, groups in descending score order).

The transcriptions keep the reference's loops and order of operations; what they take as arguments (a decode
function, per-image ``pos_assigned_gt_inds``, the read-only pass's outputs) stands for the mmdetection
objects that supplied them. ``num_class`` replaces the hard-coded 80 of the older file.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def bbox_overlaps_aligned(bboxes1: Tensor, bboxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """mmdetection's ``bbox_overlaps(..., mode='iou', is_aligned=True)``."""
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    lt = torch.max(bboxes1[..., :2], bboxes2[..., :2])
    rb = torch.min(bboxes1[..., 2:], bboxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    eps_t = union.new_tensor([eps])
    union = torch.max(union, eps_t)
    return overlap / union


def isr_p(cls_score: Tensor, bbox_pred: Tensor, bbox_targets: tuple[Tensor, Tensor, Tensor, Tensor], rois: Tensor,
          pos_assigned_gt_inds: list[Tensor], loss_cls: Callable[..., Tensor], decode: Callable[[Tensor, Tensor], Tensor],
          k: float = 2, bias: float = 0, num_class: int = 80) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``isr_p``; ``pos_assigned_gt_inds[i]`` is ``sampling_results[i].pos_assigned_gt_inds``."""
    labels, label_weights, bbox_targets_, bbox_weights = bbox_targets
    pos_label_inds = ((labels >= 0) & (labels < num_class)).nonzero().reshape(-1)
    pos_labels = labels[pos_label_inds]

    num_pos = float(pos_label_inds.size(0))
    if num_pos == 0:
        return labels, label_weights, bbox_targets_, bbox_weights

    gts = list()
    last_max_gt = 0
    for i in range(len(pos_assigned_gt_inds)):
        gt_i = pos_assigned_gt_inds[i]
        gts.append(gt_i + last_max_gt)
        if len(gt_i) != 0:
            last_max_gt = gt_i.max() + 1
    gts = torch.cat(gts)
    assert len(gts) == num_pos

    cls_score = cls_score.detach()
    bbox_pred = bbox_pred.detach()

    if rois.size(-1) == 5:
        pos_rois = rois[pos_label_inds][:, 1:]
    else:
        pos_rois = rois[pos_label_inds]

    if bbox_pred.size(-1) > 4:
        bbox_pred = bbox_pred.view(bbox_pred.size(0), -1, 4)
        pos_delta_pred = bbox_pred[pos_label_inds, pos_labels].view(-1, 4)
    else:
        pos_delta_pred = bbox_pred[pos_label_inds].view(-1, 4)

    pos_delta_target = bbox_targets_[pos_label_inds].view(-1, 4)
    pos_bbox_pred = decode(pos_rois, pos_delta_pred)
    target_bbox_pred = decode(pos_rois, pos_delta_target)
    ious = bbox_overlaps_aligned(pos_bbox_pred, target_bbox_pred)

    pos_imp_weights = label_weights[pos_label_inds]
    max_l_num = pos_labels.bincount().max()
    for label in pos_labels.unique():
        l_inds = (pos_labels == label).nonzero().view(-1)
        l_gts = gts[l_inds]
        for t in l_gts.unique():
            t_inds = l_inds[l_gts == t]
            t_ious = ious[t_inds]
            _, t_iou_rank_idx = t_ious.sort(descending=True)
            _, t_iou_rank = t_iou_rank_idx.sort()
            ious[t_inds] += max_l_num - t_iou_rank.float()
        l_ious = ious[l_inds]
        _, l_iou_rank_idx = l_ious.sort(descending=True)
        _, l_iou_rank = l_iou_rank_idx.sort()
        pos_imp_weights[l_inds] *= (max_l_num - l_iou_rank.float()) / max_l_num

    pos_imp_weights = (bias + pos_imp_weights * (1 - bias)).pow(k)

    pos_loss_cls = loss_cls(cls_score[pos_label_inds], pos_labels, reduction_override='none')
    if pos_loss_cls.dim() > 1:
        ori_pos_loss_cls = pos_loss_cls * label_weights[pos_label_inds][:, None]
        new_pos_loss_cls = pos_loss_cls * pos_imp_weights[:, None]
    else:
        ori_pos_loss_cls = pos_loss_cls * label_weights[pos_label_inds]
        new_pos_loss_cls = pos_loss_cls * pos_imp_weights
    pos_loss_cls_ratio = ori_pos_loss_cls.sum() / new_pos_loss_cls.sum()
    pos_imp_weights = pos_imp_weights * pos_loss_cls_ratio
    label_weights[pos_label_inds] = pos_imp_weights

    return labels, label_weights, bbox_targets_, bbox_weights


def carl_loss(cls_score: Tensor, labels: Tensor, bbox_pred: Tensor, bbox_targets: Tensor,
              loss_bbox: Callable[..., Tensor], k: float = 1, bias: float = 0.2, avg_factor: float | None = None,
              sigmoid: bool = False, num_class: int = 80) -> dict[str, Tensor]:
    """``carl_loss``."""
    pos_label_inds = ((labels >= 0) & (labels < num_class)).nonzero().reshape(-1)
    if pos_label_inds.numel() == 0:
        return dict(loss_carl=cls_score.sum()[None] * 0.)
    pos_labels = labels[pos_label_inds]

    if sigmoid:
        pos_cls_score = cls_score.sigmoid()[pos_label_inds, pos_labels]
    else:
        pos_cls_score = cls_score.softmax(-1)[pos_label_inds, pos_labels]
    carl_loss_weights = (bias + (1 - bias) * pos_cls_score).pow(k)

    num_pos = float(pos_cls_score.size(0))
    weight_ratio = num_pos / carl_loss_weights.sum()
    carl_loss_weights *= weight_ratio

    if avg_factor is None:
        avg_factor = bbox_targets.size(0)
    if bbox_pred.size(-1) > 4:
        bbox_pred = bbox_pred.view(bbox_pred.size(0), -1, 4)
        pos_bbox_preds = bbox_pred[pos_label_inds, pos_labels]
    else:
        pos_bbox_preds = bbox_pred[pos_label_inds]
    ori_loss_reg = loss_bbox(pos_bbox_preds, bbox_targets[pos_label_inds], reduction_override='none') / avg_factor
    loss_carl = (ori_loss_reg * carl_loss_weights[:, None]).sum()
    return dict(loss_carl=loss_carl[None])


def nms_match(dets: Tensor, iou_threshold: float) -> list[Tensor]:
    """mmcv's ``nms_match`` (``nms_match_cpu`` in Python): groups, each led by a kept box, in score order."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1) * (y2 - y1)
    order = scores.sort(0, descending=True)[1].tolist()
    ndets = dets.size(0)
    suppressed = [0] * ndets
    keep: list[int] = []
    matched: list[list[int]] = []
    for _i in range(ndets):
        i = order[_i]
        if suppressed[i] == 1:
            continue
        keep.append(i)
        v_i: list[int] = []
        for _j in range(_i + 1, ndets):
            j = order[_j]
            if suppressed[j] == 1:
                continue
            xx1 = max(float(x1[i]), float(x1[j]))
            yy1 = max(float(y1[i]), float(y1[j]))
            xx2 = min(float(x2[i]), float(x2[j]))
            yy2 = min(float(y2[i]), float(y2[j]))
            w = max(0.0, xx2 - xx1)
            h = max(0.0, yy2 - yy1)
            inter = w * h
            ovr = inter / (float(areas[i]) + float(areas[j]) - inter)
            if ovr >= iou_threshold:
                suppressed[j] = 1
                v_i.append(j)
        matched.append(v_i)
    for i in range(len(keep)):
        matched[i].insert(0, keep[i])
    return [dets.new_tensor(m, dtype=torch.long) for m in matched]


def score_hlr_sample_neg(neg_inds: Tensor, num_expected: int, cls_score: Tensor, bbox_pred: Tensor, ori_loss: Tensor,
                         neg_rois_boxes: Tensor, decode: Callable[[Tensor, Tensor], Tensor], k: float = 0.5,
                         bias: float = 0, score_thr: float = 0.05, iou_thr: float = 0.5) -> tuple[Tensor, Tensor]:
    """``ScoreHLRSampler._sample_neg`` after the context's forward.

    ``cls_score: [num_neg, K + 1]`` (background last, mmdetection's layout), ``bbox_pred: [num_neg, K * 4]``,
    ``ori_loss: [num_neg]`` the head's classification loss with the background label, ``neg_rois_boxes:
    [num_neg, 4]``. ``torch.randperm`` (the global generator) draws the random negatives, as in mmdetection.
    """
    num_neg = neg_inds.size(0)
    if num_neg == 0:
        return neg_inds, None
    with torch.no_grad():
        max_score, argmax_score = cls_score.softmax(-1)[:, :-1].max(-1)
        valid_inds = (max_score > score_thr).nonzero().view(-1)
        invalid_inds = (max_score <= score_thr).nonzero().view(-1)
        num_valid = valid_inds.size(0)
        num_invalid = invalid_inds.size(0)

        num_expected = min(num_neg, num_expected)
        num_hlr = min(num_valid, num_expected)
        num_rand = num_expected - num_hlr
        if num_valid > 0:
            valid_rois = neg_rois_boxes[valid_inds]
            valid_max_score = max_score[valid_inds]
            valid_argmax_score = argmax_score[valid_inds]
            valid_bbox_pred = bbox_pred[valid_inds]

            valid_bbox_pred = valid_bbox_pred.view(valid_bbox_pred.size(0), -1, 4)
            selected_bbox_pred = valid_bbox_pred[range(num_valid), valid_argmax_score]
            pred_bboxes = decode(valid_rois, selected_bbox_pred)
            pred_bboxes_with_score = torch.cat([pred_bboxes, valid_max_score[:, None]], -1)
            group = nms_match(pred_bboxes_with_score, iou_thr)

            imp = cls_score.new_zeros(num_valid)
            for g in group:
                g_score = valid_max_score[g]
                rank = g_score.new_tensor(range(g_score.size(0)))
                imp[g] = num_valid - rank + g_score
            _, imp_rank_inds = imp.sort(descending=True)
            _, imp_rank = imp_rank_inds.sort()
            hlr_inds = imp_rank_inds[:num_expected]

            if num_rand > 0:
                rand_inds = torch.randperm(num_invalid)[:num_rand]
                select_inds = torch.cat([valid_inds[hlr_inds], invalid_inds[rand_inds]])
            else:
                select_inds = valid_inds[hlr_inds]

            neg_label_weights = cls_score.new_ones(num_expected)

            up_bound = max(num_expected, num_valid)
            imp_weights = (up_bound - imp_rank[hlr_inds].float()) / up_bound
            neg_label_weights[:num_hlr] = imp_weights
            neg_label_weights[num_hlr:] = imp_weights.min()
            neg_label_weights = (bias + (1 - bias) * neg_label_weights).pow(k)
            ori_selected_loss = ori_loss[select_inds]
            new_loss = ori_selected_loss * neg_label_weights
            norm_ratio = ori_selected_loss.sum() / new_loss.sum()
            neg_label_weights *= norm_ratio
        else:
            neg_label_weights = cls_score.new_ones(num_expected)
            select_inds = torch.randperm(num_neg)[:num_expected]

        return neg_inds[select_inds], neg_label_weights
