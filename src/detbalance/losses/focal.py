"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv 1708.02002).

.. math::

    \\mathrm{FL}(p_t) = -\\alpha_t (1 - p_t)^{\\gamma} \\log(p_t),\\qquad
    p_t = p\\,y + (1 - p)(1 - y),\\quad \\alpha_t = \\alpha\\,y + (1 - \\alpha)(1 - y)

``gamma = 0`` gives alpha-balanced cross-entropy (the paper's "alpha-CE", best at ``alpha = 0.75``);
``alpha = None`` removes the class-balancing factor, so ``gamma = 0, alpha = None`` is plain
binary cross-entropy. Labels follow :mod:`detbalance.types` (``-1`` ignore, ``0`` background, ``1..K``).

:func:`sigmoid_focal_loss` equals ``torchvision.ops.sigmoid_focal_loss`` in value and gradient, but is a
custom :class:`torch.autograd.Function`: it processes the input in cache-sized row blocks, computes the loss
and its closed-form gradient in one sweep (sharing ``sigmoid``, the cross-entropy and the modulating factor),
and keeps only the gradient for the backward pass. Temporaries are block-sized, so the peak allocation is
about one gradient-sized buffer instead of torchvision's ~10 logits-sized temporaries, and the time is close
to ``binary_cross_entropy_with_logits`` (see ``benchmarks/bm_losses.py``). Computation is float32 for
fp16/bf16 inputs and under autocast (torchvision's fp16 sum overflows to ``inf``); float64 stays float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from detbalance.losses._reduction import (
    check_floating,
    check_nonnegative,
    check_probability,
    check_reduction,
    check_same_shape,
    check_targets_in_unit_interval,
    compute_dtype,
    elementwise_mask,
    reduce_loss,
    should_validate,
)
from detbalance.losses.contract import DetectionLoss
from detbalance.types import IGNORE, Reduction

__all__ = [
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "sigmoid_focal_gradient",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
]

# Elements per block (1 MiB of float32 on CPU): a dozen block temporaries stay in the L3 cache, the per-op
# Python overhead is amortised, and the number of intra-op parallel regions (each an OpenMP barrier) stays
# moderate. On CUDA blocks only bound the temporary memory (a few kernel launches per 16 MiB block).
_CPU_BLOCK = 1 << 18
_CUDA_BLOCK = 1 << 22


def _block_rows(num_cols: int, device: torch.device) -> int:
    block = _CUDA_BLOCK if device.type == "cuda" else _CPU_BLOCK
    return max(1, block // max(1, num_cols))


def _bce_block(x: Tensor, y: Tensor) -> Tensor:
    """``binary_cross_entropy_with_logits(x, y, reduction="none")`` from vectorised ops only.

    ``CE = max(x, 0) - x y + log1p(exp(-|x|)) = max(x, 0) - x y - log(1 - s)`` with ``s = sigmoid(-|x|)``.
    ``log(1 - s)`` is ``log(u) - ((u - 1) + s) / u`` for ``u = fl(1 - s)``, which corrects the rounding of
    ``u`` (first order), so the result is accurate to a few ulps *relative* for every sign of ``x`` and ``y``
    (PyTorch's own BCE loses relative accuracy for confident negatives). On CPU ``log1p``/``softplus``/
    ``log_sigmoid`` are not vectorised and cost ~5x more than this whole sequence.
    """
    s = torch.sigmoid(x.abs().neg_())
    u = torch.rsub(s, 1.0)
    correction = (u - 1.0).add_(s).div_(u)
    log_one_minus_s = u.log_().sub_(correction)
    return x.clamp_min(0.0).addcmul_(x, y, value=-1.0).sub_(log_one_minus_s)


def _focal_block(
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    alpha: float | None,
    gamma: float,
    grad_scale: float | None,
    loss_out: Tensor | None,
    grad_out: Tensor | None,
) -> Tensor | None:
    """One block: writes the loss into ``loss_out`` (or returns its sum) and the gradient into ``grad_out``.

    With ``u = 1 - p_t = p + y (1 - 2p)``, ``du/dx = p (1 - p)(1 - 2y)`` and ``dCE/dx = p - y``:

        d FL / dx = alpha_t [ u^gamma (p - y) + gamma u^(gamma - 1) p (1 - p)(1 - 2y) CE ].

    The cross-entropy comes from :func:`_bce_block`.
    """
    p = torch.sigmoid(x)
    ce = _bce_block(x, y)
    if gamma != 0:
        u = torch.addcmul(p, y, torch.rsub(p, 1.0, alpha=2.0))  # 1 - p_t
        mod = u * u if gamma == 2 else (u if gamma == 1 else u.pow(gamma))
        loss = ce * mod
    else:
        u = mod = None
        loss = ce
    at = None
    if alpha is not None:
        at = y * (2.0 * alpha - 1.0)
        at.add_(1.0 - alpha)
        if w is not None:
            at.mul_(w)
    elif w is not None:
        at = w.expand_as(x)
    total = None
    if loss_out is not None:
        if at is not None:
            torch.mul(loss, at, out=loss_out)
        else:
            loss_out.copy_(loss)
    elif at is not None:
        total = torch.dot(loss.reshape(-1), at.reshape(-1).to(loss.dtype))
    else:
        total = loss.sum()
    if grad_out is None:
        return total
    grad = torch.sub(p, y)
    if mod is not None:
        grad.mul_(mod)
        q = torch.addcmul(p, p, p, value=-1.0)  # p (1 - p)
        q.mul_(torch.rsub(y, 1.0, alpha=2.0)).mul_(ce)  # du/dx * CE
        if gamma == 1:
            grad.add_(q)
        elif gamma == 2:
            grad.addcmul_(q, u, value=2.0)
        else:
            # u == 0 only where p (1 - p) == 0, so clamping keeps 0 * u^(gamma - 1) finite (= 0) for gamma < 1.
            grad.addcmul_(q, u.clamp(min=torch.finfo(u.dtype).tiny).pow_(gamma - 1.0), value=gamma)
    if grad_scale is not None:
        grad.mul_(grad_scale)
    if at is not None and grad_out.dtype == grad.dtype:
        torch.mul(grad, at, out=grad_out)
    else:
        grad_out.copy_(grad if at is None else grad.mul_(at))
    return total


class _SigmoidFocalFunction(torch.autograd.Function):
    """Blocked forward that also writes the closed-form gradient; backward multiplies it by grad_output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        targets: Tensor,
        weight: Tensor | None,
        alpha: float | None,
        gamma: float,
        reduction: str,
        need_grad: bool,
    ) -> Tensor:
        dtype = compute_dtype(logits)
        cols = logits.shape[-1] if logits.dim() > 0 else 1
        x2 = logits.reshape(-1, cols)
        y2 = targets.reshape(-1, cols)
        w2 = None if weight is None else weight.reshape(-1, weight.shape[-1] if weight.dim() else 1)
        rows = x2.shape[0]
        n = x2.numel()
        # The gradient is kept in the compute dtype (float32 for fp16/bf16 input) with 1/N applied, and cast to
        # the input dtype once, after multiplying by grad_output: an fp16 buffer would flush most "mean"
        # gradients to zero and overflow under GradScaler's 2^16.
        grad = torch.empty(x2.shape, dtype=dtype, device=logits.device) if need_grad else None
        out = torch.empty(x2.shape, dtype=dtype, device=logits.device) if reduction == "none" else None
        total = torch.zeros((), dtype=dtype, device=logits.device)
        grad_scale = 1.0 / max(n, 1) if reduction == "mean" else None
        step = _block_rows(cols, logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                x = x2[r0:r1].to(dtype)
                y = y2[r0:r1].to(dtype)
                w = None if w2 is None else w2[r0:r1].to(dtype)
                partial = _focal_block(
                    x,
                    y,
                    w,
                    alpha,
                    gamma,
                    grad_scale,
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
        return total if reduction == "sum" else total / max(n, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        # Out of place: the saved gradient stays valid for a second backward (retain_graph, gradcheck).
        grad = ctx.grad.view(ctx.grad_shape)
        grad = (grad * grad_output.to(grad.dtype)).to(ctx.in_dtype)
        return grad, None, None, None, None, None, None


def _sigmoid_focal_autograd(
    logits: Tensor, targets: Tensor, weight: Tensor | None, alpha: float | None, gamma: float
) -> Tensor:
    """Plain-autograd per-element focal loss (used when targets or weight need a gradient)."""
    dtype = compute_dtype(logits, targets)
    x, y = logits.to(dtype), targets.to(dtype)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    loss = ce
    if gamma != 0:
        u = p + y * (1.0 - 2.0 * p)
        loss = ce * u.clamp(min=torch.finfo(dtype).tiny).pow(gamma) if gamma < 1 else ce * u.pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * y + (1.0 - alpha) * (1.0 - y))
    if weight is not None:
        loss = loss * weight.to(dtype)
    return loss


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    weight: Tensor | None = None,
    reduction: Reduction = "none",
    validate_args: bool | None = None,
) -> Tensor:
    """Sigmoid (one-vs-all) focal loss, ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` per element.

    Equals ``torchvision.ops.sigmoid_focal_loss`` (values and gradients), faster and with a small,
    block-sized memory footprint (see the module docstring).

    Args:
        logits: ``Tensor[..., K]`` raw scores, any floating dtype (fp16/bf16 are computed in float32).
        targets: ``Tensor[..., K]`` in ``[0, 1]`` (one-vs-all targets, see
            :func:`detbalance.types.one_hot_targets`); soft targets are allowed.
        alpha: weight of the positive term, ``1 - alpha`` for the negative term; ``None`` disables it.
        gamma: focusing parameter ``>= 0``; ``0`` gives (alpha-balanced) cross-entropy.
        weight: optional per-element ``Tensor[..., K]`` or per-row ``Tensor[...]`` multiplier (use 0 to
            ignore an anchor).
        reduction: ``'none'`` (``Tensor[..., K]``), ``'sum'`` or ``'mean'`` (over all elements; an empty
            input gives 0).
        validate_args: check that ``targets`` lie in ``[0, 1]`` (one extra pass, one host sync); ``None``
            checks on the CPU only, so the CUDA hot path has no host synchronisation.

    Returns:
        float32 (float64 for float64 input) loss, reduced as asked.

    Raises:
        ValueError: on mismatched shapes, ``gamma < 0``, ``alpha`` outside ``[0, 1]``, targets outside
            ``[0, 1]`` (when validated) or an unknown ``reduction``.

    Note:
        When ``logits`` requires grad, the gradient is computed in the forward sweep and kept (one
        logits-sized buffer) until the graph is freed; it is not twice differentiable. When ``targets`` or
        ``weight`` require grad, a plain autograd implementation is used instead.
    """
    check_floating("logits", logits)
    check_same_shape("logits", logits, "targets", targets)
    check_probability("alpha", alpha)
    check_nonnegative("gamma", gamma)
    check_reduction(reduction)
    weight = elementwise_mask("weight", weight, logits)
    if should_validate(validate_args, targets):
        check_targets_in_unit_interval("targets", targets)
    alpha = None if alpha is None else float(alpha)
    gamma = float(gamma)
    if targets.requires_grad or (weight is not None and weight.requires_grad):
        loss = _sigmoid_focal_autograd(logits, targets, weight, alpha, gamma)
        return reduce_loss(loss, reduction)
    need_grad = logits.requires_grad and torch.is_grad_enabled()  # no gradient sweep under no_grad/inference
    return _SigmoidFocalFunction.apply(logits, targets, weight, alpha, gamma, reduction, need_grad)


def sigmoid_focal_gradient(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    r"""Elementwise derivative ``d FL / d x`` of the sigmoid focal loss: the one its custom backward uses.

    .. math:: \frac{\partial FL}{\partial x} = \alpha_t \left[u^{\gamma}(p - y)
        + \gamma u^{\gamma - 1} p (1 - p)(1 - 2y)\,CE\right],\quad u = 1 - p_t

    Args:
        logits: ``Tensor[..., K]`` raw scores.
        targets: ``Tensor[..., K]`` in ``[0, 1]``.
        alpha: weight of the positive term (``None``: no balancing).
        gamma: focusing parameter ``>= 0``.

    Returns:
        ``Tensor[..., K]`` float32 (float64 for float64 input), no graph. ``gamma = 0, alpha = None`` gives
        ``sigmoid(x) - y``, the cross-entropy gradient.

    Example:
        >>> import torch
        >>> sigmoid_focal_gradient(torch.zeros(1, 1), torch.zeros(1, 1), alpha=None, gamma=0.0)
        tensor([[0.5000]])
    """
    check_floating("logits", logits)
    check_same_shape("logits", logits, "targets", targets)
    check_probability("alpha", alpha)
    check_nonnegative("gamma", gamma)
    dtype = compute_dtype(logits)
    cols = logits.shape[-1] if logits.dim() > 0 else 1
    x2, y2 = logits.detach().reshape(-1, cols), targets.detach().reshape(-1, cols)
    grad = torch.empty(x2.shape, dtype=dtype, device=logits.device)
    step = _block_rows(cols, logits.device)
    a = None if alpha is None else float(alpha)
    with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
        for r0 in range(0, x2.shape[0], step):
            r1 = min(x2.shape[0], r0 + step)
            _focal_block(x2[r0:r1].to(dtype), y2[r0:r1].to(dtype), None, a, float(gamma), None, None, grad[r0:r1])
    return grad.reshape(logits.shape)


def softmax_focal_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float | Tensor | None = None,
    gamma: float = 2.0,
    ignore_index: int = IGNORE,
    weight: Tensor | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Softmax (multi-class) focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` with ``p_t = softmax(x)[label]``.

    With ``gamma=0, alpha=None`` this is ``F.cross_entropy(logits, labels, ignore_index=ignore_index)``.
    The modulating factor is differentiated through, as in the focal-loss paper.

    Args:
        logits: ``Tensor[N, C]`` scores, column 0 the background (``C = K + 1``).
        labels: ``Tensor[N]`` int64 in ``0..C-1`` or ``ignore_index`` (label convention of
            :mod:`detbalance.types`).
        alpha: ``None`` (no balancing); a float, weighting foreground (label > 0) by ``alpha`` and background
            (label 0) by ``1 - alpha``; or a per-class ``Tensor[C]`` (``alpha_t = alpha[label]``).
        gamma: focusing parameter ``>= 0``.
        ignore_index: label value that takes no part in the loss (loss 0, not counted by ``'mean'``).
        weight: optional per-example ``Tensor[N]`` multiplier.
        reduction: ``'none'`` (``Tensor[N]``, 0 at ignored rows), ``'sum'``, or ``'mean'`` (sum divided by
            the number of non-ignored rows, at least 1).

    Returns:
        float32 (float64 for float64 input) loss.
    """
    check_floating("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    check_nonnegative("gamma", gamma)
    check_reduction(reduction)
    num_classes = logits.shape[1]
    if isinstance(alpha, Tensor):
        if alpha.shape != (num_classes,):
            raise ValueError(f"alpha must have shape ({num_classes},), got {tuple(alpha.shape)}")
    else:
        check_probability("alpha", alpha)
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"weight must have shape {tuple(labels.shape)}, got {tuple(weight.shape)}")
    keep = labels != ignore_index
    if labels.numel():
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()  # one host sync for validation
        if (lo < 0 and lo != ignore_index) or hi >= num_classes and hi != ignore_index:
            bad = labels[keep & ((labels < 0) | (labels >= num_classes))]
            if bad.numel():
                raise ValueError(
                    f"labels must lie in [0, {num_classes - 1}] or equal ignore_index={ignore_index}, "
                    f"got {int(bad[0])}"
                )
    dtype = compute_dtype(logits)
    with torch.autocast(logits.device.type, enabled=False):
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        logp_t = F.log_softmax(logits.to(dtype), dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -logp_t
        if gamma != 0:
            u = -torch.expm1(logp_t)  # 1 - p_t, accurate near p_t = 1
            loss = loss * (u.clamp(min=torch.finfo(dtype).tiny) if gamma < 1 else u).pow(gamma)
        if isinstance(alpha, Tensor):
            loss = loss * alpha.to(device=loss.device, dtype=dtype)[safe]
        elif alpha is not None:
            loss = loss * torch.where(safe > 0, alpha, 1.0 - alpha).to(dtype)
        if weight is not None:
            loss = loss * weight.to(dtype)
        loss = torch.where(keep, loss, torch.zeros((), dtype=dtype, device=loss.device))
    return reduce_loss(loss, reduction, count=keep.sum())


class SigmoidFocalLoss(DetectionLoss):
    """Module form of :func:`sigmoid_focal_loss` (hyperparameters held, forward is one call).

    ``forward(logits, targets, weight=None)`` returns per-element losses with the default
    ``reduction='none'``; the detector adapter sums them per image and divides by the positive count.
    """

    kind = "sigmoid"
    self_normalizing = False

    def __init__(
        self, *, alpha: float | None = 0.25, gamma: float = 2.0, reduction: Reduction = "none"
    ) -> None:
        super().__init__()
        check_probability("alpha", alpha)
        check_nonnegative("gamma", gamma)
        check_reduction(reduction)
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
        return sigmoid_focal_loss(
            logits, targets, alpha=self.alpha, gamma=self.gamma, weight=weight, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class SoftmaxFocalLoss(DetectionLoss):
    """Module form of :func:`softmax_focal_loss`; a per-class ``alpha`` tensor is kept as a buffer."""

    kind = "softmax"
    self_normalizing = False

    def __init__(
        self,
        *,
        alpha: float | Tensor | None = None,
        gamma: float = 2.0,
        ignore_index: int = IGNORE,
        reduction: Reduction = "none",
    ) -> None:
        super().__init__()
        if not isinstance(alpha, Tensor):
            check_probability("alpha", alpha)
        check_nonnegative("gamma", gamma)
        check_reduction(reduction)
        self.alpha_value = None if isinstance(alpha, Tensor) else alpha
        self.register_buffer("alpha_per_class", alpha.detach().clone() if isinstance(alpha, Tensor) else None)
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        alpha = self.alpha_per_class if self.alpha_per_class is not None else self.alpha_value
        return softmax_focal_loss(
            logits,
            labels,
            alpha=alpha,
            gamma=self.gamma,
            ignore_index=self.ignore_index,
            weight=weight,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        alpha = "per-class" if self.alpha_per_class is not None else self.alpha_value
        return f"alpha={alpha}, gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
