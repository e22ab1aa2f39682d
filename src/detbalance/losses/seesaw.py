r"""Seesaw loss for long-tailed classes in a two-stage detector's RoI classifier.

Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021, https://arxiv.org/abs/2008.10032.
Reference: mmdetection 3.3 ``mmdet/models/losses/seesaw_loss.py`` (held to a transcription in
``tests/reference/mmdet_seesaw.py``).

The classifier has ``K + 2`` logits: the ``K`` classes and an objectness pair, as mmdetection's
``SeesawLoss.get_cls_channels``. Our layout keeps "column ``c`` is label ``c``" for ``0..K``: column 0 is the
*background* objectness logit, columns ``1..K`` the classes, column ``K + 1`` the *object* objectness logit
(mmdetection: ``[classes..., object, background]``). The loss of a RoI is a two-way cross entropy of the
objectness pair plus, for a foreground RoI of class ``i``, the cross entropy over the class logits with every
other class ``j``'s logit shifted by ``log S_ij``:

.. math::
    S_{ij} = M_{ij} C_{ij}, \quad
    M_{ij} = \min\bigl(1, N_j / N_i\bigr)^{p}, \quad
    C_{ij} = \max\bigl(1, \sigma_j / \max(\sigma_i, \epsilon)\bigr)^{q}

where ``N`` are the cumulative per-class counts of the sampled RoIs (clamped at 1, so a class never seen
divides by nothing) and ``sigma`` the (detached) softmax over the class logits. ``M`` lowers the penalty a
frequent class ``i`` puts on a rarer class ``j``; ``C`` restores it when ``j`` is mistakenly scored above ``i``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from detbalance.losses._reduction import (
    check_nonnegative,
    check_positive,
    compute_dtype,
    reduce_loss,
    should_validate,
)
from detbalance.losses._roi_class import (
    IGNORE,
    RoIClassLoss,
    all_reduce_sum_,
    check_loss_finite,
    check_roi_inputs,
)
from detbalance.types import Reduction

__all__ = ["SeesawLoss", "seesaw_factors", "seesaw_loss"]


def _check_hyper(p: float, q: float, eps: float) -> None:
    check_nonnegative("p", p)
    check_nonnegative("q", q)
    check_positive("eps", eps)


def _mitigation_table(cum_samples: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """``Tensor[K, K]``: ``log M_ij = p min(0, log N_j - log N_i)`` (counts clamped at 1), mmdetection's matrix."""
    log_counts = cum_samples[1:].to(dtype).clamp(min=1.0).log()
    return (log_counts[None, :] - log_counts[:, None]).clamp(max=0.0) * p


def _log_factors(class_logits: Tensor, cls: Tensor, cum_samples: Tensor, p: float, q: float, eps: float
                 ) -> tuple[Tensor, Tensor]:
    """``(log M, log C)``, each ``Tensor[M, K]`` (or a 0-d zero when disabled), for class logits ``[M, K]`` of RoIs
    of class index ``cls``; computed without autograd.

    ``log C_ij = q max(0, log s_j - log max(s_i, eps)) = q max(0, z_j - max(z_i, lse(z) + log eps))``: one
    ``logsumexp`` per row instead of a full ``log_softmax``.
    """
    zeros = class_logits.new_zeros(())
    with torch.no_grad():
        z = class_logits.detach()
        log_m = _mitigation_table(cum_samples, p, z.dtype)[cls] if p > 0 else zeros
        if q > 0:
            own = z.gather(1, cls[:, None])
            floor = torch.logsumexp(z, dim=1, keepdim=True) + math.log(eps)
            log_c = (z - torch.maximum(own, floor)).clamp_(min=0.0).mul_(q)
        else:
            log_c = zeros
    return log_m, log_c


class _SeesawFunction(torch.autograd.Function):
    """Objectness CE of every RoI plus the class CE over ``z_c + log S`` of the foreground RoIs, per RoI.

    The gradient is written into one ``N x (K + 2)`` buffer: ``p - onehot`` of the 2-way objectness softmax in
    columns ``K + 1`` and ``0``, and ``softmax(z_c + log S) - onehot`` in the class columns of the foreground rows
    (``S`` constant), which is what autograd gives through ``F.cross_entropy`` without its per-op buffers.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, z: Tensor, zc: Tensor, shift: Tensor, labels: Tensor, fg: Tensor,
        cls: Tensor,
    ) -> Tensor:
        k = z.shape[1] - 2
        obj, bg = z[:, k + 1], z[:, 0]
        is_fg = labels > 0
        loss = torch.logaddexp(obj, bg) - torch.where(is_fg, obj, bg)  # 2-way CE: object for labels > 0
        log_p = None
        if fg.numel():
            zs = zc.add_(shift) if shift.dim() or float(shift) != 0.0 else zc
            log_p = torch.log_softmax(zs, dim=1)
            loss = loss.index_add(0, fg, -log_p.gather(1, cls[:, None]).squeeze(1))
        p_obj = torch.sigmoid(obj - bg)
        ctx.save_for_backward(p_obj, is_fg, fg, cls, *(() if log_p is None else (log_p,)))
        ctx.k = k
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        p_obj, is_fg, fg, cls, *rest = ctx.saved_tensors
        k = ctx.k
        out = grad.new_zeros((grad.shape[0], k + 2))
        d_obj = (p_obj - is_fg.to(p_obj.dtype)) * grad  # d/d z_object; d/d z_background is its negative
        out[:, k + 1] = d_obj
        out[:, 0] = -d_obj
        if rest:
            g = rest[0].exp()
            g.scatter_add_(1, cls[:, None], g.new_full((cls.shape[0], 1), -1.0))
            g.mul_(grad[fg][:, None])
            out[fg, 1:k + 1] = g
        return out, None, None, None, None, None


def seesaw_factors(
    logits: Tensor, labels: Tensor, *, cum_samples: Tensor, p: float = 0.8, q: float = 2.0, eps: float = 1e-2
) -> tuple[Tensor, Tensor]:
    """The mitigation and compensation factors ``M_ij``, ``C_ij`` of the foreground rows (for diagnostics).

    Args:
        logits: ``Tensor[N, K + 2]`` (layout in the module docstring).
        labels: ``Tensor[N]`` in ``-1..K``.
        cum_samples: ``Tensor[K + 1]`` cumulative RoI counts per label (index 0 background).
        p, q, eps: As :func:`seesaw_loss`.

    Returns:
        ``(M, C)``, each ``Tensor[N, K]`` (column ``j`` = class ``j + 1``); ``1`` on background and ignored rows.
    """
    k = logits.shape[1] - 2
    fg = labels > 0
    cls = (labels - 1).clamp(min=0)
    log_m, log_c = _log_factors(logits[:, 1:k + 1].to(compute_dtype(logits)), cls, cum_samples, p, q, eps)
    ones = logits.new_ones((logits.shape[0], k), dtype=compute_dtype(logits))
    m = torch.where(fg[:, None], (ones * log_m).exp(), ones)
    c = torch.where(fg[:, None], (ones * log_c).exp(), ones)
    return m, c


def seesaw_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    cum_samples: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
    weight: Tensor | None = None,
    reduction: Reduction = "none",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Seesaw loss of a RoI classifier with an objectness branch (``K + 2`` logits), given the class counts.

    Wang et al., CVPR 2021, https://arxiv.org/abs/2008.10032; mmdetection 3.3 ``seesaw_ce_loss`` +
    ``SeesawLoss.forward``. The factors are constants for autograd (the compensation factor uses detached
    scores, the mitigation factor counts), as in the reference. Pure: :class:`SeesawLoss` owns the counts.

    Args:
        logits: ``Tensor[N, K + 2]``: column 0 background objectness, ``1..K`` classes, ``K + 1`` object
            objectness.
        labels: ``Tensor[N]`` int64, ``-1`` ignore (loss 0), ``0`` background, ``1..K`` foreground.
        cum_samples: ``Tensor[K + 1]`` cumulative count of RoIs per label (index 0 background, unused; counts
            are clamped at 1, so a class never seen gets the weight of a class seen once).
        p: Mitigation exponent (``0`` disables the factor).
        q: Compensation exponent (``0`` disables the factor).
        eps: Floor of the own-class score in the compensation ratio.
        weight: Optional per-RoI ``Tensor[N]`` (mmdetection's ``label_weights``), applied to both terms.
        reduction: ``'none'`` (``Tensor[N]``), ``'sum'``, or ``'mean'`` over the non-ignored RoIs.
        validate_args: Check labels in ``-1..K`` and finite logits (one host sync); ``None``: not on CUDA.

    Returns:
        Objectness CE plus, for foreground RoIs, the seesaw CE over the classes; float32 (float64 input
        stays float64).

    Raises:
        ValueError: On shapes, labels outside ``-1..K``, non-finite logits, negative ``p``/``q``, ``eps <= 0``.

    Example:
        >>> logits = torch.zeros(2, 5)  # K = 3
        >>> seesaw_loss(logits, torch.tensor([0, 2]), cum_samples=torch.tensor([9.0, 1, 1, 1]))
        tensor([0.6931, 1.7918])
    """
    _check_hyper(p, q, eps)
    if not isinstance(cum_samples, torch.Tensor) or cum_samples.dim() != 1:
        raise ValueError(f"cum_samples must be a 1-D tensor [K + 1], got {cum_samples!r}")
    k = cum_samples.shape[0] - 1
    if k < 1:
        raise ValueError(f"cum_samples must have K + 1 >= 2 entries, got {cum_samples.shape[0]}")
    validate = should_validate(validate_args, logits)
    check_roi_inputs(logits, labels, num_classes=k, columns=k + 2, name="seesaw_loss", validate=validate)
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"weight must have shape {tuple(labels.shape)}, got {tuple(weight.shape)}")
    dtype = compute_dtype(logits)
    keep = labels != IGNORE
    with torch.autocast(logits.device.type, enabled=False):
        z = logits.to(dtype)
        fg = torch.nonzero(labels > 0).squeeze(1)
        cls = labels[fg] - 1
        zc = z.detach()[fg, 1:k + 1]  # a copy: the Function adds the factors to it in place
        log_m, log_c = _log_factors(zc, cls, cum_samples, p, q, eps)
        # the own-class entry of log M and log C is 0 by construction (ratio 1; own score / itself <= 1);
        # the factors are constants for autograd (detached scores, counts), as in the reference
        shift = log_c if not log_m.dim() else (log_m if not log_c.dim() else log_m.add_(log_c))
        loss = _SeesawFunction.apply(z, zc, shift, labels, fg, cls)
        if weight is not None:
            loss = loss * weight.to(dtype)
        loss = torch.where(keep, loss, torch.zeros((), dtype=dtype, device=loss.device))
    check_loss_finite(loss, name="seesaw_loss", validate=validate)
    return reduce_loss(loss, reduction, count=keep.sum())


class SeesawLoss(RoIClassLoss):
    """Module form of :func:`seesaw_loss`, owning the cumulative class counts (``cum_samples`` buffer).

    In training mode each call first adds the batch's RoI counts per label (``-1`` skipped) to
    ``cum_samples`` and then computes the loss with the updated counts, as mmdetection does; in eval mode the
    counts are left alone. By default (``sync=True``) the counts of the call are summed over the DDP ranks
    before they are added, so that every rank holds the counts of the global batch and 2 ranks equal one
    process at twice the batch (a test). **mmdetection does not do this**: its ``cum_samples`` are updated
    per rank and never synchronised, so each GPU's factors see only its own RoIs; ``sync=False`` reproduces
    that behaviour.

    The RoI head adapter builds the classifier with :meth:`classifier_columns` (``K + 2``) logits and scores
    detections with :meth:`class_probabilities` (mmdetection's ``get_activation``).

    Args:
        num_classes: ``K`` (foreground classes).
        p, q, eps: See :func:`seesaw_loss` (paper / mmdetection: 0.8, 2.0, 1e-2).
        sync: All-reduce each call's counts over the process group when one is up (ours; mmdetection: no).
        reduction: ``'none'`` for the RoI head.
        validate_args: See :func:`seesaw_loss`.
    """

    cum_samples: Tensor

    def __init__(self, *, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2, sync: bool = True,
                 reduction: Reduction = "none", validate_args: bool | None = None) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        _check_hyper(p, q, eps)
        reduce_loss(torch.zeros(0), reduction)  # rejects an unknown reduction
        self.num_classes, self.p, self.q, self.eps = num_classes, float(p), float(q), float(eps)
        self.sync, self.reduction, self.validate_args = bool(sync), reduction, validate_args
        self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=torch.float64))
        self.track_stats = False
        self.last_stats: dict[str, tuple[Tensor, Tensor]] | None = None

    def classifier_columns(self, num_classes: int) -> int:
        """``K + 2``: the classes and the objectness pair (mmdetection's ``get_cls_channels``)."""
        if num_classes != self.num_classes:
            raise ValueError(f"SeesawLoss was built for num_classes={self.num_classes}, the head has {num_classes}")
        return num_classes + 2

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """``Tensor[N, K + 1]``: ``softmax(classes) * P(object)``, column 0 ``P(background)`` (mmdetection's
        ``get_activation``; the columns sum to 1)."""
        k = logits.shape[1] - 2
        obj = torch.stack([logits[:, k + 1], logits[:, 0]], dim=1).softmax(dim=1)
        return torch.cat([obj[:, 1:], logits[:, 1:k + 1].softmax(dim=1) * obj[:, :1]], dim=1)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """Update the counts (training mode), then :func:`seesaw_loss`."""
        validate = should_validate(self.validate_args, logits)
        check_roi_inputs(logits, labels, num_classes=self.num_classes, columns=self.num_classes + 2,
                         name="SeesawLoss", validate=validate)
        if self.training:
            with torch.no_grad():
                valid = labels >= 0
                counts = torch.bincount(torch.where(valid, labels, torch.full_like(labels, self.num_classes + 1)),
                                        minlength=self.num_classes + 2)[: self.num_classes + 1]
                counts = counts.to(self.cum_samples.dtype)
                if self.sync:
                    all_reduce_sum_(counts)
                self.cum_samples.add_(counts)
        if self.track_stats:
            with torch.no_grad():
                m, c = seesaw_factors(logits, labels, cum_samples=self.cum_samples, p=self.p, q=self.q, eps=self.eps)
                # the factor each class j received as a negative of a foreground RoI of another class
                other = (labels > 0)[:, None] & (labels[:, None] != torch.arange(1, self.num_classes + 1,
                                                                                 device=labels.device))
                w = other.to(m.dtype)
                n = w.sum(0)
                self.last_stats = {"seesaw/mitigation": ((m * w).sum(0), n), "seesaw/compensation": ((c * w).sum(0), n)}
        loss = seesaw_loss(logits, labels, cum_samples=self.cum_samples, p=self.p, q=self.q, eps=self.eps,
                           weight=weight, reduction="none", validate_args=False)
        check_loss_finite(loss, name="SeesawLoss", validate=validate)
        return reduce_loss(loss, self.reduction, count=(labels != IGNORE).sum())

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}, sync={self.sync}"
