"""detectron2's federated loss (``use_fed_loss``), transcribed literally as an oracle (never imported by ``src/``).

Source (facebookresearch/detectron2) at commit 02b5c4e295e990042a714712c21dc79b731e8833 (v0.6-283):

* ``detectron2/modeling/roi_heads/fast_rcnn.py`` (last changed at 523c4023bc79719d2fc3fe0181311f88ad35a271):
  ``FastRCNNOutputLayers.get_fed_loss_classes`` and ``sigmoid_cross_entropy_loss`` (both credited there to
  xingyizhou/CenterNet2 "with slight modifications"), ``__init__`` (``use_fed_loss`` requires
  ``use_sigmoid_ce``; the weights are a buffer of length ``num_classes``);
* ``detectron2/data/detection_utils.py``: ``get_fed_loss_cls_weights`` = per-class ``image_count`` (LVIS's
  ``class_image_count``, sorted by category id) ** ``freq_weight_power``;
* ``detectron2/config/defaults.py``: ``ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER = 0.5``,
  ``ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES = 50``.

Label convention of the oracle (detectron2's): logits ``(N, K + 1)`` with the background **last** (column
``K``, never trained by the sigmoid loss); ``gt_classes`` ``0..K-1`` foreground, ``K`` background. The
federated classes are the unique labels **of all RoIs of the batch** (background included, and counted
towards the 50) plus negatives drawn with ``torch.multinomial(..., replacement=False)`` from the global
generator; the loss is ``sum(BCE * mask) / N``. ``self`` is replaced by explicit arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def get_fed_loss_cls_weights(image_count: Tensor, freq_weight_power: float = 1.0) -> Tensor:
    class_freq = image_count
    class_freq_weight = class_freq.float() ** freq_weight_power
    return class_freq_weight


def get_fed_loss_classes(gt_classes: Tensor, num_fed_loss_classes: int, num_classes: int, weight: Tensor) -> Tensor:
    unique_gt_classes = torch.unique(gt_classes)
    prob = unique_gt_classes.new_ones(num_classes + 1).float()
    prob[-1] = 0
    if len(unique_gt_classes) < num_fed_loss_classes:
        prob[:num_classes] = weight.float().clone()
        prob[unique_gt_classes] = 0
        sampled_negative_classes = torch.multinomial(
            prob, num_fed_loss_classes - len(unique_gt_classes), replacement=False
        )
        fed_loss_classes = torch.cat([unique_gt_classes, sampled_negative_classes])
    else:
        fed_loss_classes = unique_gt_classes
    return fed_loss_classes


def sigmoid_cross_entropy_loss(pred_class_logits: Tensor, gt_classes: Tensor, *, use_fed_loss: bool = True,
                               fed_loss_num_classes: int = 50, fed_loss_cls_weights: Tensor | None = None) -> Tensor:
    if pred_class_logits.numel() == 0:
        return pred_class_logits.new_zeros([1])[0]

    N = pred_class_logits.shape[0]
    K = pred_class_logits.shape[1] - 1

    target = pred_class_logits.new_zeros(N, K + 1)
    target[range(len(gt_classes)), gt_classes] = 1
    target = target[:, :K]

    cls_loss = F.binary_cross_entropy_with_logits(pred_class_logits[:, :-1], target, reduction="none")

    if use_fed_loss:
        fed_loss_classes = get_fed_loss_classes(
            gt_classes,
            num_fed_loss_classes=fed_loss_num_classes,
            num_classes=K,
            weight=fed_loss_cls_weights,
        )
        fed_loss_classes_mask = fed_loss_classes.new_zeros(K + 1)
        fed_loss_classes_mask[fed_loss_classes] = 1
        fed_loss_classes_mask = fed_loss_classes_mask[:K]
        weight = fed_loss_classes_mask.view(1, K).expand(N, K).float()
    else:
        weight = 1

    loss = torch.sum(cls_loss * weight) / N
    return loss


def predict_probs(scores: Tensor) -> Tensor:
    """``predict_probs`` with ``use_sigmoid_ce``: sigmoid of every column (inference drops the last)."""
    return scores.sigmoid()
