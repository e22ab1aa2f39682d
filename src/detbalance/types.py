"""Shared types and the label convention used everywhere in detbalance.

Label convention (torchvision's ``matched_idxs`` convention, written once here):

``labels: Tensor[R] (int64)`` per anchor or RoI, where

* ``IGNORE = -1``: the example takes no part in any loss (between the IoU thresholds, crowd, padding);
* ``BACKGROUND = 0``: a negative example;
* ``1..K``: a foreground example of class ``k`` (``K`` = number of object classes).

Sigmoid (one-vs-all) heads see ``K`` columns; :func:`one_hot_targets` is the one place that turns
labels into one-vs-all targets. Softmax heads see ``K + 1`` columns with column 0 the background.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, TypedDict

import torch
from torch import Tensor

__all__ = ["BACKGROUND", "IGNORE", "DetectionTarget", "Reduction", "SampledIndices", "one_hot_targets"]

IGNORE: int = -1
BACKGROUND: int = 0

Reduction = Literal["none", "mean", "sum"]


class SampledIndices(NamedTuple):
    """The result of a per-RoI sampler: indices into the flat ``labels`` it was given.

    Both are ``Tensor[N] (int64)``, sorted ascending, disjoint, never pointing at an ignored label.
    Unpacks like torchvision's ``(pos_idx, neg_idx)`` pair.
    """

    positive: Tensor
    negative: Tensor

    def all(self) -> Tensor:
        """Positive and negative indices together, sorted ascending."""
        return torch.cat([self.positive, self.negative]).sort().values


class DetectionTarget(TypedDict):
    """One image's ground truth, torchvision style.

    ``boxes``: ``Tensor[G, 4]`` float32, absolute ``(x1, y1, x2, y2)`` pixels, ``x2 > x1``, ``y2 > y1``;
    ``labels``: ``Tensor[G]`` int64 in ``1..K``; ``image_id``: int.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int


def one_hot_targets(labels: Tensor, num_classes: int) -> Tensor:
    """One-vs-all targets ``Tensor[R, K]`` (float) for sigmoid heads from ``labels`` (convention above).

    Background and ignored rows are all zeros; mask ignored rows out of the loss separately.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.max()) > num_classes or int(labels.min()) < IGNORE):
        raise ValueError(
            f"labels must lie in [-1, {num_classes}] (num_classes={num_classes}), "
            f"got min {int(labels.min())}, max {int(labels.max())}"
        )
    out = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.float32, device=labels.device)
    fg = labels > 0
    out[fg, labels[fg]] = 1.0
    return out[:, 1:]
