"""Class-frequency weights for class-imbalanced training, applied per sample by its ground-truth class.

Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019: each *sample* is weighted by
the weight of its class. In a detector, an anchor or RoI matched to an object of class ``k`` gets ``w_k``;
a background sample gets ``background_weight`` (1 by default); an ignored one gets 0. (Multiplying every
anchor's column ``k`` by ``w_k``, negatives included, is a per-column scale of the last layer, which an
adaptive optimiser largely cancels.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from detbalance.losses._reduction import check_none_on_device
from detbalance.losses.contract import AnchorBatch, DetectionLoss
from detbalance.types import BACKGROUND

__all__ = ["ClassWeightedLoss", "class_frequency_weights", "sample_class_weights"]

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


def sample_class_weights(
    labels: Tensor, class_weight: Tensor, *, background_weight: float = 1.0, validate_args: bool | None = None
) -> Tensor:
    """Per-sample weights from labels (``-1`` ignore, ``0`` background, ``1..K``) and per-class weights.

    Args:
        labels: ``Tensor[...]`` int64 labels (convention of :mod:`detbalance.types`).
        class_weight: ``Tensor[K]`` weight of classes ``1..K`` (index ``k - 1``), e.g. from
            :func:`class_frequency_weights`.
        background_weight: weight of label-0 samples.
        validate_args: Check that every label is in ``-1..K``: ``None`` (default) raises ``ValueError`` on the
            CPU and asserts asynchronously on CUDA (no host sync); ``True`` checks at once everywhere; ``False``
            never (a label above ``K`` then gets class ``K``'s weight).

    Returns:
        ``Tensor[...]`` float32 (float64 for float64 ``class_weight``): ``class_weight[label - 1]`` for
        ``label >= 1``, ``background_weight`` for 0 and 0 for ignored samples.

    Raises:
        ValueError: for a ``class_weight`` that is not 1-D, a negative ``background_weight``, or (with
            ``validate_args``) a label outside ``-1..K``.

    Example:
        >>> import torch
        >>> sample_class_weights(torch.tensor([-1, 0, 1, 2]), torch.tensor([0.5, 2.0]))
        tensor([0.0000, 1.0000, 0.5000, 2.0000])
    """
    if not isinstance(class_weight, Tensor) or class_weight.dim() != 1 or class_weight.numel() == 0:
        shape = tuple(class_weight.shape) if isinstance(class_weight, Tensor) else type(class_weight).__name__
        raise ValueError(f"class_weight must be a non-empty 1-D Tensor[K], got {shape}")
    if isinstance(background_weight, bool) or not isinstance(background_weight, int | float) or not background_weight >= 0:
        raise ValueError(f"background_weight must be a number >= 0, got {background_weight!r}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if validate_args is not False:
        k = class_weight.numel()
        check_none_on_device(
            (labels < -1) | (labels > k),
            f"sample_class_weights: labels must be in -1..{k} (-1 ignore, 0 background, 1..K with K = {k} "
            "from class_weight); got a label outside that range",
            validate_args=validate_args,
        )
    dtype = torch.float64 if class_weight.dtype == torch.float64 else torch.float32
    cw = class_weight.to(device=labels.device, dtype=dtype)
    # table index: 0 ignored, 1 background, 1 + k class k
    table = torch.cat([cw.new_zeros(1), cw.new_full((1,), float(background_weight)), cw])
    return table[(labels.to(torch.int64) + 1).clamp(min=0, max=cw.numel() + 1)]


class ClassWeightedLoss(DetectionLoss):
    """A classification loss whose every sample is weighted by its ground-truth class (Cui et al., 2019).

    Sigmoid losses (``kind='sigmoid'``) are called ``(logits[N, K'], targets[N, K'], valid=..., weight=...)``:
    the class of a row is the column of its positive target (``K' = K`` columns for classes ``1..K``, or
    ``K + 1`` with torchvision's unused column 0), a row without a positive is background. Softmax losses
    (``kind='softmax'``) are called ``(logits[N, K + 1], labels[N], weight=...)``. The per-row weight is
    :func:`sample_class_weights` and multiplies any ``weight`` given by the caller. The contract is the
    wrapped loss's.

    Args:
        loss: A sigmoid or softmax :class:`~detbalance.losses.DetectionLoss` that takes ``weight=``.
        class_weight: ``Tensor[K]``.
        background_weight: weight of background samples.
    """

    def __init__(self, loss: DetectionLoss, class_weight: Tensor, *, background_weight: float = 1.0) -> None:
        super().__init__()
        if not isinstance(loss, DetectionLoss) or loss.kind not in ("sigmoid", "softmax"):
            raise ValueError(f"loss must be a sigmoid or softmax DetectionLoss, got {type(loss).__name__}")
        sample_class_weights(torch.zeros(0, dtype=torch.int64), class_weight, background_weight=background_weight)
        self.loss = loss
        self.kind = loss.kind
        self.self_normalizing = loss.self_normalizing
        self.per_level = loss.per_level
        self.reduction = loss.reduction
        self.background_weight = float(background_weight)
        self.register_buffer("class_weight", class_weight.detach().to(torch.float32).clone())

    @property
    def last_density(self) -> Tensor | None:  # type: ignore[override]
        return self.loss.last_density

    def dense_targets(self, batch: AnchorBatch) -> Tensor:
        return self.loss.dense_targets(batch)

    def row_weights(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``Tensor[N]`` per-sample weights for a call.

        Sigmoid: a row's class is its largest target column when that is positive (one-hot or soft IoU
        targets), else background.
        """
        if self.kind == "softmax":
            return sample_class_weights(targets, self.class_weight, background_weight=self.background_weight)
        k = self.class_weight.numel()
        cols = logits.shape[-1]
        if cols not in (k, k + 1):
            raise ValueError(f"class_weight has {k} classes but logits have {cols} columns (expected {k} or {k + 1})")
        best, col = targets.detach().max(-1)
        labels = torch.where(best > 0, col + (1 if cols == k else 0), torch.full_like(col, BACKGROUND))
        # in range by construction (a column index); nothing to check
        return sample_class_weights(labels, self.class_weight, background_weight=self.background_weight,
                                    validate_args=False)

    def forward(self, logits: Tensor, targets: Tensor, weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        w = self.row_weights(logits, targets).to(logits.device)
        if weight is not None:
            w = w.unsqueeze(-1) * weight if weight.shape == logits.shape and self.kind == "sigmoid" else w * weight
        return self.loss(logits, targets, weight=w, **kwargs)

    def extra_repr(self) -> str:
        return f"classes={self.class_weight.numel()}, background_weight={self.background_weight}"
