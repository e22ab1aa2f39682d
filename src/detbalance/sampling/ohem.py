"""Online hard example mining (OHEM; Shrivastava, Gupta and Girshick, CVPR 2016).

For each image of a mini-batch (the paper: N = 2 images, about 2000 RoIs each) the read-only RoI network
computes every RoI's loss ``l = l_cls + l_loc``; hard examples are the RoIs with the highest loss. Because
highly overlapping RoIs have correlated losses, NMS with IoU 0.7 is run over the RoIs with the loss as the
score, and the top ``B / N = 64`` survivors per image (the paper: B = 128 for two images) are kept for the
backward pass. There is no foreground/background ratio, and background RoIs are taken from IoU 0 upward
(``bg_lo = 0``; Fast R-CNN used ``[0.1, 0.5)``): give this sampler labels from
``assign_by_iou(high=0.5, low=0.5)``.

The sampler takes the losses as a tensor (computed by the caller under ``torch.no_grad()``); it never calls
a model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from detbalance.sampling.assign import (
    check_boxes,
    check_count,
    check_finite,
    check_fraction,
    check_labels,
    check_same_length,
)
from detbalance.types import SampledIndices

__all__ = ["select_hard_examples"]


def select_hard_examples(
    losses: Tensor,
    labels: Tensor,
    boxes: Tensor,
    batch_idx: Tensor,
    *,
    num_samples: int = 128,
    nms_iou: float | None = 0.7,
    positive_fraction: float | None = None,
    generator: torch.Generator | None = None,
) -> SampledIndices:
    """Select the hardest RoIs of each image after loss-scored NMS (OHEM).

    Per image ``b``: among the non-ignored RoIs of ``b``, sort by loss (descending; ties by index, or by a
    random permutation from ``generator``), run greedy NMS with threshold ``nms_iou`` in that order (a RoI is
    dropped if its IoU with an already kept RoI of the same image is ``> nms_iou``), then keep the first
    ``num_samples`` survivors. With ``positive_fraction`` the positives are capped at
    ``int(num_samples * positive_fraction)`` and the hardest negatives fill the rest (a variant the paper
    does not use; it is off by default).

    Args:
        losses: ``Tensor[R]`` per-RoI loss (the paper: ``l_cls + l_loc``), detached.
        labels: ``Tensor[R] (int64)``: ``-1`` ignore (never selected), ``0`` background, ``1..K`` foreground.
        boxes: ``Tensor[R, 4]`` RoI boxes ``(x1, y1, x2, y2)`` used for NMS.
        batch_idx: ``Tensor[R] (int64)`` the image of each RoI (NMS and budgets are per image).
        num_samples: RoIs kept per image (the paper: 64 per image, 128 per two-image batch; we default to
            128 per image as ``detbalance.detectors.OHEMRoISampler`` does).
        nms_iou: NMS IoU threshold (the paper: 0.7); ``None`` disables NMS.
        positive_fraction: optional cap on the fraction of positives, in ``[0, 1]``; ``None`` (the paper)
            means no cap.
        generator: if given, ties in the loss are broken by a random permutation drawn from it instead of
            by index. Without ties the result does not depend on it.

    Returns:
        :class:`~detbalance.types.SampledIndices` ``(positive, negative)``, sorted indices into the flat
        ``R`` RoIs.

    Raises:
        ValueError: on mismatched lengths, a NaN or inf loss, ``x2 < x1`` or non-finite boxes, a negative budget or a threshold or fraction
            outside ``[0, 1]``; the message names the argument.
    """
    check_labels(labels, "labels")
    num_rois = labels.shape[0]
    check_same_length(losses, "losses", num_rois, "labels")
    check_finite(losses, "losses")
    check_boxes(boxes, "boxes", rows=num_rois)
    check_batch_idx(batch_idx, num_rois)
    check_count(num_samples, "num_samples")
    if nms_iou is not None:
        check_fraction(nms_iou, "nms_iou")
    if positive_fraction is not None:
        check_fraction(positive_fraction, "positive_fraction")

    ranked = rank_candidates(losses, labels, boxes, batch_idx, nms_iou=nms_iou, generator=generator)
    kept = ranked.kept
    is_pos = labels[kept] > 0
    if positive_fraction is None:
        chosen = ranked.position < num_samples
    else:
        max_pos = int(num_samples * positive_fraction)
        pos_rank, num_pos_in_image = _rank_within_image(is_pos, ranked)
        neg_rank, _ = _rank_within_image(~is_pos, ranked)
        pos_taken = num_pos_in_image.clamp(max=max_pos)
        chosen = torch.where(is_pos, pos_rank < max_pos, neg_rank < num_samples - pos_taken)
    return to_sampled_indices(kept[chosen], labels)


# --------------------------------------------------------------------------------------------------------
# Shared with stratified_ohem.py.


class RankedCandidates(NamedTuple):
    """Non-ignored RoIs that survive NMS, ordered by (image, loss descending, tie-break).

    ``kept``: ``Tensor[M]`` indices into the flat RoIs; ``image``: ``Tensor[M]`` their ``batch_idx``;
    ``position``: ``Tensor[M]`` rank within the image (0 = hardest); ``start``/``end``: ``Tensor[M]`` the
    first and last position in ``kept`` of the same image.
    """

    kept: Tensor
    image: Tensor
    position: Tensor
    start: Tensor
    end: Tensor


def rank_candidates(
    losses: Tensor,
    labels: Tensor,
    boxes: Tensor,
    batch_idx: Tensor,
    *,
    nms_iou: float | None,
    generator: torch.Generator | None = None,
) -> RankedCandidates:
    """Loss-ranked NMS per image over the non-ignored RoIs (see :func:`select_hard_examples`)."""
    device = labels.device
    candidates = (labels >= 0).nonzero().squeeze(1)
    if generator is not None and candidates.numel():
        shuffle = torch.randperm(candidates.numel(), generator=generator, device=generator.device)
        candidates = candidates[shuffle.to(device)]
    # Stable sort: equal losses keep the tie-break order (index, or the generator's permutation).
    order = losses.detach()[candidates].sort(descending=True, stable=True).indices
    candidates = candidates[order]
    if nms_iou is not None and candidates.numel():
        # Strictly decreasing scores make NMS's own (possibly unstable) sort follow our order exactly.
        scores = torch.arange(candidates.numel(), 0, -1, device=device, dtype=boxes.dtype)
        keep = batched_nms(boxes[candidates], scores, batch_idx[candidates], float(nms_iou))
        candidates = candidates[keep.sort().values]
    image_order = batch_idx[candidates].sort(stable=True).indices
    kept = candidates[image_order]
    image = batch_idx[kept].contiguous()
    start = torch.searchsorted(image, image, right=False)
    end = torch.searchsorted(image, image, right=True) - 1
    position = torch.arange(kept.numel(), device=device) - start
    return RankedCandidates(kept=kept, image=image, position=position, start=start, end=end)


def _rank_within_image(flags: Tensor, ranked: RankedCandidates) -> tuple[Tensor, Tensor]:
    """For flagged candidates: their rank among the flagged of the same image, and that image's flag count."""
    inclusive = flags.long().cumsum(0)
    exclusive = inclusive - flags.long()
    if flags.numel() == 0:
        return exclusive, exclusive
    rank = exclusive - exclusive[ranked.start]
    count = inclusive[ranked.end] - exclusive[ranked.start]
    return rank, count


def to_sampled_indices(selected: Tensor, labels: Tensor) -> SampledIndices:
    """Split flat selected indices into sorted positive and negative indices."""
    selected = selected.sort().values
    is_pos = labels[selected] > 0
    return SampledIndices(positive=selected[is_pos], negative=selected[~is_pos])


def check_batch_idx(batch_idx: Tensor, num_rois: int) -> None:
    """Raise ``ValueError`` unless ``batch_idx`` is a 1-D non-negative integer tensor of ``num_rois`` items."""
    check_same_length(batch_idx, "batch_idx", num_rois, "labels")
    if batch_idx.dtype.is_floating_point or batch_idx.dtype == torch.bool:
        raise ValueError(f"batch_idx must be an integer tensor, got dtype {batch_idx.dtype}")
    if batch_idx.numel() and int(batch_idx.min()) < 0:
        raise ValueError(f"batch_idx must be >= 0, got min {int(batch_idx.min())}")
