r"""Score-HLR sampling: ISR-N of Prime Sample Attention (PISA; Cao et al., CVPR 2020, arXiv:1904.04821).

The negative part of PISA's importance-based sample re-weighting, as mmdetection 3.3's ``ScoreHLRSampler``:

1. positives are drawn at random up to ``int(num_samples * positive_fraction)`` per image; the rest of the
   budget, ``n_exp = min(#negatives, num_samples - #positives)``, goes to negatives;
2. a negative is *valid* if its largest foreground score ``s`` (softmax, background column excluded) is
   ``> score_thr``;
3. the valid negatives of an image are grouped by NMS-match over their predicted boxes (the box of their
   top-scoring class): in descending score order, each not yet grouped box opens a group with every later
   box whose IoU with it is ``>= iou_thr``;
4. the score hierarchical local rank (Score-HLR): rank in the group by score, then across groups by
   (rank in group, score); the ``n_exp`` first are kept, and if there are fewer valid negatives than
   ``n_exp`` the remainder is drawn at random from the invalid ones;
5. the kept negatives get weight :math:`u = (U - r) / U` (:math:`U = \max(n_{exp}, \#valid)`, :math:`r`
   the Score-HLR; the random ones the smallest :math:`u` of the image), then
   :math:`w = (\beta + (1 - \beta) u)^k`, then :math:`w \leftarrow w \sum L / \sum w L` over the image's
   kept negatives with :math:`L` their background cross entropy.

mmdetection groups with mmcv's ``nms_match`` (a C++ loop over boxes) and its RoI head runs the extra
forward inside the sampler. Here the sampler is a function of tensors: the scores, predicted boxes and
losses come from the detector's read-only pass (the one OHEM uses), and the grouping is torchvision's NMS for
the group leaders plus one IoU matrix between every valid negative and the leaders of its image (no loop
over boxes). mmcv's NMS-match groups at ``IoU >= iou_thr`` and torchvision's NMS suppresses at
``IoU > iou_thr``: the two differ only for an IoU exactly equal to the threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

from detbalance.sampling.assign import check_boxes, check_count, check_finite, check_fraction, check_labels
from detbalance.sampling.fixed_ratio import sample_fixed_ratio_batched
from detbalance.types import SampledIndices

__all__ = ["sample_score_hlr"]


def _segment_rank(keys: Tensor) -> Tensor:
    n = keys.shape[0]
    pos = torch.arange(n, device=keys.device)
    start = torch.ones(n, dtype=torch.bool, device=keys.device)
    if n > 1:
        start[1:] = keys[1:] != keys[:-1]
    return pos - torch.where(start, pos, torch.zeros_like(pos)).cummax(0).values


def _rank_within(groups: Tensor, score: Tensor) -> Tensor:
    """Rank (0 = highest ``score``) of each element within its group (two stable sorts)."""
    by_score = torch.argsort(score, descending=True, stable=True)
    order = by_score[torch.argsort(groups[by_score], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = _segment_rank(groups[order])
    return rank


def nms_match_rank(boxes: Tensor, scores: Tensor, *, iou_thr: float) -> Tensor:
    """Rank of every box inside its NMS-match group (0 = the group's leader), for one image.

    Leaders are the boxes kept by greedy NMS at ``iou_thr``; every other box joins the first leader (in
    descending score order) that precedes it and overlaps it at ``IoU >= iou_thr``, as mmcv's ``nms_match``.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(n, device=boxes.device)
    leaders = nms(boxes, scores, iou_thr)
    overlap = box_iou(boxes, boxes[leaders]) >= iou_thr  # [N, L]
    leader_pos = position[leaders]
    allowed = overlap & (leader_pos[None, :] <= position[:, None])
    big = torch.full_like(leader_pos, n)
    first = torch.where(allowed, leader_pos[None, :], big[None, :]).argmin(dim=1)
    group = leaders[first]
    return _rank_within(group, scores)


def sample_score_hlr(
    labels: Tensor,
    batch_idx: Tensor,
    pred_boxes: Tensor,
    scores: Tensor,
    negative_loss: Tensor,
    *,
    num_images: int,
    num_samples: int = 512,
    positive_fraction: float = 0.25,
    k: float = 0.5,
    bias: float = 0.0,
    score_thr: float = 0.05,
    iou_thr: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[SampledIndices, Tensor]:
    """Score-HLR sampling with ISR-N weights (see the module docstring for the steps).

    Args:
        labels: ``Tensor[R] (int64)``: ``-1`` ignore, ``0`` background, ``1..K`` foreground.
        batch_idx: ``Tensor[R] (int64)`` image of each RoI, non-decreasing.
        pred_boxes: ``Tensor[R, 4]`` each RoI's predicted box for its top-scoring foreground class.
        scores: ``Tensor[R]`` each RoI's largest foreground probability (softmax without background).
        negative_loss: ``Tensor[R]`` each RoI's classification loss as background (cross entropy with label 0).
        num_images: ``B``.
        num_samples: Budget per image (mmdetection: 512).
        positive_fraction: Largest foreground share (mmdetection: 0.25).
        k: Power of the weight mapping (mmdetection: 0.5).
        bias: Shift of the weight mapping in ``[0, 1]`` (mmdetection: 0).
        score_thr: A negative is ranked only if its score is ``> score_thr`` (mmdetection: 0.05).
        iou_thr: IoU of the NMS-match grouping (mmdetection: 0.5).
        generator: Source of randomness for positives and the random negatives.

    Returns:
        ``(indices, negative_weight)``: sorted :class:`~detbalance.types.SampledIndices` and ``Tensor[N_neg]``
        weights of ``indices.negative`` (same order), detached.

    Raises:
        ValueError: On NaN or infinite ``scores`` or ``negative_loss`` (naming which), on shape mismatches
            or on bad hyperparameters.
    """
    check_labels(labels)
    r = labels.shape[0]
    check_boxes(pred_boxes, "pred_boxes", rows=r)
    for name, t in (("batch_idx", batch_idx), ("scores", scores), ("negative_loss", negative_loss)):
        if t.shape != (r,):
            raise ValueError(f"{name} must have shape [{r}] (one per label), got {tuple(t.shape)}")
    check_finite(scores, "scores")
    check_finite(negative_loss, "negative_loss")
    check_count(num_samples, "num_samples")
    check_count(num_images, "num_images")
    check_fraction(positive_fraction, "positive_fraction")
    check_fraction(bias, "bias")
    check_fraction(score_thr, "score_thr")
    check_fraction(iou_thr, "iou_thr")
    if isinstance(k, bool) or not isinstance(k, int | float) or not k >= 0:
        raise ValueError(f"k must be a number >= 0, got {k!r}")
    device = labels.device
    batch_idx = batch_idx.to(torch.int64)

    # 1. positives: random, at most int(num_samples * positive_fraction) per image.
    counts = torch.bincount(batch_idx, minlength=num_images).tolist()
    only_pos = torch.where(labels > 0, labels, torch.full_like(labels, -1))
    drawn = sample_fixed_ratio_batched(list(only_pos.split(counts)), num_samples, positive_fraction,
                                       generator=generator)
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    positive = torch.cat([labels.new_zeros(0)] + [d.positive + s for d, s in zip(drawn, starts)])
    num_pos = torch.zeros(num_images, dtype=torch.int64, device=device).index_add_(
        0, batch_idx[positive], torch.ones_like(positive))

    negative = labels == 0
    num_neg = torch.zeros(num_images, dtype=torch.int64, device=device).index_add_(
        0, batch_idx, negative.to(torch.int64))
    expected = torch.minimum(num_neg, num_samples - num_pos)  # n_exp per image

    # 2.-4. valid negatives, NMS-match groups, Score-HLR.
    valid = negative & (scores > score_thr)
    num_valid = torch.zeros(num_images, dtype=torch.int64, device=device).index_add_(
        0, batch_idx, valid.to(torch.int64))
    valid_idx = torch.nonzero(valid).flatten()
    v_img = batch_idx[valid_idx]
    v_score = scores[valid_idx]
    v_boxes = pred_boxes[valid_idx]
    group_rank = torch.zeros_like(valid_idx)
    v_counts = torch.bincount(v_img, minlength=num_images).tolist()
    v_start = 0
    for c in v_counts:  # one NMS per image, as the OHEM sampler's per-image NMS
        if c:
            sl = slice(v_start, v_start + c)
            group_rank[sl] = nms_match_rank(v_boxes[sl], v_score[sl], iou_thr=iou_thr)
        v_start += c
    imp = (num_valid[v_img] - group_rank).to(v_score.dtype) + v_score  # mmdetection's importance value
    hlr = _rank_within(v_img, imp)
    keep_hlr = hlr < expected[v_img]
    up_bound = torch.maximum(expected, num_valid).clamp(min=1).to(scores.dtype)
    u_hlr = (up_bound[v_img] - hlr.to(scores.dtype)) / up_bound[v_img]

    # random negatives from the invalid ones where the valid ones do not fill n_exp.
    num_hlr = torch.minimum(num_valid, expected)
    num_rand = expected - num_hlr
    invalid = negative & ~valid
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(r, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    inv_idx = torch.nonzero(invalid).flatten()
    inv_rank = _rank_within(batch_idx[inv_idx], keys[inv_idx])
    keep_rand = inv_rank < num_rand[batch_idx[inv_idx]]
    # the random ones take the smallest weight of the ranked ones (1 when none is ranked).
    u_min = torch.where(num_hlr > 0, (up_bound - (num_hlr - 1).to(scores.dtype)) / up_bound,
                        torch.ones_like(up_bound))

    neg_idx = torch.cat([valid_idx[keep_hlr], inv_idx[keep_rand]])
    u = torch.cat([u_hlr[keep_hlr], u_min[batch_idx[inv_idx[keep_rand]]]])
    ranked = num_valid > 0
    w = torch.where(ranked[batch_idx[neg_idx]], (bias + (1.0 - bias) * u).pow(k), torch.ones_like(u))

    # 5. per image, keep the kept negatives' total loss unchanged.
    img = batch_idx[neg_idx]
    loss = negative_loss[neg_idx].detach().to(w.dtype)
    ori = torch.zeros(num_images, dtype=w.dtype, device=device).index_add_(0, img, loss)
    new = torch.zeros(num_images, dtype=w.dtype, device=device).index_add_(0, img, loss * w)
    ratio = torch.where(new > 0, ori / new.clamp(min=torch.finfo(w.dtype).tiny), torch.ones_like(new))
    w = w * ratio[img]

    order = torch.argsort(neg_idx)
    return SampledIndices(positive.sort().values, neg_idx[order]), w[order].detach()
