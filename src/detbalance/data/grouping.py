"""Aspect-ratio grouping of batches, as torchvision's detection reference (``--aspect-ratio-group-factor``).

torchvision's detectors pad every image of a batch to the batch's largest height and width. A batch that
mixes a portrait with a landscape photo is mostly padding; grouping images of similar aspect ratio into the
same batch avoids it. The reference (``references/detection/group_by_aspect_ratio.py``) does it in two parts,
both reproduced here (held to a literal transcription in ``tests/reference/tv_group_by_aspect_ratio.py``, torchvision commit
d2aeec2):

* :func:`aspect_ratio_groups`: each image's ratio ``width / height`` is quantised with the bin edges
  ``2 ** linspace(-1, 1, 2k + 1)`` (``k`` = the group factor; ``k = 0``: one edge at 1), so ``k = 3`` gives
  8 groups;
* :func:`group_batches`: walks the sampler's order and fills one buffer per group, emitting a batch whenever
  a buffer is full (``GroupedBatchSampler``). When the order is exhausted, the fullest leftover buffers are
  completed with earlier samples of their own group (repeated if the group is small) until the pass has
  ``len(order) // batch_size`` batches, as many as without grouping.

With square images (the built-in benchmark) every image falls into one group and the batches are exactly the
ungrouped ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from detbalance.data.base import DetectionDataset

__all__ = ["aspect_ratio_groups", "group_batches"]


def aspect_ratio_groups(sizes: DetectionDataset | Sequence[tuple[int, int]], *, factor: int) -> Tensor:
    """The aspect-ratio group of every image (torchvision's ``create_aspect_ratio_groups``).

    Args:
        sizes: a detbalance dataset (its :meth:`~DetectionDataset.image_size`, no image is decoded) or the
            ``(height, width)`` of each image.
        factor: ``k`` of torchvision's ``--aspect-ratio-group-factor`` (its default is 3): the bin edges of
            ``width / height`` are ``2 ** linspace(-1, 1, 2k + 1)``, or the single edge 1 for ``k = 0``.

    Returns:
        ``Tensor[N]`` int64 group ids in ``0 .. 2k + 1`` (``bisect_right`` of the ratio in the edges).

    Raises:
        ValueError: ``factor < 0``, or a non-positive image size (naming the image).
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
        raise ValueError(f"factor must be an integer >= 0 (torchvision's default is 3), got {factor!r}")
    if isinstance(sizes, DetectionDataset):
        hw = [sizes.image_size(i) for i in range(len(sizes))]
    else:
        hw = list(sizes)
    t = torch.tensor(hw, dtype=torch.float64).reshape(-1, 2)
    bad = (t <= 0).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"image {i} has a non-positive size (height, width) = {tuple(hw[i])}")
    if factor > 0:
        edges = torch.exp2(torch.linspace(-1.0, 1.0, 2 * factor + 1, dtype=torch.float64))
    else:
        edges = torch.ones(1, dtype=torch.float64)
    return torch.bucketize(t[:, 1] / t[:, 0], edges, right=True)


def group_batches(order: Sequence[int], group_ids: Tensor | Sequence[int], *, batch_size: int) -> list[list[int]]:
    """Batches of positions in ``order`` that hold one aspect-ratio group each (torchvision's
    ``GroupedBatchSampler``).

    Walks ``order`` (a sampler's indices into the dataset), appending each position to its group's buffer and
    emitting the buffer as a batch when it holds ``batch_size``; then completes the fullest leftover buffers
    with the group's earliest samples (repeated when the group has too few) until there are
    ``len(order) // batch_size`` batches.

    Args:
        order: dataset indices in sampling order (one pass).
        group_ids: ``Tensor[N]`` or a sequence: the group of each dataset index (:func:`aspect_ratio_groups`).
        batch_size: images per batch (>= 1).

    Returns:
        ``len(order) // batch_size`` batches of *positions* in ``order`` (``order[p]`` is the dataset index); a
        position appears twice only in a completed leftover batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    buffers: defaultdict[int, list[int]] = defaultdict(list)
    members: defaultdict[int, list[int]] = defaultdict(list)
    batches: list[list[int]] = []
    for position, index in enumerate(order):
        g = groups[index]
        buffers[g].append(position)
        members[g].append(position)
        if len(buffers[g]) == batch_size:
            batches.append(buffers[g])
            del buffers[g]
        buffers[g]  # noqa: B018  (re-creates the group's empty buffer at the end, as the reference does)
    expected = len(order) // batch_size
    # leftovers: the fullest buffers first (a stable sort: ties keep the buffers' order)
    for g, _ in sorted(buffers.items(), key=lambda item: len(item[1]), reverse=True):
        if len(batches) >= expected:
            break
        missing = batch_size - len(buffers[g])
        pool = members[g]
        fill = (pool * (missing // len(pool) + 1))[:missing]
        batches.append(buffers[g] + fill)
    return batches
