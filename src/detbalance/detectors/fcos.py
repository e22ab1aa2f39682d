"""FCOS with an injected classification loss (focal, alpha-CE, GHM-C, class weights); box and centerness stock.

FCOS (Tian et al., ICCV 2019) classifies every location with a sigmoid focal loss, as RetinaNet does, so
its classification takes the same dense-loss remedies, through the same pattern: :func:`balance_fcos` swaps
``model.head`` for a :class:`BalancedFCOSHead`, a subclass of torchvision's ``FCOSHead`` sharing its
classification and regression branches and box coder, and replaces only the classification term of
``compute_loss``. Matching (centre sampling, scale ranges), the GIoU box loss and the centerness BCE are
torchvision's own: the head calls torchvision's ``FCOSHead.compute_loss`` for them.

Classification, for ``B`` images with ``A`` locations each (all levels concatenated) and labels from
torchvision's matching (``0`` background, ``1..K``; FCOS ignores nothing): one-vs-all targets over the
``K`` class columns (column 0 only with ``background_column=True``, as torchvision), summed per image and
divided by the positives through ``normalizer`` (``"per_batch"``: ``sum_b L_b / max(1, sum_b P_b)``,
torchvision's FCOS); a self-normalising loss (GHM-C) returns its own normalised value, per level by default.

With ``SigmoidFocalLoss(alpha=0.25, gamma=2)``, ``normalizer="per_batch"`` and ``background_column=True`` the
adapted model's loss dict equals torchvision's (a test).

``assigner`` replaces torchvision's matching (centre sampling and scale ranges) for every term, as ATSS does
for FCOS (Zhang et al., CVPR 2020, "FCOS + ATSS"): :class:`~detbalance.sampling.ATSSAssigner` sees one square
anchor of ``atss_anchor_scale`` (8) times the stride per location, the paper's 8S anchor and mmdetection's ATSS
anchors (``octave_base_scale=8``); torchvision's FCOS anchors are one stride wide, so they are scaled about
their centres for the assignment only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead

from detbalance.detectors._dense import (
    Normalizer,
    check_normalizer,
    check_weight,
    loss_for_slot,
    match_targets,
)
from detbalance.detectors._targets import install_target_check
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.detectors.retinanet import Assigner, DenseSigmoidLoss
from detbalance.losses import DetectionLoss

__all__ = ["BalancedFCOSHead", "balance_fcos"]


class BalancedFCOSHead(DenseSigmoidLoss, FCOSHead):
    """torchvision's ``FCOSHead`` with an injected classification loss; forward and modules are the original's.

    Build it with :meth:`from_head` (or :func:`balance_fcos`). ``compute_loss`` returns torchvision's keys
    ``{"classification": w_cls * L_cls, "bbox_regression", "bbox_ctrness"}``, the last two torchvision's.
    """

    record_prefix = "fcos"

    def __init__(
        self,
        head: FCOSHead,
        *,
        cls_loss: DetectionLoss,
        normalizer: Normalizer = "per_batch",
        recorder: BalanceRecorder | None = None,
        cls_loss_weight: float = 1.0,
        background_column: bool = False,
        assigner: Assigner | None = None,
        atss_anchor_scale: float = 8.0,
    ) -> None:
        nn.Module.__init__(self)
        if assigner is not None and not callable(assigner):
            raise ValueError(f"assigner must be a callable (anchors, gt_boxes, anchors_per_level) or None, got {assigner!r}")
        if isinstance(atss_anchor_scale, bool) or not isinstance(atss_anchor_scale, int | float) \
                or not 0 < atss_anchor_scale < float("inf"):
            raise ValueError(f"atss_anchor_scale must be a finite number > 0, got {atss_anchor_scale!r}")
        if not isinstance(head, FCOSHead):
            raise ValueError(f"head must be a torchvision FCOSHead, got {type(head).__name__}")
        self.cls_loss = loss_for_slot(cls_loss, slot="cls_loss", kind="sigmoid")
        check_normalizer(normalizer)
        self.cls_loss_weight = check_weight("cls_loss_weight", cls_loss_weight)
        if recorder is not None and not isinstance(recorder, BalanceRecorder):
            raise ValueError(f"recorder must be a BalanceRecorder or None, got {type(recorder).__name__}")
        self.box_coder = head.box_coder
        self.classification_head = head.classification_head
        self.regression_head = head.regression_head
        self.normalizer = normalizer
        self.recorder = recorder
        self.background_column = bool(background_column)
        self.anchors_per_level = []
        self.assigner = assigner
        self.atss_anchor_scale = float(atss_anchor_scale)

    @classmethod
    def from_head(
        cls,
        head: FCOSHead,
        *,
        cls_loss: DetectionLoss,
        normalizer: Normalizer = "per_batch",
        recorder: BalanceRecorder | None = None,
        cls_loss_weight: float = 1.0,
        background_column: bool = False,
        assigner: Assigner | None = None,
        atss_anchor_scale: float = 8.0,
    ) -> BalancedFCOSHead:
        """Wrap the branches of an existing head (shared, not copied); see :func:`balance_fcos`."""
        return cls(head, cls_loss=cls_loss, normalizer=normalizer, recorder=recorder,
                   cls_loss_weight=cls_loss_weight, background_column=background_column, assigner=assigner,
                   atss_anchor_scale=atss_anchor_scale)

    @property
    def num_classes(self) -> int:
        """Columns ``C`` of the classifier (torchvision's count, including the unused column 0)."""
        return int(self.classification_head.num_classes)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        """torchvision's forward; also remembers the number of locations per level (per-level losses, recorder)."""
        a = self.classification_head.num_anchors
        self.anchors_per_level = [int(f.shape[-2] * f.shape[-1] * a) for f in x]
        return super().forward(x)

    def assignment_anchors(self, anchors: Tensor) -> Tensor:
        """``anchors`` ``[A, 4]`` scaled by ``atss_anchor_scale`` about their centres (what the assigner sees)."""
        ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
        half = (anchors[:, 2:] - anchors[:, :2]) * (self.atss_anchor_scale / 2)
        return torch.cat([ctr - half, ctr + half], dim=1)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """The injected classification loss, torchvision's GIoU box and centerness losses."""
        if self.assigner is not None:  # e.g. ATSS, on 8S anchors per location; every term uses its matches
            matched_idxs = [
                self.assigner(self.assignment_anchors(anchors_i), t["boxes"].to(anchors_i), self.anchors_per_level)
                for anchors_i, t in zip(anchors, targets)
            ]
        stock = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        cls_logits = head_outputs["cls_logits"]
        b, a, _ = cls_logits.shape
        labels, matched_boxes = match_targets(targets, matched_idxs, cls_logits.device)
        anchors_stacked = torch.stack(list(anchors))
        with torch.no_grad():
            pred_boxes = self.box_coder.decode(head_outputs["bbox_regression"].detach(), anchors_stacked)
        cls_value, per_anchor_cls = self.classification_loss(
            cls_logits, labels, (labels > 0).sum(1), anchors=anchors_stacked.reshape(b * a, 4),
            matched_boxes=matched_boxes, pred_boxes=pred_boxes.reshape(b * a, 4),
        )
        if self.recorder is not None:
            self._record(labels, per_anchor_cls, None)
        return {
            "classification": self.cls_loss_weight * cls_value,
            "bbox_regression": stock["bbox_regression"],
            "bbox_ctrness": stock["bbox_ctrness"],
        }


def balance_fcos(
    model: FCOS,
    *,
    cls_loss: DetectionLoss,
    normalizer: Normalizer = "per_batch",
    recorder: BalanceRecorder | None = None,
    cls_loss_weight: float = 1.0,
    background_column: bool = False,
    assigner: Assigner | None = None,
    atss_anchor_scale: float = 8.0,
) -> FCOS:
    """Put an imbalance-aware classification loss into a torchvision ``FCOS`` (in place; returns ``model``).

    ``model.head`` becomes a :class:`BalancedFCOSHead` sharing the original branches, and a forward pre-hook
    validates the training targets. The classifier's bias is left as it is (torchvision initialises a fresh
    one at the focal prior 0.01; a loaded one keeps its trained bias).

    Args:
        model: A torchvision ``FCOS`` (``fcos_resnet50_fpn``).
        cls_loss: A ``"sigmoid"`` :class:`~detbalance.losses.DetectionLoss`: ``SigmoidFocalLoss`` (torchvision:
            alpha 0.25, gamma 2), alpha-CE (gamma 0), ``GHMCLoss``, a ``ClassWeightedLoss``, ...
        normalizer: ``"per_batch"`` (torchvision's FCOS, default), ``"per_image"`` or a ``PositiveNormalizer``.
        recorder: Optional sink for per-level positive/negative counts, per-class losses and GHM densities.
        cls_loss_weight: Factor on the classification loss.
        background_column: Include torchvision's column 0 (never a class) in the loss, as torchvision does.
        assigner: ``None`` keeps torchvision's matching (centre sampling, scale ranges); ``ATSSAssigner()`` is
            ATSS for FCOS (Zhang et al. 2020), for the classification, box and centerness terms alike.
        atss_anchor_scale: Side of the anchor the assigner sees, in strides (the ATSS paper: 8).

    Raises:
        ValueError: for a model that is not an FCOS, a loss that is not a sigmoid loss, a bad normaliser.
    """
    if not isinstance(model, FCOS):
        raise ValueError(f"model must be a torchvision FCOS, got {type(model).__name__}")
    model.head = BalancedFCOSHead.from_head(
        model.head, cls_loss=cls_loss, normalizer=normalizer, recorder=recorder, cls_loss_weight=cls_loss_weight,
        background_column=background_column, assigner=assigner, atss_anchor_scale=atss_anchor_scale,
    )
    install_target_check(model, model.head.num_classes)
    return model

