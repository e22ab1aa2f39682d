"""Box-regression losses: smooth L1, authentic smooth L1 (ASL1), balanced L1 (Libra R-CNN), L1 and GIoU.

All compute in float32 for fp16/bf16 inputs and under autocast (float64 stays float64), and default to
``reduction="none"``: the detector adapter sums per image and divides by the positive count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from detbalance.losses._reduction import (
    check_floating,
    check_none_on_device,
    check_nonnegative,
    check_positive,
    check_reduction,
    check_same_shape,
    compute_dtype,
    reduce_loss,
)
from detbalance.losses.contract import DetectionLoss
from detbalance.types import Reduction

__all__ = [
    "ASL1Loss",
    "BalancedL1Loss",
    "GIoULoss",
    "L1Loss",
    "SmoothL1Loss",
    "asl1_loss",
    "balanced_l1_loss",
    "smooth_l1_loss",
]


def _check_pair(pred: Tensor, target: Tensor, reduction: str) -> torch.dtype:
    check_floating("pred", pred)
    check_same_shape("pred", pred, "target", target)
    check_reduction(reduction)
    return compute_dtype(pred, target)


def smooth_l1_loss(
    pred: Tensor, target: Tensor, *, beta: float = 1.0 / 9.0, reduction: Reduction = "none"
) -> Tensor:
    """Smooth L1 (Fast R-CNN, Girshick 2015): ``0.5 d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 beta``.

    Equals ``F.smooth_l1_loss(pred, target, beta=beta)``; ``beta = 0`` is the L1 loss. The default ``1/9`` is
    torchvision's detection default.

    Args:
        pred: ``Tensor[..., 4]`` predicted box deltas.
        target: ``Tensor[..., 4]`` target deltas (same shape).
        beta: transition point ``>= 0``.
        reduction: ``'none'``, ``'mean'`` or ``'sum'``.
    """
    dtype = _check_pair(pred, target, reduction)
    check_nonnegative("beta", beta)
    with torch.autocast(pred.device.type, enabled=False):
        loss = F.smooth_l1_loss(pred.to(dtype), target.to(dtype), beta=float(beta), reduction="none")
    return reduce_loss(loss, reduction)


def _asl1(d: Tensor, mu: float) -> Tensor:
    # sqrt(d^2 + mu^2) - mu, rewritten as d^2 / (sqrt(d^2 + mu^2) + mu) to avoid cancellation for |d| << mu.
    return d * d / (torch.sqrt(d * d + mu * mu) + mu)


def asl1_loss(pred: Tensor, target: Tensor, *, mu: float = 0.02, reduction: Reduction = "none") -> Tensor:
    """Authentic smooth L1 (GHM paper, eq. 7): ``ASL1(d) = sqrt(d^2 + mu^2) - mu``, ``d = pred - target``.

    Its gradient ``d / sqrt(d^2 + mu^2)`` is smooth everywhere and has norm in ``[0, 1)``, which is what
    GHM-R bins.

    Args:
        pred: ``Tensor[..., 4]`` predicted deltas.
        target: ``Tensor[..., 4]`` target deltas.
        mu: smoothness ``> 0`` (paper: 0.02).
        reduction: ``'none'``, ``'mean'`` or ``'sum'``.
    """
    dtype = _check_pair(pred, target, reduction)
    check_positive("mu", mu)
    with torch.autocast(pred.device.type, enabled=False):
        loss = _asl1(pred.to(dtype) - target.to(dtype), float(mu))
    return reduce_loss(loss, reduction)


def balanced_l1_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: Reduction = "none",
) -> Tensor:
    r"""Balanced L1 loss (Pang et al., "Libra R-CNN", CVPR 2019, https://arxiv.org/abs/1904.02701, eq. 8).

    With :math:`x = |pred - target|` and :math:`b` from :math:`\alpha \ln(b + 1) = \gamma` (continuity at
    :math:`x = \beta`, the paper's eq. 9 generalised to a transition at ``beta`` as mmdetection does):

    .. math::
        L_b(x) = \begin{cases}
            \frac{\alpha}{b} (b x + 1) \ln(\frac{b x}{\beta} + 1) - \alpha x & x < \beta \\
            \gamma x + \frac{\gamma}{b} - \alpha \beta & \text{otherwise}
        \end{cases}

    It raises the gradient of the inliers (:math:`x < \beta`, :math:`\partial L / \partial x =
    \alpha \ln(b x / \beta + 1)`) and clips that of the outliers at :math:`\gamma`. Defaults are the paper's
    and mmdetection 3.3's ``configs/libra_rcnn`` (alpha 0.5, gamma 1.5, beta 1.0); the values equal
    mmdetection's ``balanced_l1_loss`` (``tests/reference/mmdet_libra.py``).

    Args:
        pred: ``Tensor[..., 4]`` predicted box deltas.
        target: ``Tensor[..., 4]`` target deltas (same shape).
        alpha: Inlier gradient scale ``> 0``.
        gamma: Outlier gradient bound ``> 0``.
        beta: Inlier/outlier transition ``> 0``.
        reduction: ``'none'``, ``'mean'`` or ``'sum'``.

    Returns:
        The loss per element (``reduction='none'``), or its mean or sum.

    Example:
        >>> import torch
        >>> round(float(balanced_l1_loss(torch.tensor([2.0]), torch.tensor([0.0]))), 4)  # 1.5 * 2 + 1.5 / b - 0.5
        2.5786
    """
    dtype = _check_pair(pred, target, reduction)
    check_positive("alpha", alpha)
    check_positive("gamma", gamma)
    check_positive("beta", beta)
    b = math.exp(gamma / alpha) - 1.0
    with torch.autocast(pred.device.type, enabled=False):
        x = (pred.to(dtype) - target.to(dtype)).abs()
        inlier = alpha / b * (b * x + 1.0) * torch.log1p(b * x / beta) - alpha * x
        outlier = gamma * x + (gamma / b - alpha * beta)
        loss = torch.where(x < beta, inlier, outlier)
    return reduce_loss(loss, reduction)


class SmoothL1Loss(DetectionLoss):
    """Module form of :func:`smooth_l1_loss`."""

    kind = "box"
    self_normalizing = False

    def __init__(self, *, beta: float = 1.0 / 9.0, reduction: Reduction = "none") -> None:
        super().__init__()
        check_nonnegative("beta", beta)
        check_reduction(reduction)
        self.beta, self.reduction = beta, reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return smooth_l1_loss(pred, target, beta=self.beta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"


class ASL1Loss(DetectionLoss):
    """Module form of :func:`asl1_loss`."""

    kind = "box"
    self_normalizing = False

    def __init__(self, *, mu: float = 0.02, reduction: Reduction = "none") -> None:
        super().__init__()
        check_positive("mu", mu)
        check_reduction(reduction)
        self.mu, self.reduction = mu, reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return asl1_loss(pred, target, mu=self.mu, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, reduction={self.reduction!r}"


class BalancedL1Loss(DetectionLoss):
    """Module form of :func:`balanced_l1_loss` (Libra R-CNN; alpha 0.5, gamma 1.5, beta 1.0)."""

    kind = "box"
    self_normalizing = False

    def __init__(self, *, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0,
                 reduction: Reduction = "none") -> None:
        super().__init__()
        check_positive("alpha", alpha)
        check_positive("gamma", gamma)
        check_positive("beta", beta)
        check_reduction(reduction)
        self.alpha, self.gamma, self.beta, self.reduction = alpha, gamma, beta, reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return balanced_l1_loss(pred, target, alpha=self.alpha, gamma=self.gamma, beta=self.beta,
                                reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, reduction={self.reduction!r}"


class L1Loss(DetectionLoss):
    """``|pred - target|`` per element (RetinaNet's box loss in torchvision), computed in float32."""

    kind = "box"
    self_normalizing = False

    def __init__(self, *, reduction: Reduction = "none") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        dtype = _check_pair(pred, target, self.reduction)
        with torch.autocast(pred.device.type, enabled=False):
            loss = (pred.to(dtype) - target.to(dtype)).abs()
        return reduce_loss(loss, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class GIoULoss(DetectionLoss):
    """Generalized IoU loss (Rezatofighi et al., CVPR 2019), ``1 - GIoU``, on *decoded* boxes.

    ``forward(pred_boxes, target_boxes)`` takes ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` boxes and returns
    ``Tensor[N]`` (with ``reduction='none'``); it calls ``torchvision.ops.generalized_box_iou_loss`` in float32.

    Inverted boxes: a *predicted* box with ``x2 < x1`` (or ``y2 < y1``) is clamped to an empty box
    (``x2 = x1``, ``y2 = y1``): it overlaps nothing, so its loss is at least 1 and its gradient moves ``x1``/
    ``y1`` towards the target (torchvision's function would read it as a box of area ``(x1 - x2)(y1 - y2)``).
    A *target* box with ``x2 < x1`` or ``y2 < y1`` is an error (``ValueError`` on the CPU; on CUDA an
    asynchronous device assertion, no host sync, unless ``validate_args=True``).

    Args:
        eps: Added to denominators (torchvision's default).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        validate_args: Check the target boxes: ``None`` (default) on the CPU at once and on CUDA without a host
            sync (an asynchronous assertion); ``True`` at once everywhere; ``False`` never.
    """

    kind = "box"
    decoded_boxes = True
    self_normalizing = False

    def __init__(self, *, eps: float = 1e-7, reduction: Reduction = "none", validate_args: bool | None = None) -> None:
        super().__init__()
        check_positive("eps", eps)
        check_reduction(reduction)
        self.eps, self.reduction, self.validate_args = eps, reduction, validate_args

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        dtype = _check_pair(pred, target, self.reduction)
        if pred.shape[-1] != 4:
            raise ValueError(f"pred must be boxes Tensor[N, 4], got shape {tuple(pred.shape)}")
        if self.validate_args is not False:
            check_none_on_device(
                (target[..., 2:] < target[..., :2]).any(-1),
                "GIoULoss: a target box has x2 < x1 or y2 < y1 (target boxes must be (x1, y1, x2, y2))",
                validate_args=self.validate_args,
            )
        with torch.autocast(pred.device.type, enabled=False):
            p = pred.to(dtype)
            lo = p[..., :2]
            p = torch.cat([lo, torch.maximum(p[..., 2:], lo)], dim=-1)  # inverted -> empty box at (x1, y1)
            loss = generalized_box_iou_loss(p, target.to(dtype), reduction="none", eps=self.eps)
        return reduce_loss(loss, self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}, validate_args={self.validate_args}"
