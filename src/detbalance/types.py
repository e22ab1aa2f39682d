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


def one_hot_targets(
    labels: Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32, validate_args: bool | None = None
) -> Tensor:
    """One-vs-all targets ``Tensor[..., K]`` for sigmoid heads from ``labels`` (convention above).

    The one place that builds them: column ``k - 1`` is 1 for label ``k``; background and ignored rows are all
    zeros (mask ignored rows out of the loss separately). Vectorised, any leading shape.

    Args:
        labels: ``Tensor[...]`` int64 in ``-1..K``.
        num_classes: ``K``.
        dtype: of the result.
        validate_args: check the label range (one host sync); ``None`` checks on the CPU only.

    Raises:
        ValueError: for float labels or (when validated) a label outside ``[-1, K]``.

    Example:
        >>> one_hot_targets(torch.tensor([-1, 0, 2]), 2)
        tensor([[0., 0.],
                [0., 0.],
                [0., 1.]])
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    check = labels.device.type != "cuda" if validate_args is None else validate_args
    if check and labels.numel() and (int(labels.max()) > num_classes or int(labels.min()) < IGNORE):
        raise ValueError(
            f"labels must lie in [-1, {num_classes}] (num_classes={num_classes}), "
            f"got min {int(labels.min())}, max {int(labels.max())}"
        )
    columns = torch.arange(1, num_classes + 1, device=labels.device)
    return (labels.unsqueeze(-1) == columns).to(dtype)
