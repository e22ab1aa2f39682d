"""Gradient Harmonizing Mechanism (Li, Liu, Wang, "Gradient Harmonized Single-stage Detector", AAAI 2019,
arXiv 1811.05181).

The gradient norm of each example is binned into ``M`` equal-width unit regions of ``[0, 1]``
(``epsilon = 1 / M``). With ``R_j`` the number of examples in region ``j``, the paper approximates the
gradient density by ``GD(g) = R_{ind(g)} / epsilon = R_{ind(g)} M`` and weights every example by

.. math::

    \\beta_i = \\frac{N}{GD(g_i)},\\qquad
    L_{GHM\\text{-}C} = \\frac{1}{N} \\sum_{i=1}^{N} \\beta_i L_{CE}(p_i, p^*_i),\\qquad
    L_{GHM\\text{-}R} = \\frac{1}{N} \\sum_{i=1}^{N} \\beta_i \\mathrm{ASL1}(d_i)

with ``g = |sigmoid(x) - y|`` for classification and ``g = |d| / sqrt(d^2 + mu^2)`` (the ASL1 gradient) for
regression. ``N`` is the number of valid examples in the call. ``beta`` is a constant for autograd, as in
the paper: the gradient of the "mean" loss is ``beta_i (sigmoid(x_i) - y_i) / N``.

Normalisation (``normalization=``):

* ``"paper"``: ``GD = R M`` with all ``M`` regions, exactly the formula above. A uniform gradient
  distribution (``R_j = N / M``) gives ``beta = 1``, i.e. plain cross-entropy.
* ``"valid_bins"``: ``GD = R n`` with ``n`` the number of non-empty regions in the batch, as the authors'
  code does (mmdetection ``GHMC``/``GHMR``: ``weights = tot / num_in_bin / n``). It equals ``"paper"`` when
  every region is populated and otherwise scales the loss by ``M / n`` (larger), which keeps the loss scale
  of a heavily skewed batch closer to cross-entropy.

Unlike mmdetection's implementation, :func:`gradient_density` is vectorised (no Python loop over bins, no
host sync), the EMA of :class:`GHMCLoss`/:class:`GHMRLoss` is bias-corrected (mmdetection's first step
sees a quarter of the density, i.e. 4x weights, at ``momentum=0.75``), empty bins decay instead of
freezing, all FPN levels update the histogram once per call, and the histogram is all-reduced across
ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from detbalance.losses._reduction import (
    check_bins,
    check_floating,
    check_momentum,
    check_positive,
    check_reduction,
    check_same_shape,
    compute_dtype,
    elementwise_mask,
)
from detbalance.losses.focal import _bce_block
from detbalance.losses.regression import _asl1
from detbalance.types import Reduction

__all__ = ["GHMCLoss", "GHMRLoss", "ghm_c_loss", "ghm_r_loss", "gradient_density"]

NORMALIZATIONS = ("paper", "valid_bins")
_CPU_BLOCK = 1 << 18
_CUDA_BLOCK = 1 << 22


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be 'paper' or 'valid_bins', got {normalization!r}")


def _check_density(density: Tensor | None, bins: int) -> None:
    if density is not None and (not isinstance(density, Tensor) or density.shape != (bins,)):
        shape = tuple(density.shape) if isinstance(density, Tensor) else type(density).__name__
        raise ValueError(f"density must be a Tensor[{bins}] (bins={bins}), got {shape}")


def _bin_index_(g: Tensor, bins: int, out: Tensor, invalid: Tensor | None) -> None:
    """Write the region index ``trunc(g M)`` (``g`` in ``[0, 1]``, so ``M`` only for ``g == 1``) into int32 ``out``.

    Index ``M`` is folded into region ``M - 1`` by :func:`_fold_counts` and :func:`_weight_table` (the last
    region is closed, as in mmdetection); invalid elements get the spare index ``M + 1``. ``g`` is clobbered.
    """
    out.copy_(g.clamp_(0.0, 1.0).mul_(bins))  # float -> int32 copy truncates, i.e. floors non-negative values
    if invalid is not None:
        out.masked_fill_(invalid, bins + 1)


def _fold_counts(idx: Tensor, bins: int) -> Tensor:
    """int64 ``Tensor[M]`` counts from indices in ``0..M+1`` (``M`` joins region ``M - 1``, ``M + 1`` dropped)."""
    counts = torch.bincount(idx.reshape(-1), minlength=bins + 2)
    hist = counts[:bins].clone()
    hist[bins - 1] += counts[bins]
    return hist


def gradient_density(g: Tensor, *, bins: int, valid: Tensor | None = None) -> Tensor:
    """Histogram of gradient norms: the number of valid ``g`` in each of ``bins`` equal regions of ``[0, 1]``.

    Region ``j`` is ``[j / M, (j + 1) / M)``, the last one closed (``g = 1`` falls in it, as in
    mmdetection). Vectorised (one ``bincount``), no host synchronisation.

    Args:
        g: ``Tensor[...]`` gradient norms in ``[0, 1]`` (values outside are clamped into the end regions).
        bins: number of regions ``M >= 1``.
        valid: optional bool ``Tensor[...]`` (same shape as ``g``); ``False`` entries are not counted.

    Returns:
        ``Tensor[M]`` float32 counts ``R_j``.
    """
    check_bins(bins)
    if not isinstance(g, Tensor) or not g.is_floating_point():
        raise ValueError(f"g must be a floating-point tensor, got {getattr(g, 'dtype', type(g).__name__)}")
    if valid is not None:
        if valid.shape != g.shape:
            raise ValueError(f"valid must have the shape of g {tuple(g.shape)}, got {tuple(valid.shape)}")
        valid = valid.bool()
    g = g.detach().reshape(-1).to(torch.float32, copy=True)
    idx = torch.empty(g.shape, dtype=torch.int32, device=g.device)
    _bin_index_(g, bins, idx, None if valid is None else ~valid.reshape(-1))
    return _fold_counts(idx, bins).float()


def _weight_table(
    batch_hist: Tensor, density: Tensor | None, bins: int, normalization: str, reduction: str
) -> tuple[Tensor, Tensor]:
    """Per-region weight (plus a 0 for the spare "invalid" region) and the valid count N (0-d).

    The weight is ``beta / N = 1 / GD`` for ``'mean'`` and ``beta = N / GD`` otherwise; regions whose density
    is 0 (possible only with a user-supplied density) get weight 0.
    """
    # float64 for the M-sized table: counts above 2^24 stay exact and float64 inputs get float64 weights
    # (float32 on MPS, which has no float64).
    f64 = torch.float32 if batch_hist.device.type == "mps" else torch.float64
    batch_hist = batch_hist.to(f64)
    n_valid = batch_hist.sum()
    dens = batch_hist if density is None else density.detach().to(device=batch_hist.device, dtype=f64)
    if normalization == "paper":
        gd = dens * float(bins)
    else:  # mmdetection: divide by the number of regions that hold an example of this batch
        gd = dens * (batch_hist > 0).sum().to(f64)
    inv_gd = torch.where(gd > 0, 1.0 / gd.clamp(min=1e-300), torch.zeros_like(gd))
    table = inv_gd if reduction == "mean" else inv_gd * n_valid
    # index M (g == 1) shares region M - 1's weight; index M + 1 (invalid) weighs 0
    return torch.cat([table, table[-1:], table.new_zeros(1)]), n_valid


def _ghm_c_histogram(
    logits: Tensor, targets: Tensor, valid: Tensor | None, bins: int, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sweep 1 (blocked): region index per element, batch histogram, and ``sigmoid(x) - y`` for the gradient."""
    dtype = compute_dtype(logits)
    cols = logits.shape[-1] if logits.dim() > 0 else 1
    x2, y2 = logits.detach().reshape(-1, cols), targets.detach().reshape(-1, cols)
    v2 = None if valid is None else valid.reshape(-1, valid.shape[-1] if valid.dim() else 1)
    rows = x2.shape[0]
    idx = torch.empty(x2.shape, dtype=torch.int32, device=logits.device)
    diff = torch.empty(x2.shape, dtype=dtype, device=logits.device) if need_grad else None
    step = max(1, (_CUDA_BLOCK if logits.device.type == "cuda" else _CPU_BLOCK) // max(1, cols))
    with torch.autocast(logits.device.type, enabled=False):
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            d = torch.sigmoid(x2[r0:r1].to(dtype), out=None if diff is None else diff[r0:r1])
            d.sub_(y2[r0:r1].to(dtype))
            g = torch.abs(d) if diff is not None else d.abs_()
            _bin_index_(g, bins, idx[r0:r1], None if v2 is None else ~v2[r0:r1])
    return idx, _fold_counts(idx, bins), diff


class _GHMCFunction(torch.autograd.Function):
    """Sweep 2: weighted BCE per block; the gradient ``w (sigmoid(x) - y)`` is written in place of ``diff``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        targets: Tensor,
        idx: Tensor,
        diff: Tensor | None,
        table: Tensor,
        weight: Tensor | None,
        reduction: str,
    ) -> Tensor:
        dtype = compute_dtype(logits)
        cols = logits.shape[-1] if logits.dim() > 0 else 1
        x2, y2, idx2 = logits.reshape(-1, cols), targets.reshape(-1, cols), idx.reshape(-1, cols)
        w2 = None if weight is None else weight.reshape(-1, weight.shape[-1] if weight.dim() else 1)
        rows = x2.shape[0]
        table = table.to(dtype)
        out = torch.empty(x2.shape, dtype=dtype, device=logits.device) if reduction == "none" else None
        total = torch.zeros((), dtype=dtype, device=logits.device)
        grad = diff if ctx.needs_input_grad[0] else None
        step = max(1, (_CUDA_BLOCK if logits.device.type == "cuda" else _CPU_BLOCK) // max(1, cols))
        with torch.autocast(logits.device.type, enabled=False):
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                w = torch.index_select(table, 0, idx2[r0:r1].reshape(-1)).view(r1 - r0, cols)
                if w2 is not None:
                    w.mul_(w2[r0:r1].to(dtype))
                x, y = x2[r0:r1].to(dtype), y2[r0:r1].to(dtype)
                ce = _bce_block(x, y)
                if out is not None:
                    torch.mul(ce, w, out=out[r0:r1])
                else:
                    total.add_(torch.dot(ce.reshape(-1), w.reshape(-1)))
                if grad is not None:
                    grad[r0:r1].mul_(w)
        ctx.grad, ctx.shape, ctx.in_dtype = grad, logits.shape, logits.dtype
        return out.reshape(logits.shape) if out is not None else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = (ctx.grad.view(ctx.shape) * grad_output).to(ctx.in_dtype)
        return grad, None, None, None, None, None, None


def _ghm_c_prepare(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor | None,
    weight: Tensor | None,
    bins: int,
    normalization: str,
    reduction: str,
) -> tuple[Tensor | None, Tensor | None]:
    check_floating("logits", logits)
    check_same_shape("logits", logits, "targets", targets)
    check_bins(bins)
    _check_normalization(normalization)
    check_reduction(reduction)
    valid = elementwise_mask("valid", valid, logits)
    weight = elementwise_mask("weight", weight, logits)
    return (None if valid is None else valid.bool()), weight


def _ghm_c_apply(
    logits: Tensor,
    targets: Tensor,
    idx: Tensor,
    diff: Tensor | None,
    batch_hist: Tensor,
    density: Tensor | None,
    weight: Tensor | None,
    bins: int,
    normalization: str,
    reduction: str,
) -> Tensor:
    table, n_valid = _weight_table(batch_hist, density, bins, normalization, reduction)
    if targets.requires_grad or (weight is not None and weight.requires_grad):
        dtype = compute_dtype(logits)
        w = table.to(dtype)[idx.view(logits.shape)]
        if weight is not None:
            w = w * weight.to(dtype)
        loss = F.binary_cross_entropy_with_logits(logits.to(dtype), targets.to(dtype), reduction="none") * w
        return loss if reduction == "none" else loss.sum()
    return _GHMCFunction.apply(logits, targets, idx.view(logits.shape), diff, table, weight, reduction)


def ghm_c_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    bins: int = 30,
    density: Tensor | None = None,
    valid: Tensor | None = None,
    normalization: str = "paper",
    weight: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """GHM-C: binary cross-entropy weighted by the inverse gradient density ``beta_i = N / GD(g_i)``.

    Args:
        logits: ``Tensor[..., K]`` raw scores (all FPN levels of a batch together); fp16/bf16 computed in float32.
        targets: ``Tensor[..., K]`` one-vs-all targets in ``[0, 1]``.
        bins: number of unit regions ``M`` (paper: 30).
        density: optional ``Tensor[M]`` region counts to use instead of this batch's histogram (for example the
            EMA kept by :class:`GHMCLoss`); ``N`` stays the number of valid elements of this call.
        valid: optional bool ``Tensor[..., K]`` or per-anchor ``Tensor[...]``; invalid elements get no loss and
            are not counted in the histogram or ``N`` (mmdetection's ``label_weight > 0``).
        normalization: ``'paper'`` (``GD = R M``) or ``'valid_bins'`` (``GD = R n``, mmdetection); see the
            module docstring.
        weight: optional extra per-element (or per-anchor) multiplier of the cross-entropy.
        reduction: ``'mean'`` (the paper's ``(1/N) sum_i beta_i CE_i``, with N clamped to >= 1),
            ``'sum'`` (``sum_i beta_i CE_i``) or ``'none'`` (``beta_i CE_i``, 0 where invalid).

    Returns:
        float32 loss (float64 for float64 input). Its gradient is ``beta_i (sigmoid(x_i) - y_i)`` (divided by N
        for ``'mean'``); beta is a constant.
    """
    valid, weight = _ghm_c_prepare(logits, targets, valid, weight, bins, normalization, reduction)
    _check_density(density, bins)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        idx, hist, diff = _ghm_c_histogram(logits, targets, valid, bins, need_grad)
    return _ghm_c_apply(logits, targets, idx, diff, hist, density, weight, bins, normalization, reduction)


def ghm_r_loss(
    pred: Tensor,
    target: Tensor,
    *,
    mu: float = 0.02,
    bins: int = 10,
    density: Tensor | None = None,
    valid: Tensor | None = None,
    normalization: str = "paper",
    reduction: Reduction = "mean",
) -> Tensor:
    """GHM-R: authentic smooth L1 weighted by ``beta_i = N / GD(g_i)``, ``g = |d| / sqrt(d^2 + mu^2)``.

    Every coordinate of every box is one example, as in the authors' code.

    Args:
        pred: ``Tensor[..., 4]`` predicted box deltas.
        target: ``Tensor[..., 4]`` target deltas.
        mu: ASL1 smoothness ``> 0`` (paper: 0.02).
        bins: number of regions ``M`` (paper: 10).
        density: optional ``Tensor[M]`` counts instead of this batch's histogram.
        valid: optional bool mask, per element or per box (``Tensor[...]``).
        normalization: ``'paper'`` or ``'valid_bins'`` (see :func:`ghm_c_loss`).
        reduction: ``'mean'`` (``(1/N) sum_i beta_i ASL1_i``), ``'sum'`` or ``'none'``.

    Returns:
        float32 loss (float64 for float64 input).
    """
    check_floating("pred", pred)
    check_same_shape("pred", pred, "target", target)
    check_positive("mu", mu)
    check_bins(bins)
    _check_normalization(normalization)
    check_reduction(reduction)
    _check_density(density, bins)
    valid = elementwise_mask("valid", valid, pred)
    dtype = compute_dtype(pred, target)
    with torch.autocast(pred.device.type, enabled=False):
        d = pred.to(dtype) - target.to(dtype)
        v = None if valid is None else valid.bool().expand(pred.shape)
        with torch.no_grad():
            g = d.abs() / torch.sqrt(d * d + mu * mu)
            idx = torch.empty(g.shape, dtype=torch.int32, device=g.device)
            _bin_index_(g, bins, idx, None if v is None else ~v)
            table, _ = _weight_table(_fold_counts(idx, bins), density, bins, normalization, reduction)
            w = table.to(dtype)[idx]
        loss = _asl1(d, mu) * w
    return loss if reduction == "none" else loss.sum()


def _all_reduce_mean_(hist: Tensor) -> Tensor:
    """Average the histogram over ranks (SUM of counts / world size) when a process group is up.

    With the per-rank mean density, each rank's loss is ``sum_local CE / (R_avg M)``; DDP's gradient averaging
    then yields exactly the single-process GHM loss of the combined batch (``R_global = W R_avg``).
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(hist, op=dist.ReduceOp.SUM)
        hist.div_(dist.get_world_size())
    return hist


class _GHMBase(nn.Module):
    self_normalizing: bool = True

    def __init__(
        self, *, bins: int, momentum: float | None, bias_correction: bool, normalization: str
    ) -> None:
        super().__init__()
        check_bins(bins)
        check_momentum("momentum", momentum)
        _check_normalization(normalization)
        self.bins = bins
        self.momentum = momentum if momentum else None
        self.bias_correction = bool(bias_correction)
        self.normalization = normalization
        self.register_buffer("ema_density", torch.zeros(bins))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.int64))
        self.last_density: Tensor = torch.zeros(bins)

    def _density(self, hist: Tensor) -> Tensor:
        """Update the EMA with this call's histogram (training only) and return the density to weight with.

        Training: ``ema = m ema + (1 - m) hist`` for every bin (empty bins decay), then divided by
        ``1 - m^t`` when ``bias_correction`` (the first step returns ``hist`` exactly). Evaluation: the EMA if it
        has been updated at least once (like BatchNorm's running statistics), else this batch's histogram.
        Without momentum the batch histogram is always used.
        """
        with torch.no_grad():
            # Collectives only in training: evaluation may run on a subset of ranks.
            hist = hist.to(torch.float32 if hist.device.type == "mps" else torch.float64)
            hist = _all_reduce_mean_(hist) if self.training else hist
            if self.momentum is None:
                density = hist
            else:
                m = self.momentum
                ema = self.ema_density
                if self.training:
                    ema.mul_(m).add_(hist.to(device=ema.device, dtype=ema.dtype), alpha=1.0 - m)
                    self.ema_steps.add_(1)
                if self.bias_correction:
                    # 1 - m^t from the step buffer, on device (a scalar base needs no host-to-device copy)
                    corr = 1.0 - torch.pow(m, self.ema_steps.to(ema.dtype))
                    ema = ema / corr.clamp(min=1e-12)
                density = ema if self.training else torch.where(self.ema_steps > 0, ema, hist)
            self.last_density = density.detach().to(torch.float32, copy=True)
        return density

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, momentum={self.momentum}, bias_correction={self.bias_correction}, "
            f"normalization={self.normalization!r}"
        )


class GHMCLoss(_GHMBase):
    """GHM-C with the paper's EMA of the gradient density (momentum 0.75, M = 30).

    ``forward(pred, target, valid=None, weight=None)`` returns the scalar ``(1/N) sum_i beta_i CE_i`` (already
    normalised as the paper does; :attr:`self_normalizing` is True). Pass all FPN levels of the batch in one
    call: the histogram buffer ``ema_density`` is updated once per call, in training mode only, from the
    histogram all-reduced across ranks (SUM of counts divided by the world size, so DDP's gradient average
    equals the single-process loss of the whole batch). Every bin decays, empty ones included. In eval mode
    the buffer is not touched; the loss uses the (bias-corrected) EMA if it has been updated at least once,
    like BatchNorm's running statistics, else the batch's own density. ``last_density`` holds the density
    used by the latest call, for recorders.

    Args:
        bins: number of regions ``M``.
        momentum: EMA momentum in ``[0, 1)``; ``None`` or 0 uses each batch's own density.
        bias_correction: divide the EMA by ``1 - m^t`` (Adam-style) so the first step equals the batch
            density; ``False`` reproduces mmdetection (zero-initialised EMA, first step 1/(1-m) = 4x weights).
        normalization: ``'paper'`` or ``'valid_bins'`` (see :func:`ghm_c_loss`).
    """

    def __init__(
        self,
        bins: int = 30,
        momentum: float | None = 0.75,
        bias_correction: bool = True,
        normalization: str = "paper",
    ) -> None:
        super().__init__(
            bins=bins, momentum=momentum, bias_correction=bias_correction, normalization=normalization
        )

    def forward(
        self, pred: Tensor, target: Tensor, valid: Tensor | None = None, weight: Tensor | None = None
    ) -> Tensor:
        valid, weight = _ghm_c_prepare(pred, target, valid, weight, self.bins, self.normalization, "mean")
        need_grad = pred.requires_grad and torch.is_grad_enabled()
        with torch.no_grad():
            idx, hist, diff = _ghm_c_histogram(pred, target, valid, self.bins, need_grad)
        density = self._density(hist)
        return _ghm_c_apply(
            pred, target, idx, diff, hist, density, weight, self.bins, self.normalization, "mean"
        )


class GHMRLoss(_GHMBase):
    """GHM-R (ASL1 weighted by inverse gradient density) with an EMA density (momentum 0.7, M = 10, mu 0.02).

    ``forward(pred, target, valid=None)`` returns the scalar ``(1/N) sum_i beta_i ASL1_i``; the paper's loss
    weight (10 for RetinaNet) is applied by the caller. State handling as in :class:`GHMCLoss`.
    """

    def __init__(
        self,
        mu: float = 0.02,
        bins: int = 10,
        momentum: float | None = 0.7,
        bias_correction: bool = True,
        normalization: str = "paper",
    ) -> None:
        check_positive("mu", mu)
        super().__init__(
            bins=bins, momentum=momentum, bias_correction=bias_correction, normalization=normalization
        )
        self.mu = float(mu)

    def forward(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        check_floating("pred", pred)
        check_same_shape("pred", pred, "target", target)
        v = elementwise_mask("valid", valid, pred)
        with torch.no_grad():
            d = pred.detach().float() - target.detach().float()
            g = d.abs() / torch.sqrt(d * d + self.mu * self.mu)
            hist = gradient_density(
                g, bins=self.bins, valid=None if v is None else v.bool().expand(pred.shape)
            )
        density = self._density(hist)
        return ghm_r_loss(
            pred,
            target,
            mu=self.mu,
            bins=self.bins,
            density=density,
            valid=valid,
            normalization=self.normalization,
            reduction="mean",
        )

    def extra_repr(self) -> str:
        return f"mu={self.mu}, " + super().extra_repr()
