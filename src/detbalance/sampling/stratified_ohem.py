"""Stratified online hard example mining (S-OHEM; Li, Zhang, Yu, Chen and Li, arXiv:1705.02233, 2017).

Source: we could obtain only the paper's abstract (arXiv:1705.02233; searched for the full text and found
none we could read), plus the issue's summary of it (4 loss strata, classification first). What it states:

* OHEM weights the classification and localisation losses equally for the whole of training; S-OHEM
  ranks RoIs by a *weighted* multitask loss ``l = w_cls * l_cls + w_loc * l_loc`` whose weights change
  with training, classification weighted more early and localisation more late.
* The RoIs are split into loss strata (four in the paper) and the mini-batch is drawn by *stratified
  sampling*: each stratum contributes according to a sampling distribution that is also changed over the
  course of training, after OHEM's NMS.

What is ours (every choice below is a parameter; :class:`~detbalance.sampling.StratifiedOHEMSampler` also
weights the *back-propagated* loss with the same ``(w_cls, w_loc)`` it ranks with):

* The weights are a continuous function of ``progress`` (the fraction of training done) instead of discrete
  stages. Default (:func:`default_loss_weights`): ``w_cls = 1.5 - progress``, ``w_loc = 0.5 + progress``;
  the sum stays 2 (the scale of OHEM's ``l_cls + l_loc``) and the two are equal halfway through.
* Strata are quantiles of the batch's loss distribution (quartiles for 4 strata) over all non-ignored RoIs
  of all images of the batch, before NMS; stratum 0 is the hardest.
* The default sampling distribution (:func:`default_stratum_distribution`) is
  ``pi_s ∝ exp(-beta * s)`` with ``beta = 1 - 0.75 * progress``: early it is close to OHEM (64 %, 24 %,
  9 %, 3 % of the budget from the hardest to the easiest quartile), late it is flatter (35 %, 27 %, 21 %,
  17 %), so that the moderately hard RoIs, rather than the few hardest (often ambiguous or mislabelled),
  dominate late training.
* Quotas are ``num_samples * pi`` rounded by largest remainder (they sum to ``num_samples``); each
  stratum is filled with its hardest survivors of NMS; an unfilled quota passes to the next (easier)
  stratum; what the easiest stratum cannot fill goes to the hardest RoIs not yet taken, so that the budget
  is used whenever enough RoIs survive NMS.

With ``strata=1`` and ``loss_weights=(1.0, 1.0)`` this selects exactly what
``select_hard_examples(cls_losses + loc_losses, ...)`` selects (a test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from detbalance.sampling.assign import (
    check_boxes,
    check_count,
    check_finite,
    check_fraction,
    check_labels,
    check_same_length,
)
from detbalance.sampling.ohem import check_batch_idx, rank_candidates, to_sampled_indices
from detbalance.types import SampledIndices

__all__ = [
    "default_loss_weights",
    "default_stratum_distribution",
    "select_hard_examples_stratified",
    "stratum_quotas",
]

LossWeights = tuple[float, float] | Callable[[float], tuple[float, float]]
Quotas = Sequence[float] | Callable[[float], Sequence[float]]


def default_loss_weights(progress: float) -> tuple[float, float]:
    """Our default ``(w_cls, w_loc)`` at ``progress`` in ``[0, 1]``: ``(1.5 - progress, 0.5 + progress)``."""
    check_fraction(progress, "progress")
    return 1.5 - progress, 0.5 + progress


def default_stratum_distribution(progress: float, strata: int) -> list[float]:
    """Our default sampling distribution over strata (0 = hardest): ``pi_s ∝ exp(-(1 - 0.75 p) s)``."""
    check_fraction(progress, "progress")
    if isinstance(strata, bool) or not isinstance(strata, int) or strata < 1:
        raise ValueError(f"strata must be a positive int, got {strata!r}")
    beta = 1.0 - 0.75 * progress
    weights = [math.exp(-beta * s) for s in range(strata)]
    total = sum(weights)
    return [w / total for w in weights]


def stratum_quotas(distribution: Sequence[float], num_samples: int) -> list[int]:
    """Integer quotas ``num_samples * pi`` rounded by largest remainder (ties to the harder stratum).

    Raises:
        ValueError: if ``distribution`` has a negative or non-finite entry or sums to 0.
    """
    check_count(num_samples, "num_samples")
    values = [float(p) for p in distribution]
    if not values or any(not math.isfinite(p) or p < 0 for p in values) or sum(values) <= 0:
        raise ValueError(f"quotas must be non-negative, finite and not all zero, got {list(distribution)!r}")
    total = sum(values)
    raw = [num_samples * p / total for p in values]
    base = [math.floor(r) for r in raw]
    remainder = num_samples - sum(base)
    by_fraction = sorted(range(len(raw)), key=lambda s: (-(raw[s] - base[s]), s))
    for s in by_fraction[:remainder]:
        base[s] += 1
    return base


def select_hard_examples_stratified(
    cls_losses: Tensor,
    loc_losses: Tensor,
    labels: Tensor,
    boxes: Tensor,
    batch_idx: Tensor,
    *,
    num_samples: int,
    progress: float,
    strata: int = 4,
    loss_weights: LossWeights | None = None,
    quotas: Quotas | None = None,
    nms_iou: float | None = 0.7,
) -> SampledIndices:
    """Select hard RoIs per image by stratified sampling over loss strata (S-OHEM).

    ``l_i = w_cls(p) * cls_i + w_loc(p) * loc_i``; strata by the batch's quantiles of ``l``; per image, NMS
    in loss order as OHEM (:func:`~detbalance.sampling.select_hard_examples`), then each stratum ``s`` takes
    its hardest survivors up to its quota (plus what harder strata could not fill). See the module docstring
    for which parts are the paper's and which are our defaults.

    Args:
        cls_losses: ``Tensor[R]`` per-RoI classification loss, detached.
        loc_losses: ``Tensor[R]`` per-RoI localisation loss (0 for background RoIs), detached.
        labels: ``Tensor[R] (int64)``: ``-1`` ignore (never selected), ``0`` background, ``1..K`` foreground.
        boxes: ``Tensor[R, 4]`` RoI boxes ``(x1, y1, x2, y2)`` used for NMS.
        batch_idx: ``Tensor[R] (int64)`` the image of each RoI.
        num_samples: RoIs kept per image.
        progress: fraction of training done, in ``[0, 1]``.
        strata: number of loss strata (the paper: 4).
        loss_weights: ``(w_cls, w_loc)``, or a callable of ``progress`` returning it; ``None`` uses
            :func:`default_loss_weights`.
        quotas: a sampling distribution over strata (hardest first; normalised here), or a callable of
            ``progress`` returning one; ``None`` uses :func:`default_stratum_distribution`.
        nms_iou: NMS IoU threshold (OHEM: 0.7); ``None`` disables NMS.

    Returns:
        :class:`~detbalance.types.SampledIndices` ``(positive, negative)``, sorted indices into the ``R`` RoIs.

    Raises:
        ValueError: on mismatched lengths, a NaN or inf loss, ``x2 < x1`` or non-finite boxes, a negative budget, ``progress`` or ``nms_iou``
            outside ``[0, 1]``, negative loss weights or a quota vector of the wrong length.
    """
    check_labels(labels, "labels")
    num_rois = labels.shape[0]
    check_same_length(cls_losses, "cls_losses", num_rois, "labels")
    check_same_length(loc_losses, "loc_losses", num_rois, "labels")
    check_finite(cls_losses, "cls_losses")
    check_finite(loc_losses, "loc_losses")
    check_boxes(boxes, "boxes", rows=num_rois)
    check_batch_idx(batch_idx, num_rois)
    check_count(num_samples, "num_samples")
    check_fraction(progress, "progress")
    if isinstance(strata, bool) or not isinstance(strata, int) or strata < 1:
        raise ValueError(f"strata must be a positive int, got {strata!r}")
    if nms_iou is not None:
        check_fraction(nms_iou, "nms_iou")

    weights = default_loss_weights(progress) if loss_weights is None else (
        loss_weights(progress) if callable(loss_weights) else loss_weights
    )
    if len(weights) != 2 or any(not math.isfinite(float(w)) or float(w) < 0 for w in weights):
        raise ValueError(f"loss_weights must give two non-negative finite numbers (w_cls, w_loc), got {weights!r}")
    distribution = default_stratum_distribution(progress, strata) if quotas is None else (
        quotas(progress) if callable(quotas) else quotas
    )
    if len(distribution) != strata:
        raise ValueError(f"quotas must have one entry per stratum ({strata}), got {list(distribution)!r}")
    quota = stratum_quotas(distribution, num_samples)

    w_cls, w_loc = float(weights[0]), float(weights[1])
    losses = w_cls * cls_losses.detach() + w_loc * loc_losses.detach()
    device = labels.device
    valid = labels >= 0
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if num_samples == 0 or not bool(valid.any()):
        return SampledIndices(empty, empty.clone())

    # Stratum of every RoI from the batch's loss quantiles (0 = hardest).
    if strata > 1:
        levels = torch.arange(1, strata, device=device, dtype=torch.float64) / strata
        edges = torch.quantile(losses[valid].double(), levels).to(losses.dtype)
        stratum = (strata - 1) - torch.bucketize(losses, edges, right=True)
    else:
        stratum = torch.zeros(num_rois, dtype=torch.int64, device=device)

    ranked = rank_candidates(losses, labels, boxes, batch_idx, nms_iou=nms_iou)
    kept = ranked.kept
    # Dense image ids 0..U-1 for the (few) images of the batch.
    _, image_id = torch.unique_consecutive(ranked.image, return_inverse=True)
    num_images = int(image_id[-1]) + 1
    s_of = stratum[kept]
    group = image_id * strata + s_of
    available = torch.bincount(group, minlength=num_images * strata).view(num_images, strata)

    # Quotas with carry from harder to easier strata (a loop over the few strata, vectorised over images).
    take = torch.zeros_like(available)
    carry = torch.zeros(num_images, dtype=torch.int64, device=device)
    for s in range(strata):
        want = carry + quota[s]
        take[:, s] = torch.minimum(available[:, s], want)
        carry = want - take[:, s]

    # Rank of each survivor inside its (image, stratum): order by group, keep the loss order within.
    by_group = group.sort(stable=True).indices
    sorted_group = group[by_group]
    rank_sorted = torch.arange(kept.numel(), device=device) - torch.searchsorted(sorted_group, sorted_group)
    rank_in_group = torch.empty_like(rank_sorted).scatter_(0, by_group, rank_sorted)
    chosen = rank_in_group < take.view(-1)[group]

    # What the easiest stratum could not absorb goes to the hardest survivors not yet taken.
    left = (~chosen).long()
    exclusive = left.cumsum(0) - left
    rank_left = exclusive - exclusive[ranked.start]
    chosen |= ~chosen & (rank_left < carry[image_id])
    return to_sampled_indices(kept[chosen], labels)
