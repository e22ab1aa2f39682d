"""mmdetection's EQLv2 loss, transcribed literally as an oracle (never imported by ``src/``).

Source (open-mmlab/mmdetection): ``mmdet/models/losses/eqlv2_loss.py`` at commit
4b9c2ce2c0901556750767ea6183f7f104ae4ef4, the 3.x file with ``use_distributed`` (the file mmdetection 3.3
ships; it was migrated from the authors' tztztztztz/eqlv2 repository by PR #10120, whose first version at
067bc388478e5fb9bea2fd9743ddda3eaea1ad06 had no all-reduce). Defaults ``mu 0.8, alpha 4.0, gamma 12``,
``use_distributed=False``, ``test_with_obj=True``.

Label convention of the oracle (mmdetection's): logits ``(N, K + 1)``, columns ``0..K-1`` the classes and
column ``K`` the objectness (background) channel; labels ``0..K-1`` foreground, ``K`` background, so a
background RoI's one-hot target is ``1`` in the objectness column. The loss is ``sum(BCE * weight) / n_i``
(``n_i`` = number of RoIs; ``avg_factor`` and ``reduction`` are ignored by the reference); the gradient
statistics of the class columns are accumulated *after* the loss, from the weights used in it.
``print_log`` and the registry are left out; ``use_distributed`` calls ``torch.distributed.all_reduce``
(a sum) on this step's ``pos_grad``/``neg_grad`` as the reference does.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RefEQLV2Loss(nn.Module):
    def __init__(self, use_sigmoid: bool = True, reduction: str = "mean", class_weight: Tensor | None = None,
                 loss_weight: float = 1.0, num_classes: int = 1203, use_distributed: bool = False,
                 mu: float = 0.8, alpha: float = 4.0, gamma: int = 12, vis_grad: bool = False,
                 test_with_obj: bool = True) -> None:
        super().__init__()
        self.use_sigmoid = True
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.class_weight = class_weight
        self.num_classes = num_classes
        self.group = True

        # cfg for eqlv2
        self.vis_grad = vis_grad
        self.mu = mu
        self.alpha = alpha
        self.gamma = gamma
        self.use_distributed = use_distributed

        # initial variables
        self.register_buffer("pos_grad", torch.zeros(self.num_classes))
        self.register_buffer("neg_grad", torch.zeros(self.num_classes))
        # At the beginning of training, we set a high value (eg. 100)
        # for the initial gradient ratio so that the weight for pos
        # gradients and neg gradients are 1.
        self.register_buffer("pos_neg", torch.ones(self.num_classes) * 100)

        self.test_with_obj = test_with_obj

        def _func(x, gamma, mu):
            return 1 / (1 + torch.exp(-gamma * (x - mu)))

        self.map_func = partial(_func, gamma=self.gamma, mu=self.mu)

    def forward(self, cls_score: Tensor, label: Tensor, weight: Tensor | None = None,
                avg_factor: int | None = None, reduction_override: Tensor | None = None) -> Tensor:
        self.n_i, self.n_c = cls_score.size()
        self.gt_classes = label
        self.pred_class_logits = cls_score

        def expand_label(pred, gt_classes):
            target = pred.new_zeros(self.n_i, self.n_c)
            target[torch.arange(self.n_i), gt_classes] = 1
            return target

        target = expand_label(cls_score, label)

        pos_w, neg_w = self.get_weight(cls_score)

        weight = pos_w * target + neg_w * (1 - target)

        cls_loss = F.binary_cross_entropy_with_logits(cls_score, target, reduction="none")
        cls_loss = torch.sum(cls_loss * weight) / self.n_i

        self.collect_grad(cls_score.detach(), target.detach(), weight.detach())

        return self.loss_weight * cls_loss

    def get_channel_num(self, num_classes):
        num_channel = num_classes + 1
        return num_channel

    def get_activation(self, pred):
        pred = torch.sigmoid(pred)
        n_i, n_c = pred.size()
        bg_score = pred[:, -1].view(n_i, 1)
        if self.test_with_obj:
            pred[:, :-1] *= (1 - bg_score)
        return pred

    def collect_grad(self, pred, target, weight):
        prob = torch.sigmoid(pred)
        grad = target * (prob - 1) + (1 - target) * prob
        grad = torch.abs(grad)

        # do not collect grad for objectiveness branch [:-1]
        pos_grad = torch.sum(grad * target * weight, dim=0)[:-1]
        neg_grad = torch.sum(grad * (1 - target) * weight, dim=0)[:-1]

        if self.use_distributed:
            dist.all_reduce(pos_grad)
            dist.all_reduce(neg_grad)

        self.pos_grad += pos_grad
        self.neg_grad += neg_grad
        self.pos_neg = self.pos_grad / (self.neg_grad + 1e-10)

    def get_weight(self, pred):
        neg_w = torch.cat([self.map_func(self.pos_neg), pred.new_ones(1)])
        pos_w = 1 + self.alpha * (1 - neg_w)
        neg_w = neg_w.view(1, -1).expand(self.n_i, self.n_c)
        pos_w = pos_w.view(1, -1).expand(self.n_i, self.n_c)
        return pos_w, neg_w
