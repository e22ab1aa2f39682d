"""Class-frequency weights for class-imbalanced training (per-class loss weights or softmax-focal alpha)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["class_frequency_weights"]

METHODS = ("inverse", "sqrt_inverse", "effective_number")


def class_frequency_weights(counts: Tensor, *, method: str = "inverse", beta: float = 0.999) -> Tensor:
    """Per-class weights from class frequencies, normalised to sum to ``K``.

    * ``'inverse'``: ``w_k ∝ 1 / n_k``;
    * ``'sqrt_inverse'``: ``w_k ∝ 1 / sqrt(n_k)``;
    * ``'effective_number'``: ``w_k ∝ (1 - beta) / (1 - beta^{n_k})`` (Cui et al., "Class-Balanced Loss Based
      on Effective Number of Samples", CVPR 2019, arXiv 1901.05555); ``beta -> 0`` gives equal weights,
      ``beta -> 1`` approaches ``'inverse'``.

    A class with zero examples is weighted as if it had one (its weight is finite, the largest).

    Args:
        counts: ``Tensor[K]`` non-negative example counts per class (labels ``1..K`` -> index ``k - 1``).
        method: one of ``'inverse'``, ``'sqrt_inverse'``, ``'effective_number'``.
        beta: effective-number hyperparameter in ``[0, 1)``.

    Returns:
        ``Tensor[K]`` float32 (float64 for float64 counts), ``sum == K``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(beta, int | float) or isinstance(beta, bool) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    if not isinstance(counts, Tensor) or counts.dim() != 1 or counts.numel() == 0:
        shape = tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
        raise ValueError(f"counts must be a non-empty 1-D tensor Tensor[K], got {shape}")
    dtype = torch.float64 if counts.dtype == torch.float64 else torch.float32
    n = counts.to(dtype)
    if bool((n < 0).any()) or not bool(torch.isfinite(n).all()):
        raise ValueError(f"counts must be finite and >= 0, got {counts.tolist()}")
    n = n.clamp(min=1.0)
    if method == "inverse":
        w = 1.0 / n
    elif method == "sqrt_inverse":
        w = n.rsqrt()
    else:
        # (1 - beta^n) computed as -expm1(n log beta) for accuracy when beta^n is close to 1.
        w = (
            (1.0 - beta) / -torch.expm1(n * torch.log(torch.tensor(beta, dtype=dtype)))
            if beta > 0
            else n * 0 + 1
        )
    return w * (w.numel() / w.sum())
