r"""Faster R-CNN adapter: which RoIs (and RPN anchors) count, and how the RoI classifier is scored.

:func:`balance_faster_rcnn` swaps three parts of a torchvision :class:`~torchvision.models.detection.FasterRCNN`
for subclasses built from the model's own modules (no monkeypatching, all weights shared):

* ``model.roi_heads`` -> :class:`BalancedRoIHeads`: the RoI sampler (fixed ratio, OHEM, S-OHEM), the
  per-RoI classification loss, offline bootstrapping and recording;
* ``model.rpn`` -> :class:`BalancedRPN` (only when ``rpn_sampler`` is given): the RPN anchor sampler;
* ``model.transform`` -> :class:`BalancedTransform`: rejects bad targets with a ``ValueError`` *before*
  torchvision's own ``AssertionError`` checks, and tells the RoI head each image's original size so that
  bootstrapped boxes (in original image coordinates) can be resized with the image.

Samplers are given as frozen dataclasses of hyperparameters (:class:`FixedRatioRoISampler`,
:class:`OHEMRoISampler`, :class:`StratifiedOHEMRoISampler`); the selection itself is done by the pure
functions of :mod:`detbalance.sampling`.

Seeding: each adapted head owns a :class:`torch.Generator` (created on the device of the RoIs). Its seed is
drawn once from torch's global CPU generator when the head is adapted, so ``torch.manual_seed(s)`` before
:func:`balance_faster_rcnn` makes the sampling reproducible; pass ``seed=`` to
:meth:`BalancedRoIHeads.from_roi_heads` / :meth:`BalancedRPN.from_rpn` to fix it explicitly. The
generator's state is ``head.generator_state()`` / ``head.set_generator_state(...)`` for checkpoints.

Configured as torchvision (fixed ratio 512 @ 0.25 for RoIs, 256 @ 0.5 for the RPN, cross entropy) the
adapted model computes torchvision's losses; with budgets above the candidate counts (no randomness) it
gives the very same loss dict (a test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from detbalance.detectors._targets import check_detection_targets
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.sampling import (
    HardNegativeSet,
    sample_fixed_ratio_batched,
    select_hard_examples,
    select_hard_examples_stratified,
)
from detbalance.types import SampledIndices

__all__ = [
    "ORIGINAL_SIZE_KEY",
    "BalancedRPN",
    "BalancedRoIHeads",
    "BalancedTransform",
    "FixedRatioRoISampler",
    "OHEMRoISampler",
    "StratifiedOHEMRoISampler",
    "TrainingRoIs",
    "balance_faster_rcnn",
    "roi_losses",
]

#: Key under which :class:`BalancedTransform` stores ``Tensor[2]`` (original ``h, w``) in each target copy.
ORIGINAL_SIZE_KEY = "original_image_size"

BoxClsLoss = Callable[[Tensor, Tensor], Tensor]


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1]{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True)
class FixedRatioRoISampler:
    """Random sampling at a fixed foreground fraction (torchvision's default for RPN and RoI head).

    Ren et al., "Faster R-CNN", NeurIPS 2015, https://arxiv.org/abs/1506.01497: per image, up to
    ``int(num_samples * positive_fraction)`` foreground examples, the rest of the budget background, drawn
    uniformly (:func:`detbalance.sampling.sample_fixed_ratio_batched`).

    Args:
        num_samples: Budget per image (RoI head 512, RPN 256 in torchvision).
        positive_fraction: Largest fraction of the budget given to foreground (RoI 0.25, RPN 0.5).
    """

    num_samples: int = 512
    positive_fraction: float = 0.25

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_fraction("positive_fraction", self.positive_fraction, allow_none=False)


@dataclass(frozen=True)
class OHEMRoISampler:
    """Online hard example mining over all RoIs (Shrivastava et al., CVPR 2016, https://arxiv.org/abs/1604.03540).

    The paper's recipe: per image the ``B = 128`` RoIs of highest loss ``cls + loc`` among all ~2000
    proposals, after NMS at IoU 0.7 over the RoIs sorted by loss, background from IoU 0 upward, no
    foreground ratio (:func:`detbalance.sampling.select_hard_examples`).

    Args:
        num_samples: ``B``, hard RoIs kept per image.
        nms_iou: IoU of the NMS over the hard RoIs; ``None`` disables it.
        positive_fraction: Optional cap on the foreground share of ``B``; ``None`` (paper) means no cap.
    """

    num_samples: int = 128
    nms_iou: float | None = 0.7
    positive_fraction: float | None = None

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_fraction("nms_iou", self.nms_iou, allow_none=True)
        _check_fraction("positive_fraction", self.positive_fraction, allow_none=True)


@dataclass(frozen=True)
class StratifiedOHEMRoISampler:
    r"""Stratified OHEM (Li et al., "S-OHEM", CCBR 2017, https://arxiv.org/abs/1705.02233).

    RoIs are ranked by :math:`w_{cls}(t)\,L_{cls} + w_{loc}(t)\,L_{loc}` (classification first,
    localisation later in training; ``t`` = training progress, see :meth:`BalancedRoIHeads.set_progress`),
    split into ``strata`` loss strata and drawn per stratum
    (:func:`detbalance.sampling.select_hard_examples_stratified`).

    Args:
        num_samples: Hard RoIs kept per image.
        strata: Number of loss strata.
        loss_weights: ``(w_cls, w_loc)`` or a callable of the progress returning it; ``None`` = the
            default schedule of :func:`~detbalance.sampling.select_hard_examples_stratified`.
        quotas: Sampling distribution over strata (hardest first), or a callable of the progress
            returning one; ``None`` = the sampler's default.
        nms_iou: IoU of the NMS over the hard RoIs; ``None`` disables it.
    """

    num_samples: int = 128
    strata: int = 4
    loss_weights: tuple[float, float] | Callable[[float], tuple[float, float]] | None = None
    quotas: tuple[float, ...] | Callable[[float], Sequence[float]] | None = None
    nms_iou: float | None = 0.7

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_int("strata", self.strata, minimum=1)
        _check_fraction("nms_iou", self.nms_iou, allow_none=True)
        if not (self.loss_weights is None or callable(self.loss_weights)
                or (isinstance(self.loss_weights, tuple) and len(self.loss_weights) == 2)):
            raise ValueError(
                f"loss_weights must be None, a (w_cls, w_loc) tuple or a callable, got {self.loss_weights!r}"
            )
        if not (self.quotas is None or callable(self.quotas)
                or (isinstance(self.quotas, tuple) and len(self.quotas) == self.strata)):
            raise ValueError(
                f"quotas must be None, a tuple of {self.strata} shares or a callable, got {self.quotas!r}"
            )


RoISampler = FixedRatioRoISampler | OHEMRoISampler | StratifiedOHEMRoISampler


class TrainingRoIs(NamedTuple):
    """The training RoIs of a batch, flat over images (``R`` = all RoIs of all images).

    ``rois``: per image ``Tensor[R_b, 4]`` (proposals, bootstrapped boxes, ground truth, in that order);
    ``boxes``: ``Tensor[R, 4]`` their concatenation; ``labels``: ``Tensor[R]`` (:mod:`detbalance.types`);
    ``regression_targets``: ``Tensor[R, 4]`` (zeros where not foreground); ``batch_idx``: ``Tensor[R]``;
    ``is_mined``: ``Tensor[R]`` bool, bootstrapped boxes; ``counts``: ``[R_b]`` per image.
    """

    rois: list[Tensor]
    boxes: Tensor
    labels: Tensor
    regression_targets: Tensor
    batch_idx: Tensor
    is_mined: Tensor
    counts: list[int]


def roi_losses(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    *,
    box_cls_loss: BoxClsLoss | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-RoI Fast R-CNN losses, the summands of torchvision's ``fastrcnn_loss``.

    .. math::
        L_{cls,i} = \mathrm{CE}(z_i, y_i), \qquad
        L_{loc,i} = [y_i > 0] \sum_{j=1}^{4} \mathrm{smooth}_{L1}^{\beta=1/9}(t^{y_i}_{ij} - v_{ij})

    Args:
        class_logits: ``Tensor[N, C]`` (``C = K + 1``, column 0 background).
        box_regression: ``Tensor[N, 4 C]`` class-specific box deltas.
        labels: ``Tensor[N]`` int64, convention of :mod:`detbalance.types` (``-1`` rows give 0 loss).
        regression_targets: ``Tensor[N, 4]`` encoded targets (only foreground rows are read).
        box_cls_loss: ``None`` for cross entropy, or a callable ``(logits[N, C], labels[N]) -> Tensor[N]``
            (e.g. :class:`detbalance.losses.SoftmaxFocalLoss`).

    Returns:
        ``(cls, loc)``, each ``Tensor[N]``; the mean over the sampled RoIs of each is torchvision's loss.

    Raises:
        ValueError: If ``box_cls_loss`` does not return one loss per RoI.
    """
    n = labels.shape[0]
    valid = labels >= 0
    safe = labels.clamp(min=0)
    if box_cls_loss is None:
        cls = F.cross_entropy(class_logits, safe, reduction="none")
    else:
        cls = box_cls_loss(class_logits, safe)
        if cls.shape != (n,):
            raise ValueError(
                f"box_cls_loss must return per-RoI losses of shape ({n},), got {tuple(cls.shape)}; "
                "construct it with reduction='none'"
            )
    cls = torch.where(valid, cls, torch.zeros_like(cls))
    fg = labels > 0
    deltas = box_regression.reshape(n, -1, 4)[torch.arange(n, device=labels.device), safe]
    targets = torch.where(fg[:, None], regression_targets.to(deltas.dtype), torch.zeros_like(deltas))
    loc = F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="none").sum(dim=1)
    loc = torch.where(fg, loc, torch.zeros_like(loc))
    return cls, loc


class _GeneratorMixin:
    """A lazily created per-device :class:`torch.Generator` seeded once at adaptation."""

    _seed: int
    _generator: torch.Generator | None

    def _init_generator(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
        _check_int("seed", seed, minimum=0)
        self._seed = seed
        self._generator = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The sampling generator on ``device`` (created, seeded with the adaptation seed, on first use)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

    def generator_state(self) -> Tensor | None:
        """The generator's state (``None`` before the first sample), for checkpoints."""
        return None if self._generator is None else self._generator.get_state()

    def set_generator_state(self, state: Tensor, device: torch.device | str = "cpu") -> None:
        """Restore :meth:`generator_state` on ``device``."""
        self.generator(torch.device(device)).set_state(state)


class BalancedRPN(_GeneratorMixin, RegionProposalNetwork):
    """torchvision's RPN with its anchor sampler replaced (anchor matching and proposals are unchanged).

    Build it with :meth:`from_rpn`; all modules (head, anchor generator) are shared with the original.
    """

    @classmethod
    def from_rpn(
        cls,
        rpn: RegionProposalNetwork,
        *,
        sampler: FixedRatioRoISampler,
        recorder: BalanceRecorder | None = None,
        seed: int | None = None,
    ) -> BalancedRPN:
        """A :class:`BalancedRPN` sharing every module and setting of ``rpn``.

        Args:
            rpn: The model's ``RegionProposalNetwork``.
            sampler: Anchor budget and foreground fraction per image.
            recorder: Optional sink for the sampled counts (``"faster_rcnn/rpn"``).
            seed: Seed of the sampling generator; ``None`` draws one from the global generator.

        Raises:
            ValueError: If ``sampler`` is not a :class:`FixedRatioRoISampler`.
        """
        if not isinstance(sampler, FixedRatioRoISampler):
            raise ValueError(f"rpn_sampler must be a FixedRatioRoISampler, got {sampler!r}")
        new = cls(
            rpn.anchor_generator,
            rpn.head,
            fg_iou_thresh=rpn.proposal_matcher.high_threshold,
            bg_iou_thresh=rpn.proposal_matcher.low_threshold,
            batch_size_per_image=sampler.num_samples,
            positive_fraction=sampler.positive_fraction,
            pre_nms_top_n=dict(rpn._pre_nms_top_n),
            post_nms_top_n=dict(rpn._post_nms_top_n),
            nms_thresh=rpn.nms_thresh,
            score_thresh=rpn.score_thresh,
        )
        new.proposal_matcher = rpn.proposal_matcher
        new.box_coder = rpn.box_coder
        new.min_size = rpn.min_size
        new.sampler = sampler
        new.recorder = recorder
        new._init_generator(seed)
        new.train(rpn.training)
        return new

    sampler: FixedRatioRoISampler
    recorder: BalanceRecorder | None

    def compute_loss(  # type: ignore[override]  # same signature, typed more tightly
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's RPN loss over the anchors drawn by :attr:`sampler`.

        Args:
            objectness: ``Tensor[B * A, 1]`` logits.
            pred_bbox_deltas: ``Tensor[B * A, 4]``.
            labels: ``B`` float tensors ``[A]`` (``1`` object, ``0`` background, ``-1`` ignore).
            regression_targets: ``B`` tensors ``[A, 4]``.

        Returns:
            ``(objectness_loss, box_loss)``: mean BCE over the sampled anchors and smooth-L1
            (``beta = 1/9``) summed over the sampled positives divided by the number sampled.
        """
        int_labels = torch.stack(labels).to(torch.int64)  # [B, A]
        num_anchors = int_labels.shape[1]
        sampled = sample_fixed_ratio_batched(
            int_labels,
            self.sampler.num_samples,
            self.sampler.positive_fraction,
            generator=self.generator(int_labels.device),
        )
        pos = torch.cat([s.positive + i * num_anchors for i, s in enumerate(sampled)])
        neg = torch.cat([s.negative + i * num_anchors for i, s in enumerate(sampled)])
        inds = torch.cat([pos, neg])
        flat_labels = torch.cat(labels)
        targets = torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(
            pred_bbox_deltas[pos], targets[pos], beta=1 / 9, reduction="sum"
        ) / max(1, inds.numel())
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[inds], flat_labels[inds])
        if self.recorder is not None:
            self.recorder.record_counts("faster_rcnn/rpn", pos.numel(), neg.numel())
        return objectness_loss, box_loss


class BalancedTransform(GeneralizedRCNNTransform):
    """torchvision's transform that validates targets and records each image's original size.

    Validation raises ``ValueError`` naming the image and box (torchvision asserts, or does not check at
    all). In each (copied) target it stores ``Tensor[2]`` ``(h, w)`` of the original image under
    :data:`ORIGINAL_SIZE_KEY`, which :class:`BalancedRoIHeads` uses to resize bootstrapped boxes.
    """

    num_classes: int

    @classmethod
    def from_transform(cls, transform: GeneralizedRCNNTransform, *, num_classes: int) -> BalancedTransform:
        """A :class:`BalancedTransform` with ``transform``'s settings; ``num_classes`` = ``K + 1``."""
        new = cls(
            transform.min_size,
            transform.max_size,
            transform.image_mean,
            transform.image_std,
            size_divisible=transform.size_divisible,
            fixed_size=transform.fixed_size,
            _skip_resize=transform._skip_resize,
        )
        new.num_classes = num_classes
        new.train(transform.training)
        return new

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Validate ``targets`` against ``images``, then torchvision's normalise/resize/batch."""
        if targets is not None:
            check_detection_targets(images, targets, num_classes=self.num_classes)
            targets = [dict(t) for t in targets]
            for image, t in zip(images, targets):
                t[ORIGINAL_SIZE_KEY] = torch.tensor(image.shape[-2:], dtype=torch.float32)
        return super().forward(images, targets)


def _image_id(target: dict[str, Any]) -> int | None:
    image_id = target.get("image_id")
    if image_id is None:
        return None
    return int(image_id)


class BalancedRoIHeads(_GeneratorMixin, RoIHeads):
    """torchvision's box RoI head with an injectable RoI sampler, classification loss and bootstrapping.

    Training computes, per image, the proposals plus the bootstrapped boxes plus the ground truth (as
    torchvision adds it), matches them with the head's own matcher, then

    * :class:`FixedRatioRoISampler`: samples, then runs RoI pooling and the box head on the sample only
      (torchvision's path);
    * :class:`OHEMRoISampler` / :class:`StratifiedOHEMRoISampler`: runs the box head over *all* RoIs under
      :func:`torch.no_grad` (the paper's read-only network), computes per-RoI ``cls`` and ``loc`` losses
      (:func:`roi_losses`), selects hard RoIs, then runs RoI pooling and the head *with* gradients on the
      selected RoIs only, so memory and backward time scale with ``B``, not ``R``.

    Both losses are summed over the sampled RoIs and divided by their number, as ``fastrcnn_loss`` does.
    Inference is torchvision's, unchanged. Build it with :meth:`from_roi_heads`.
    """

    sampler: RoISampler
    box_cls_loss: BoxClsLoss | None
    recorder: BalanceRecorder | None
    hard_negatives: HardNegativeSet | None
    progress: float

    @classmethod
    def from_roi_heads(
        cls,
        heads: RoIHeads,
        *,
        sampler: RoISampler,
        box_cls_loss: BoxClsLoss | None = None,
        recorder: BalanceRecorder | None = None,
        hard_negatives: HardNegativeSet | None = None,
        seed: int | None = None,
    ) -> BalancedRoIHeads:
        """A :class:`BalancedRoIHeads` sharing ``heads``' pooler, box head, predictor, matcher and coder.

        Args:
            heads: The model's box-only ``RoIHeads`` (mask / keypoint heads are not supported).
            sampler: One of :class:`FixedRatioRoISampler`, :class:`OHEMRoISampler`,
                :class:`StratifiedOHEMRoISampler`.
            box_cls_loss: ``None`` (cross entropy) or a callable ``(logits[N, C], labels[N]) -> Tensor[N]``.
            recorder: Optional sink (counts ``"faster_rcnn/roi"``, losses ``"faster_rcnn/roi"`` of the
                selected RoIs and ``"ohem/all"`` of every RoI for OHEM, class sums ``"faster_rcnn/roi_cls"``).
            hard_negatives: Optional :class:`~detbalance.sampling.HardNegativeSet` (offline bootstrapping).
            seed: Seed of the sampling generator; ``None`` draws one from the global generator.

        Raises:
            ValueError: On a sampler of another type, a self-normalising ``box_cls_loss``, or a head
                with mask/keypoint branches.
        """
        if not isinstance(sampler, FixedRatioRoISampler | OHEMRoISampler | StratifiedOHEMRoISampler):
            raise ValueError(
                "roi_sampler must be a FixedRatioRoISampler, OHEMRoISampler or StratifiedOHEMRoISampler, "
                f"got {sampler!r}"
            )
        if box_cls_loss is not None and not callable(box_cls_loss):
            raise ValueError(f"box_cls_loss must be None or a callable, got {box_cls_loss!r}")
        if getattr(box_cls_loss, "self_normalizing", False):
            raise ValueError(
                f"box_cls_loss must return per-RoI losses; {type(box_cls_loss).__name__} normalises itself"
            )
        if heads.has_mask() or heads.has_keypoint():
            raise ValueError("balance_faster_rcnn supports box-only heads; got a mask or keypoint branch")
        if hard_negatives is not None and not isinstance(hard_negatives, HardNegativeSet):
            raise ValueError(f"hard_negatives must be a HardNegativeSet or None, got {hard_negatives!r}")
        fixed = sampler if isinstance(sampler, FixedRatioRoISampler) else None
        new = cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=fixed.num_samples if fixed else heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=fixed.positive_fraction if fixed else heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
        )
        new.proposal_matcher = heads.proposal_matcher
        new.box_coder = heads.box_coder
        new.sampler = sampler
        new.box_cls_loss = box_cls_loss
        new.recorder = recorder
        new.hard_negatives = hard_negatives
        new.progress = 0.0
        new._init_generator(seed)
        new.train(heads.training)
        return new

    @property
    def num_classes(self) -> int:
        """``C = K + 1``, the classifier's columns (background included)."""
        return int(self.box_predictor.cls_score.out_features)

    def set_progress(self, progress: float) -> None:
        """Tell S-OHEM the fraction of training done (``0`` start, ``1`` end); other samplers ignore it."""
        if isinstance(progress, bool) or not isinstance(progress, int | float) or not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be a float in [0, 1], got {progress!r}")
        self.progress = float(progress)

    def set_hard_negatives(self, hard_negatives: HardNegativeSet | None) -> None:
        """Swap the bootstrapped negatives (e.g. after a new mining round); ``None`` disables them."""
        if hard_negatives is not None and not isinstance(hard_negatives, HardNegativeSet):
            raise ValueError(f"hard_negatives must be a HardNegativeSet or None, got {hard_negatives!r}")
        self.hard_negatives = hard_negatives

    # ----------------------------------------------------------------------------------------- training
    def _mined_boxes(self, targets: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Bootstrapped boxes of each image, in the network's (resized) coordinates."""
        empty = torch.zeros((0, 4), dtype=dtype, device=device)
        if self.hard_negatives is None:
            return [empty for _ in targets]
        image_ids = [_image_id(t) for t in targets]
        if any(i is None for i in image_ids):
            raise ValueError("bootstrapping needs targets[i]['image_id'] to look up the mined boxes")
        out = []
        for t, shape, boxes in zip(targets, image_shapes, self.hard_negatives.boxes_for(image_ids, device=device)):
            boxes = boxes.to(dtype).reshape(-1, 4)
            original = t.get(ORIGINAL_SIZE_KEY)
            if original is not None and boxes.numel():
                boxes = resize_boxes(boxes, original.tolist(), list(shape))
            out.append(boxes)
        return out

    def prepare_training_rois(
        self, proposals: list[Tensor], image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> TrainingRoIs:
        """Every training RoI of the batch (proposals, bootstrapped boxes, GT) with its label and target.

        Matching is the head's own (torchvision's ``Matcher``; the RoI head's default makes every RoI
        below IoU 0.5 background, i.e. ``bg_lo = 0``); a bootstrapped box the matcher would ignore is
        made background.

        Raises:
            ValueError: On non-float boxes or non-int64 labels, or bootstrapping without ``image_id``.
        """
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise ValueError(f"target boxes must be floating point, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise ValueError(f"target labels must be int64, got {t['labels'].dtype}")
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        mined = self._mined_boxes(targets, image_shapes, dtype, device)
        rois = [torch.cat([p, m, g]) for p, m, g in zip(proposals, mined, gt_boxes)]
        matched_idxs, labels = self.assign_targets_to_proposals(rois, gt_boxes, gt_labels)

        counts = [r.shape[0] for r in rois]
        boxes = torch.cat(rois)
        labels_flat = torch.cat(labels)
        batch_idx = torch.repeat_interleave(
            torch.arange(len(rois), device=device), torch.tensor(counts, device=device)
        )
        is_mined = torch.cat([
            torch.cat([p.new_zeros(p.shape[0], dtype=torch.bool), m.new_ones(m.shape[0], dtype=torch.bool),
                       g.new_zeros(g.shape[0], dtype=torch.bool)])
            for p, m, g in zip(proposals, mined, gt_boxes)
        ])
        # A mined box is a confident false positive: anything not matched as foreground is background,
        # also when the matcher would ignore it (bg_iou_thresh < fg_iou_thresh).
        labels_flat = torch.where(is_mined & (labels_flat < 0), torch.zeros_like(labels_flat), labels_flat)
        matched_gt = torch.cat([
            (g if g.numel() else g.new_zeros((1, 4)))[i] for g, i in zip(gt_boxes, matched_idxs)
        ])
        regression_targets = self.box_coder.encode_single(matched_gt, boxes)
        regression_targets = torch.where(
            (labels_flat > 0)[:, None], regression_targets, torch.zeros_like(regression_targets)
        )
        return TrainingRoIs(rois, boxes, labels_flat, regression_targets, batch_idx, is_mined, counts)

    def forward(  # type: ignore[override]  # torchvision's signature
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """torchvision's ``RoIHeads.forward``; in training the sampler and loss described in the class."""
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets must be given in training mode")
        prep = self.prepare_training_rois(proposals, image_shapes, targets)
        num_images = len(prep.rois)
        boxes, labels_flat, regression_targets, batch_idx = (
            prep.boxes, prep.labels, prep.regression_targets, prep.batch_idx
        )

        if isinstance(self.sampler, FixedRatioRoISampler):
            sampled = self._sample_fixed(labels_flat, prep.is_mined, prep.counts)
        else:
            sampled = self._select_hard(features, prep.rois, image_shapes, boxes, labels_flat,
                                        regression_targets, batch_idx)

        selected = sampled.all()
        per_image = torch.bincount(batch_idx[selected], minlength=num_images).tolist()
        box_features = self.box_roi_pool(features, list(boxes[selected].split(per_image)), image_shapes)
        box_features = self.box_head(box_features)
        class_logits, box_regression = self.box_predictor(box_features)
        sel_labels = labels_flat[selected]
        cls, loc = roi_losses(class_logits, box_regression, sel_labels, regression_targets[selected],
                              box_cls_loss=self.box_cls_loss)
        num = max(1, selected.numel())
        losses = {"loss_classifier": cls.sum() / num, "loss_box_reg": loc.sum() / num}
        if self.recorder is not None:
            self.recorder.record_counts("faster_rcnn/roi", sampled.positive.numel(), sampled.negative.numel())
            self.recorder.record_losses("faster_rcnn/roi", cls + loc)
            self.recorder.record_class_losses("faster_rcnn/roi_cls", sel_labels, cls, self.num_classes - 1)
        return [], losses

    def _sample_fixed(self, labels: Tensor, is_mined: Tensor, counts: list[int]) -> SampledIndices:
        """Fixed-ratio sampling; bootstrapped background RoIs fill the background budget first."""
        sampler = self.sampler
        assert isinstance(sampler, FixedRatioRoISampler)  # internal invariant (checked by the caller)
        generator = self.generator(labels.device)
        mined_bg = is_mined & (labels == 0)
        candidates = torch.where(mined_bg, torch.full_like(labels, -1), labels)
        sampled = sample_fixed_ratio_batched(
            list(candidates.split(counts)), sampler.num_samples, sampler.positive_fraction, generator=generator
        )
        offsets = [0]
        for c in counts[:-1]:
            offsets.append(offsets[-1] + c)
        positive, negative = [], []
        for s, mined_i, offset in zip(sampled, mined_bg.split(counts), offsets):
            neg = s.negative
            mined_idx = torch.nonzero(mined_i).flatten()
            if mined_idx.numel():
                budget = sampler.num_samples - s.positive.numel()
                take = mined_idx[torch.randperm(mined_idx.numel(), generator=generator,
                                                device=mined_idx.device)[:budget]]
                rest = neg[torch.randperm(neg.numel(), generator=generator, device=neg.device)
                           [: max(0, budget - take.numel())]]
                neg = torch.cat([take, rest]).sort().values
            positive.append(s.positive + offset)
            negative.append(neg + offset)
        return SampledIndices(torch.cat(positive), torch.cat(negative))

    def _select_hard(self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]],
                     boxes: Tensor, labels: Tensor, regression_targets: Tensor,
                     batch_idx: Tensor) -> SampledIndices:
        """OHEM / S-OHEM: per-RoI losses of all RoIs from the read-only (no-grad) pass, then selection."""
        with torch.no_grad():
            box_features = self.box_head(self.box_roi_pool(features, rois, image_shapes))
            class_logits, box_regression = self.box_predictor(box_features)
            cls, loc = roi_losses(class_logits, box_regression, labels, regression_targets,
                                  box_cls_loss=self.box_cls_loss)
            cls, loc = cls.float(), loc.float()
        sampler = self.sampler
        if isinstance(sampler, OHEMRoISampler):
            sampled = select_hard_examples(
                cls + loc, labels, boxes, batch_idx, num_samples=sampler.num_samples, nms_iou=sampler.nms_iou,
                positive_fraction=sampler.positive_fraction, generator=self.generator(labels.device),
            )
        else:
            sampled = select_hard_examples_stratified(
                cls, loc, labels, boxes, batch_idx, num_samples=sampler.num_samples, progress=self.progress,
                strata=sampler.strata, loss_weights=sampler.loss_weights, quotas=sampler.quotas,
                nms_iou=sampler.nms_iou,
            )
        if self.recorder is not None:
            self.recorder.record_losses("ohem/all", (cls + loc)[labels >= 0])
        return sampled


def balance_faster_rcnn(
    model: FasterRCNN,
    *,
    roi_sampler: RoISampler,
    rpn_sampler: FixedRatioRoISampler | None = None,
    box_cls_loss: BoxClsLoss | None = None,
    recorder: BalanceRecorder | None = None,
    hard_negatives: HardNegativeSet | None = None,
) -> FasterRCNN:
    """Adapt a torchvision Faster R-CNN in place to a sampling / loss remedy and return it.

    Replaces ``model.roi_heads`` by :class:`BalancedRoIHeads`, ``model.rpn`` by :class:`BalancedRPN` when
    ``rpn_sampler`` is given, and ``model.transform`` by :class:`BalancedTransform`; every weight is shared.

    Args:
        model: A box-only torchvision ``FasterRCNN`` (``GeneralizedRCNN`` with ``RoIHeads``).
        roi_sampler: :class:`FixedRatioRoISampler` (torchvision: 512 @ 0.25), :class:`OHEMRoISampler`
            (Shrivastava et al. 2016: 128 per image, NMS 0.7) or :class:`StratifiedOHEMRoISampler`.
        rpn_sampler: A :class:`FixedRatioRoISampler` for the RPN anchors (torchvision: 256 @ 0.5);
            ``None`` keeps torchvision's RPN untouched.
        box_cls_loss: ``None`` (cross entropy) or a per-RoI loss ``(logits[N, C], labels[N]) -> Tensor[N]``
            such as ``SoftmaxFocalLoss(gamma=2.0)``.
        recorder: Optional :class:`~detbalance.detectors.recorder.BalanceRecorder`.
        hard_negatives: Offline bootstrapping (Sung & Poggio 1998): a
            :class:`~detbalance.sampling.HardNegativeSet` whose boxes (original image coordinates, looked up
            by ``targets[i]["image_id"]``) are appended to each image's proposals; swap it between rounds
            with ``model.roi_heads.set_hard_negatives``.

    Returns:
        ``model`` itself, adapted.

    Raises:
        ValueError: On a model that is not a box-only Faster R-CNN, or a sampler / loss of the wrong kind.
    """
    if not isinstance(model, FasterRCNN) or not isinstance(model.roi_heads, RoIHeads):
        raise ValueError(f"model must be a torchvision FasterRCNN, got {type(model).__name__}")
    if not isinstance(model.rpn, RegionProposalNetwork):
        raise ValueError(f"model.rpn must be a RegionProposalNetwork, got {type(model.rpn).__name__}")
    if rpn_sampler is not None and not isinstance(rpn_sampler, FixedRatioRoISampler):
        raise ValueError(f"rpn_sampler must be a FixedRatioRoISampler or None, got {rpn_sampler!r}")
    model.roi_heads = BalancedRoIHeads.from_roi_heads(
        model.roi_heads, sampler=roi_sampler, box_cls_loss=box_cls_loss, recorder=recorder,
        hard_negatives=hard_negatives,
    )
    if rpn_sampler is not None:
        model.rpn = BalancedRPN.from_rpn(model.rpn, sampler=rpn_sampler, recorder=recorder)
    if not isinstance(model.transform, BalancedTransform):
        model.transform = BalancedTransform.from_transform(
            model.transform, num_classes=model.roi_heads.num_classes
        )
    return model

