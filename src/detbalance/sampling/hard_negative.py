"""SSD hard negative mining (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, section 2.2).

After matching, most default boxes are negatives. Instead of using all of them, SSD sorts the negatives of
each image by their confidence (classification) loss and keeps the highest, so that negatives : positives
is at most 3 : 1. Vectorised as torchvision's ``SSD.compute_loss``: one sort per row and a rank compare,
with no loop over images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detbalance.sampling.assign import check_count, check_finite

__all__ = ["mine_hard_negatives"]


def mine_hard_negatives(
    losses: Tensor,
    labels: Tensor,
    *,
    negative_ratio: float = 3.0,
    min_negatives: int = 0,
) -> Tensor:
    """Per image, all positives plus the ``ceil(negative_ratio * P)`` highest-loss negatives.

    For image ``b`` with ``P_b = #{labels[b] > 0}`` positives, the negative budget is
    ``n_b = negative_ratio * P_b`` if ``P_b > 0`` else ``min_negatives``; a negative is kept if its rank
    (0-based, by descending loss, ties by anchor index) is ``< n_b`` (so a fractional budget rounds up,
    as in torchvision). Ignored anchors (``-1``) are never selected.

    ``min_negatives`` defaults to 0, as the SSD paper and torchvision: an image without any object
    contributes no negative. A positive value (ours; 3 is the budget of an image with one positive at
    3:1) lets such an image still teach the background. With the default and no ignored anchors the
    mask equals the union of torchvision's ``foreground_idxs`` and ``background_idxs`` in
    ``SSD.compute_loss`` (a test).

    Args:
        losses: ``Tensor[B, A]`` per-anchor classification loss (only the ranking matters; detached here).
        labels: ``Tensor[B, A] (int64)``: ``-1`` ignore, ``0`` background, ``1..K`` foreground.
        negative_ratio: negatives per positive (SSD: 3.0), ``>= 0``.
        min_negatives: hardest negatives kept in an image with no positive, ``>= 0``.

    Returns:
        ``Tensor[B, A] (bool)``: the anchors that enter the classification loss.

    Raises:
        ValueError: on mismatched or non-2-D shapes, a NaN or inf in ``losses``, a negative ratio or a
            negative ``min_negatives``.
    """
    if losses.dim() != 2:
        raise ValueError(f"losses must have shape [B, A], got {tuple(losses.shape)}")
    if labels.shape != losses.shape:
        raise ValueError(f"labels must have the shape of losses {tuple(losses.shape)}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if isinstance(negative_ratio, bool) or not isinstance(negative_ratio, int | float) or not negative_ratio >= 0:
        raise ValueError(f"negative_ratio must be a non-negative number, got {negative_ratio!r}")
    check_count(min_negatives, "min_negatives")
    check_finite(losses, "losses")

    positive = labels > 0
    negative = labels == 0
    num_pos = positive.sum(dim=1, keepdim=True)
    budget = torch.where(
        num_pos > 0,
        num_pos.to(torch.float64) * float(negative_ratio),
        torch.full_like(num_pos, min_negatives, dtype=torch.float64),
    )
    negative_loss = torch.where(negative, losses.detach(), torch.full_like(losses, -float("inf"), dtype=losses.dtype))
    order = negative_loss.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(losses.shape[1], device=losses.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return positive | (negative & (rank < budget))
