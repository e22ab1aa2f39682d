r"""Libra R-CNN's RoI sampling: IoU-balanced negatives and instance-balanced positives, batched.

Pang, Chen, Shi, Feng, Ouyang and Lin, "Libra R-CNN: Towards Balanced Learning for Object Detection", CVPR
2019, https://arxiv.org/abs/1904.02701, sec. 3.1. The reference is mmdetection 3.3's
``IoUBalancedNegSampler`` and ``InstanceBalancedPosSampler`` under ``CombinedSampler`` with the values of
``configs/libra_rcnn`` (held to a literal transcription in ``tests/reference/mmdet_libra.py``). mmdetection
samples one image at a time with Python sets, a loop over ground-truth boxes and NumPy on the host; here the
whole batch is sampled at once on the RoIs' device by group ranks of random keys (one sort per stage), with
no host round trip and no loop over boxes, bins or images.

Per image, with budget ``N`` and ``P = int(N * positive_fraction)``:

* **Positives** (instance-balanced): all of them if there are at most ``P``; otherwise each matched ground
  truth keeps up to ``round(P / G) + 1`` of its positives at random (``G`` ground truths among them), a
  shortfall is filled at random from the rest, an excess is cut at random to ``P``.
* **Negatives**, ``N - #positives`` of them (IoU-balanced): all if there are no more; otherwise the
  negatives split into a *floor* set and an *IoU* set at ``floor_thr``. ``int(E (1 - floor_fraction))`` are
  drawn from the IoU set: the interval ``[floor_thr, max IoU of the image)`` is cut into ``num_bins`` equal
  bins and each bin gives up to ``int(E_iou / num_bins)`` at random, a shortfall filled at random from the
  IoU set; the floor set then fills the budget at random, and any remaining shortfall comes from all
  negatives.

``floor_thr`` as mmdetection runs it. Its config says ``floor_thr=-1`` ("all using IoU balanced
sampling"), but the sampler's first call sets ``self.floor_thr = 0``, so from the second call on the IoU set
is ``IoU > 0`` and the negatives with IoU exactly 0 only make up a shortfall. ``floor_thr=0.0`` (our
default) is that behaviour, i.e. mmdetection's training after its first step; ``floor_thr=None`` is the
documented intent (every negative binned from IoU 0, as mmdetection's very first call does), an option.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detbalance.sampling.assign import (
    check_count,
    check_finite,
    check_fraction,
    check_labels,
    check_same_length,
)
from detbalance.types import SampledIndices

__all__ = ["sample_iou_balanced"]


def _rank_in_group(group: Tensor, keys: Tensor) -> Tensor:
    """Each element's rank within its group in ascending ``keys`` order: one sort of ``group + keys``.

    ``group`` holds integral values (float64), ``keys`` values in ``[0, 1)``; the start of each group in the
    sorted order is found by a running maximum, so no per-group table is built.
    """
    order = (group + keys).argsort()
    sorted_group = group[order]
    position = torch.arange(order.numel(), device=order.device)
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    first = torch.where(starts, position, 0).cummax(0).values
    rank = torch.empty_like(order)
    rank[order] = position - first
    return rank


def _count(mask: Tensor, image: Tensor, num_images: int) -> Tensor:
    """``Tensor[B]`` number of true elements of ``mask`` per image (no host sync)."""
    return torch.zeros(num_images, dtype=torch.int64, device=mask.device).index_add_(0, image, mask.long())


def sample_iou_balanced(
    labels: Tensor,
    max_iou: Tensor,
    batch_idx: Tensor,
    gt_index: Tensor,
    *,
    num_images: int,
    num_samples: int = 512,
    positive_fraction: float = 0.25,
    floor_thr: float | None = 0.0,
    floor_fraction: float = 0.0,
    num_bins: int = 3,
    generator: torch.Generator | None = None,
    validate_args: bool = True,
) -> SampledIndices:
    """Libra R-CNN's IoU-balanced negatives and instance-balanced positives, per image, for a whole batch.

    See the module docstring for the rule (mmdetection 3.3's ``CombinedSampler(InstanceBalancedPosSampler,
    IoUBalancedNegSampler)``; defaults from ``configs/libra_rcnn``: 512 at 0.25, 3 bins, floor fraction 0).
    The same inputs and generator state give the same result; the selected sets have the reference's
    distribution (not its random stream).

    Args:
        labels: ``Tensor[R] (int64)``: ``-1`` ignore (never sampled), ``0`` background, ``1..K`` foreground.
        max_iou: ``Tensor[R]`` each RoI's largest IoU with a ground-truth box of its image (0 if none; the
            ground-truth boxes among the RoIs have 1, as mmdetection's ``add_gt_as_proposals``).
        batch_idx: ``Tensor[R] (int64)`` the image of each RoI, in ``[0, num_images)``.
        gt_index: ``Tensor[R] (int64)`` for a foreground RoI the index of its matched ground-truth box, unique
            over the batch (``-1`` elsewhere): the instance of instance-balanced sampling.
        num_images: ``B``, the number of images.
        num_samples: Budget ``N`` per image.
        positive_fraction: Largest foreground share; ``P = int(N * positive_fraction)``.
        floor_thr: IoU below which negatives form the floor set (``0.0``: IoU == 0, mmdetection in training);
            ``None``: no floor set, every negative binned from IoU 0.
        floor_fraction: The IoU set gets ``int(E (1 - floor_fraction))`` of the negative budget ``E``, the floor
            set what is left (mmdetection's order).
        num_bins: IoU bins of the IoU set (``1``: uniform sampling of the IoU set).
        generator: Source of randomness (``None``: torch's global generator); it may live on another device.
        validate_args: Check the inputs (a few host syncs); the detector adapter passes checked tensors.

    Returns:
        :class:`~detbalance.types.SampledIndices` ``(positive, negative)``, sorted indices into the ``R`` RoIs.

    Raises:
        ValueError: On mismatched lengths, labels below -1, a non-finite IoU, a foreground RoI without a
            ground-truth index, or hyperparameters out of range; the message names the argument.

    Example:
        >>> import torch
        >>> labels = torch.tensor([1, 1, 0, 0, 0, 0])
        >>> iou = torch.tensor([1.0, 0.7, 0.0, 0.1, 0.2, 0.45])
        >>> s = sample_iou_balanced(labels, iou, torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, -1, -1, -1, -1]),
        ...                         num_images=1, num_samples=4, positive_fraction=0.5)
        >>> s.positive.tolist(), len(s.negative)
        ([0, 1], 2)
    """
    num_rois = labels.shape[0] if labels.dim() == 1 else -1
    if validate_args:
        check_labels(labels, "labels")
        check_same_length(max_iou, "max_iou", num_rois, "labels")
        check_same_length(batch_idx, "batch_idx", num_rois, "labels")
        check_same_length(gt_index, "gt_index", num_rois, "labels")
        check_finite(max_iou, "max_iou")
        check_count(num_images, "num_images")
        check_count(num_samples, "num_samples")
        check_fraction(positive_fraction, "positive_fraction")
        check_fraction(floor_fraction, "floor_fraction")
        if floor_thr is not None:
            check_fraction(floor_thr, "floor_thr")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
        if num_rois and bool(((labels > 0) & (gt_index < 0)).any()):
            raise ValueError("gt_index must give the matched ground truth (>= 0) of every foreground RoI")
        if num_rois and (int(batch_idx.min()) < 0 or int(batch_idx.max()) >= num_images):
            raise ValueError(f"batch_idx must lie in [0, num_images = {num_images})")
    device = labels.device
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if num_rois == 0 or num_images == 0:
        return SampledIndices(empty, empty.clone())
    image = batch_idx.long()
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(2, num_rois, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    pos, neg = labels > 0, labels == 0
    max_pos = int(num_samples * positive_fraction)
    n_pos = _count(pos, image, num_images)

    # Which negatives form the IoU set (binned) and which the floor set.
    if floor_thr is None:
        iou_set, base = neg, 0.0
    elif floor_thr > 0:
        iou_set, base = neg & (max_iou >= floor_thr), float(floor_thr)
    else:
        iou_set, base = neg & (max_iou > 0), 0.0
    budget = num_samples - n_pos.clamp(max=max_pos)  # negatives per image: N - #positives kept
    iou_budget = torch.floor(budget.double() * (1.0 - floor_fraction)).long()
    # IoU bins of each image: [base + i w, base + (i + 1) w), w = (max IoU of the image - base) / num_bins. The
    # bin is found by division, then moved by one where rounding put it across an edge (edges as mmdetection
    # computes them, base + i * w), so membership is decided by the same comparisons.
    top = torch.full((num_images,), float("-inf"), dtype=max_iou.dtype, device=device)
    width = ((top.scatter_reduce(0, image, max_iou, reduce="amax") - base) / num_bins)[image]
    guess = torch.floor((max_iou - base) / width).nan_to_num(nan=-1.0, posinf=-1.0, neginf=-1.0).clamp(-1, num_bins)
    guess = guess - (max_iou < base + guess * width).to(guess.dtype)
    guess = guess + (max_iou >= base + (guess + 1) * width).to(guess.dtype)
    bin_id = torch.where((guess >= 0) & (guess < num_bins), guess.long(), num_bins)
    binning = num_bins >= 2

    # Sort 1, the per-group quotas: negatives by (image, IoU bin), positives by matched object.
    slots = num_bins + 1
    neg_group = image * slots + bin_id
    group = torch.where(pos, num_images * slots + gt_index.long().clamp(min=0), neg_group)
    group = torch.where(pos | iou_set, group, -1).double()
    rank = _rank_in_group(group, keys[0])
    first_of_object = pos & (rank == 0)
    per_object = (torch.round(max_pos / _count(first_of_object, image, num_images).clamp(min=1).double()) + 1).long()
    per_bin = torch.div(iou_budget, num_bins, rounding_mode="floor")
    quota = torch.where(pos, per_object[image], torch.where(bin_id < num_bins, per_bin[image], 0) if binning else 0)
    # Tiers in the order mmdetection fills the budget: within quota, then the rest of the same set (a shortfall
    # filled at random), then the floor set, then any negative left.
    tier = torch.where(rank < quota, 0, 1)
    tier = torch.where(pos | iou_set, tier, 2)
    if floor_fraction > 0:  # the IoU set gives at most int(E (1 - floor_fraction)); the rest waits
        segment = torch.where(iou_set, image, -1).double()
        in_iou = _rank_in_group(segment, (tier.double() + keys[1]) / 4)  # keys in [0, 1) for every element
        tier = torch.where(iou_set & (in_iou >= iou_budget[image]), 3, tier)
    # Sort 2, per image and kind (positive / negative): the lowest (tier, key) within the budget.
    segment = torch.where(pos, image * 2, image * 2 + 1)
    segment = torch.where(pos | neg, segment, -1).double()
    order_in_segment = _rank_in_group(segment, (tier.double() + keys[1]) / 4)
    positive = pos & (order_in_segment < max_pos)
    negative = neg & (order_in_segment < budget[image])
    return SampledIndices(positive.nonzero().squeeze(1), negative.nonzero().squeeze(1))
