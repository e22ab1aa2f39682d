"""mmdetection's Seesaw loss, transcribed literally as an oracle (never imported by ``src/``).

Source (open-mmlab/mmdetection): ``mmdet/models/losses/seesaw_loss.py`` at commit
19bceba56284d440278e80cfde1d95460330ccbb, the 3.x file (``MODELS`` registry, typed signatures, the
``pos_inds.sum() > 0`` guard, ``.to(scores.device)``); it is the file mmdetection 3.3 ships (the 2.x one at
08282a60904d22abc16bc8409d341ce1dd48b613 differs only by ``.cuda()`` and the missing guard). The helpers
``weight_reduce_loss`` and ``cross_entropy`` are transcribed from ``mmdet/models/losses/utils.py`` and
``cross_entropy_loss.py`` for the reductions used here (``'none'``, and ``'mean'`` with ``avg_factor``, which
is how ``BBoxHead.loss`` calls it: ``avg_factor = max(sum(label_weights > 0), 1)``).

Label convention of the oracle (mmdetection's): ``0..K-1`` foreground, ``K`` background. Logits
``(N, K + 2)``: ``K`` class logits, then the objectness pair (object, background). The registry, the
accuracy and ``return_dict`` plumbing are left out; the arithmetic and the order of operations are the
reference's, including the Python loop over the unique labels that accumulates ``cum_samples`` (updated
before the loss is computed, per rank, never all-reduced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def weight_reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean",
                       avg_factor: float | None = None) -> Tensor:
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss
    if reduction == "mean":
        eps = torch.finfo(torch.float32).eps
        loss = loss.sum() / (avg_factor + eps)
    elif reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def cross_entropy(pred: Tensor, label: Tensor, weight: Tensor | None = None, reduction: str = "mean",
                  avg_factor: float | None = None) -> Tensor:
    loss = F.cross_entropy(pred, label, weight=None, reduction="none", ignore_index=-100)
    if weight is not None:
        weight = weight.float()
    return weight_reduce_loss(loss, weight=weight, reduction=reduction, avg_factor=avg_factor)


def seesaw_ce_loss(cls_score: Tensor, labels: Tensor, label_weights: Tensor, cum_samples: Tensor,
                   num_classes: int, p: float, q: float, eps: float, reduction: str = "mean",
                   avg_factor: int | None = None) -> Tensor:
    assert cls_score.size(-1) == num_classes
    assert len(cum_samples) == num_classes

    onehot_labels = F.one_hot(labels, num_classes)
    seesaw_weights = cls_score.new_ones(onehot_labels.size())

    # mitigation factor
    if p > 0:
        sample_ratio_matrix = cum_samples[None, :].clamp(min=1) / cum_samples[:, None].clamp(min=1)
        index = (sample_ratio_matrix < 1.0).float()
        sample_weights = sample_ratio_matrix.pow(p) * index + (1 - index)
        mitigation_factor = sample_weights[labels.long(), :]
        seesaw_weights = seesaw_weights * mitigation_factor

    # compensation factor
    if q > 0:
        scores = F.softmax(cls_score.detach(), dim=1)
        self_scores = scores[torch.arange(0, len(scores)).to(scores.device).long(), labels.long()]
        score_matrix = scores / self_scores[:, None].clamp(min=eps)
        index = (score_matrix > 1.0).float()
        compensation_factor = score_matrix.pow(q) * index + (1 - index)
        seesaw_weights = seesaw_weights * compensation_factor

    cls_score = cls_score + (seesaw_weights.log() * (1 - onehot_labels))

    loss = F.cross_entropy(cls_score, labels, weight=None, reduction="none")

    if label_weights is not None:
        label_weights = label_weights.float()
    loss = weight_reduce_loss(loss, weight=label_weights, reduction=reduction, avg_factor=avg_factor)
    return loss


class RefSeesawLoss(torch.nn.Module):
    """``SeesawLoss(use_sigmoid=False, p, q, num_classes, eps, reduction, loss_weight, return_dict=True)``."""

    def __init__(self, p: float = 0.8, q: float = 2.0, num_classes: int = 1203, eps: float = 1e-2,
                 reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        self.p = p
        self.q = q
        self.num_classes = num_classes
        self.eps = eps
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.cls_criterion = seesaw_ce_loss
        self.register_buffer("cum_samples", torch.zeros(self.num_classes + 1, dtype=torch.float))

    def _split_cls_score(self, cls_score: Tensor) -> tuple[Tensor, Tensor]:
        assert cls_score.size(-1) == self.num_classes + 2
        cls_score_classes = cls_score[..., :-2]
        cls_score_objectness = cls_score[..., -2:]
        return cls_score_classes, cls_score_objectness

    def get_cls_channels(self, num_classes: int) -> int:
        assert num_classes == self.num_classes
        return num_classes + 2

    def get_activation(self, cls_score: Tensor) -> Tensor:
        cls_score_classes, cls_score_objectness = self._split_cls_score(cls_score)
        score_classes = F.softmax(cls_score_classes, dim=-1)
        score_objectness = F.softmax(cls_score_objectness, dim=-1)
        score_pos = score_objectness[..., [0]]
        score_neg = score_objectness[..., [1]]
        score_classes = score_classes * score_pos
        scores = torch.cat([score_classes, score_neg], dim=-1)
        return scores

    def forward(self, cls_score: Tensor, labels: Tensor, label_weights: Tensor | None = None,
                avg_factor: int | None = None, reduction_override: str | None = None) -> dict[str, Tensor]:
        assert reduction_override in (None, "none", "mean", "sum")
        reduction = reduction_override if reduction_override else self.reduction
        assert cls_score.size(-1) == self.num_classes + 2
        pos_inds = labels < self.num_classes
        # 0 for pos, 1 for neg
        obj_labels = (labels == self.num_classes).long()

        # accumulate the samples for each category
        unique_labels = labels.unique()
        for u_l in unique_labels:
            inds_ = labels == u_l.item()
            self.cum_samples[u_l] += inds_.sum()

        if label_weights is not None:
            label_weights = label_weights.float()
        else:
            label_weights = labels.new_ones(labels.size(), dtype=torch.float)

        cls_score_classes, cls_score_objectness = self._split_cls_score(cls_score)
        # calculate loss_cls_classes (only need pos samples)
        if pos_inds.sum() > 0:
            loss_cls_classes = self.loss_weight * self.cls_criterion(
                cls_score_classes[pos_inds], labels[pos_inds], label_weights[pos_inds],
                self.cum_samples[:self.num_classes], self.num_classes, self.p, self.q, self.eps, reduction,
                avg_factor)
        else:
            loss_cls_classes = cls_score_classes[pos_inds].sum()
        # calculate loss_cls_objectness
        loss_cls_objectness = self.loss_weight * cross_entropy(
            cls_score_objectness, obj_labels, label_weights, reduction, avg_factor)

        return {"loss_cls_objectness": loss_cls_objectness, "loss_cls_classes": loss_cls_classes}
