"""What Libra R-CNN's IoU-balanced sampling does to the negatives: how many fall in each IoU bin.

Libra R-CNN (Pang et al., CVPR 2019, fig. 2) shows that more than 60 % of the hard negatives lie above IoU
0.05 while random sampling draws over 70 % of its negatives below it. :func:`libra_negative_stats` counts, per
IoU bin of the RoI head's training RoIs, the negatives available, those a fixed-ratio (random) sampler takes
and those the IoU-balanced sampler takes, from the same RoIs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from detbalance.sampling.roi_sampler import FixedRatioSampler, IoUBalancedSampler, RoIBatch

__all__ = ["LibraStats", "detector_libra_stats", "libra_negative_stats"]


@dataclass(frozen=True)
class LibraStats:
    """Negatives per IoU bin: ``bin_edges`` (IoU, the first bin is IoU exactly 0), and per bin the negatives
    ``available``, taken by a fixed-ratio sampler (``random``) and by the IoU-balanced sampler (``balanced``),
    summed over ``num_images`` images at the same budget ``num_samples`` per image."""

    num_images: int
    num_samples: int
    bin_labels: list[str]
    available: list[int]
    random: list[int]
    balanced: list[int]

    def share(self, counts: Sequence[int]) -> list[float]:
        """Each bin's share of ``counts`` (0 when empty)."""
        total = sum(counts)
        return [c / total if total else 0.0 for c in counts]


def _bins(max_iou: torch.Tensor, edges: Sequence[float]) -> torch.Tensor:
    """Bin of each IoU: 0 for IoU == 0, then ``[edges[i], edges[i + 1])`` for ``i >= 1`` (the last bin closed)."""
    inner = torch.tensor(list(edges[2:-1]), dtype=max_iou.dtype, device=max_iou.device)
    return torch.where(max_iou == 0, 0, 1 + torch.bucketize(max_iou, inner, right=True))


def libra_negative_stats(
    batches: Sequence[RoIBatch],
    sampler: IoUBalancedSampler,
    *,
    edges: Sequence[float] = (0.0, 0.0, 1 / 6, 1 / 3, 0.5),
    seed: int = 0,
) -> LibraStats:
    """Negatives per IoU bin, available and sampled by fixed-ratio and by IoU-balanced sampling.

    Args:
        batches: RoI batches as the Faster R-CNN head builds them (:meth:`BalancedRoIHeads.prepare_training_rois`),
            with ``gt_index``.
        sampler: The IoU-balanced sampler; the fixed-ratio sampler gets its budget and positive fraction.
        edges: Bin edges: ``(0, 0)`` is the bin of IoU exactly 0, then ``[edges[i], edges[i + 1])``. The
            default's three bins over ``(0, 0.5)`` are the sampler's over ``(0, 1)`` seen from the negatives.
        seed: Seed of both samplers' generator.

    Returns:
        :class:`LibraStats`.
    """
    if len(edges) < 3 or edges[0] != 0.0 or edges[1] != 0.0 or list(edges[1:]) != sorted(edges[1:]):
        raise ValueError(f"edges must start (0, 0) and increase, got {tuple(edges)}")
    fixed = FixedRatioSampler(num_samples=sampler.num_samples, positive_fraction=sampler.positive_fraction)
    nbins = len(edges) - 1
    available, random, balanced = [0] * nbins, [0] * nbins, [0] * nbins
    images = 0
    for rois in batches:
        images += rois.num_images
        bins = _bins(rois.max_iou, edges)
        neg = rois.labels == 0
        for counts, chosen in ((available, neg.nonzero().flatten()),
                               (random, fixed(rois, generator=torch.Generator().manual_seed(seed)).negative),
                               (balanced, sampler(rois, generator=torch.Generator().manual_seed(seed)).negative)):
            hist = torch.bincount(bins[chosen], minlength=nbins).tolist()
            for i in range(nbins):
                counts[i] += int(hist[i])
    labels = ["IoU 0"] + [f"{'(' if a == 0 else '['}{a:.2f}, {b:.2f})" for a, b in zip(edges[1:-1], edges[2:])]
    return LibraStats(images, sampler.num_samples, labels, available, random, balanced)


def detector_libra_stats(
    model: torch.nn.Module, dataset: Any, indices: Sequence[int], *, sampler: IoUBalancedSampler,
    batch_size: int = 8, seed: int = 0,
) -> LibraStats:
    """:func:`libra_negative_stats` over ``dataset[indices]`` for an adapted Faster R-CNN (training proposals:
    the RPN runs in training mode, the rest in evaluation mode; no gradient, no state changes)."""
    head = model.roi_heads
    was_training = model.training
    model.eval()
    batches = []
    try:
        with torch.no_grad():
            model.rpn.train()  # the training proposal pool, the candidates the sampler draws from
            for start in range(0, len(indices), batch_size):
                items = [dataset[i] for i in indices[start:start + batch_size]]
                image_list, targets = model.transform(
                    [im for im, _ in items], [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items])
                features = model.backbone(image_list.tensors)
                features = features if isinstance(features, dict) else {"0": features}
                proposals, _ = model.rpn(image_list, features, targets)
                rois, _ = head.prepare_training_rois(proposals, image_list.image_sizes, targets)
                batches.append(rois)
    finally:
        model.train(was_training)
    return libra_negative_stats(batches, sampler, seed=seed)
