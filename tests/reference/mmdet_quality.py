"""mmdetection's Quality Focal Loss (GFL) and Varifocal Loss (VarifocalNet), transcribed as literal oracles.

Source: mmdetection **3.3.0**, the PyPI wheel ``mmdet-3.3.0-py3-none-any.whl`` (sha256
``2e23e291281ac57e7dccf8678e957da45fbe560ce78a1f5ded6afeccd3730f17``; the files are those of the ``v3.3.0``
tag of open-mmlab/mmdetection). Transcribed (the arithmetic line by line; registry, ``mmcv`` and
``MODELS`` decorations dropped):

* ``mmdet/models/losses/gfocal_loss.py``: ``quality_focal_loss`` (the ``(label, score)`` target form, labels
  ``0..K-1`` foreground, ``K`` background), ``quality_focal_loss_tensor_target`` (the one-hot soft target form,
  ``activated=False``), ``QualityFocalLoss(use_sigmoid=True, beta=2.0, reduction='mean', loss_weight=1.0)``;
* ``mmdet/models/losses/varifocal_loss.py``: ``varifocal_loss``, ``VarifocalLoss(use_sigmoid=True, alpha=0.75,
  gamma=2.0, iou_weighted=True, reduction='mean', loss_weight=1.0)``;
* ``mmdet/models/losses/utils.py``: ``weight_reduce_loss`` and the ``weighted_loss`` decorator (what gives
  ``quality_focal_loss`` its ``weight``/``reduction``/``avg_factor`` arguments);
* ``mmdet/structures/bbox/bbox_overlaps.py``: ``bbox_overlaps(mode='iou', is_aligned=True, eps=1e-6)``;
* ``mmdet/models/dense_heads/gfl_head.py`` ``GFLHead.loss_by_feat_single``: the QFL target of a positive is
  ``score[pos_inds] = bbox_overlaps(pos_decode_bbox_pred.detach(), pos_decode_bbox_targets, is_aligned=True)``
  (IoU of the decoded, **detached** predicted box with its assigned ground truth, both divided by the level's
  stride; no clamp), 0 for every other anchor; ``loss_cls(cls_score, (labels, score), weight=label_weights,
  avg_factor=avg_factor)`` with ``avg_factor`` = the number of positives (``PseudoSampler``), averaged over
  GPUs by ``reduce_mean`` (not clamped: ``weight_reduce_loss`` adds ``eps``); the classifier ``gfl_cls`` is
  initialised ``Normal(std=0.01, bias_prob=0.01)`` (bias ``-log((1 - 0.01) / 0.01)``);
* ``mmdet/models/dense_heads/vfnet_head.py`` ``VFNetHead.loss_by_feat``: ``iou_targets_rf =
  bbox_overlaps(pos_decoded_bbox_preds_refine, pos_decoded_target_preds.detach(), is_aligned=True)
  .clamp(min=1e-6)``; ``cls_iou_targets[pos_inds, pos_labels] = iou_targets_rf.clone().detach()`` (zeros
  elsewhere); ``loss_cls(flatten_cls_scores, cls_iou_targets, avg_factor=num_pos_avg_per_gpu)`` with
  ``num_pos_avg_per_gpu = max(reduce_mean(num_pos), 1.0)`` (``sync_num_pos=True``) and **no** label weights;
  the classifier ``vfnet_cls`` is initialised ``Normal(std=0.01, bias_prob=0.01)``;
* configs ``configs/gfl/gfl_r50_fpn_1x_coco.py``: ``QualityFocalLoss(use_sigmoid=True, beta=2.0,
  loss_weight=1.0)``, ATSS (topk 9), GIoU weight 2.0, DFL weight 0.25; ``configs/vfnet/vfnet_r50_fpn_1x_coco.py``:
  ``VarifocalLoss(use_sigmoid=True, alpha=0.75, gamma=2.0, iou_weighted=True, loss_weight=1.0)``, ATSS
  (topk 9), GIoU 1.5 (initial boxes) and 2.0 (refined boxes).

Facts read off the transcription:

* QFL is ``|y - sigmoid(x)|^beta * BCE(x, y)`` for every element of a one-hot soft target ``y`` (a positive's
  column holds its score, every other column 0). The ``(label, score)`` form and the tensor form agree,
  including for a positive whose score is 0 (``|0 - p|^beta BCE(x, 0)`` is the negative term).
* VFL is ``q * BCE(x, q)`` where ``q > 0`` and ``alpha * |p - q|^gamma * BCE(x, q)`` where ``q <= 0``; the
  focal weight is not detached (the gradient flows through ``p^gamma``). ``iou_weighted=False`` puts 1 in place
  of ``q`` on the positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# -------------------------------------------------------------------------- mmdet/models/losses/utils.py


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    reduction_enum = F._Reduction.get_enum(reduction)
    # none: 0, elementwise_mean:1, sum: 2
    if reduction_enum == 0:
        return loss
    elif reduction_enum == 1:
        return loss.mean()
    elif reduction_enum == 2:
        return loss.sum()


def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    # if weight is specified, apply element-wise weight
    if weight is not None:
        loss = loss * weight

    # if avg_factor is not specified, just reduce the loss
    if avg_factor is None:
        loss = reduce_loss(loss, reduction)
    else:
        # if reduction is mean, then average the loss by avg_factor
        if reduction == "mean":
            # Avoid causing ZeroDivisionError when avg_factor is 0.0,
            # i.e., all labels of an image belong to ignore index.
            eps = torch.finfo(torch.float32).eps
            loss = loss.sum() / (avg_factor + eps)
        # if reduction is 'none', then do nothing, otherwise raise an error
        elif reduction != "none":
            raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def weighted_loss(loss_func):
    def wrapper(pred, target, weight=None, reduction="mean", avg_factor=None, **kwargs):
        # get element-wise loss
        loss = loss_func(pred, target, **kwargs)
        loss = weight_reduce_loss(loss, weight, reduction, avg_factor)
        return loss

    return wrapper


# -------------------------------------------------------------------- mmdet/models/losses/gfocal_loss.py


@weighted_loss
def quality_focal_loss(pred, target, beta=2.0):
    assert len(target) == 2, """target for QFL must be a tuple of two elements,
        including category label and quality label, respectively"""
    # label denotes the category id, score denotes the quality score
    label, score = target

    # negatives are supervised by 0 quality score
    pred_sigmoid = pred.sigmoid()
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy_with_logits(pred, zerolabel, reduction="none") * scale_factor.pow(beta)

    # FG cat_id: [0, num_classes -1], BG cat_id: num_classes
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    # positives are supervised by bbox quality (IoU) score
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy_with_logits(
        pred[pos, pos_label], score[pos], reduction="none"
    ) * scale_factor.abs().pow(beta)

    loss = loss.sum(dim=1, keepdim=False)
    return loss


@weighted_loss
def quality_focal_loss_tensor_target(pred, target, beta=2.0, activated=False):
    # pred and target should be of the same size
    assert pred.size() == target.size()
    if activated:
        pred_sigmoid = pred
        loss_function = F.binary_cross_entropy
    else:
        pred_sigmoid = pred.sigmoid()
        loss_function = F.binary_cross_entropy_with_logits

    scale_factor = pred_sigmoid
    target = target.type_as(pred)

    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = loss_function(pred, zerolabel, reduction="none") * scale_factor.pow(beta)

    pos = target != 0
    scale_factor = target[pos] - pred_sigmoid[pos]
    loss[pos] = loss_function(pred[pos], target[pos], reduction="none") * scale_factor.abs().pow(beta)

    loss = loss.sum(dim=1, keepdim=False)
    return loss


class QualityFocalLoss(torch.nn.Module):
    def __init__(self, use_sigmoid=True, beta=2.0, reduction="mean", loss_weight=1.0, activated=False):
        super().__init__()
        assert use_sigmoid is True, "Only sigmoid in QFL supported now."
        assert activated is False  # quality_focal_loss_with_prob (activated=True) is not transcribed
        self.use_sigmoid = use_sigmoid
        self.beta = beta
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.activated = activated

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        assert reduction_override in (None, "none", "mean", "sum")
        reduction = reduction_override if reduction_override else self.reduction
        if self.use_sigmoid:
            calculate_loss_func = quality_focal_loss
            if isinstance(target, torch.Tensor):
                # the target shape with (N,C) or (N,C,...), which means
                # the target is one-hot form with soft weights.
                def calculate_loss_func(*args, **kwargs):
                    return quality_focal_loss_tensor_target(*args, activated=self.activated, **kwargs)

            loss_cls = self.loss_weight * calculate_loss_func(
                pred, target, weight, beta=self.beta, reduction=reduction, avg_factor=avg_factor
            )
        else:
            raise NotImplementedError
        return loss_cls


# ------------------------------------------------------------------ mmdet/models/losses/varifocal_loss.py


def varifocal_loss(pred, target, weight=None, alpha=0.75, gamma=2.0, iou_weighted=True, reduction="mean",
                   avg_factor=None):
    # pred and target should be of the same size
    assert pred.size() == target.size()
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    if iou_weighted:
        focal_weight = target * (target > 0.0).float() + \
            alpha * (pred_sigmoid - target).abs().pow(gamma) * \
            (target <= 0.0).float()
    else:
        focal_weight = (target > 0.0).float() + \
            alpha * (pred_sigmoid - target).abs().pow(gamma) * \
            (target <= 0.0).float()
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    loss = weight_reduce_loss(loss, weight, reduction, avg_factor)
    return loss


class VarifocalLoss(torch.nn.Module):
    def __init__(self, use_sigmoid=True, alpha=0.75, gamma=2.0, iou_weighted=True, reduction="mean",
                 loss_weight=1.0):
        super().__init__()
        assert use_sigmoid is True, "Only sigmoid varifocal loss supported now."
        assert alpha >= 0.0
        self.use_sigmoid = use_sigmoid
        self.alpha = alpha
        self.gamma = gamma
        self.iou_weighted = iou_weighted
        self.reduction = reduction
        self.loss_weight = loss_weight

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        assert reduction_override in (None, "none", "mean", "sum")
        reduction = reduction_override if reduction_override else self.reduction
        if self.use_sigmoid:
            loss_cls = self.loss_weight * varifocal_loss(
                pred,
                target,
                weight,
                alpha=self.alpha,
                gamma=self.gamma,
                iou_weighted=self.iou_weighted,
                reduction=reduction,
                avg_factor=avg_factor,
            )
        else:
            raise NotImplementedError
        return loss_cls


# ------------------------------------------------- mmdet/structures/bbox/bbox_overlaps.py (iou, aligned)


def bbox_overlaps_aligned(bboxes1: Tensor, bboxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """``bbox_overlaps(bboxes1, bboxes2, mode='iou', is_aligned=True, eps=eps)`` (float32/64 path)."""
    rows = bboxes1.size(-2)
    cols = bboxes2.size(-2)
    assert rows == cols
    batch_shape = bboxes1.shape[:-2]
    if rows * cols == 0:
        return bboxes1.new(batch_shape + (rows,))

    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])

    lt = torch.max(bboxes1[..., :2], bboxes2[..., :2])  # [B, rows, 2]
    rb = torch.min(bboxes1[..., 2:], bboxes2[..., 2:])  # [B, rows, 2]

    wh = (rb - lt).clamp(min=0)  # fp16_clamp on float32/64 input
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap

    eps = union.new_tensor([eps])
    union = torch.max(union, eps)
    ious = overlap / union
    return ious


# ------------------------------------------------------------------- the heads' target building bits


def gfl_cls_targets(labels: Tensor, pos_decode_bbox_pred: Tensor, pos_decode_bbox_targets: Tensor,
                    num_classes: int) -> tuple[Tensor, Tensor]:
    """``GFLHead.loss_by_feat_single``: ``(labels, score)`` for ``loss_cls``; labels ``0..K-1`` fg, ``K`` bg.

    ``pos_decode_bbox_pred``/``pos_decode_bbox_targets`` are the decoded boxes of the positives, in the
    order of ``pos_inds``.
    """
    bg_class_ind = num_classes
    pos_inds = ((labels >= 0) & (labels < bg_class_ind)).nonzero().squeeze(1)
    score = labels.new_zeros(labels.shape, dtype=torch.float32 if not pos_decode_bbox_pred.dtype.is_floating_point
                             else pos_decode_bbox_pred.dtype)
    if len(pos_inds) > 0:
        score[pos_inds] = bbox_overlaps_aligned(pos_decode_bbox_pred.detach(), pos_decode_bbox_targets)
    return labels, score


def vfnet_cls_targets(flatten_cls_scores: Tensor, flatten_labels: Tensor, pos_decoded_bbox_preds_refine: Tensor,
                      pos_decoded_target_preds: Tensor, num_classes: int) -> Tensor:
    """``VFNetHead.loss_by_feat``: the ``cls_iou_targets`` ``Tensor[N, K]``; labels ``0..K-1`` fg, ``K`` bg."""
    bg_class_ind = num_classes
    pos_inds = torch.where(((flatten_labels >= 0) & (flatten_labels < bg_class_ind)) > 0)[0]
    num_pos = len(pos_inds)
    pos_labels = flatten_labels[pos_inds]
    iou_targets_rf = bbox_overlaps_aligned(
        pos_decoded_bbox_preds_refine, pos_decoded_target_preds.detach()
    ).clamp(min=1e-6)
    if num_pos > 0:
        pos_ious = iou_targets_rf.clone().detach()
        cls_iou_targets = torch.zeros_like(flatten_cls_scores)
        cls_iou_targets[pos_inds, pos_labels] = pos_ious
    else:
        cls_iou_targets = torch.zeros_like(flatten_cls_scores)
    return cls_iou_targets


def vfnet_avg_factor(num_pos: int) -> float:
    """``num_pos_avg_per_gpu`` with ``sync_num_pos=True`` on one process: ``max(num_pos, 1.0)``."""
    return max(float(num_pos), 1.0)


GFL_CONFIG = {"beta": 2.0, "loss_weight": 1.0, "bias_prob": 0.01}
VFNET_CONFIG = {"alpha": 0.75, "gamma": 2.0, "iou_weighted": True, "loss_weight": 1.0, "bias_prob": 0.01,
                "iou_clamp_min": 1e-6}
