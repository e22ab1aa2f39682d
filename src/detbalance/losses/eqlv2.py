r"""Equalization loss v2 (EQLv2): gradient-guided re-weighting of a sigmoid RoI classifier.

Tan et al., "Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object Detection",
CVPR 2021, https://arxiv.org/abs/2012.08548. Reference: mmdetection 3.3 ``mmdet/models/losses/eqlv2_loss.py``
(held to a transcription in ``tests/reference/mmdet_eqlv2.py``).

The classifier has ``K + 1`` sigmoid logits: column 0 is the objectness (background) channel, trained with
target 1 on background RoIs and weight 1; columns ``1..K`` the classes (mmdetection: classes first, the
objectness channel last). Each class ``j`` keeps the accumulated positive and negative gradient magnitudes
``P_j``, ``N_j`` (of the weighted BCE, ``|t - sigma(z)|``) and their ratio ``g_j = P_j / (N_j + 1e-10)``:

.. math::
    w^{neg}_j = \frac{1}{1 + e^{-\gamma (g_j - \mu)}}, \qquad w^{pos}_j = 1 + \alpha (1 - w^{neg}_j),
    \qquad L_i = \sum_{c} w_{ic}\, \mathrm{BCE}(z_{ic}, t_{ic})

with ``w_ic = w^pos_c`` on the RoI's own column and ``w^neg_c`` elsewhere. A class that receives far more
negative than positive gradient (a rare class) gets its negatives down-weighted and its positives up-weighted.
At the start ``g = 100`` (both weights 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from detbalance.losses._reduction import check_nonnegative, compute_dtype, reduce_loss, should_validate
from detbalance.losses._roi_class import (
    IGNORE,
    RoIClassLoss,
    all_reduce_sum_,
    check_loss_finite,
    check_roi_inputs,
)
from detbalance.types import Reduction

__all__ = ["EQLv2Loss", "eqlv2_gradient_statistics", "eqlv2_loss", "eqlv2_weights"]


def _check_hyper(mu: float, alpha: float, gamma: float) -> None:
    check_nonnegative("mu", mu)
    check_nonnegative("alpha", alpha)
    check_nonnegative("gamma", gamma)


def eqlv2_weights(pos_neg: Tensor, *, mu: float = 0.8, alpha: float = 4.0, gamma: float = 12.0
                  ) -> tuple[Tensor, Tensor]:
    """Per-column ``(pos_w, neg_w)``, each ``Tensor[K + 1]`` (column 0, the objectness channel, gets 1).

    Args:
        pos_neg: ``Tensor[K]`` accumulated positive / negative gradient ratio of classes ``1..K``.
        mu, alpha, gamma: See the module docstring (paper / mmdetection: 0.8, 4, 12).
    """
    neg_w = torch.cat([pos_neg.new_ones(1), torch.sigmoid(gamma * (pos_neg - mu))])
    pos_w = 1 + alpha * (1 - neg_w)
    return pos_w, neg_w


class _EQLv2Function(torch.autograd.Function):
    """Row sums of the weighted BCE with the weights as constants, and ``sum_i keep_i sigma(z_i)`` for the
    statistics, from one ``softplus`` and one ``sigmoid`` pass (no ``N x C`` target or weight matrix)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, z: Tensor, safe: Tensor, keep: Tensor, pos_w: Tensor, neg_w: Tensor
    ) -> tuple[Tensor, Tensor]:
        sp = torch.nn.functional.softplus(z)  # BCE for target 0; for target 1 it is softplus(z) - z
        sig = torch.sigmoid(z)
        own = safe[:, None]
        sp_own = sp.gather(1, own).squeeze(1)
        z_own = z.gather(1, own).squeeze(1)
        loss = torch.mv(sp, neg_w) + pos_w[safe] * (sp_own - z_own) - neg_w[safe] * sp_own
        col_sig = torch.mv(sig.t(), keep.to(sig.dtype))  # sum over the kept rows of sigma, per column
        ctx.save_for_backward(sig, safe, pos_w, neg_w)
        ctx.mark_non_differentiable(col_sig)
        return loss, col_sig

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _: Tensor):  # type: ignore[override]
        sig, safe, pos_w, neg_w = ctx.saved_tensors
        out = sig * neg_w  # d/dz of w_neg softplus(z)
        out.mul_(grad[:, None])
        own = safe[:, None]
        s_own = sig.gather(1, own).squeeze(1)
        out.scatter_(1, own, (grad * pos_w[safe] * (s_own - 1))[:, None])  # own column: w_pos (sigma - 1)
        return out, None, None, None, None


def _eqlv2(z: Tensor, labels: Tensor, pos_neg: Tensor, mu: float, alpha: float, gamma: float
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(per-RoI loss, column sums of sigma over kept rows, pos_w, neg_w)`` in ``z``'s dtype."""
    pos_w, neg_w = eqlv2_weights(pos_neg.to(device=z.device, dtype=z.dtype), mu=mu, alpha=alpha, gamma=gamma)
    keep = labels != IGNORE
    loss, col_sig = _EQLv2Function.apply(z, labels.clamp(min=0), keep, pos_w, neg_w)
    return loss, col_sig, pos_w, neg_w


def eqlv2_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    pos_neg: Tensor,
    mu: float = 0.8,
    alpha: float = 4.0,
    gamma: float = 12.0,
    weight: Tensor | None = None,
    reduction: Reduction = "none",
    validate_args: bool | None = None,
) -> Tensor:
    r"""EQLv2 per RoI, given the gradient ratio ``pos_neg`` (pure; :class:`EQLv2Loss` owns the statistics).

    Computed as ``softplus(z) @ w_neg`` plus the own column's correction (no ``(N, K + 1)`` target or weight
    matrix is built); the weights are constants for autograd, as in the reference.

    Args:
        logits: ``Tensor[N, K + 1]``, column 0 the objectness (background) channel.
        labels: ``Tensor[N]`` int64, ``-1`` ignore (loss 0), ``0`` background, ``1..K`` foreground.
        pos_neg: ``Tensor[K]`` gradient ratio of the classes.
        mu, alpha, gamma: See :func:`eqlv2_weights`.
        weight: Optional per-RoI ``Tensor[N]``.
        reduction: ``'none'`` (``Tensor[N]``, the row sums), ``'sum'``, or ``'mean'`` over the non-ignored RoIs
            (mmdetection's ``sum(BCE * w) / n_i``).
        validate_args: Check labels in ``-1..K`` and finite logits (one host sync); ``None``: not on CUDA.

    Returns:
        float32 loss (float64 input stays float64).

    Raises:
        ValueError: On shapes, labels outside ``-1..K``, non-finite logits or negative hyperparameters.

    Example:
        >>> eqlv2_loss(torch.zeros(2, 3), torch.tensor([0, 2]), pos_neg=torch.full((2,), 100.0))
        tensor([2.0794, 2.0794])
    """
    _check_hyper(mu, alpha, gamma)
    if not isinstance(pos_neg, Tensor) or pos_neg.dim() != 1:
        raise ValueError(f"pos_neg must be a 1-D tensor [K], got {pos_neg!r}")
    k = pos_neg.shape[0]
    check_roi_inputs(logits, labels, num_classes=k, columns=k + 1, name="eqlv2_loss",
                     validate=should_validate(validate_args, logits))
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"weight must have shape {tuple(labels.shape)}, got {tuple(weight.shape)}")
    loss, _ = _eqlv2_apply(logits, labels, pos_neg, mu, alpha, gamma, weight)
    check_loss_finite(loss, name="eqlv2_loss", validate=should_validate(validate_args, logits))
    return reduce_loss(loss, reduction, count=(labels != IGNORE).sum())


def _eqlv2_apply(logits: Tensor, labels: Tensor, pos_neg: Tensor, mu: float, alpha: float, gamma: float,
                 weight: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Per-RoI loss (ignored rows 0) and ``(column sums of sigma, pos_w, neg_w)`` for the statistics."""
    dtype = compute_dtype(logits)
    keep = labels != IGNORE
    with torch.autocast(logits.device.type, enabled=False):
        loss, col_sig, pos_w, neg_w = _eqlv2(logits.to(dtype), labels, pos_neg, mu, alpha, gamma)
        if weight is not None:
            loss = loss * weight.to(dtype)
        loss = torch.where(keep, loss, torch.zeros((), dtype=dtype, device=loss.device))
    return loss, (col_sig, pos_w, neg_w)


@torch.no_grad()
def eqlv2_gradient_statistics(logits: Tensor, labels: Tensor, *, pos_w: Tensor, neg_w: Tensor
                              ) -> tuple[Tensor, Tensor]:
    """This call's weighted gradient magnitudes of the classes: ``(pos_grad, neg_grad)``, each ``Tensor[K]``.

    ``pos_grad_j = sum_{i: y_i = j} w^pos_j (1 - sigma(z_ij))``, ``neg_grad_j = sum_{i: y_i != j} w^neg_j
    sigma(z_ij)`` over the non-ignored RoIs (mmdetection's ``collect_grad``, objectness column left out).
    """
    z = logits.detach().to(pos_w.dtype)
    keep = labels >= 0
    prob = torch.sigmoid(z) * keep[:, None].to(z.dtype)
    safe = labels.clamp(min=0)
    p_own = prob.gather(1, safe[:, None]).squeeze(1)
    own_sum = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, safe, p_own)
    count = torch.bincount(safe, weights=keep.to(z.dtype), minlength=z.shape[1]).to(z.dtype)
    pos_grad = (count - own_sum) * pos_w
    neg_grad = (prob.sum(0) - own_sum) * neg_w
    return pos_grad[1:], neg_grad[1:]


def _statistics_from_column_sums(logits: Tensor, labels: Tensor, col_sig: Tensor, pos_w: Tensor, neg_w: Tensor
                                 ) -> tuple[Tensor, Tensor]:
    """:func:`eqlv2_gradient_statistics` from the forward's column sums of sigma (only ``N`` more values read)."""
    keep = labels >= 0
    safe = labels.clamp(min=0)
    p_own = torch.sigmoid(logits.detach().gather(1, safe[:, None]).squeeze(1).to(col_sig.dtype))
    p_own = p_own * keep.to(p_own.dtype)
    own_sum = torch.zeros_like(col_sig).index_add_(0, safe, p_own)
    count = torch.bincount(safe, weights=keep.to(col_sig.dtype), minlength=col_sig.shape[0]).to(col_sig.dtype)
    pos_grad = (count - own_sum) * pos_w
    neg_grad = (col_sig - own_sum) * neg_w
    return pos_grad[1:], neg_grad[1:]


class EQLv2Loss(RoIClassLoss):
    """Module form of :func:`eqlv2_loss`, owning the accumulated gradients (``pos_grad``, ``neg_grad``, ``pos_neg``).

    Each call computes the loss with the current ratio, then (training mode only) adds this call's weighted
    gradient magnitudes and recomputes ``pos_neg = pos_grad / (neg_grad + 1e-10)``, as mmdetection's
    ``collect_grad`` (which also updates in eval mode). By default (``sync=True``) the call's statistics are
    summed over the DDP ranks first, so every rank holds the statistics of the global batch (2 ranks equal
    one process at twice the batch, a test); mmdetection offers this as ``use_distributed`` and defaults it to
    ``False``; ``sync=False`` is that default.

    Inference scores (:meth:`class_probabilities`): ``sigma(z_c) (1 - sigma(z_0))`` for the classes
    (mmdetection's ``get_activation`` with ``test_with_obj=True``).

    Args:
        num_classes: ``K``.
        mu, alpha, gamma: See :func:`eqlv2_weights` (0.8, 4, 12).
        sync: All-reduce each call's gradient statistics when a process group is up.
        reduction: ``'none'`` for the RoI head.
        validate_args: See :func:`eqlv2_loss`.
    """

    pos_grad: Tensor
    neg_grad: Tensor
    pos_neg: Tensor

    def __init__(self, *, num_classes: int, mu: float = 0.8, alpha: float = 4.0, gamma: float = 12.0,
                 sync: bool = True, reduction: Reduction = "none", validate_args: bool | None = None) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        _check_hyper(mu, alpha, gamma)
        reduce_loss(torch.zeros(0), reduction)
        self.num_classes, self.mu, self.alpha, self.gamma = num_classes, float(mu), float(alpha), float(gamma)
        self.sync, self.reduction, self.validate_args = bool(sync), reduction, validate_args
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        self.register_buffer("pos_neg", torch.full((num_classes,), 100.0))
        self.track_stats = False
        self.last_stats: dict[str, tuple[Tensor, Tensor]] | None = None

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """``Tensor[N, K + 1]``: column 0 ``sigma(z_0)``, classes ``sigma(z_c) (1 - sigma(z_0))``."""
        p = torch.sigmoid(logits)
        return torch.cat([p[:, :1], p[:, 1:] * (1 - p[:, :1])], dim=1)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """:func:`eqlv2_loss` with the current ratio, then (training mode) accumulate this call's gradients."""
        validate = should_validate(self.validate_args, logits)
        check_roi_inputs(logits, labels, num_classes=self.num_classes, columns=self.num_classes + 1,
                         name="EQLv2Loss", validate=validate)
        if weight is not None and weight.shape != labels.shape:
            raise ValueError(f"weight must have shape {tuple(labels.shape)}, got {tuple(weight.shape)}")
        per_roi, (col_sig, pos_w, neg_w) = _eqlv2_apply(logits, labels, self.pos_neg, self.mu, self.alpha,
                                                        self.gamma, weight)
        check_loss_finite(per_roi, name="EQLv2Loss", validate=validate)
        loss = reduce_loss(per_roi, self.reduction, count=(labels != IGNORE).sum())
        if self.training:
            with torch.no_grad():
                pos, neg = _statistics_from_column_sums(logits, labels, col_sig, pos_w, neg_w)
                if self.sync:
                    both = all_reduce_sum_(torch.cat([pos, neg]))
                    pos, neg = both[: self.num_classes], both[self.num_classes:]
                self.pos_grad.add_(pos)
                self.neg_grad.add_(neg)
                self.pos_neg.copy_(self.pos_grad / (self.neg_grad + 1e-10))
        if self.track_stats:
            ones = torch.ones_like(self.pos_neg)
            self.last_stats = {"eqlv2/pos_neg": (self.pos_neg.detach().clone(), ones)}
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, mu={self.mu}, alpha={self.alpha}, gamma={self.gamma}, sync={self.sync}"
