"""mmdetection's GHM-C / GHM-R and their per-FPN-level use in ``retinanet_ghm``, transcribed as literal oracles.

Sources (open-mmlab/mmdetection):

* ``mmdet/models/losses/ghm_loss.py`` at commit 080742cb2311f5815a08ea7e7a49bb768f828ecc (``GHMC``, ``GHMR``;
  the arithmetic is unchanged in the 3.x files, which only add ``reduction_override``);
* ``configs/ghm/retinanet_ghm_r50_fpn_1x_coco.py`` at commit 742ecf5a007573b5dd047cb4760ef37b3673ca11:
  ``GHMC(bins=30, momentum=0.75, use_sigmoid=True, loss_weight=1.0)``, ``GHMR(mu=0.02, bins=10,
  momentum=0.7, loss_weight=10.0)``, ``clip_grad=dict(max_norm=35, norm_type=2)``;
* ``mmdet/models/dense_heads/anchor_head.py`` at commit 01fba5b5b42e088b1550dd7cf55a54d0614c608d
  (``loss`` -> ``multi_apply(self.loss_single, cls_scores, ...)``): the losses are called **once per
  FPN level**, each call with all images of the batch at that level (``labels.reshape(-1)``,
  ``cls_score.permute(0, 2, 3, 1).reshape(-1, C)``), and the per-level losses are summed.

The facts transcribed (the loops below follow them step by step; they are ours, written for clarity):

* region edges ``arange(M + 1).float() / M`` in float32; GHM-C adds ``1e-6`` to the last edge, GHM-R sets it
  to ``1e3``; region ``i`` holds ``edges[i] <= g < edges[i + 1]`` among the valid elements;
* ``valid = label_weight > 0``; GHM-C: ``tot = max(#valid, 1)``; GHM-R: ``tot = max(sum(label_weight), 1)``
  (``label_weight`` is ``bbox_weights``, 1 on the 4 coordinates of each positive);
* with ``momentum > 0`` a float32 buffer ``acc_sum`` (zeros at start, no bias correction) is updated **only
  for regions holding an element in this call**: ``acc_sum[i] = m acc_sum[i] + (1 - m) num_in_bin``, and
  those elements get ``tot / acc_sum[i]``; ``n`` counts the non-empty regions; weights are divided by ``n``;
* GHM-C loss ``= sum(BCE(pred, target) * weights) / tot``; GHM-R: ``sqrt(d^2 + mu^2) - mu`` likewise;
  the result is multiplied by ``loss_weight``; the weights are constants (computed from detached ``g``);
* labels use background ``= num_classes``; GHM-C's one-hot over the ``K`` class columns gives an all-zero row
  for background, so the sigmoid head has no background column. Ignored anchors have ``label_weight = 0``.

The EMA is updated in eval mode as well in mmdetection; the oracles are used in training mode only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class RefGHMC:
    """mmdetection ``GHMC(bins, momentum, use_sigmoid=True, loss_weight)``: per-region Python loop."""

    def __init__(self, bins: int = 30, momentum: float = 0.75, loss_weight: float = 1.0) -> None:
        self.bins, self.momentum, self.loss_weight = bins, momentum, loss_weight
        self.edges = torch.arange(bins + 1).float() / bins
        self.edges[-1] += 1e-6
        self.acc_sum = torch.zeros(bins)

    def __call__(self, pred: Tensor, target: Tensor, label_weight: Tensor) -> Tensor:
        target, label_weight = target.float(), label_weight.float()
        weights = torch.zeros_like(pred)
        g = torch.abs(pred.sigmoid().detach() - target)
        valid = label_weight > 0
        tot = max(valid.float().sum().item(), 1.0)
        n = 0
        for i in range(self.bins):
            inds = (g >= self.edges[i]) & (g < self.edges[i + 1]) & valid
            num_in_bin = inds.sum().item()
            if num_in_bin == 0:
                continue
            if self.momentum > 0:
                self.acc_sum[i] = self.momentum * self.acc_sum[i] + (1 - self.momentum) * num_in_bin
                weights[inds] = tot / self.acc_sum[i]
            else:
                weights[inds] = tot / num_in_bin
            n += 1
        if n > 0:
            weights = weights / n
        loss = F.binary_cross_entropy_with_logits(pred, target, weights, reduction="sum") / tot
        return loss * self.loss_weight


class RefGHMR:
    """mmdetection ``GHMR(mu, bins, momentum, loss_weight)``: per-region Python loop."""

    def __init__(self, mu: float = 0.02, bins: int = 10, momentum: float = 0.7, loss_weight: float = 10.0) -> None:
        self.mu, self.bins, self.momentum, self.loss_weight = mu, bins, momentum, loss_weight
        self.edges = torch.arange(bins + 1).float() / bins
        self.edges[-1] = 1e3
        self.acc_sum = torch.zeros(bins)

    def __call__(self, pred: Tensor, target: Tensor, label_weight: Tensor) -> Tensor:
        mu = self.mu
        diff = pred - target
        loss = torch.sqrt(diff * diff + mu * mu) - mu
        g = torch.abs(diff / torch.sqrt(mu * mu + diff * diff)).detach()
        weights = torch.zeros_like(g)
        valid = label_weight > 0
        tot = max(label_weight.float().sum().item(), 1.0)
        n = 0
        for i in range(self.bins):
            inds = (g >= self.edges[i]) & (g < self.edges[i + 1]) & valid
            num_in_bin = inds.sum().item()
            if num_in_bin == 0:
                continue
            n += 1
            if self.momentum > 0:
                self.acc_sum[i] = self.momentum * self.acc_sum[i] + (1 - self.momentum) * num_in_bin
                weights[inds] = tot / self.acc_sum[i]
            else:
                weights[inds] = tot / num_in_bin
        if n > 0:
            weights = weights / n
        return (loss * weights).sum() / tot * self.loss_weight


def retinanet_ghm_losses(
    cls_logits: Tensor,
    bbox_deltas: Tensor,
    labels: Tensor,
    target_deltas: Tensor,
    anchors_per_level: Sequence[int],
    ghmc: RefGHMC,
    ghmr: RefGHMR,
) -> tuple[Tensor, Tensor]:
    """mmdetection ``AnchorHead.loss`` with GHM: one ``ghmc``/``ghmr`` call per level, level losses summed.

    Args:
        cls_logits: ``Tensor[B, A, K]`` class logits (no background column), levels concatenated along ``A``.
        bbox_deltas: ``Tensor[B, A, 4]`` predicted deltas.
        labels: ``Tensor[B, A]`` (``-1`` ignore, ``0`` background, ``1..K``).
        target_deltas: ``Tensor[B, A, 4]`` encoded matched boxes (any value off the positives).
        anchors_per_level: anchors per image of each level, in order.
        ghmc: the classification oracle (its state carries over between calls).
        ghmr: the regression oracle.

    Returns:
        ``(loss_cls, loss_bbox)`` summed over levels, ``loss_weight`` applied.
    """
    k = cls_logits.shape[-1]
    label_weight = (labels >= 0).float()
    onehot = (labels.unsqueeze(-1) == torch.arange(1, k + 1)).float()
    bbox_weight = (labels > 0).float().unsqueeze(-1).expand(*labels.shape, 4)
    loss_cls, loss_bbox, start = 0.0, 0.0, 0
    for n in anchors_per_level:
        sl = slice(start, start + n)
        start += n
        lw = label_weight[:, sl].reshape(-1, 1).expand(-1, k)
        loss_cls = loss_cls + ghmc(cls_logits[:, sl].reshape(-1, k), onehot[:, sl].reshape(-1, k), lw)
        loss_bbox = loss_bbox + ghmr(
            bbox_deltas[:, sl].reshape(-1, 4), target_deltas[:, sl].reshape(-1, 4), bbox_weight[:, sl].reshape(-1, 4)
        )
    return loss_cls, loss_bbox
