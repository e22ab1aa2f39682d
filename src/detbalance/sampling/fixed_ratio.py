"""Fixed-ratio random sampling of anchors or RoIs (Faster R-CNN, Ren et al., NeurIPS 2015).

Per image, up to ``int(num_samples * positive_fraction)`` foreground examples are drawn uniformly without
replacement, and background examples fill the rest of the ``num_samples`` budget (as torchvision's
``BalancedPositiveNegativeSampler`` and detectron2's ``subsample_labels``). Faster R-CNN's defaults: RPN 256
anchors per image at 0.5, RoI head 512 RoIs per image at 0.25.

The batched form draws one uniform key per example, offset by label so that a row sorts as (positives,
negatives, ignored), each group in random order, and keeps the ``num_samples`` smallest keys per row with one
``topk`` (a second ``topk`` over the negatives for rows with more positives than the cap): no Python loop over
images, and the same distribution as a per-image ``randperm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detbalance.sampling.assign import check_count, check_fraction, check_labels
from detbalance.types import SampledIndices

__all__ = ["sample_fixed_ratio", "sample_fixed_ratio_batched"]


def sample_fixed_ratio(
    labels: Tensor,
    num_samples: int,
    positive_fraction: float,
    *,
    generator: torch.Generator | None = None,
) -> SampledIndices:
    """Draw a fixed-ratio sample of one image's anchors or RoIs.

    ``num_pos = min(#{labels > 0}, int(num_samples * positive_fraction))`` positives and
    ``num_neg = min(#{labels == 0}, num_samples - num_pos)`` negatives, each uniformly without replacement.
    Ignored examples (``-1``) are never drawn. With a budget at least the number of candidates, every
    candidate is returned, whatever the generator.

    Args:
        labels: ``Tensor[R] (int64)``: ``-1`` ignore, ``0`` background, ``1..K`` foreground.
        num_samples: examples per image (RPN 256, RoI head 512).
        positive_fraction: the largest fraction of positives (RPN 0.5, RoI head 0.25), in ``[0, 1]``.
        generator: the source of randomness; ``None`` uses torch's global generator.

    Returns:
        :class:`~detbalance.types.SampledIndices` ``(positive, negative)``, indices into ``labels``, sorted.

    Raises:
        ValueError: if ``labels`` is not a 1-D integer tensor with values ``>= -1``, ``num_samples`` is not a
            non-negative int or ``positive_fraction`` is outside ``[0, 1]``.

    Example:
        >>> labels = torch.tensor([1, 0, 0, 0, 0, -1])
        >>> pos, neg = sample_fixed_ratio(labels, 4, 0.5, generator=torch.Generator().manual_seed(0))
        >>> pos.tolist(), len(neg)
        ([0], 3)
    """
    check_labels(labels, "labels", dim=1)
    return sample_fixed_ratio_batched(labels[None], num_samples, positive_fraction, generator=generator)[0]


def sample_fixed_ratio_batched(
    labels: Tensor | Sequence[Tensor],
    num_samples: int,
    positive_fraction: float,
    *,
    generator: torch.Generator | None = None,
) -> list[SampledIndices]:
    """:func:`sample_fixed_ratio` for a batch of images at once, without a Python loop over images.

    Args:
        labels: ``Tensor[B, R] (int64)`` padded with ``-1``, or a list of ``B`` tensors ``Tensor[R_b]``.
        num_samples: examples per image.
        positive_fraction: the largest fraction of positives per image, in ``[0, 1]``.
        generator: the source of randomness; ``None`` uses torch's global generator. A generator on another
            device than ``labels`` is allowed: the keys are drawn there and moved.

    Returns:
        One :class:`~detbalance.types.SampledIndices` per image, indices into that image's labels, sorted.

    Raises:
        ValueError: as :func:`sample_fixed_ratio`.
    """
    check_count(num_samples, "num_samples")
    check_fraction(positive_fraction, "positive_fraction")
    if isinstance(labels, Tensor):
        check_labels(labels, "labels", dim=2)
        padded = labels
    else:
        if len(labels) == 0:
            return []
        for i, per_image in enumerate(labels):
            check_labels(per_image, f"labels[{i}]", dim=1)
        padded = torch.nn.utils.rnn.pad_sequence(list(labels), batch_first=True, padding_value=-1)
    num_images, num_rois = padded.shape
    device = padded.device
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if num_images == 0:
        return []
    if num_rois == 0 or num_samples == 0:
        return [SampledIndices(empty, empty.clone()) for _ in range(num_images)]

    max_pos = int(num_samples * positive_fraction)
    k = min(num_samples, num_rois)
    gen_device = generator.device if generator is not None else device
    # One key per example: u - 2 * clamp(label, -1, 1) with u ~ U[0, 1), so positives lie in [-2, -1),
    # negatives in [0, 1) and ignored examples in [2, 3). In ascending order a row lists its positives in
    # random order, then its negatives in random order, then the ignored ones.
    keys = torch.rand(num_images, num_rois, generator=generator, device=gen_device).to(device)
    keys.add_(padded.clamp(-1, 1), alpha=-2)
    values, order = keys.topk(k, dim=1, largest=False, sorted=True)  # [B, k]
    position = torch.arange(k, device=device)[None, :]
    is_pos = values < -1
    pos_mat = torch.where(is_pos & (position < max_pos), order, num_rois)
    # If a row has at most max_pos positives, its first k keys are all it needs: every positive, then
    # negatives up to the budget. Otherwise its negatives are drawn by a second topk (rare for RPN/RoI use).
    overflow = is_pos[:, max_pos] if max_pos < k else torch.zeros(num_images, dtype=torch.bool, device=device)
    neg_mat = torch.where((values >= 0) & (values < 1) & ~overflow[:, None], order, num_rois)
    rows = overflow.nonzero().squeeze(1)
    if rows.numel():
        k_neg = min(num_samples - max_pos, num_rois)
        sub = keys[rows]
        sub = torch.where(sub < -1, 5.0, sub)  # positives out of the way
        sub_values, sub_order = sub.topk(k_neg, dim=1, largest=False, sorted=True)
        chosen = torch.where(sub_values < 1, sub_order, num_rois)
        neg_mat[rows] = torch.nn.functional.pad(chosen, (0, k - k_neg), value=num_rois)
    picked = [m.sort(dim=1).values for m in (pos_mat, neg_mat)]  # taken first, ascending
    # One host sync for the per-image counts, needed to split the flat results.
    counts = torch.stack([(m < num_rois).sum(dim=1) for m in picked]).tolist()
    return [
        SampledIndices(p, n)
        for p, n in zip(
            picked[0][picked[0] < num_rois].split(counts[0]),
            picked[1][picked[1] < num_rois].split(counts[1]),
            strict=True,
        )
    ]
