"""Argument validation, reductions and float32 compute helpers shared by the losses.

Private module: the public names live in :mod:`detbalance.losses`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of ``'none'``, ``'mean'``, ``'sum'``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def reduce_loss(loss: Tensor, reduction: str, *, count: Tensor | float | None = None) -> Tensor:
    """Reduce a per-element loss.

    Args:
        loss: per-element loss, any shape.
        reduction: ``'none'`` returns ``loss``; ``'sum'`` its sum; ``'mean'`` the sum divided by ``count``
            (default: ``loss.numel()``), where a count of zero divides by one, so the mean of an empty input
            is ``0`` and never NaN.
        count: the number of elements that count towards the mean (for example the non-ignored ones).

    Returns:
        ``loss`` or a 0-d tensor.
    """
    check_reduction(reduction)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if count is None:
        count = float(loss.numel())
    if isinstance(count, Tensor):
        return total / count.to(total.dtype).clamp(min=1.0)
    return total / max(float(count), 1.0)


def check_none_on_device(bad: Tensor, message: str, *, validate_args: bool | None = None) -> None:
    """Raise ``ValueError(message)`` if any element of the bool tensor ``bad`` is true.

    ``validate_args``: ``False`` checks nothing; ``True`` checks now (one host sync on CUDA); ``None`` checks
    now on the CPU and, on CUDA, with ``torch._assert_async``: no host sync, a failure surfaces at the next
    synchronising call as a device-side assertion (``CUDA_LAUNCH_BLOCKING=1`` shows where).
    """
    if validate_args is False or bad.numel() == 0:
        return
    if bad.device.type == "cpu" or validate_args:
        if bool(bad.any()):
            raise ValueError(message)
        return
    torch._assert_async(~bad.any(), message)


def check_nonnegative(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number ``>= 0``."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number ``> 0``."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_probability(name: str, value: float | None) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a number in ``[0, 1]``."""
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be None or a number in [0, 1], got {value!r}")


def check_momentum(name: str, value: float | None) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a number in ``[0, 1)``."""
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be None or a number in [0, 1), got {value!r}")


def check_bins(bins: int) -> None:
    """Raise ``ValueError`` unless ``bins`` is an integer ``>= 1``."""
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ``ValueError`` unless the two tensors have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {name_b} shape {tuple(b.shape)}"
        )


def check_floating(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` is a floating-point tensor."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        dtype = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {dtype}")


def elementwise_mask(name: str, mask: Tensor | None, like: Tensor) -> Tensor | None:
    """Validate a per-element (``like.shape``) or per-row (``like.shape[:-1]``) tensor; return it broadcastable.

    Used for ``valid`` masks and ``weight`` tensors: a dense detector often has one flag per anchor
    (``Tensor[A]``) for ``Tensor[A, K]`` logits.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    if mask.shape == like.shape:
        return mask
    if like.dim() >= 1 and mask.shape == like.shape[:-1]:
        return mask.unsqueeze(-1)
    raise ValueError(
        f"{name} must have shape {tuple(like.shape)} or {tuple(like.shape[:-1])}, got {tuple(mask.shape)}"
    )


def float32(t: Tensor) -> Tensor:
    """``t`` as float32 (float64 stays float64 so that ``gradcheck`` runs in double precision)."""
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the losses never compute in fp16/bf16."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def should_validate(validate_args: bool | None, t: Tensor) -> bool:
    """Resolve a ``validate_args`` flag: ``None`` validates unless ``t`` is on CUDA (no host sync there)."""
    if validate_args is None:
        return t.device.type != "cuda"
    return bool(validate_args)


def check_targets_in_unit_interval(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` unless every element of ``t`` lies in ``[0, 1]`` (NaN fails). One host sync."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())
    lo_f, hi_f = float(lo), float(hi)
    if not (lo_f >= 0.0 and hi_f <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo_f}, {hi_f}]")


def check_finite(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or +-inf. One host sync."""
    if t.numel() and not bool(torch.isfinite(t.detach()).all()):
        bad = int((~torch.isfinite(t.detach())).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN/inf element(s)")
