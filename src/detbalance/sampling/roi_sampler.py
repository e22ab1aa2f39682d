r"""One contract for every RoI (and RPN anchor) sampler of a two-stage detector.

A sampler is a callable

.. code-block:: python

    sampler(rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None)
        -> SampledIndices

that picks, among the ``R`` RoIs of a batch, those that enter the loss. ``rois`` carries everything a
sampler may look at (labels, boxes, the image of each RoI, each RoI's max IoU with the ground truth, a
mined flag and the training progress); ``losses`` are the per-RoI losses of the read-only pass, given only
to a sampler whose ``needs_losses`` attribute is true (the detector runs that pass only then). A sampler
may also say how the two loss terms of the back-propagated loss are weighted at a training progress
(``loss_weights(progress) -> (w_cls, w_loc)``); without that method both weights are 1.

The samplers here are frozen dataclasses of their hyperparameters. Each hyperparameter is declared once, in
the torch-free :mod:`detbalance._sampler_params`, which the config classes of :mod:`detbalance.config`
extend with a ``name`` (so that reading a configuration needs no torch) and these classes extend with the
sampling:

* :class:`FixedRatioSampler`: Fast/Faster R-CNN's random sampling at a fixed foreground fraction;
* :class:`BootstrappedSampler`: fixed ratio, mined background RoIs first (offline bootstrapping);
* :class:`OHEMSampler`: online hard example mining (Shrivastava et al., 2016);
* :class:`StratifiedOHEMSampler`: S-OHEM (Li et al., 2017), whose schedule also weights the loss;
* :class:`ScoreHLRSampler`: PISA's ISR-N (Cao et al., 2020), which also weights each kept negative's
  classification term: it returns a :class:`WeightedSample` instead of bare indices;
* :class:`IoUBalancedSampler`: Libra R-CNN's IoU-balanced negatives and instance-balanced positives (Pang
  et al., 2019).

A plain function with the signature above is a sampler too (it needs no losses and weights both terms 1);
see the README for a sampler written that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from detbalance._sampler_params import (
    FixedRatioParams,
    IoUBalancedParams,
    OHEMParams,
    ScoreHLRParams,
    StratifiedOHEMParams,
)
from detbalance.sampling.fixed_ratio import sample_fixed_ratio_batched
from detbalance.sampling.iou_balanced import sample_iou_balanced
from detbalance.sampling.ohem import select_hard_examples
from detbalance.sampling.score_hlr import sample_score_hlr
from detbalance.sampling.stratified_ohem import select_hard_examples_stratified
from detbalance.types import SampledIndices

__all__ = [
    "BootstrappedSampler",
    "FixedRatioSampler",
    "IoUBalancedSampler",
    "OHEMSampler",
    "RoIBatch",
    "RoILosses",
    "RoISampler",
    "ScoreHLRSampler",
    "StratifiedOHEMSampler",
    "WeightedSample",
    "split_weighted_sample",
    "sampler_loss_weights",
    "sampler_needs_losses",
]


class RoIBatch(NamedTuple):
    """The candidate RoIs of a batch, flat over images and grouped by image (``batch_idx`` ascending).

    Attributes:
        labels: ``Tensor[R] (int64)``: ``-1`` ignore, ``0`` background, ``1..K`` foreground
            (:mod:`detbalance.types`).
        boxes: ``Tensor[R, 4]`` ``(x1, y1, x2, y2)`` in the network's input coordinates.
        batch_idx: ``Tensor[R] (int64)``: the image of each RoI, non-decreasing.
        max_iou: ``Tensor[R]`` float: each RoI's largest IoU with a ground-truth box of its image (0 if none).
        mined: ``Tensor[R] (bool)``: the RoI is (or overlaps) a bootstrapped false positive.
        progress: fraction of training done, in ``[0, 1]``.
        num_images: number of images ``B`` of the batch (images may have no RoI).
        gt_index: ``Tensor[R] (int64)`` or ``None``: for a foreground RoI the index of its matched
            ground-truth box among all images' boxes concatenated (unique over the batch), ``-1`` otherwise.
    """

    labels: Tensor
    boxes: Tensor
    batch_idx: Tensor
    max_iou: Tensor
    mined: Tensor
    progress: float
    num_images: int
    gt_index: Tensor | None = None

    def counts(self) -> list[int]:
        """RoIs per image (one host sync)."""
        return torch.bincount(self.batch_idx, minlength=self.num_images).tolist()


class RoILosses(NamedTuple):
    """Per-RoI losses of the read-only pass: ``cls`` and ``loc``, each ``Tensor[R]``, detached.

    ``loc`` is 0 for background and ignored RoIs, ``cls`` is 0 for ignored RoIs. The read-only pass also
    fills ``scores`` (``Tensor[R]``, each RoI's largest foreground softmax probability) and ``pred_boxes``
    (``Tensor[R, 4]``, its predicted box for that class), which a score-based sampler reads.
    """

    cls: Tensor
    loc: Tensor
    scores: Tensor | None = None
    pred_boxes: Tensor | None = None


class WeightedSample(NamedTuple):
    """What a sampler returns when it also weights the classification term of what it keeps.

    Attributes:
        indices: The kept RoIs.
        negative_weight: ``Tensor[N_neg]`` weights of ``indices.negative`` (same order), detached; the
            positives keep weight 1.
    """

    indices: SampledIndices
    negative_weight: Tensor


def split_weighted_sample(result: SampledIndices | WeightedSample) -> tuple[SampledIndices, Tensor | None]:
    """``(indices, negative_weight or None)`` of a sampler's result, either kind."""
    if isinstance(result, WeightedSample):
        return result.indices, result.negative_weight
    return result, None


@runtime_checkable
class RoISampler(Protocol):
    """The sampler contract (see the module docstring). ``needs_losses`` and ``loss_weights`` are optional."""

    def __call__(
        self, rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None
    ) -> SampledIndices: ...


def sampler_needs_losses(sampler: Any) -> bool:
    """Whether ``sampler`` wants the per-RoI losses of the read-only pass (``needs_losses``, default no)."""
    return bool(getattr(sampler, "needs_losses", False))


def sampler_loss_weights(sampler: Any, progress: float) -> tuple[float, float]:
    """``(w_cls, w_loc)`` of the back-propagated loss at ``progress`` (``(1, 1)`` unless the sampler says)."""
    fn = getattr(sampler, "loss_weights", None)
    if fn is None:
        return 1.0, 1.0
    w_cls, w_loc = fn(progress)
    return float(w_cls), float(w_loc)


# ----------------------------------------------------------------------------------------- validation


def _require_losses(losses: RoILosses | None, rois: RoIBatch, who: str) -> RoILosses:
    if losses is None:
        raise ValueError(f"losses must be given to {who} (it ranks RoIs by their loss)")
    n = rois.labels.shape[0]
    if losses.cls.shape != (n,) or losses.loc.shape != (n,):
        raise ValueError(
            f"losses.cls and losses.loc must have shape ({n},), got {tuple(losses.cls.shape)} and "
            f"{tuple(losses.loc.shape)}"
        )
    return losses


def _grouped(rois: RoIBatch) -> tuple[RoIBatch, Tensor | None, list[int]]:
    """``rois`` grouped by image (a stable sort by ``batch_idx`` when it is not), the order that sorted it
    (``None`` when already grouped), and the RoIs per image (one host sync).

    Raises:
        ValueError: a ``batch_idx`` outside ``0..num_images - 1``.
    """
    b = rois.batch_idx
    if b.numel() == 0:
        return rois, None, rois.counts()
    out_of_range, unsorted = torch.stack([((b < 0) | (b >= rois.num_images)).any(), (b[1:] < b[:-1]).any()]).tolist()
    if out_of_range:
        raise ValueError(
            f"rois.batch_idx must be in 0..{rois.num_images - 1} (num_images = {rois.num_images}), got values "
            f"from {int(b.min())} to {int(b.max())}"
        )
    order = None
    if unsorted:
        order = torch.argsort(b, stable=True)
        n = b.shape[0]  # every per-RoI tensor follows the sort (labels, boxes, max_iou, mined, gt_index, ...)
        rois = rois._replace(**{
            k: v[order] for k, v in rois._asdict().items() if isinstance(v, Tensor) and v.dim() and v.shape[0] == n
        })
    return rois, order, rois.counts()


def _ungroup(sampled: SampledIndices, order: Tensor | None) -> SampledIndices:
    """Map indices into the grouped RoIs back to the caller's order (sorted)."""
    if order is None:
        return sampled
    return SampledIndices(order[sampled.positive].sort().values, order[sampled.negative].sort().values)


def _offsets(counts: list[int]) -> list[int]:
    out = [0]
    for c in counts[:-1]:
        out.append(out[-1] + c)
    return out


# --------------------------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class FixedRatioSampler(FixedRatioParams):
    """Random sampling at a fixed foreground fraction (Ren et al., "Faster R-CNN", NeurIPS 2015).

    Per image, up to ``int(num_samples * positive_fraction)`` foreground RoIs, the rest of the budget
    background, both drawn uniformly (:func:`~detbalance.sampling.sample_fixed_ratio_batched`). Defaults
    are the RoI head's (512 at 0.25); the RPN's are 256 at 0.5.

    Args:
        num_samples: Budget per image.
        positive_fraction: Largest share of the budget given to foreground.
    """

    needs_losses: ClassVar[bool] = False

    def __call__(
        self, rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None
    ) -> SampledIndices:
        """Sample ``rois`` (``losses`` is not used). Returns sorted indices into the ``R`` RoIs.

        RoIs not grouped by image (``batch_idx`` not non-decreasing) are grouped first (a stable sort), so each
        image gets its own budget whatever the order.
        """
        rois, order, counts = _grouped(rois)
        sampled = sample_fixed_ratio_batched(
            list(rois.labels.split(counts)), self.num_samples, self.positive_fraction, generator=generator
        )
        offsets = _offsets(counts)
        empty = rois.labels.new_zeros(0)
        pos = torch.cat([empty] + [s.positive + o for s, o in zip(sampled, offsets)])
        neg = torch.cat([empty] + [s.negative + o for s, o in zip(sampled, offsets)])
        return _ungroup(SampledIndices(pos, neg), order)


@dataclass(frozen=True)
class BootstrappedSampler(FixedRatioSampler):
    """Fixed-ratio sampling in which mined background RoIs fill the background budget first.

    Offline bootstrapping (Sung and Poggio, 1998; R-CNN's hard negative mining): the confident false
    positives of an earlier model (``rois.mined``) are kept whenever the budget allows; the remainder is
    drawn as :class:`FixedRatioSampler` draws it (same hyperparameters). With no mined RoI it is
    :class:`FixedRatioSampler`.
    """

    def __call__(
        self, rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None
    ) -> SampledIndices:
        """Sample ``rois``; mined background RoIs (in random order) take the background budget first.

        RoIs not grouped by image are grouped first, as :class:`FixedRatioSampler` does.
        """
        rois, order, counts = _grouped(rois)
        labels = rois.labels
        mined_bg = rois.mined & (labels == 0)
        candidates = torch.where(mined_bg, torch.full_like(labels, -1), labels)
        sampled = sample_fixed_ratio_batched(
            list(candidates.split(counts)), self.num_samples, self.positive_fraction, generator=generator
        )
        positive, negative = [labels.new_zeros(0)], [labels.new_zeros(0)]
        gen_device = generator.device if generator is not None else labels.device
        for s, mined_i, offset in zip(sampled, mined_bg.split(counts), _offsets(counts)):
            neg = s.negative
            mined_idx = torch.nonzero(mined_i).flatten()
            if mined_idx.numel():
                budget = self.num_samples - s.positive.numel()
                first = torch.randperm(mined_idx.numel(), generator=generator, device=gen_device).to(labels.device)
                take = mined_idx[first[:budget]]
                rest = torch.randperm(neg.numel(), generator=generator, device=gen_device).to(labels.device)
                neg = torch.cat([take, neg[rest[: max(0, budget - take.numel())]]]).sort().values
            positive.append(s.positive + offset)
            negative.append(neg + offset)
        return _ungroup(SampledIndices(torch.cat(positive), torch.cat(negative)), order)


@dataclass(frozen=True)
class OHEMSampler(OHEMParams):
    """Online hard example mining (Shrivastava, Gupta and Girshick, CVPR 2016, arXiv:1604.03540).

    The paper's recipe: per image, the ``B`` RoIs of highest loss ``cls + loc`` among all proposals,
    after NMS at IoU 0.7 over the RoIs ordered by loss; background from IoU 0 upward; no foreground
    ratio (:func:`~detbalance.sampling.select_hard_examples`). The paper uses ``B = 64`` per image
    (128 over 2 images); we default to 128 per image.

    Args:
        num_samples: Hard RoIs kept per image.
        nms_iou: IoU of the NMS over the hard RoIs; ``None`` disables it.
        positive_fraction: Optional cap on the foreground share; ``None`` (the paper) means none.
    """

    needs_losses: ClassVar[bool] = True

    def __call__(
        self, rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None
    ) -> SampledIndices:
        """The hardest RoIs by ``losses.cls + losses.loc`` (``losses`` required)."""
        losses = _require_losses(losses, rois, "OHEMSampler")
        return select_hard_examples(
            losses.cls + losses.loc, rois.labels, rois.boxes, rois.batch_idx, num_samples=self.num_samples,
            nms_iou=self.nms_iou, positive_fraction=self.positive_fraction, generator=generator,
        )


@dataclass(frozen=True)
class StratifiedOHEMSampler(StratifiedOHEMParams):
    r"""Stratified OHEM (Li, Zhang, Yu, Chen and Li, arXiv:1705.02233, 2017).

    From the paper (its abstract; we could not obtain the full text, so the stage schedule and the
    per-stage sampling distribution below are ours): OHEM weights the classification and localisation
    losses equally for the whole of training; S-OHEM weights them by the training stage, and draws the
    hard examples by stratified sampling over loss strata with a distribution that changes over
    training. The same weights :math:`(w_{cls}(t), w_{loc}(t))` rank the RoIs *and* weight the
    back-propagated loss :math:`w_{cls}(t) L_{cls} + w_{loc}(t) L_{loc}` (:meth:`loss_weights`).

    Ours, each a parameter: the weights move linearly in the progress ``t`` from ``cls_weight[0]``
    to ``cls_weight[1]`` (default 1.5 -> 0.5) and from ``loc_weight[0]`` to ``loc_weight[1]``
    (0.5 -> 1.5), so classification dominates early, localisation late, and the sum stays OHEM's 2; the
    sampling distribution over the ``strata`` loss quantiles (hardest first) is
    :math:`\pi_s \propto e^{-\beta(t) s}` with :math:`\beta` moving linearly from ``decay[0]`` to
    ``decay[1]`` (default 1.0 -> 0.25: close to OHEM early, flatter late). See
    :func:`~detbalance.sampling.select_hard_examples_stratified` for the strata and quotas.

    Args:
        num_samples: Hard RoIs kept per image.
        strata: Number of loss strata (the paper: 4).
        nms_iou: IoU of the NMS over the hard RoIs (OHEM's 0.7); ``None`` disables it.
        cls_weight: ``(start, end)`` of :math:`w_{cls}`.
        loc_weight: ``(start, end)`` of :math:`w_{loc}`.
        decay: ``(start, end)`` of :math:`\beta`.
    """

    needs_losses: ClassVar[bool] = True

    def __call__(
        self, rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None
    ) -> SampledIndices:
        """Stratified selection by ``w_cls(t) cls + w_loc(t) loc`` (``losses`` required)."""
        losses = _require_losses(losses, rois, "StratifiedOHEMSampler")
        return select_hard_examples_stratified(
            losses.cls, losses.loc, rois.labels, rois.boxes, rois.batch_idx, num_samples=self.num_samples,
            progress=rois.progress, strata=self.strata, loss_weights=self.loss_weights(rois.progress),
            quotas=self.distribution(rois.progress), nms_iou=self.nms_iou,
        )


@dataclass(frozen=True)
class ScoreHLRSampler(ScoreHLRParams):
    r"""PISA's ISR-N: Score-HLR sampling of negatives, with importance weights (Cao, Chen, Loy and Lin, CVPR 2020).

    Positives at random up to ``int(num_samples * positive_fraction)``; the negatives whose largest
    foreground score exceeds ``score_thr`` are grouped by NMS-match (IoU ``iou_thr``) of their predicted
    boxes and ranked by score hierarchical local rank; the best ranked fill the budget (random low-score
    negatives make up a shortfall) and get weight :math:`(\beta + (1 - \beta) u)^k`, :math:`u` linear in
    the rank, normalised to keep the image's negative loss. See :func:`~detbalance.sampling.sample_score_hlr`.
    Defaults are mmdetection 3.3's ``configs/pisa`` (512 at 0.25, ``k=0.5``, ``bias=0``, ``score_thr=0.05``,
    ``iou_thr=0.5``). It reads the scores, predicted boxes and background losses of the detector's
    read-only pass (``needs_losses``, as OHEM), and returns a :class:`WeightedSample`.

    Args:
        num_samples: Budget per image.
        positive_fraction: Largest foreground share.
        k: Power of the weight mapping.
        bias: Shift of the weight mapping, in ``[0, 1]``.
        score_thr: Negatives at or below this score are not ranked.
        iou_thr: IoU of the NMS-match grouping.
    """

    needs_losses: ClassVar[bool] = True

    def __call__(
        self, rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None
    ) -> WeightedSample:
        """Score-HLR selection; ``losses`` must carry ``scores`` and ``pred_boxes`` of the read-only pass.

        RoIs not grouped by image are grouped first (a stable sort, the losses following it), as
        :class:`FixedRatioSampler` does: each image gets its own budget and its own NMS-match whatever the order.
        """
        losses = _require_losses(losses, rois, "ScoreHLRSampler")
        if losses.scores is None or losses.pred_boxes is None:
            raise ValueError("ScoreHLRSampler needs losses.scores and pred_boxes (the RoI head's read-only pass)")
        rois, order, _ = _grouped(rois)
        if order is not None:
            losses = RoILosses(*(None if v is None else v[order] for v in losses))
        indices, weight = sample_score_hlr(
            rois.labels, rois.batch_idx, losses.pred_boxes, losses.scores, losses.cls, num_images=rois.num_images,
            num_samples=self.num_samples, positive_fraction=self.positive_fraction, k=self.k, bias=self.bias,
            score_thr=self.score_thr, iou_thr=self.iou_thr, generator=generator,
        )
        if order is not None:  # back to the caller's order, the weights following their negatives
            negative, perm = order[indices.negative].sort()
            indices, weight = SampledIndices(order[indices.positive].sort().values, negative), weight[perm]
        return WeightedSample(indices, weight)


@dataclass(frozen=True)
class IoUBalancedSampler(IoUBalancedParams):
    """Libra R-CNN's RoI sampling (Pang et al., CVPR 2019, arXiv:1904.02701, sec. 3.1).

    Negatives split into ``num_bins`` IoU bins above ``floor_thr`` and drawn evenly from them; positives drawn
    evenly over the ground-truth instances they match. Defaults are mmdetection 3.3's ``configs/libra_rcnn``
    (``CombinedSampler`` of ``InstanceBalancedPosSampler`` and ``IoUBalancedNegSampler``), as that code runs
    in training (see :func:`~detbalance.sampling.sample_iou_balanced`). It needs ``rois.gt_index`` (the
    Faster R-CNN adapter sets it) and no losses.

    Args:
        num_samples: Budget per image.
        positive_fraction: Largest foreground share.
        floor_thr: IoU below which negatives form the floor set; ``None``: every negative is binned.
        floor_fraction: Share of the negative budget left to the floor set.
        num_bins: IoU bins.
    """

    needs_losses: ClassVar[bool] = False

    def __call__(
        self, rois: RoIBatch, *, losses: RoILosses | None = None, generator: torch.Generator | None = None
    ) -> SampledIndices:
        """Sample ``rois`` (``losses`` is not used). Returns sorted indices into the ``R`` RoIs."""
        if rois.gt_index is None:
            raise ValueError(
                "IoUBalancedSampler needs rois.gt_index (each foreground RoI's matched ground truth) for its "
                "instance-balanced positives; the Faster R-CNN adapter sets it"
            )
        return sample_iou_balanced(
            rois.labels, rois.max_iou, rois.batch_idx, rois.gt_index, num_images=rois.num_images,
            num_samples=self.num_samples, positive_fraction=self.positive_fraction, floor_thr=self.floor_thr,
            floor_fraction=self.floor_fraction, num_bins=self.num_bins, generator=generator,
        )
