"""RetinaNet with injected classification and box losses (focal, alpha-CE, GHM-C; L1, smooth L1, ASL1, GHM-R).

:func:`balance_retinanet` swaps ``model.head`` of a torchvision ``RetinaNet`` for a
:class:`BalancedRetinaNetHead`, a subclass of torchvision's ``RetinaNetHead`` that reuses the model's
classification and regression branches (same modules, same weights) and replaces only
``compute_loss``. Everything else (transform, backbone, anchors, IoU matching with torchvision's
``Matcher`` at 0.5/0.4, box coding, post-processing) stays torchvision's.

The loss of a batch, for ``B`` images with ``A`` anchors each (all FPN levels concatenated), reads the
losses' declared contract (:mod:`detbalance.losses.contract`) and nothing else:

* classification: one-vs-all targets over the ``K`` object classes, built by the loss from the batch's
  :class:`~detbalance.losses.AnchorBatch` (``cls_loss.dense_targets``): the one-hot labels
  (:func:`detbalance.types.one_hot_targets`) for focal, CE and GHM-C; for QFL and VFL the IoU of each
  positive's decoded, detached predicted box with its matched ground truth in its class column. torchvision's classifier has ``K + 1`` columns whose column 0 is never a class; it is left out of
  the loss (and of GHM's histogram) unless ``background_column=True`` (torchvision's own loss). Anchors
  between the IoU thresholds (label ``-1``) are left out;
* regression: positives only, targets encoded with the head's ``box_coder`` exactly as torchvision
  (``BoxCoder(1, 1, 1, 1)``); a loss declaring ``decoded_boxes`` (GIoU) gets decoded boxes instead;
* a per-element loss (``self_normalizing=False``) is summed per image and divided by the positive count
  through ``normalizer`` (``"per_image"``: ``mean_b L_b / max(1, P_b)``, torchvision, the default;
  ``"per_batch"``: ``sum_b L_b / max(1, sum_b P_b)``, the focal-loss paper; or a
  :class:`~detbalance.losses.PositiveNormalizer`);
* a self-normalising loss (GHM-C, GHM-R) returns the normalised scalar. One declaring ``per_level`` (the
  GHM default) is called once per FPN level with all images of the batch, and the level losses are summed,
  as mmdetection's ``AnchorHead.loss_by_feat`` does for its ``retinanet_ghm`` config; otherwise once for all
  levels (one histogram per step).

With ``SigmoidFocalLoss(alpha=0.25, gamma=2)``, ``L1Loss()``, ``normalizer="per_image"`` and
``background_column=True`` the adapted model's loss dict equals torchvision's (a test), as it does for
``SmoothL1Loss(beta=1.0)`` against ``_loss_type = "smooth_l1"`` and ``GIoULoss()`` against ``"giou"``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops

from detbalance.detectors._dense import (
    Normalizer,
    box_loss_inputs,
    check_normalizer,
    check_weight,
    level_slices,
    loss_for_slot,
    match_targets,
    normalize,
    positive_box_loss,
)
from detbalance.detectors._targets import check_detection_targets, install_target_check
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.losses import AnchorBatch, DetectionLoss, GIoULoss, L1Loss, SmoothL1Loss
from detbalance.losses.pisa import PrimeSampleAttention, aligned_box_iou, carl_loss, isr_p_weights

#: An anchor assigner: ``(anchors[A, 4], gt_boxes[G, 4], anchors_per_level) -> matched index Tensor[A]`` in
#: torchvision's ``Matcher`` convention (``>= 0`` object, ``-1`` background, ``-2`` ignored).
Assigner = Callable[[Tensor, Tensor, Sequence[int]], Tensor]

__all__ = [
    "AnchorOutputs",
    "BalancedRetinaNetHead",
    "DenseSigmoidLoss",
    "anchor_outputs",
    "balance_retinanet",
    "torchvision_box_loss",
]


# ------------------------------------------------------------------------------ dense sigmoid losses
class DenseSigmoidLoss:
    """The classification loss of a dense sigmoid head (RetinaNet, FCOS), shared by their adapted heads.

    The host class sets ``cls_loss`` (a ``"sigmoid"`` loss), ``normalizer``, ``background_column``,
    ``recorder``, ``anchors_per_level`` (from its forward) and ``record_prefix`` (``"retinanet"``, ``"fcos"``).
    """

    cls_loss: DetectionLoss
    normalizer: Normalizer
    background_column: bool
    recorder: BalanceRecorder | None
    anchors_per_level: list[int]
    record_prefix: str = "retinanet"

    def level_index(self, num_anchors: int, device: torch.device) -> Tensor:
        """``Tensor[A]`` (int64): the pyramid level of every anchor of the last forward."""
        sizes = self.anchors_per_level
        level_slices(sizes, num_anchors)
        return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))

    def _self_normalized(self, loss: DetectionLoss, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """A self-normalising loss on ``[B, A, *]`` inputs: once per level (summed) or once for all levels."""
        b, a = valid.shape
        if not loss.per_level:
            return loss(pred.reshape(b * a, -1), target.reshape(b * a, -1), valid=valid.reshape(-1))
        total = None
        for sl in level_slices(self.anchors_per_level, a):
            n = b * (sl.stop - sl.start)
            value = loss(pred[:, sl].reshape(n, -1), target[:, sl].reshape(n, -1), valid=valid[:, sl].reshape(n))
            total = value if total is None else total + value
        return total

    def classification_loss(
        self,
        cls_logits: Tensor,
        labels: Tensor,
        num_positives: Tensor,
        *,
        anchors: Tensor,
        matched_boxes: Tensor,
        pred_boxes: Tensor,
        reweight: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(value, per_anchor)``: the normalised classification loss of ``cls_logits: Tensor[B, A, C]`` for
        ``labels: Tensor[B, A]`` (``-1`` ignore, ``0`` background, ``1..K`` = column), and the per-anchor loss
        ``Tensor[B, A]`` (``None`` for a self-normalising loss). ``anchors: Tensor[B A, 4]``, ``matched_boxes:
        Tensor[B, A, 4]`` and the detached decoded ``pred_boxes: Tensor[B A, 4]`` go to the loss's
        :class:`~detbalance.losses.AnchorBatch` (QFL / VFL build their targets from them); ``reweight`` maps the
        per-anchor loss ``Tensor[B, A]`` to a reweighted one before normalisation (PISA's ISR-P)."""
        b, a, c = cls_logits.shape
        valid = labels >= 0
        # Classification: the K class columns (torchvision's column 0 only with background_column). The loss
        # builds its targets from the per-anchor batch (one-hot labels; QFL/VFL: IoU of the detached decoded box).
        batch = AnchorBatch(
            logits=cls_logits[..., 1:].reshape(b * a, c - 1),
            labels=labels.reshape(-1),
            anchors=anchors,
            matched_boxes=matched_boxes.reshape(b * a, 4),
            pred_boxes=pred_boxes,
        )
        cls_targets = self.cls_loss.dense_targets(batch).reshape(b, a, c - 1)
        logits = cls_logits if self.background_column else cls_logits[..., 1:]
        if self.background_column:
            cls_targets = torch.cat([torch.zeros_like(cls_targets[..., :1]), cls_targets], dim=-1)
        k = logits.shape[-1]
        per_anchor_cls = None
        if self.cls_loss.self_normalizing:
            cls_value = self._self_normalized(self.cls_loss, logits, cls_targets, valid)
        else:
            flat = logits.reshape(b * a, k)
            elementwise = self.cls_loss(flat, cls_targets.reshape(b * a, k))
            if elementwise.shape != flat.shape:
                raise ValueError(
                    f"cls_loss returned shape {tuple(elementwise.shape)}, expected per-element "
                    f"{tuple(flat.shape)} (reduction='none')"
                )
            per_anchor_cls = torch.where(valid.reshape(-1), elementwise.sum(-1), 0.0).reshape(b, a)
            if reweight is not None:
                per_anchor_cls = reweight(per_anchor_cls)
            cls_value = normalize(self.normalizer, per_anchor_cls.sum(1), num_positives)

        return cls_value, per_anchor_cls

    def _record(self, labels: Tensor, per_anchor_cls: Tensor | None, per_anchor_box: Tensor | None) -> None:
        rec = self.recorder
        if rec is None:
            return
        with torch.no_grad():
            b, a = labels.shape
            level = self.level_index(a, labels.device)
            num_levels = len(self.anchors_per_level)

            def per_level(mask: Tensor) -> Tensor:
                out = torch.zeros(num_levels, dtype=torch.int64, device=labels.device)
                return out.index_add_(0, level, mask.sum(0).to(torch.int64))

            p = self.record_prefix
            rec.record_counts(f"{p}/anchors", per_level(labels > 0), per_level(labels == 0), per_level(labels < 0))
            if per_anchor_cls is not None:
                k = self.num_classes - 1  # type: ignore[attr-defined]  # the host head's column count
                rec.record_class_losses(f"{p}/cls", labels.reshape(-1), per_anchor_cls.reshape(-1), k)
                rec.record_losses(f"{p}/cls_positive", per_anchor_cls, mask=labels > 0)
                rec.record_losses(f"{p}/cls_negative", per_anchor_cls, mask=labels == 0)
            if per_anchor_box is not None:
                rec.record_losses(f"{p}/box", per_anchor_box, mask=labels > 0)
            box_loss = getattr(self, "box_loss", None)  # FCOS keeps torchvision's box loss
            for name, loss in ((f"{p}/cls", self.cls_loss), (f"{p}/box", box_loss)):
                if loss is not None and loss.last_density is not None:
                    rec.record_ghm_density(name, loss.last_density)


# -------------------------------------------------------------------------------------------- head
class BalancedRetinaNetHead(DenseSigmoidLoss, RetinaNetHead):
    """torchvision's ``RetinaNetHead`` with injected losses; forward and modules are the original's.

    Build it with :meth:`from_head` (or :func:`balance_retinanet`). ``compute_loss`` returns
    ``{"classification": w_cls * L_cls, "bbox_regression": w_box * L_box}`` (torchvision's keys).

    Args:
        classification_head: torchvision ``RetinaNetClassificationHead`` (used as is).
        regression_head: torchvision ``RetinaNetRegressionHead`` (its ``box_coder`` codes the targets).
        cls_loss: A ``"sigmoid"`` :class:`~detbalance.losses.DetectionLoss`.
        box_loss: A ``"box"`` :class:`~detbalance.losses.DetectionLoss`.
        normalizer: ``"per_image"``, ``"per_batch"`` or a ``PositiveNormalizer``-like callable
            ``(per_image_loss[B], num_positives[B]) -> scalar``. A module is deep-copied for the box
            term, so both terms update its state (e.g. detectron2's EMA) once per step, identically.
        recorder: Optional :class:`BalanceRecorder`.
        cls_loss_weight: Factor on the classification loss.
        box_loss_weight: Factor on the box loss.
        background_column: Put torchvision's column 0 into the classification loss (torchvision does).
        assigner: Optional anchor assigner (e.g. :class:`~detbalance.sampling.ATSSAssigner`) replacing
            torchvision's IoU matching; ``None`` keeps it.
        pisa: PISA's ISR-P (weights on the positives' classification loss) and CARL (an extra
            ``"carl"`` term); needs per-element (not self-normalising) losses. ``None`` off.
    """

    def __init__(
        self,
        classification_head: nn.Module,
        regression_head: nn.Module,
        *,
        cls_loss: DetectionLoss,
        box_loss: DetectionLoss,
        normalizer: Normalizer = "per_image",
        recorder: BalanceRecorder | None = None,
        cls_loss_weight: float = 1.0,
        box_loss_weight: float = 1.0,
        background_column: bool = False,
        assigner: Assigner | None = None,
        pisa: PrimeSampleAttention | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if assigner is not None and not callable(assigner):
            raise ValueError(f"assigner must be a callable (anchors, gt_boxes, anchors_per_level) or None, got {assigner!r}")
        if pisa is not None and not isinstance(pisa, PrimeSampleAttention):
            raise ValueError(f"pisa must be a PrimeSampleAttention or None, got {pisa!r}")
        self.cls_loss = loss_for_slot(cls_loss, slot="cls_loss", kind="sigmoid")
        self.box_loss = loss_for_slot(box_loss, slot="box_loss", kind="box")
        check_normalizer(normalizer)
        self.cls_loss_weight = check_weight("cls_loss_weight", cls_loss_weight)
        self.box_loss_weight = check_weight("box_loss_weight", box_loss_weight)
        if recorder is not None and not isinstance(recorder, BalanceRecorder):
            raise ValueError(f"recorder must be a BalanceRecorder or None, got {type(recorder).__name__}")
        self.classification_head = classification_head
        self.regression_head = regression_head
        self.normalizer = normalizer
        self.box_normalizer = copy.deepcopy(normalizer)
        self.recorder = recorder
        self.background_column = bool(background_column)
        self.anchors_per_level: list[int] = []
        self.assigner = assigner
        self.pisa = pisa
        if pisa is not None and (self.cls_loss.self_normalizing or self.box_loss.self_normalizing):
            raise ValueError(
                "pisa needs per-element cls_loss and box_loss (ISR-P weights each positive's classification "
                "loss, CARL each positive's box loss); a self-normalising loss (GHM) cannot take them"
            )

    @classmethod
    def from_head(
        cls,
        head: RetinaNetHead,
        *,
        cls_loss: DetectionLoss,
        box_loss: DetectionLoss,
        normalizer: Normalizer = "per_image",
        recorder: BalanceRecorder | None = None,
        cls_loss_weight: float = 1.0,
        box_loss_weight: float = 1.0,
        prior_prob: float | None = None,
        background_column: bool = False,
        assigner: Assigner | None = None,
        pisa: PrimeSampleAttention | None = None,
    ) -> BalancedRetinaNetHead:
        """Wrap the branches of an existing head (shared, not copied); see :func:`balance_retinanet`."""
        if not isinstance(head, RetinaNetHead):
            raise ValueError(f"head must be a torchvision RetinaNetHead, got {type(head).__name__}")
        if prior_prob is not None and not (0.0 < prior_prob < 1.0):
            raise ValueError(f"prior_prob must lie in (0, 1) or be None, got {prior_prob!r}")
        new = cls(
            head.classification_head,
            head.regression_head,
            cls_loss=cls_loss,
            box_loss=box_loss,
            normalizer=normalizer,
            recorder=recorder,
            cls_loss_weight=cls_loss_weight,
            box_loss_weight=box_loss_weight,
            background_column=background_column,
            assigner=assigner,
            pisa=pisa,
        )
        if prior_prob is not None:
            with torch.no_grad():
                new.classification_head.cls_logits.bias.fill_(-math.log((1.0 - prior_prob) / prior_prob))
        return new

    @property
    def num_classes(self) -> int:
        """Columns ``C`` of the classifier (torchvision's count, including the unused column 0)."""
        return int(self.classification_head.num_classes)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        """torchvision's forward; also remembers the number of anchors per level (per-level losses, recorder)."""
        a = self.classification_head.num_anchors
        self.anchors_per_level = [int(f.shape[-2] * f.shape[-1] * a) for f in x]
        return super().forward(x)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """Losses of the batch from torchvision's matching; shapes ``[B, A, C]`` and ``[B, A, 4]``."""
        cls_logits = head_outputs["cls_logits"]
        bbox_regression = head_outputs["bbox_regression"]
        b, a, c = cls_logits.shape
        device = cls_logits.device
        if self.assigner is not None:
            level_slices(self.anchors_per_level, a)
            matched_idxs = [self.assigner(anchors_i, t["boxes"].to(anchors_i), self.anchors_per_level)
                            for anchors_i, t in zip(anchors, targets)]
        labels, matched_boxes = match_targets(targets, matched_idxs, device)
        positive = labels > 0
        num_positives = positive.sum(1)

        anchors_flat = torch.stack(list(anchors)).reshape(b * a, 4)
        with torch.no_grad():
            pred_boxes = self.regression_head.box_coder.decode_single(
                bbox_regression.detach().reshape(b * a, 4), anchors_flat
            )
        reweight = None
        if self.pisa is not None and self.pisa.isr_k is not None:
            pisa = self.pisa

            def reweight(per_anchor: Tensor) -> Tensor:  # ISR-P: each positive's loss by its importance rank
                return per_anchor * self._isr_p(targets, matched_idxs, per_anchor, labels, matched_boxes,
                                                bbox_regression, anchors, k=pisa.isr_k, bias=pisa.isr_bias)

        cls_value, per_anchor_cls = self.classification_loss(
            cls_logits, labels, num_positives, anchors=anchors_flat, matched_boxes=matched_boxes,
            pred_boxes=pred_boxes, reweight=reweight,
        )

        # Regression: positives only, torchvision's box coding.
        pred, target = box_loss_inputs(
            bbox_regression, anchors, matched_boxes, self.regression_head.box_coder,
            decoded=self.box_loss.decoded_boxes,
        )
        per_anchor_box = None
        if self.box_loss.self_normalizing:
            box_value = self._self_normalized(self.box_loss, pred.reshape(b, a, 4), target.reshape(b, a, 4), positive)
        else:
            per_anchor_box = positive_box_loss(self.box_loss(pred, target), positive)
            box_value = normalize(self.box_normalizer, per_anchor_box.sum(1), num_positives)

        if self.recorder is not None:
            self._record(labels, per_anchor_cls, per_anchor_box)
        out = {
            "classification": self.cls_loss_weight * cls_value,
            "bbox_regression": self.box_loss_weight * box_value,
        }
        if self.pisa is not None and self.pisa.carl_k is not None and per_anchor_box is not None:
            flat_pos = positive.reshape(-1)
            p = cls_logits.reshape(b * a, c).float().sigmoid()[flat_pos, labels.reshape(-1)[flat_pos]]
            out["carl"] = carl_loss(p, per_anchor_box.reshape(-1)[flat_pos].float(), k=self.pisa.carl_k,
                                    bias=self.pisa.carl_bias, avg_factor=num_positives.sum().clamp(min=1))
        return out

    def _isr_p(
        self, targets: list[dict[str, Tensor]], matched_idxs: list[Tensor], per_anchor_cls: Tensor, labels: Tensor,
        matched_boxes: Tensor, bbox_regression: Tensor, anchors: list[Tensor], *, k: float, bias: float,
    ) -> Tensor:
        """ISR-P weights ``Tensor[B, A]`` (1 off the positives), as mmdetection's ``PISARetinaHead``."""
        with torch.no_grad():
            b, a = labels.shape
            counts = torch.tensor([int(t["boxes"].shape[0]) for t in targets], device=labels.device)
            offsets = torch.cumsum(counts, 0) - counts
            gt_index = (torch.stack(list(matched_idxs)).to(labels.device) + offsets[:, None]).reshape(-1)
            flat_pos = (labels > 0).reshape(-1)
            pos = torch.nonzero(flat_pos).flatten()
            anchors_flat = torch.stack(list(anchors)).reshape(b * a, 4)[pos]
            pred = self.regression_head.box_coder.decode_single(
                bbox_regression.detach().reshape(b * a, 4)[pos].to(anchors_flat.dtype), anchors_flat)
            ious = aligned_box_iou(pred, matched_boxes.reshape(b * a, 4)[pos].to(pred.dtype))
            w = isr_p_weights(ious, labels.reshape(-1)[pos], gt_index[pos], per_anchor_cls.reshape(-1)[pos],
                              k=k, bias=bias)
            return torch.ones(b * a, dtype=per_anchor_cls.dtype, device=labels.device).index_copy(
                0, pos, w.to(per_anchor_cls.dtype)).reshape(b, a)


def torchvision_box_loss(model: RetinaNet) -> DetectionLoss:
    """The box loss torchvision's ``model`` trains with, as a library loss (per element, ``reduction="none"``).

    ``regression_head._loss_type``: ``"l1"`` (``retinanet_resnet50_fpn``) -> ``L1Loss()``; ``"smooth_l1"`` ->
    ``SmoothL1Loss(beta=1.0)`` (torchvision's ``_box_loss`` default beta); ``"giou"``
    (``retinanet_resnet50_fpn_v2``) -> ``GIoULoss()`` (eps 1e-7, torchvision's).

    Raises:
        ValueError: for a loss type without a library equivalent (``"ciou"``, ``"diou"``).
    """
    if not isinstance(model, RetinaNet):
        raise ValueError(f"model must be a torchvision RetinaNet, got {type(model).__name__}")
    match getattr(model.head.regression_head, "_loss_type", "l1"):
        case "l1":
            return L1Loss()
        case "smooth_l1":
            return SmoothL1Loss(beta=1.0)
        case "giou":
            return GIoULoss()
        case other:
            raise ValueError(f"the model's box loss {other!r} has no library equivalent; pass box_loss explicitly")


def balance_retinanet(
    model: RetinaNet,
    *,
    cls_loss: DetectionLoss,
    box_loss: DetectionLoss | None = None,
    normalizer: Normalizer = "per_image",
    recorder: BalanceRecorder | None = None,
    cls_loss_weight: float = 1.0,
    box_loss_weight: float | None = None,
    prior_prob: float | None = None,
    background_column: bool = False,
    assigner: Assigner | None = None,
    pisa: PrimeSampleAttention | None = None,
) -> RetinaNet:
    """Put imbalance-aware losses into a torchvision ``RetinaNet`` (in place; returns ``model``).

    ``model.head`` becomes a :class:`BalancedRetinaNetHead` sharing the original branches, and a
    forward pre-hook validates the training targets (:func:`check_detection_targets`).

    ``balance_retinanet(model, cls_loss=GHMCLoss(), box_loss=GHMRLoss())`` is the GHM authors' setting
    (mmdetection ``retinanet_ghm``): both losses called once per FPN level, level losses summed, weights 1 and
    10 (add gradient clipping at norm 35 in the optimiser, as that config does).

    Args:
        model: A torchvision ``RetinaNet`` (e.g. from :func:`~detbalance.detectors.build.build_detector`).
        cls_loss: A ``"sigmoid"`` :class:`~detbalance.losses.DetectionLoss`: ``SigmoidFocalLoss`` (focal:
            gamma 2, alpha 0.25; alpha-CE: gamma 0, alpha 0.75), ``GHMCLoss``, ``QualityFocalLoss`` (GFL),
            ``VarifocalLoss`` (VarifocalNet), a ``ClassWeightedLoss``, or
            ``declare_loss(fn, kind="sigmoid")`` for your own callable.
        box_loss: A ``"box"`` loss (``L1Loss``, ``SmoothL1Loss``, ``ASL1Loss``, ``GIoULoss``, ``GHMRLoss``);
            ``None`` keeps the model's own (:func:`torchvision_box_loss`: ``L1Loss()`` for
            ``retinanet_resnet50_fpn``, ``GIoULoss()`` for ``retinanet_resnet50_fpn_v2``).
        normalizer: ``"per_image"`` (torchvision, default), ``"per_batch"`` (focal-loss paper) or a
            ``PositiveNormalizer``.
        recorder: Optional sink for per-level positive/negative/ignored anchor counts, per-class
            classification loss sums, loss histograms and the GHM densities.
        cls_loss_weight: Factor on the classification loss.
        box_loss_weight: Factor on the box loss; ``None`` is the loss's declared ``reference_weight``: 10 for
            ``GHMRLoss`` (the GHM paper and mmdetection's config), 1 otherwise (a
            :class:`~detbalance.losses.ScaledLoss` carries its own weight and declares 1).
        prior_prob: Set the classifier bias to ``-log((1 - pi) / pi)`` (Lin et al. 2017, sec. 3.3);
            ``None`` (default) keeps the current bias: torchvision already initialises a fresh classifier at
            ``pi = 0.01``, and a loaded (pretrained) classifier keeps its trained bias.
        background_column: Include torchvision's column 0 (never a class) in the classification loss, as
            torchvision does; by default it is left out, as in detectron2 and mmdetection.
        assigner: Which anchors are positive: ``None`` is torchvision's IoU matching (0.5 / 0.4);
            ``ATSSAssigner()`` is ATSS (Zhang et al., CVPR 2020; mmdetection's ``atss`` config, topk 9).
            Any callable ``(anchors[A, 4], gt_boxes[G, 4], anchors_per_level) -> Tensor[A]`` returning the
            matched index in torchvision's ``Matcher`` convention works.
        pisa: :class:`~detbalance.losses.PrimeSampleAttention` (ISR-P + CARL, mmdetection's
            ``retinanet-r50_fpn_pisa`` recipe), or ``None``.

    Raises:
        ValueError: for a model that is not a RetinaNet, a loss whose declared kind does not fit its slot
            (naming the slot), an unknown normaliser, or bad weights.
    """
    if not isinstance(model, RetinaNet):
        raise ValueError(f"model must be a torchvision RetinaNet, got {type(model).__name__}")
    box_loss = torchvision_box_loss(model) if box_loss is None else box_loss
    if box_loss_weight is None:
        box_loss_weight = box_loss.reference_weight if isinstance(box_loss, DetectionLoss) else 1.0
    model.head = BalancedRetinaNetHead.from_head(
        model.head,
        cls_loss=cls_loss,
        box_loss=box_loss,
        normalizer=normalizer,
        recorder=recorder,
        cls_loss_weight=cls_loss_weight,
        box_loss_weight=box_loss_weight,
        prior_prob=prior_prob,
        background_column=background_column,
        assigner=assigner,
        pisa=pisa,
    )
    install_target_check(model, model.head.num_classes)
    return model


# -------------------------------------------------------------------------------- anchor outputs
class AnchorOutputs(NamedTuple):
    """Per-anchor predictions and training targets of a RetinaNet batch (after the transform).

    ``cls_logits: Tensor[B, A, C]``; ``bbox_regression: Tensor[B, A, 4]`` (encoded deltas);
    ``labels: Tensor[B, A]`` int64 (``-1`` ignore, ``0`` background, ``1..K``); ``anchors: Tensor[B, A, 4]``
    (pixels of the transformed image); ``level: Tensor[A]`` int64 pyramid level of each anchor;
    ``target_regression: Tensor[B, A, 4]`` the encoded matched box for positives, 0 elsewhere.
    """

    cls_logits: Tensor
    bbox_regression: Tensor
    labels: Tensor
    anchors: Tensor
    level: Tensor
    target_regression: Tensor


def anchor_outputs(model: RetinaNet, images: list[Tensor], targets: list[dict[str, Tensor]]) -> AnchorOutputs:
    """Run a (plain or adapted) RetinaNet up to its loss and return every anchor's outputs and targets.

    The transform, backbone, head, anchors and the IoU matching are the model's own, exactly as in its
    training forward, so the labels are those its loss sees. Runs in the model's current mode
    (BatchNorm in training mode updates its statistics); wrap in ``torch.no_grad()`` for diagnostics.

    Args:
        model: A torchvision ``RetinaNet``.
        images: ``B`` tensors ``[3, H, W]`` in ``[0, 1]``.
        targets: ``B`` dicts with ``boxes: Tensor[G, 4]`` and ``labels: Tensor[G]``.
    """
    if not isinstance(model, RetinaNet):
        raise ValueError(f"model must be a torchvision RetinaNet, got {type(model).__name__}")
    check_detection_targets(images, targets, num_classes=int(model.head.classification_head.num_classes))
    image_list, targets_t = model.transform(list(images), [dict(t) for t in targets])
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    num_anchors_per_level = [int(f.shape[-2] * f.shape[-1]) * model.anchor_generator.num_anchors_per_location()[0]
                             for f in features]
    matched = []
    assigner = getattr(model.head, "assigner", None)
    for anchors_per_image, targets_per_image in zip(anchors, targets_t):
        if assigner is not None:
            matched.append(assigner(anchors_per_image, targets_per_image["boxes"].to(anchors_per_image),
                                    num_anchors_per_level))
            continue
        if targets_per_image["boxes"].numel() == 0:
            matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=anchors_per_image.device))
            continue
        quality = box_ops.box_iou(targets_per_image["boxes"], anchors_per_image)
        matched.append(model.proposal_matcher(quality))
    device = head_outputs["cls_logits"].device
    labels, matched_boxes = match_targets(targets_t, matched, device)
    anchors_t = torch.stack(anchors)
    b, a = labels.shape
    coder = model.head.regression_head.box_coder
    encoded = coder.encode_single(matched_boxes.reshape(b * a, 4), anchors_t.reshape(b * a, 4)).reshape(b, a, 4)
    target_regression = torch.where((labels > 0)[..., None], encoded, torch.zeros_like(encoded))
    level = torch.repeat_interleave(
        torch.arange(len(num_anchors_per_level), device=device), torch.tensor(num_anchors_per_level, device=device)
    )
    return AnchorOutputs(
        cls_logits=head_outputs["cls_logits"],
        bbox_regression=head_outputs["bbox_regression"],
        labels=labels,
        anchors=anchors_t,
        level=level,
        target_regression=target_regression,
    )
