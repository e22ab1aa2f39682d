"""Shared parts of the RoI classification losses for long tails (Seesaw, EQLv2, federated loss).

Private module. Validation with one host sync, the all-reduce of per-step statistics, and the base class
that tells the Faster R-CNN adapter how many logits the classifier needs and how to turn them into scores.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from detbalance.losses._reduction import check_floating
from detbalance.losses.contract import DetectionLoss

IGNORE = -1


def check_roi_inputs(logits: Tensor, labels: Tensor, *, num_classes: int, columns: int, name: str,
                     validate: bool) -> None:
    """Shapes always; with ``validate``, labels in ``-1..K`` (one host sync over ``N`` values).

    Non-finite logits are caught on the per-RoI loss instead (:func:`check_loss_finite`): one reduction over
    ``N`` values rather than a pass over the ``N x C`` logits.

    Args:
        logits: ``Tensor[N, columns]``.
        labels: ``Tensor[N]`` int64, ``-1`` ignore, ``0`` background, ``1..K`` foreground.
        num_classes: ``K``.
        columns: the logits' expected width (``K + 1``, or ``K + 2`` for Seesaw).
        name: the loss's name, for the messages.
        validate: run the value check (a host sync).
    """
    check_floating("logits", logits)
    if logits.dim() != 2 or logits.shape[1] != columns:
        raise ValueError(f"{name}: logits must have shape (N, {columns}), got {tuple(logits.shape)}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name}: labels must have shape ({logits.shape[0]},) to match logits, got {got}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
    if not validate or labels.numel() == 0:
        return
    lo, hi = torch.aminmax(labels)
    if int(lo) < IGNORE or int(hi) > num_classes:
        where = int(torch.nonzero((labels < IGNORE) | (labels > num_classes))[0, 0])
        raise ValueError(
            f"{name}: labels must lie in -1..{num_classes} (-1 ignore, 0 background, 1..{num_classes} classes), "
            f"got {int(labels[where])} at row {where}"
        )


def check_loss_finite(loss: Tensor, *, name: str, validate: bool) -> None:
    """With ``validate``, raise ``ValueError`` naming the first RoI whose loss is NaN/inf (its logits that enter
    the loss are not finite). One reduction over ``N`` values and one host sync."""
    if not validate or loss.numel() == 0:
        return
    bad = ~torch.isfinite(loss.detach())
    if bool(bad.any()):
        where = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{name}: logits must be finite, got a non-finite loss at {int(bad.sum())} RoI(s), the first in row "
            f"{where} (NaN/inf among the logits that enter its loss)"
        )


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` in place over the ranks when a process group is up (else unchanged); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class RoIClassLoss(DetectionLoss):
    """A RoI classification loss that may reshape the classifier and its scores (mmdetection's custom heads).

    ``kind = "softmax"`` is the RoI head's calling convention ``(logits[N, C], labels[N]) -> Tensor[N]``
    (``labels`` in ``0..K``); the loss may need ``C != K + 1`` columns and its own activation at inference,
    as mmdetection's ``get_cls_channels`` / ``get_activation`` declare.
    """

    kind = "softmax"
    self_normalizing = False
    reduction = "none"

    def classifier_columns(self, num_classes: int) -> int:
        """Logits the RoI classifier must output for ``K = num_classes`` (default ``K + 1``)."""
        return num_classes + 1

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """Scores ``Tensor[N, K + 1]`` (column 0 background, unused by detection) from the classifier's logits."""
        raise NotImplementedError
