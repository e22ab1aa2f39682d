r"""Prime Sample Attention (PISA; Cao, Chen, Loy and Lin, CVPR 2020, arXiv:1904.04821): ISR-P and CARL.

PISA re-weights the *positives* of a detector by how "prime" they are:

* **ISR-P** (importance-based sample re-weighting, positive part) ranks the positives by their
  *IoU hierarchical local rank* (IoU-HLR) and puts weight :math:`w = ((1 - \beta) u + \beta)^{k}` on their
  classification loss, with :math:`u = (n_{max} - r) / n_{max}` linear in the rank :math:`r`.
  IoU-HLR is computed in two steps: the positives of one ground-truth box are ranked by the IoU of their
  *predicted* box with that ground truth (local rank), then all positives of one class are ranked by
  (local rank, IoU). :math:`n_{max}` is the largest number of positives of any class. The weights are then
  scaled so that the weighted classification loss of the positives equals the unweighted one; they are
  constants for autograd (computed from detached predictions, as in mmdetection).
* **CARL** (classification-aware regression loss) multiplies each positive's box loss by
  :math:`((1 - \beta) p + \beta)^{k}` of its classification score :math:`p` (sigmoid or softmax of its own
  class), normalised to sum to the number of positives; the gradient flows into the classifier through
  :math:`p` (and through the normalisation), which is the point of the loss.

Defaults are mmdetection 3.3's ``configs/pisa``: ``isr=dict(k=2, bias=0)``, ``carl=dict(k=1, bias=0.2)``.
mmdetection's ``isr_p`` loops in Python over the classes and ground-truth boxes; here the ranks come from two
stable sorts and a segmented scan, with no loop and no host round-trip. One deliberate difference:
mmdetection offsets each image's ground-truth indices by the previous image's largest index + 1 (not the
running total), so that with three or more images positives of different objects of the same class can
share a group; here a group is always one object of one image. With two images (mmdetection's default batch)
both agree (a test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from detbalance.losses.quality import aligned_box_iou

__all__ = ["PrimeSampleAttention", "aligned_box_iou", "carl_loss", "iou_hlr_rank", "isr_p_weights"]


def _check_power(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_bias(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _segment_rank(keys: Tensor) -> Tensor:
    """Position of each element inside its run of equal ``keys`` (``keys`` sorted); no host sync."""
    n = keys.shape[0]
    pos = torch.arange(n, device=keys.device)
    start = torch.ones(n, dtype=torch.bool, device=keys.device)
    if n > 1:
        start[1:] = keys[1:] != keys[:-1]
    first = torch.where(start, pos, torch.zeros_like(pos)).cummax(0).values
    return pos - first


def _rank_within(groups: Tensor, score: Tensor) -> Tensor:
    """Rank (0 = highest ``score``) of every element among the elements of its group; two stable sorts."""
    by_score = torch.argsort(score, descending=True, stable=True)
    order = by_score[torch.argsort(groups[by_score], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = _segment_rank(groups[order])
    return rank


def iou_hlr_rank(ious: Tensor, labels: Tensor, gt_index: Tensor) -> tuple[Tensor, Tensor]:
    """IoU hierarchical local rank of each positive (PISA, section 3.2) and ``n_max``.

    Step 1 ranks the positives of each ground-truth box by IoU (descending): local rank ``r_loc``. Step 2
    ranks the positives of each class by ``iou + n_max - r_loc`` (descending), i.e. by local rank first and
    IoU second, computed in the same floating-point form as mmdetection so that near-ties break alike.

    Args:
        ious: ``Tensor[P]`` IoU of each positive's predicted box with its ground truth.
        labels: ``Tensor[P]`` int64 class of each positive.
        gt_index: ``Tensor[P]`` int64, an identifier of the ground-truth object of each positive, unique over
            the batch (e.g. the index into all images' boxes concatenated).

    Returns:
        ``(rank, n_max)``: ``Tensor[P]`` int64 IoU-HLR (0 = most prime) and the 0-dim largest number of
        positives of one class.
    """
    p = ious.shape[0]
    if labels.shape != (p,) or gt_index.shape != (p,):
        raise ValueError(
            f"ious, labels and gt_index must have the same shape [P], got {tuple(ious.shape)}, "
            f"{tuple(labels.shape)} and {tuple(gt_index.shape)}"
        )
    if p == 0:
        return torch.zeros(0, dtype=torch.int64, device=ious.device), torch.zeros((), dtype=torch.int64, device=ious.device)
    labels = labels.to(torch.int64)
    n_max = _segment_rank(labels.sort().values).max() + 1  # largest class count, no host sync
    local = _rank_within(gt_index.to(torch.int64), ious)
    value = ious + (n_max - local).to(ious.dtype)
    return _rank_within(labels, value), n_max


def isr_p_weights(
    ious: Tensor,
    labels: Tensor,
    gt_index: Tensor,
    positive_loss: Tensor,
    *,
    k: float = 2.0,
    bias: float = 0.0,
) -> Tensor:
    r"""ISR-P weights of the positives' classification loss (PISA; mmdetection's ``isr_p``).

    :math:`u_i = (n_{max} - r_i) / n_{max}` with :math:`r_i` the IoU-HLR (:func:`iou_hlr_rank`),
    :math:`w_i = (\beta + (1 - \beta) u_i)^k`, then :math:`w \leftarrow w \sum_i L_i / \sum_i w_i L_i` so
    that the weighted positive classification loss equals the unweighted one. Everything is detached.

    Args:
        ious: ``Tensor[P]`` IoU of each positive's predicted (decoded) box with its ground truth.
        labels: ``Tensor[P]`` int64 class of each positive (any consistent numbering).
        gt_index: ``Tensor[P]`` int64 identifier of each positive's ground-truth object (unique over the batch).
        positive_loss: ``Tensor[P]`` each positive's classification loss (summed over the columns of a
            sigmoid head), used only for the normalisation.
        k: Power of the mapping (mmdetection: 2).
        bias: Shift of the mapping, in ``[0, 1]`` (mmdetection: 0).

    Returns:
        ``Tensor[P]`` weights (detached), in the dtype of ``ious``. Empty input gives an empty result.
    """
    k = _check_power("k", k)
    bias = _check_bias("bias", bias)
    if positive_loss.shape != ious.shape:
        raise ValueError(f"positive_loss must have the shape of ious {tuple(ious.shape)}, got {tuple(positive_loss.shape)}")
    with torch.no_grad():
        rank, n_max = iou_hlr_rank(ious.detach(), labels, gt_index)
        if rank.numel() == 0:
            return ious.new_zeros(0)
        n = n_max.to(ious.dtype)
        u = (n - rank.to(ious.dtype)) / n
        w = (bias + u * (1.0 - bias)).pow(k)
        loss = positive_loss.detach().to(ious.dtype)
        return w * (loss.sum() / (loss * w).sum())


def carl_loss(
    positive_scores: Tensor,
    positive_box_loss: Tensor,
    *,
    k: float = 1.0,
    bias: float = 0.2,
    avg_factor: Tensor | float | None = None,
) -> Tensor:
    r"""Classification-aware regression loss (PISA, section 3.3; mmdetection's ``carl_loss``).

    .. math::
        v_i = (\beta + (1 - \beta) p_i)^k, \qquad
        L_{carl} = \frac{1}{Z} \sum_i \frac{P\, v_i}{\sum_j v_j} L^{box}_i

    with :math:`p_i` the classification score of positive :math:`i` for its own class (sigmoid or softmax;
    gradients flow through it and through the normalisation, as in mmdetection), :math:`L^{box}_i` its box
    loss summed over the coordinates, :math:`P` the number of positives and :math:`Z` = ``avg_factor``.

    Args:
        positive_scores: ``Tensor[P]`` scores in ``[0, 1]`` (with gradient).
        positive_box_loss: ``Tensor[P]`` per-positive box loss (with gradient).
        k: Power (mmdetection: 1).
        bias: Shift in ``[0, 1]`` (mmdetection: 0.2).
        avg_factor: Divisor ``Z``: mmdetection's RoI head uses the number of sampled RoIs, its RetinaNet the
            number of positives; ``None`` is ``P``.

    Returns:
        Scalar; ``0`` (connected to the graph) without positives.
    """
    k = _check_power("k", k)
    bias = _check_bias("bias", bias)
    if positive_scores.shape != positive_box_loss.shape or positive_scores.dim() != 1:
        raise ValueError(
            f"positive_scores and positive_box_loss must both be [P], got {tuple(positive_scores.shape)} and "
            f"{tuple(positive_box_loss.shape)}"
        )
    p = positive_scores.shape[0]
    if p == 0:
        return positive_scores.sum() * 0.0 + positive_box_loss.sum() * 0.0
    v = (bias + (1.0 - bias) * positive_scores).pow(k)
    v = v * (p / v.sum())
    z = p if avg_factor is None else avg_factor
    return (positive_box_loss * v).sum() / z


@dataclass(frozen=True)
class PrimeSampleAttention:
    """PISA's positive-side settings for a detector head: ISR-P and CARL (``None`` switches a part off).

    Defaults are mmdetection 3.3's ``configs/pisa`` (``isr=dict(k=2, bias=0)``, ``carl=dict(k=1, bias=0.2)``).
    The negative side (ISR-N) of the two-stage recipe is a RoI sampler,
    :class:`~detbalance.sampling.ScoreHLRSampler`. Give it to
    :func:`~detbalance.detectors.balance_faster_rcnn` or :func:`~detbalance.detectors.balance_retinanet`
    as ``pisa=PrimeSampleAttention()``.

    Args:
        isr_k: Power of ISR-P's mapping; ``None`` disables ISR-P.
        isr_bias: Shift of ISR-P's mapping.
        carl_k: Power of CARL's mapping; ``None`` disables CARL.
        carl_bias: Shift of CARL's mapping.
    """

    isr_k: float | None = 2.0
    isr_bias: float = 0.0
    carl_k: float | None = 1.0
    carl_bias: float = 0.2

    def __post_init__(self) -> None:
        if self.isr_k is not None:
            _check_power("isr_k", self.isr_k)
        _check_bias("isr_bias", self.isr_bias)
        if self.carl_k is not None:
            _check_power("carl_k", self.carl_k)
        _check_bias("carl_bias", self.carl_bias)
