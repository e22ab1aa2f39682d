"""Quality-aware classification losses for dense detectors: Quality Focal Loss and Varifocal Loss.

Both train the classifier's score towards the localisation quality of the anchor's predicted box: a positive's
target in its class column is the IoU ``q`` of its decoded (detached) predicted box with its assigned ground
truth, every other element's target is 0.

* **QFL** (Li et al., "Generalized Focal Loss", NeurIPS 2020, arXiv 2006.04388, eq. 5):
  ``QFL(x, y) = |y - sigma(x)|^beta * BCE(x, y)`` for every element, ``beta = 2``.
* **VFL** (Zhang et al., "VarifocalNet", CVPR 2021, arXiv 2008.13367, eq. 2):
  ``VFL(x, q) = q * BCE(x, q)`` where ``q > 0`` and ``alpha * sigma(x)^gamma * BCE(x, 0)`` where ``q = 0``;
  ``alpha = 0.75``, ``gamma = 2``. With ``iou_weighted=False`` the positive term is ``BCE(x, q)``.

The defaults and the arithmetic are mmdetection 3.3's (``mmdet/models/losses/gfocal_loss.py``,
``varifocal_loss.py``; a literal transcription lives in ``tests/reference/mmdet_quality.py`` and the tests hold
these functions to it in value and gradient). As there, the modulating factors are differentiated through
(mmdetection does not detach ``|y - p|^beta`` nor ``p^gamma``). Where mmdetection's ``quality_focal_loss``
returns the per-anchor sum over classes, these return per-element losses (``reduction="none"``), which the
detector adapters sum and normalise.

Like :func:`~detbalance.losses.sigmoid_focal_loss`, both are custom autograd functions that compute the loss
and its closed-form gradient in one sweep over cache-sized row blocks (keeping only the gradient for the
backward pass), in float32 for fp16/bf16 inputs and under autocast. The gradients, with ``p = sigma(x)``,
``d = p - y`` and ``CE = BCE(x, y)``:

* QFL: ``dL/dx = sign(d) |d|^(beta - 1) (d^2 + beta CE p (1 - p))``;
* VFL: ``q (p - q)`` on positives (``1 (p - q)`` without IoU weighting) and
  ``alpha sign(d) |d|^(gamma - 1) (d^2 + gamma CE p (1 - p))`` on negatives (``d = p - q``).

On a dense head (RetinaNet) the modules build their own targets from the per-anchor batch the adapter hands
them (:meth:`QualityFocalLoss.dense_targets`): :func:`aligned_box_iou` of the decoded, detached predicted box
with the matched ground truth for positives, as GFL's and VarifocalNet's heads compute it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from detbalance.losses._reduction import (
    check_floating,
    check_nonnegative,
    check_reduction,
    check_same_shape,
    check_targets_in_unit_interval,
    compute_dtype,
    elementwise_mask,
    reduce_loss,
    should_validate,
)
from detbalance.losses.contract import AnchorBatch, DetectionLoss
from detbalance.losses.focal import _bce_block, _block_rows
from detbalance.types import Reduction, one_hot_targets

__all__ = [
    "QualityFocalLoss",
    "VarifocalLoss",
    "aligned_box_iou",
    "quality_focal_loss",
    "quality_targets",
    "varifocal_loss",
]

_QFL, _VFL = 0, 1


def _quality_block(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    loss_id: int,
    params: tuple[float, float, bool],
    scale: float,
    loss_out: Tensor | None,
    grad_out: Tensor | None,
) -> Tensor | None:
    """One block: writes the loss into ``loss_out`` (or returns its sum) and ``scale * dL/dx`` into ``grad_out``.

    With ``d = p - y``, ``pq = p (1 - p)`` and a modulating power ``k`` (QFL: ``beta``; VFL negatives:
    ``gamma``), ``d/dx [|d|^k CE] = sign(d) |d|^(k - 1) (d^2 + k CE pq)``; for ``k = 2`` that is
    ``d (d^2 + 2 CE pq)``. VFL's positives have the constant weight ``q`` (or 1): ``d/dx = q d``.
    """
    p = torch.sigmoid(x)
    ce = _bce_block(x, y)
    d = p - y
    power = params[0] if loss_id == _QFL else params[1]
    a = None
    if power == 2:
        mod = d * d
    elif power == 0:
        mod = torch.ones_like(d)
    else:
        a = d.abs()
        if power < 1:
            a.clamp_min_(torch.finfo(d.dtype).tiny)
        mod = a.pow(power)
    # the per-element weight of the cross-entropy, and (for the gradient) of d
    if loss_id == _QFL:
        weight = mod
    else:
        alpha, _, iou_weighted = params
        pos = y > 0
        pos_w = y if iou_weighted else torch.ones((), dtype=y.dtype, device=y.device)
        mod = mod * alpha  # alpha |d|^gamma, the negatives' weight
        weight = torch.where(pos, pos_w, mod)
    if w is not None:
        weight = weight * w
    total = None
    if loss_out is not None:
        torch.mul(ce, weight, out=loss_out)
    else:
        total = torch.dot(ce.reshape(-1), weight.reshape(-1)) if weight.dim() else ce.sum() * weight
    if grad_out is None:
        return total
    direct = w is None and scale == 1.0  # write the last op straight into grad_out
    if loss_id != _QFL and power == 2:
        # VFL, gamma 2: dL/dx = d * [q on positives; alpha (d^2 + 2 CE pq) on negatives] (mod holds alpha d^2)
        pq = torch.addcmul(p, p, p, value=-1.0)
        factor = torch.where(pos, pos_w, torch.addcmul(mod, ce, pq, value=2.0 * params[0]))
        if w is not None:
            factor.mul_(w)
        if scale != 1.0:
            factor.mul_(scale)
        torch.mul(factor, d, out=grad_out)
        return total
    if power == 0:
        g = d
    else:
        pq = torch.addcmul(p, p, p, value=-1.0)
        if power == 2:  # QFL
            g = torch.addcmul(mod, ce, pq, value=2.0)
            if direct:
                torch.mul(g, d, out=grad_out)
                return total
            g.mul_(d)
        else:  # sign(d) |d|^(k - 1) (d^2 + k CE pq); |d| clamped above 0 for k < 1 (the limit at d = 0 is 0)
            g = torch.addcmul(d * d, ce, pq, value=power).mul_(a.pow(power - 1.0)).mul_(torch.sign(d))
    if loss_id != _QFL:  # VFL: alpha * that on the negatives, q d (or d) on the positives
        neg = g * params[0]
        posd = d * pos_w if params[2] else d
        if direct:
            torch.where(pos, posd, neg, out=grad_out)
            return total
        g = torch.where(pos, posd, neg)
    if w is not None:
        g = g * w
    if scale != 1.0:
        g = g * scale
    grad_out.copy_(g)
    return total


class _QualityFunction(torch.autograd.Function):
    """QFL / VFL forward with the closed-form gradient computed in the same sweep (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        targets: Tensor,
        weight: Tensor | None,
        loss_id: int,
        params: tuple[float, float, bool],
        reduction: str,
        need_grad: bool,
    ) -> Tensor:
        dtype = compute_dtype(logits)
        cols = logits.shape[-1] if logits.dim() > 0 else 1
        x2 = logits.reshape(-1, cols)
        y2 = targets.reshape(-1, cols)
        w2 = None
        if weight is not None:
            w2 = weight.expand(logits.shape).reshape(-1, cols) if weight.shape != logits.shape else weight.reshape(-1, cols)
        rows, n = x2.shape[0], x2.numel()
        grad = torch.empty(x2.shape, dtype=dtype, device=logits.device) if need_grad else None
        out = torch.empty(x2.shape, dtype=dtype, device=logits.device) if reduction == "none" else None
        total = torch.zeros((), dtype=dtype, device=logits.device)
        scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
        step = _block_rows(cols, logits.device)
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                w = None if w2 is None else w2[r0:r1].to(dtype)
                partial = _quality_block(
                    x2[r0:r1].to(dtype),
                    y2[r0:r1].to(dtype),
                    w,
                    loss_id,
                    params,
                    scale,
                    None if out is None else out[r0:r1],
                    None if grad is None else grad[r0:r1],
                )
                if partial is not None:
                    total.add_(partial)
        ctx.grad = grad
        ctx.grad_shape = logits.shape
        ctx.in_dtype = logits.dtype
        if out is not None:
            return out.reshape(logits.shape)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = ctx.grad.view(ctx.grad_shape)
        grad = (grad * grad_output.to(grad.dtype)).to(ctx.in_dtype)
        return grad, None, None, None, None, None, None


def _autograd_quality(
    logits: Tensor, targets: Tensor, weight: Tensor | None, loss_id: int, params: tuple[float, float, bool]
) -> Tensor:
    """Plain-autograd per-element loss (used when targets or weight need a gradient)."""
    dtype = compute_dtype(logits, targets)
    x, y = logits.to(dtype), targets.to(dtype)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if loss_id == _QFL:
        loss = ce * (y - p).abs().pow(params[0])
    else:
        alpha, gamma, iou_weighted = params
        pos = y > 0
        loss = ce * torch.where(pos, y if iou_weighted else torch.ones_like(y), alpha * (p - y).abs().pow(gamma))
    return loss if weight is None else loss * weight.to(dtype)


def _check_inputs(
    logits: Tensor, targets: Tensor, weight: Tensor | None, reduction: str, validate_args: bool | None
) -> Tensor | None:
    check_floating("logits", logits)
    if not isinstance(targets, Tensor) or not targets.is_floating_point():
        raise ValueError(
            "targets must be a floating-point tensor of soft (IoU) targets in [0, 1], shaped like logits; build it "
            f"from labels and IoUs with quality_targets(), got {getattr(targets, 'dtype', type(targets).__name__)}"
        )
    check_same_shape("logits", logits, "targets", targets)
    check_reduction(reduction)
    weight = elementwise_mask("weight", weight, logits)
    if should_validate(validate_args, logits):
        check_targets_in_unit_interval("targets (IoU quality)", targets)
        if logits.numel() and bool(torch.isnan(logits.detach()).any()):
            bad = int(torch.isnan(logits.detach()).sum())
            raise ValueError(f"logits must not be NaN, got {bad} NaN element(s) (a diverged classifier?)")
    return weight


def _apply(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor | None,
    loss_id: int,
    params: tuple[float, float, bool],
    reduction: str,
) -> Tensor:
    if targets.requires_grad or (weight is not None and weight.requires_grad):
        return reduce_loss(_autograd_quality(logits, targets, weight, loss_id, params), reduction)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    return _QualityFunction.apply(logits, targets, weight, loss_id, params, reduction, need_grad)


def quality_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    beta: float = 2.0,
    weight: Tensor | None = None,
    reduction: Reduction = "none",
    validate_args: bool | None = None,
) -> Tensor:
    """Quality Focal Loss ``|y - sigma(x)|^beta * BCE(x, y)`` per element (Li et al., NeurIPS 2020, eq. 5).

    Equals mmdetection 3.3's ``quality_focal_loss`` / ``quality_focal_loss_tensor_target`` (summed over
    classes there) in value and gradient. ``beta = 0`` is binary cross-entropy with soft targets.

    Args:
        logits: ``Tensor[..., K]`` raw scores (any floating dtype; fp16/bf16 are computed in float32).
        targets: ``Tensor[..., K]`` soft targets in ``[0, 1]``: a positive's IoU quality in its class column,
            0 elsewhere (:func:`quality_targets`).
        beta: exponent of the modulating factor ``|y - p|``, ``>= 0``.
        weight: optional per-element ``Tensor[..., K]`` or per-row ``Tensor[...]`` multiplier.
        reduction: ``'none'`` (``Tensor[..., K]``), ``'sum'`` or ``'mean'`` (over all elements).
        validate_args: check that ``targets`` lie in ``[0, 1]`` and ``logits`` hold no NaN (two host syncs);
            ``None`` checks unless the input is on CUDA.

    Returns:
        float32 (float64 for float64 input) loss, reduced as asked.

    Raises:
        ValueError: mismatched shapes, non-float targets, ``beta < 0``, targets outside ``[0, 1]`` or NaN logits
            (when validated), an unknown ``reduction``.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(1, 2), torch.tensor([[0.5, 0.0]])
        >>> quality_focal_loss(x, y)  # |0.5 - 0.5|^2 * BCE = 0 ; 0.5^2 * log 2
        tensor([[0.0000, 0.1733]])
    """
    check_nonnegative("beta", beta)
    weight = _check_inputs(logits, targets, weight, reduction, validate_args)
    return _apply(logits, targets, weight, _QFL, (float(beta), 0.0, False), reduction)


def varifocal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    weight: Tensor | None = None,
    reduction: Reduction = "none",
    validate_args: bool | None = None,
) -> Tensor:
    """Varifocal Loss per element (Zhang et al., CVPR 2021, eq. 2).

    ``q * BCE(x, q)`` where the target ``q > 0`` (``BCE(x, q)`` with ``iou_weighted=False``) and
    ``alpha * |sigma(x) - q|^gamma * BCE(x, q)`` where ``q <= 0``: positives keep their full (IoU-weighted)
    loss, only negatives are down-weighted. Equals mmdetection 3.3's ``varifocal_loss`` in value and gradient.

    Args:
        logits: ``Tensor[..., K]`` raw scores.
        targets: ``Tensor[..., K]`` IoU-aware targets in ``[0, 1]`` (:func:`quality_targets`).
        alpha: weight of the negative term, ``>= 0`` (0.75; not focal loss's alpha).
        gamma: exponent on the negatives' score, ``>= 0``.
        iou_weighted: weight each positive by its target ``q``.
        weight: optional per-element or per-row multiplier.
        reduction: ``'none'``, ``'sum'`` or ``'mean'``.
        validate_args: as :func:`quality_focal_loss`.

    Returns:
        float32 (float64 for float64 input) loss, reduced as asked.

    Raises:
        ValueError: as :func:`quality_focal_loss`, and for ``alpha < 0`` or ``gamma < 0``.

    Example:
        >>> import torch
        >>> varifocal_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.0]]))  # 0.5 log 2 ; 0.75 * 0.25 log 2
        tensor([[0.3466, 0.1300]])
    """
    check_nonnegative("alpha", alpha)
    check_nonnegative("gamma", gamma)
    if not isinstance(iou_weighted, bool):
        raise ValueError(f"iou_weighted must be a bool, got {iou_weighted!r}")
    weight = _check_inputs(logits, targets, weight, reduction, validate_args)
    return _apply(logits, targets, weight, _VFL, (float(alpha), float(gamma), iou_weighted), reduction)


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, *, eps: float = 1e-6) -> Tensor:
    """IoU of each box with the box at the same index (mmdetection's ``bbox_overlaps(..., is_aligned=True)``).

    Args:
        boxes1: ``Tensor[..., 4]`` ``(x1, y1, x2, y2)``.
        boxes2: ``Tensor[..., 4]``, same shape.
        eps: lower bound of the union (as mmdetection: degenerate pairs give 0, never NaN).

    Returns:
        ``Tensor[...]`` in ``[0, 1]`` for valid boxes.
    """
    check_same_shape("boxes1", boxes1, "boxes2", boxes2)
    if boxes1.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(boxes1.shape)}")
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    wh = (torch.minimum(boxes1[..., 2:], boxes2[..., 2:]) - torch.maximum(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    return overlap / (area1 + area2 - overlap).clamp(min=eps)


def quality_targets(
    labels: Tensor, quality: Tensor, *, num_classes: int, validate_args: bool | None = None
) -> Tensor:
    """Soft one-vs-all targets ``Tensor[..., K]``: ``quality`` in the column of each positive's class, else 0.

    Args:
        labels: ``Tensor[...]`` int64 in ``-1..K`` (``-1`` ignore, ``0`` background, see
            :mod:`detbalance.types`); ignored and background rows get all-zero targets.
        quality: ``Tensor[...]`` in ``[0, 1]``, the positives' localisation quality (IoU); read only where
            ``labels > 0``.
        num_classes: ``K``.
        validate_args: check labels in ``-1..K`` and the positives' quality in ``[0, 1]`` (host syncs);
            ``None`` checks unless on CUDA.

    Returns:
        ``Tensor[..., K]`` of ``quality``'s floating dtype.

    Raises:
        ValueError: a label outside ``-1..K`` or a positive's quality outside ``[0, 1]`` (when validated), or
            shapes that do not match.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    check_floating("quality", quality)
    check_same_shape("labels", labels, "quality", quality)
    validate = should_validate(validate_args, quality)
    onehot = one_hot_targets(labels, num_classes, dtype=quality.dtype, validate_args=validate)
    q = torch.where(labels > 0, quality, torch.zeros((), dtype=quality.dtype, device=quality.device))
    if validate:
        check_targets_in_unit_interval("quality (IoU of the positives)", q)
    return onehot * q.unsqueeze(-1)


class _QualityLoss(DetectionLoss):
    """Shared part of the two modules: the dense-head target (IoU of the detached decoded box, positives)."""

    kind = "sigmoid"
    self_normalizing = False
    iou_floor: float | None = None

    def dense_targets(self, batch: AnchorBatch) -> Tensor:
        """IoU-quality targets ``Tensor[N, K]`` for a dense head (see the class docstring)."""
        with torch.no_grad():
            iou = aligned_box_iou(batch.pred_boxes.detach().float(), batch.matched_boxes.float())
            if self.iou_floor is not None:
                iou = iou.clamp(min=self.iou_floor)
            targets = quality_targets(
                batch.labels, iou, num_classes=batch.logits.shape[-1], validate_args=False
            )
        return targets.to(batch.logits.dtype if batch.logits.dtype == torch.float64 else torch.float32)


class QualityFocalLoss(_QualityLoss):
    """Module form of :func:`quality_focal_loss`, with GFL's dense-head target.

    On a dense head (:meth:`dense_targets`) a positive's target is the IoU of its decoded, detached predicted box
    with its matched ground truth (``GFLHead``: no floor, so an IoU of 0 trains the class column towards 0),
    every other element's 0. Prior initialisation (``bias_prob`` 0.01) and the positive-count normaliser are
    the adapter's defaults, as in ``GFLHead``.

    Args:
        beta: modulating exponent (2, GFL).
        reduction: ``'none'`` for the adapters.
    """

    def __init__(self, *, beta: float = 2.0, reduction: Reduction = "none") -> None:
        super().__init__()
        check_nonnegative("beta", beta)
        check_reduction(reduction)
        self.beta, self.reduction = float(beta), reduction

    def forward(self, logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
        return quality_focal_loss(logits, targets, beta=self.beta, weight=weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"


class VarifocalLoss(_QualityLoss):
    """Module form of :func:`varifocal_loss`, with VarifocalNet's dense-head target.

    On a dense head a positive's target is the IoU of its decoded, detached predicted box with its matched
    ground truth, clamped below at ``iou_floor`` (``VFNetHead``: ``1e-6``, so every positive stays a positive of
    the loss, which tells them apart by ``q > 0``).

    Args:
        alpha: negatives' weight (0.75).
        gamma: negatives' exponent (2).
        iou_weighted: weight positives by their IoU (True).
        iou_floor: lower clamp of the positives' IoU target (``1e-6``; ``None`` disables it).
        reduction: ``'none'`` for the adapters.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.75,
        gamma: float = 2.0,
        iou_weighted: bool = True,
        iou_floor: float | None = 1e-6,
        reduction: Reduction = "none",
    ) -> None:
        super().__init__()
        check_nonnegative("alpha", alpha)
        check_nonnegative("gamma", gamma)
        if not isinstance(iou_weighted, bool):
            raise ValueError(f"iou_weighted must be a bool, got {iou_weighted!r}")
        if iou_floor is not None and not (isinstance(iou_floor, int | float) and 0.0 <= iou_floor <= 1.0):
            raise ValueError(f"iou_floor must be None or a number in [0, 1], got {iou_floor!r}")
        check_reduction(reduction)
        self.alpha, self.gamma, self.iou_weighted = float(alpha), float(gamma), iou_weighted
        self.iou_floor = None if iou_floor is None else float(iou_floor)
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
        return varifocal_loss(
            logits,
            targets,
            alpha=self.alpha,
            gamma=self.gamma,
            iou_weighted=self.iou_weighted,
            weight=weight,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, gamma={self.gamma}, iou_weighted={self.iou_weighted}, "
            f"iou_floor={self.iou_floor}, reduction={self.reduction!r}"
        )
