r"""Faster R-CNN adapter: which RoIs (and RPN anchors) count, and how the RoI classifier is scored.

:func:`balance_faster_rcnn` swaps three parts of a torchvision :class:`~torchvision.models.detection.FasterRCNN`
for subclasses built from the model's own modules (no monkeypatching, all weights shared):

* ``model.roi_heads`` -> :class:`BalancedRoIHeads`: the RoI sampler, the per-RoI classification loss
  (optionally class-weighted), bootstrapped boxes and recording;
* ``model.rpn`` -> :class:`BalancedRPN` (only when ``rpn_sampler`` is given): the RPN anchor sampler;
* ``model.transform`` -> :class:`BalancedTransform`: rejects bad targets with a ``ValueError`` *before*
  torchvision's own ``AssertionError`` checks, and tells the RoI head each image's original size so that
  mined boxes (``target["mined_boxes"]``, in the coordinates of the image given) are resized with it.

Both samplers follow the contract of :mod:`detbalance.sampling.roi_sampler`:
``sampler(rois, *, losses=None, generator=None) -> SampledIndices``. The head builds the
:class:`~detbalance.sampling.RoIBatch`, runs the read-only pass over every RoI only when the sampler
declares ``needs_losses``, and weights the back-propagated ``cls`` and ``loc`` terms by the sampler's
``loss_weights(progress)`` when it has one (S-OHEM). There is no branch on the sampler's type.

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

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import box_iou

from detbalance.detectors._targets import check_detection_targets
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.losses.contract import ScaledLoss
from detbalance.losses.pisa import PrimeSampleAttention, aligned_box_iou, carl_loss, isr_p_weights
from detbalance.sampling.roi_sampler import (
    RoIBatch,
    RoILosses,
    RoISampler,
    sampler_loss_weights,
    sampler_needs_losses,
    split_weighted_sample,
)

__all__ = [
    "MINED_BOXES_KEY",
    "ORIGINAL_SIZE_KEY",
    "BalancedRPN",
    "BalancedRoIHeads",
    "BalancedTransform",
    "balance_faster_rcnn",
    "roi_losses",
]

#: Key under which :class:`BalancedTransform` stores ``Tensor[2]`` (original ``h, w``) in each target copy.
ORIGINAL_SIZE_KEY = "original_image_size"
#: Target key of the bootstrapped boxes ``Tensor[M, 4]`` (xyxy, coordinates of the image given).
MINED_BOXES_KEY = "mined_boxes"

BoxClsLoss = Callable[[Tensor, Tensor], Tensor]
BoxLoss = Callable[[Tensor, Tensor], Tensor]


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_sampler(name: str, sampler: object) -> None:
    if not callable(sampler):
        raise ValueError(f"{name} must be a callable sampler(rois, *, losses=None, generator=None), got {sampler!r}")


def _class_weights(labels: Tensor, class_weight: Tensor, background_weight: float) -> Tensor:
    """Per-RoI weights ``Tensor[N]``: ``class_weight[label - 1]`` for foreground, ``background_weight`` else.

    Private until the library function of ``losses/weighting.py`` replaces it; the loss it gives is
    ``sum_i w[label_i] CE_i / N`` with ``N`` the number of sampled RoIs (torchvision's mean).
    """
    table = torch.cat([class_weight.new_full((1,), float(background_weight)), class_weight]).to(labels.device)
    return table[labels.clamp(min=0)]


def _inner_loss(loss: object) -> object:
    """The loss inside any ``ScaledLoss`` wrappers (a wrapper carries the loss weight, not the methods)."""
    while isinstance(loss, ScaledLoss):
        loss = loss.loss
    return loss


@contextlib.contextmanager
def _frozen_state(loss: object) -> Iterator[None]:
    """Eval mode for a stateful loss during OHEM's read-only pass: its statistics count each step's RoIs once."""
    if not isinstance(loss, nn.Module) or not loss.training:
        yield
        return
    loss.train(False)
    try:
        yield
    finally:
        loss.train(True)


def roi_losses(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    *,
    box_cls_loss: BoxClsLoss | None = None,
    box_loss: BoxLoss | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-RoI Fast R-CNN losses, the summands of torchvision's ``fastrcnn_loss``.

    .. math::
        L_{cls,i} = \mathrm{CE}(z_i, y_i), \qquad
        L_{loc,i} = [y_i > 0] \sum_{j=1}^{4} \mathrm{smooth}_{L1}^{\beta=1/9}(t^{y_i}_{ij} - v_{ij})

    (``box_loss`` replaces the smooth L1, e.g. Libra R-CNN's balanced L1.)

    Args:
        class_logits: ``Tensor[N, C]`` (``C = K + 1``, column 0 background).
        box_regression: ``Tensor[N, 4 C]`` class-specific box deltas.
        labels: ``Tensor[N]`` int64, convention of :mod:`detbalance.types` (``-1`` rows give 0 loss).
        regression_targets: ``Tensor[N, 4]`` encoded targets (only foreground rows are read).
        box_cls_loss: ``None`` for cross entropy, or a callable ``(logits[N, C], labels[N]) -> Tensor[N]``
            (e.g. :class:`detbalance.losses.SoftmaxFocalLoss`).
        box_loss: ``None`` for torchvision's smooth L1 (beta 1/9), or a per-element box loss
            ``(deltas[N, 4], targets[N, 4]) -> Tensor[N, 4]`` of the loss contract (``kind = "box"``, e.g.
            :class:`detbalance.losses.BalancedL1Loss`), summed over the 4 coordinates.

    Returns:
        ``(cls, loc)``, each ``Tensor[N]``; the mean over the sampled RoIs of each is torchvision's loss.

    Raises:
        ValueError: If ``box_cls_loss`` does not return one loss per RoI or ``box_loss`` one per coordinate.
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
    deltas = box_regression.reshape(n, box_regression.shape[-1] // 4, 4)[torch.arange(n, device=labels.device), safe]
    targets = torch.where(fg[:, None], regression_targets.to(deltas.dtype), torch.zeros_like(deltas))
    if box_loss is None:
        loc = F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="none")
    else:
        loc = box_loss(deltas, targets)
        if loc.shape != deltas.shape:
            raise ValueError(
                f"box_loss must return per-coordinate losses of shape {tuple(deltas.shape)}, got "
                f"{tuple(loc.shape)}; construct it with reduction='none'"
            )
    loc = torch.where(fg, loc.sum(dim=1), torch.zeros_like(loc[:, 0]))
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

    def set_generator_state(self, state: Tensor, device: torch.device | str = "cpu", *, step: int = 0) -> bool:
        """Restore :meth:`generator_state` on ``device``; ``True`` when the stream continues.

        A state saved on another device type (a CUDA run resumed on a CPU, or back: their generators differ
        in kind and state size) cannot continue there. The generator is then seeded afresh with the
        adaptation seed + ``step`` (the resumed run samples reproducibly, but not as the uninterrupted run
        would have) and ``False`` is returned.
        """
        device = torch.device(device)
        fresh = torch.Generator(device=device)
        if fresh.get_state().numel() != state.numel():
            fresh.manual_seed(self._seed + step)
            self._generator = fresh
            return False
        self.generator(device).set_state(state)
        return True


class BalancedRPN(_GeneratorMixin, RegionProposalNetwork):
    """torchvision's RPN with its anchor sampler replaced (anchor matching and proposals are unchanged).

    The sampler gets a :class:`~detbalance.sampling.RoIBatch` of all anchors of the batch (``boxes`` the
    anchors, ``max_iou`` their largest IoU with the ground truth, ``mined`` all false); a sampler that
    needs losses is refused (the RPN has no read-only pass). Build it with :meth:`from_rpn`; all modules
    (head, anchor generator) are shared with the original.
    """

    sampler: RoISampler
    recorder: BalanceRecorder | None
    progress: float

    @classmethod
    def from_rpn(
        cls,
        rpn: RegionProposalNetwork,
        *,
        sampler: RoISampler,
        recorder: BalanceRecorder | None = None,
        seed: int | None = None,
    ) -> BalancedRPN:
        """A :class:`BalancedRPN` sharing every module and setting of ``rpn``.

        Args:
            rpn: The model's ``RegionProposalNetwork``.
            sampler: An anchor sampler (e.g. ``FixedRatioSampler(num_samples=256, positive_fraction=0.5)``).
            recorder: Optional sink for the sampled counts (``"faster_rcnn/rpn"``).
            seed: Seed of the sampling generator; ``None`` draws one from the global generator.

        Raises:
            ValueError: If ``sampler`` is not callable or needs per-anchor losses.
        """
        _check_sampler("rpn_sampler", sampler)
        if sampler_needs_losses(sampler):
            raise ValueError(f"rpn_sampler must not need losses (the RPN has no read-only pass), got {sampler!r}")
        new = cls(
            rpn.anchor_generator,
            rpn.head,
            fg_iou_thresh=rpn.proposal_matcher.high_threshold,
            bg_iou_thresh=rpn.proposal_matcher.low_threshold,
            batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
            positive_fraction=rpn.fg_bg_sampler.positive_fraction,
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
        new.progress = 0.0
        new._anchors: list[Tensor] = []
        new._max_iou: list[Tensor] = []
        new._init_generator(seed)
        new.train(rpn.training)
        return new

    def set_progress(self, progress: float) -> None:
        """The fraction of training done, passed to the sampler in :attr:`RoIBatch.progress`."""
        self.progress = _check_progress(progress)

    def assign_targets_to_anchors(  # type: ignore[override]  # torchvision's signature
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's matching; also keeps the anchors and their max IoU for :meth:`compute_loss`."""
        self._anchors = anchors
        self._max_iou = [
            box_iou(a, t["boxes"].to(a)).max(dim=1).values if t["boxes"].numel() else a.new_zeros(a.shape[0])
            for a, t in zip(anchors, targets)
        ]
        return super().assign_targets_to_anchors(anchors, targets)

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
        int_labels = torch.cat(labels).to(torch.int64)
        device = int_labels.device
        counts = torch.tensor([lab.shape[0] for lab in labels], device=device)
        rois = RoIBatch(
            labels=int_labels,
            boxes=torch.cat(self._anchors),
            batch_idx=torch.repeat_interleave(torch.arange(len(labels), device=device), counts),
            max_iou=torch.cat(self._max_iou),
            mined=torch.zeros_like(int_labels, dtype=torch.bool),
            progress=self.progress,
            num_images=len(labels),
        )
        self._anchors, self._max_iou = [], []  # only for this call
        sampled = self.sampler(rois, generator=self.generator(device))
        pos, inds = sampled.positive, sampled.all()
        flat_labels = torch.cat(labels)
        targets = torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(
            pred_bbox_deltas[pos], targets[pos], beta=1 / 9, reduction="sum"
        ) / max(1, inds.numel())
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[inds], flat_labels[inds])
        if self.recorder is not None:
            self.recorder.record_counts("faster_rcnn/rpn", pos.numel(), sampled.negative.numel())
        return objectness_loss, box_loss


class BalancedTransform(GeneralizedRCNNTransform):
    """torchvision's transform that validates targets and records each image's original size.

    Validation raises ``ValueError`` naming the image and box (torchvision asserts, or does not check at
    all); ``target["mined_boxes"]``, when present, must be a finite ``Tensor[M, 4]``. In each (copied)
    target it stores ``Tensor[2]`` ``(h, w)`` of the original image under :data:`ORIGINAL_SIZE_KEY`, which
    :class:`BalancedRoIHeads` uses to resize the mined boxes.
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
            for i, t in enumerate(targets):
                mined = t.get(MINED_BOXES_KEY)
                if mined is None:
                    continue
                if not isinstance(mined, Tensor) or mined.dim() != 2 or mined.shape[1] != 4:
                    raise ValueError(f"targets[{i}]['{MINED_BOXES_KEY}'] must be Tensor[M, 4], got {mined!r}")
                if not mined.is_floating_point() or not bool(torch.isfinite(mined).all()):
                    raise ValueError(f"targets[{i}]['{MINED_BOXES_KEY}'] must be finite floating-point boxes")
            targets = [dict(t) for t in targets]
            for image, t in zip(images, targets):
                t[ORIGINAL_SIZE_KEY] = torch.tensor(image.shape[-2:], dtype=torch.float32)
        return super().forward(images, targets)


def _check_progress(progress: object) -> float:
    if isinstance(progress, bool) or not isinstance(progress, int | float) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be a float in [0, 1], got {progress!r}")
    return float(progress)


class BalancedRoIHeads(_GeneratorMixin, RoIHeads):
    """torchvision's box RoI head with an injectable RoI sampler, classification loss and bootstrapping.

    Training, per image: the proposals, the mined boxes (``target["mined_boxes"]``) and the ground truth
    (as torchvision adds it) are matched with the head's own matcher into a
    :class:`~detbalance.sampling.RoIBatch`; the mined boxes, and proposals whose IoU with one of them is
    at least ``mined_iou``, are flagged ``mined`` (a mined box the matcher would ignore is background).
    If the sampler declares ``needs_losses``, the box head runs over *all* RoIs under
    :func:`torch.no_grad` (OHEM's read-only network) and the per-RoI ``cls``/``loc`` losses
    (:func:`roi_losses`, class-weighted like the trained loss) go to the sampler. RoI pooling and the
    head then run *with* gradients on the sampled RoIs only, and the loss is

    .. math::
        L = \\frac{w_{cls}(t)}{N} \\sum_i c_{y_i} L_{cls,i}, \\qquad
        L_{box} = \\frac{w_{loc}(t)}{N} \\sum_i L_{loc,i}

    with ``N`` the number of sampled RoIs (torchvision's mean), ``c`` the optional class weights
    (background ``background_weight``) and ``(w_cls, w_loc)`` the sampler's ``loss_weights`` at the
    training progress ``t`` (``(1, 1)`` for samplers without a schedule). Inference is torchvision's.
    Build it with :meth:`from_roi_heads`.
    """

    sampler: RoISampler
    box_cls_loss: BoxClsLoss | None
    recorder: BalanceRecorder | None
    progress: float
    mined_iou: float | None
    background_weight: float
    pisa: PrimeSampleAttention | None
    box_loss: BoxLoss | None

    @classmethod
    def from_roi_heads(
        cls,
        heads: RoIHeads,
        *,
        sampler: RoISampler,
        box_cls_loss: BoxClsLoss | None = None,
        class_weight: Tensor | None = None,
        background_weight: float = 1.0,
        mined_iou: float | None = 0.7,
        recorder: BalanceRecorder | None = None,
        seed: int | None = None,
        pisa: PrimeSampleAttention | None = None,
        box_loss: BoxLoss | None = None,
    ) -> BalancedRoIHeads:
        """A :class:`BalancedRoIHeads` sharing ``heads``' pooler, box head, predictor, matcher and coder.

        Args:
            heads: The model's box-only ``RoIHeads`` (mask / keypoint heads are not supported).
            sampler: A RoI sampler (:mod:`detbalance.sampling.roi_sampler`).
            box_cls_loss: ``None`` (cross entropy) or a callable ``(logits[N, C], labels[N]) -> Tensor[N]``.
            class_weight: ``Tensor[K]`` per-class weights of the classification term (``None``: off).
            background_weight: Weight of a background RoI's classification term when ``class_weight`` is set.
            mined_iou: A proposal whose IoU with a mined box is ``>= mined_iou`` is flagged mined (ours: 0.7,
                the RPN's foreground threshold, i.e. "the same box"); ``None`` flags the mined boxes only.
            recorder: Optional sink (counts ``"faster_rcnn/roi"``, losses ``"faster_rcnn/roi"`` of the
                selected RoIs and ``"ohem/all"`` of every RoI when the read-only pass runs, class sums
                ``"faster_rcnn/roi_cls"``).
            seed: Seed of the sampling generator; ``None`` draws one from the global generator.
            pisa: PISA's ISR-P and CARL on the sampled RoIs (:class:`~detbalance.losses.PrimeSampleAttention`);
                ``None`` off.
            box_loss: ``None`` (torchvision's smooth L1, beta 1/9) or a per-element box loss on the encoded
                deltas (:func:`roi_losses`), e.g. ``BalancedL1Loss()`` (Libra R-CNN).

        Raises:
            ValueError: On a non-callable sampler, a self-normalising ``box_cls_loss``, bad class weights,
                or a head with mask/keypoint branches.
        """
        _check_sampler("roi_sampler", sampler)
        if box_cls_loss is not None and not callable(box_cls_loss):
            raise ValueError(f"box_cls_loss must be None or a callable, got {box_cls_loss!r}")
        if getattr(box_cls_loss, "self_normalizing", False):
            raise ValueError(
                f"box_cls_loss must return per-RoI losses; {type(box_cls_loss).__name__} normalises itself"
            )
        if box_loss is not None and not callable(box_loss):
            raise ValueError(f"box_loss must be None or a callable, got {box_loss!r}")
        if getattr(box_loss, "self_normalizing", False) or getattr(box_loss, "decoded_boxes", False):
            raise ValueError(
                f"box_loss must return per-element losses on encoded deltas; {type(_inner_loss(box_loss)).__name__} "
                "normalises itself or needs decoded boxes"
            )
        if heads.has_mask() or heads.has_keypoint():
            raise ValueError("balance_faster_rcnn supports box-only heads; got a mask or keypoint branch")
        if pisa is not None and not isinstance(pisa, PrimeSampleAttention):
            raise ValueError(f"pisa must be a PrimeSampleAttention or None, got {pisa!r}")
        columns = int(heads.box_predictor.bbox_pred.out_features) // 4
        if class_weight is not None and (
            not isinstance(class_weight, Tensor) or class_weight.shape != (columns - 1,)
            or not bool(torch.isfinite(class_weight).all()) or bool((class_weight < 0).any())
        ):
            raise ValueError(f"class_weight must be a finite Tensor[{columns - 1}] >= 0, got {class_weight!r}")
        if isinstance(background_weight, bool) or not isinstance(background_weight, int | float) \
                or not background_weight >= 0:
            raise ValueError(f"background_weight must be a number >= 0, got {background_weight!r}")
        if mined_iou is not None and (isinstance(mined_iou, bool) or not isinstance(mined_iou, int | float)
                                      or not 0.0 < mined_iou <= 1.0):
            raise ValueError(f"mined_iou must be in (0, 1] or None, got {mined_iou!r}")
        # A loss that needs another classifier width (Seesaw: K + 2, the objectness pair) gets a fresh
        # cls_score of that width, as mmdetection's BBoxHead builds it from loss_cls.get_cls_channels.
        width = getattr(_inner_loss(box_cls_loss), "classifier_columns", None)
        if width is not None:
            bbox_pred = heads.box_predictor.bbox_pred
            wanted = int(width(int(bbox_pred.out_features) // 4 - 1))
            old = heads.box_predictor.cls_score
            if int(old.out_features) != wanted:
                heads.box_predictor.cls_score = nn.Linear(old.in_features, wanted).to(
                    device=old.weight.device, dtype=old.weight.dtype
                )
        new = cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
        )
        new.proposal_matcher = heads.proposal_matcher
        new.box_coder = heads.box_coder
        new.sampler = sampler
        new.box_cls_loss = box_cls_loss
        new.box_loss = box_loss
        new.register_buffer(
            "class_weight", None if class_weight is None else class_weight.detach().to(torch.float32).clone()
        )
        new.background_weight = float(background_weight)
        new.mined_iou = None if mined_iou is None else float(mined_iou)
        new.recorder = recorder
        new.pisa = pisa
        new.progress = 0.0
        inner = _inner_loss(box_cls_loss)
        if recorder is not None and hasattr(inner, "track_stats"):
            inner.track_stats = True  # type: ignore[union-attr]  # per-class factors for the recorder
        new._init_generator(seed)
        new.train(heads.training)
        return new

    @property
    def num_classes(self) -> int:
        """``C = K + 1``, the labels' range (background included); read from the class-specific box deltas,
        since a loss may widen the classifier (Seesaw's ``K + 2`` logits)."""
        return int(self.box_predictor.bbox_pred.out_features) // 4

    def postprocess_detections(  # type: ignore[override]  # torchvision's signature
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's post-processing, scored by the loss's ``class_probabilities`` when it has one.

        Seesaw scores ``softmax(classes) * P(object)``, EQLv2 ``sigma(z_c) (1 - sigma(z_0))``, the federated
        loss ``sigma(z_c)`` (mmdetection's ``get_activation``, detectron2's ``predict_probs``). torchvision's
        code applies a softmax; it is handed logits whose softmax is ``p_c / S`` for the classes (``S = K + 1``
        exceeds any sum of ``K`` probabilities; the background logit takes the rest) and a threshold divided
        by ``S``, and the kept scores are multiplied back: the same boxes, order and scores as thresholding,
        NMS and top-k on ``p`` itself (a test).
        """
        probabilities = getattr(_inner_loss(self.box_cls_loss), "class_probabilities", None)
        if probabilities is None:
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        fg = probabilities(class_logits)[:, 1:].float()
        scale = float(fg.shape[1] + 1)
        logits = torch.cat([torch.log(scale - fg.sum(dim=1, keepdim=True)), torch.log(fg)], dim=1)
        threshold = self.score_thresh
        self.score_thresh = threshold / scale
        try:
            boxes, scores, labels = super().postprocess_detections(logits, box_regression, proposals, image_shapes)
        finally:
            self.score_thresh = threshold
        return boxes, [s * scale for s in scores], labels

    def set_progress(self, progress: float) -> None:
        """The fraction of training done (``0`` start, ``1`` end), passed to the sampler and its schedule."""
        self.progress = _check_progress(progress)

    # ----------------------------------------------------------------------------------------- training
    def _mined_boxes(self, targets: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Each image's ``target["mined_boxes"]`` in the network's (resized) coordinates."""
        out = []
        for t, shape in zip(targets, image_shapes):
            boxes = t.get(MINED_BOXES_KEY)
            if boxes is None:
                out.append(torch.zeros((0, 4), dtype=dtype, device=device))
                continue
            boxes = boxes.to(device=device, dtype=dtype).reshape(-1, 4)
            original = t.get(ORIGINAL_SIZE_KEY)
            if original is not None and boxes.numel():
                boxes = resize_boxes(boxes, original.tolist(), list(shape))
            out.append(boxes)
        return out

    def prepare_training_rois(
        self, proposals: list[Tensor], image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> tuple[RoIBatch, Tensor]:
        """Every training RoI of the batch (proposals, mined boxes, GT) and its regression target.

        Matching is the head's own (torchvision's ``Matcher``; the RoI head's default makes every RoI
        below IoU 0.5 background, i.e. ``bg_lo = 0``); a mined box the matcher would ignore is made
        background.

        Returns:
            ``(rois, regression_targets)``: the :class:`~detbalance.sampling.RoIBatch` and
            ``Tensor[R, 4]`` encoded targets (zeros where not foreground).

        Raises:
            ValueError: On non-float boxes or non-int64 labels.
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
        max_iou = torch.cat([
            box_iou(r, g).max(dim=1).values if g.numel() else r.new_zeros(r.shape[0]) for r, g in zip(rois, gt_boxes)
        ])
        flags = []
        for p, m, g in zip(proposals, mined, gt_boxes):
            near = p.new_zeros(p.shape[0], dtype=torch.bool)
            if m.numel() and self.mined_iou is not None and p.numel():
                near = box_iou(p, m).max(dim=1).values >= self.mined_iou
            flags.append(torch.cat([near, m.new_ones(m.shape[0], dtype=torch.bool),
                                    g.new_zeros(g.shape[0], dtype=torch.bool)]))
        is_mined = torch.cat(flags)
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
        gt_offsets = torch.tensor([0] + [g.shape[0] for g in gt_boxes[:-1]], device=device).cumsum(0)
        gt_index = torch.cat([i + o for i, o in zip(matched_idxs, gt_offsets)])
        gt_index = torch.where(labels_flat > 0, gt_index, torch.full_like(gt_index, -1))
        batch = RoIBatch(labels_flat, boxes, batch_idx, max_iou, is_mined, self.progress, len(rois), gt_index)
        return batch, regression_targets

    def _losses(self, box_features: Tensor, labels: Tensor, regression_targets: Tensor) -> tuple[Tensor, Tensor]:
        """Per-RoI ``(cls, loc)`` of pooled features, the classification term class-weighted if set."""
        cls, loc, _, _ = self._outputs_and_losses(box_features, labels, regression_targets)
        return cls, loc

    def _outputs_and_losses(
        self, box_features: Tensor, labels: Tensor, regression_targets: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(cls, loc, class_logits, box_regression)`` of pooled features."""
        class_logits, box_regression = self.box_predictor(self.box_head(box_features))
        cls, loc = roi_losses(class_logits, box_regression, labels, regression_targets,
                              box_cls_loss=self.box_cls_loss, box_loss=self.box_loss)
        if self.class_weight is not None:
            cls = cls * _class_weights(labels, self.class_weight, self.background_weight).to(cls.dtype)
        return cls, loc, class_logits, box_regression

    def _probabilities(self, class_logits: Tensor) -> Tensor:
        """``Tensor[N, K + 1]`` class probabilities: the loss's ``class_probabilities`` (Seesaw, EQLv2, federated
        loss), else the softmax."""
        probabilities = getattr(_inner_loss(self.box_cls_loss), "class_probabilities", None)
        return class_logits.softmax(-1) if probabilities is None else probabilities(class_logits)

    def _scores_and_boxes(self, class_logits: Tensor, box_regression: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Each RoI's largest foreground probability and its decoded box for that class (read-only pass)."""
        n = class_logits.shape[0]
        scores, arg = self._probabilities(class_logits.float())[:, 1:].max(-1)
        deltas = box_regression.reshape(n, -1, 4)[torch.arange(n, device=boxes.device), arg + 1]
        return scores, self.box_coder.decode_single(deltas.to(boxes.dtype), boxes)

    def _pisa_terms(
        self, rois: RoIBatch, selected: Tensor, cls: Tensor, loc: Tensor, class_logits: Tensor,
        box_regression: Tensor, regression_targets: Tensor, num: int,
    ) -> tuple[Tensor | None, Tensor | None]:
        """ISR-P weights of the sampled RoIs' classification terms and the CARL loss (``None`` where off)."""
        pisa = self.pisa
        if pisa is None:
            return None, None
        labels = rois.labels[selected]
        pos = torch.nonzero(labels > 0).flatten()
        boxes = rois.boxes[selected][pos]
        pos_labels = labels[pos]
        weight = None
        if pisa.isr_k is not None:
            with torch.no_grad():
                deltas = box_regression.detach().reshape(labels.shape[0], -1, 4)[pos, pos_labels]
                pred = self.box_coder.decode_single(deltas.to(boxes.dtype), boxes)
                target = self.box_coder.decode_single(regression_targets[selected][pos].to(boxes.dtype), boxes)
                ious = aligned_box_iou(pred, target)
                gt_index = rois.gt_index[selected][pos] if rois.gt_index is not None else pos_labels
                w = isr_p_weights(ious, pos_labels, gt_index, cls[pos].detach(), k=pisa.isr_k, bias=pisa.isr_bias)
                weight = torch.ones_like(cls).index_copy(0, pos, w.to(cls.dtype))
        carl = None
        if pisa.carl_k is not None:
            p = self._probabilities(class_logits.float())[pos, pos_labels]
            carl = carl_loss(p, loc[pos].float(), k=pisa.carl_k, bias=pisa.carl_bias, avg_factor=float(num))
        return weight, carl

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
        rois, regression_targets = self.prepare_training_rois(proposals, image_shapes, targets)
        boxes, labels = rois.boxes, rois.labels
        all_losses = None
        if sampler_needs_losses(self.sampler):
            with torch.no_grad(), _frozen_state(_inner_loss(self.box_cls_loss)):  # OHEM's read-only RoI network
                pooled = self.box_roi_pool(features, list(boxes.split(rois.counts())), image_shapes)
                cls_all, loc_all, logits_all, deltas_all = self._outputs_and_losses(pooled, labels, regression_targets)
                scores_all, pred_boxes_all = self._scores_and_boxes(logits_all, deltas_all, boxes)
            all_losses = RoILosses(cls_all.float(), loc_all.float(), scores_all, pred_boxes_all)
            if self.recorder is not None:
                self.recorder.record_losses("ohem/all", (all_losses.cls + all_losses.loc)[labels >= 0])
        sampled, negative_weight = split_weighted_sample(
            self.sampler(rois, losses=all_losses, generator=self.generator(labels.device))
        )

        selected = sampled.all()
        per_image = torch.bincount(rois.batch_idx[selected], minlength=rois.num_images).tolist()
        pooled = self.box_roi_pool(features, list(boxes[selected].split(per_image)), image_shapes)
        sel_labels = labels[selected]
        cls, loc, class_logits, box_regression = self._outputs_and_losses(
            pooled, sel_labels, regression_targets[selected])
        w_cls, w_loc = sampler_loss_weights(self.sampler, self.progress)
        num = max(1, selected.numel())
        if negative_weight is not None:  # ISR-N: the sampler weights the negatives it keeps
            neg_pos = torch.searchsorted(selected, sampled.negative)
            cls = cls * torch.ones_like(cls).index_copy(0, neg_pos, negative_weight.to(cls.dtype))
        isr_weight, carl = self._pisa_terms(rois, selected, cls, loc, class_logits, box_regression,
                                            regression_targets, num)
        if isr_weight is not None:
            cls = cls * isr_weight
        losses = {"loss_classifier": cls.sum() * (w_cls / num), "loss_box_reg": loc.sum() * (w_loc / num)}
        if carl is not None:
            losses["loss_carl"] = carl
        if self.recorder is not None:
            self.recorder.record_counts("faster_rcnn/roi", sampled.positive.numel(), sampled.negative.numel())
            self.recorder.record_losses("faster_rcnn/roi", cls + loc)
            self.recorder.record_class_losses("faster_rcnn/roi_cls", sel_labels, cls, self.num_classes - 1)
            stats = getattr(_inner_loss(self.box_cls_loss), "last_stats", None)
            for name, (total, count) in (stats or {}).items():  # Seesaw's factors, EQLv2's ratio, federated draws
                self.recorder.record_class_values(name, total, count)
        return [], losses


def balance_faster_rcnn(
    model: FasterRCNN,
    *,
    roi_sampler: RoISampler,
    rpn_sampler: RoISampler | None = None,
    box_cls_loss: BoxClsLoss | None = None,
    class_weight: Tensor | None = None,
    background_weight: float = 1.0,
    mined_iou: float | None = 0.7,
    recorder: BalanceRecorder | None = None,
    pisa: PrimeSampleAttention | None = None,
    box_loss: BoxLoss | None = None,
) -> FasterRCNN:
    """Adapt a torchvision Faster R-CNN in place to a sampling / loss remedy and return it.

    Replaces ``model.roi_heads`` by :class:`BalancedRoIHeads`, ``model.rpn`` by :class:`BalancedRPN` when
    ``rpn_sampler`` is given, and ``model.transform`` by :class:`BalancedTransform`; every weight is shared.

    Args:
        model: A box-only torchvision ``FasterRCNN`` (``GeneralizedRCNN`` with ``RoIHeads``).
        roi_sampler: Any sampler of the contract of :mod:`detbalance.sampling.roi_sampler`:
            ``FixedRatioSampler()`` (torchvision: 512 @ 0.25), ``OHEMSampler()`` (Shrivastava et al.
            2016), ``StratifiedOHEMSampler()``, ``BootstrappedSampler()``, or your own function.
        rpn_sampler: The RPN's anchor sampler (torchvision: ``FixedRatioSampler(256, 0.5)``); ``None``
            keeps torchvision's RPN untouched.
        box_cls_loss: ``None`` (cross entropy) or a per-RoI loss ``(logits[N, C], labels[N]) -> Tensor[N]``
            such as ``SoftmaxFocalLoss(gamma=2.0)``.
        class_weight: Optional ``Tensor[K]``: a RoI's classification term is weighted by its class's weight
            (``background_weight`` for background), ``sum_i w[y_i] CE_i / N``.
        background_weight: See ``class_weight``.
        mined_iou: See :meth:`BalancedRoIHeads.from_roi_heads`.
        recorder: Optional :class:`~detbalance.detectors.recorder.BalanceRecorder`.
        pisa: PISA's ISR-P and CARL (:class:`~detbalance.losses.PrimeSampleAttention`); with
            ``roi_sampler=ScoreHLRSampler()`` (ISR-N) it is mmdetection's ``faster-rcnn_r50_fpn_pisa`` recipe.
        box_loss: The RoI head's box loss (``None``: torchvision's smooth L1, beta 1/9; the RPN keeps its own),
            e.g. ``BalancedL1Loss()``: with ``roi_sampler=IoUBalancedSampler()`` it is Libra R-CNN's sampling
            and loss (mmdetection's ``configs/libra_rcnn`` without the balanced feature pyramid).

    Returns:
        ``model`` itself, adapted. Bootstrapped boxes arrive per image as ``target["mined_boxes"]``
        (see :class:`~detbalance.sampling.BootstrapHook`).

    Raises:
        ValueError: On a model that is not a box-only Faster R-CNN, or a sampler / loss of the wrong kind.
    """
    if not isinstance(model, FasterRCNN) or not isinstance(model.roi_heads, RoIHeads):
        raise ValueError(f"model must be a torchvision FasterRCNN, got {type(model).__name__}")
    if not isinstance(model.rpn, RegionProposalNetwork):
        raise ValueError(f"model.rpn must be a RegionProposalNetwork, got {type(model.rpn).__name__}")
    model.roi_heads = BalancedRoIHeads.from_roi_heads(
        model.roi_heads, sampler=roi_sampler, box_cls_loss=box_cls_loss, class_weight=class_weight,
        background_weight=background_weight, mined_iou=mined_iou, recorder=recorder, pisa=pisa, box_loss=box_loss,
    )
    if rpn_sampler is not None:
        model.rpn = BalancedRPN.from_rpn(model.rpn, sampler=rpn_sampler, recorder=recorder)
    if not isinstance(model.transform, BalancedTransform):
        model.transform = BalancedTransform.from_transform(
            model.transform, num_classes=model.roi_heads.num_classes
        )
    return model
