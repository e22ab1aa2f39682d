"""RetinaNet with injected classification and box losses (focal, alpha-CE, GHM-C; smooth L1, ASL1, GHM-R).

:func:`balance_retinanet` swaps ``model.head`` of a torchvision ``RetinaNet`` for a
:class:`BalancedRetinaNetHead`, a subclass of torchvision's ``RetinaNetHead`` that reuses the model's
classification and regression branches (same modules, same weights) and replaces only
``compute_loss``. Everything else (transform, backbone, anchors, IoU matching with torchvision's
``Matcher`` at 0.5/0.4, box coding, post-processing) stays torchvision's.

The loss of a batch, for ``B`` images with ``A`` anchors each (all FPN levels concatenated):

* classification: the one-vs-all targets ``Tensor[B A, C]`` put a 1 in column ``label`` of every
  positive anchor, as torchvision does: ``C`` is the model's ``num_classes`` (``K + 1`` when built by
  :func:`~detbalance.detectors.build.build_detector`), labels ``1..K`` are the column indices and
  column 0 is never a positive. Anchors between the IoU thresholds (label ``-1``) are left out.
  All anchors of all images and levels go to ``cls_loss`` in **one call**, so GHM-C builds one
  gradient-density histogram per step (Li et al., AAAI 2019, sec. 3);
* regression: positives only, targets encoded with the head's ``box_coder`` exactly as torchvision
  (``BoxCoder(1, 1, 1, 1)``); a loss on boxes (GIoU) gets the decoded predictions instead, as
  torchvision's ``bbox_reg_loss_type="giou"``;
* normalisation (Lin et al., ICCV 2017, sec. 3.3 and 4): a loss with ``self_normalizing = False``
  returns per-element values; they are summed per image and divided by the positive count through
  ``normalizer`` (``"per_batch"``: ``sum_b L_b / max(1, sum_b P_b)``, the paper; ``"per_image"``:
  ``mean_b L_b / max(1, P_b)``, torchvision; or a
  :class:`~detbalance.losses.PositiveNormalizer`). A self-normalising loss (GHM-C, GHM-R) returns the
  paper's normalised scalar and is used as is.

With ``SigmoidFocalLoss(alpha=0.25, gamma=2)``, ``L1Loss()`` and ``normalizer="per_image"`` the adapted
model's loss dict equals torchvision's (a test), as it does for ``SmoothL1Loss(beta=1.0)`` against
``_loss_type = "smooth_l1"`` and ``GIoULoss()`` against ``"giou"``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops

from detbalance.detectors._targets import check_detection_targets, install_target_check
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.losses import (
    ASL1Loss,
    GHMCLoss,
    GHMRLoss,
    GIoULoss,
    L1Loss,
    SigmoidFocalLoss,
    SmoothL1Loss,
    SoftmaxFocalLoss,
    asl1_loss,
    ghm_c_loss,
    ghm_r_loss,
    normalize_by_positives,
    sigmoid_focal_loss,
    smooth_l1_loss,
    softmax_focal_loss,
)
from detbalance.types import BACKGROUND, IGNORE

__all__ = [
    "AnchorOutputs",
    "BalancedRetinaNetHead",
    "anchor_outputs",
    "balance_retinanet",
]

Normalizer = str | Callable[[Tensor, Tensor], Tensor]

# Losses that cannot be a sigmoid one-vs-all classification loss or a box loss, by type and function.
_SOFTMAX_TYPES: tuple[type, ...] = (SoftmaxFocalLoss, nn.CrossEntropyLoss, nn.NLLLoss)
_SOFTMAX_FNS: tuple[Callable[..., Any], ...] = (softmax_focal_loss, F.cross_entropy, F.nll_loss)
_SIGMOID_TYPES: tuple[type, ...] = (SigmoidFocalLoss, GHMCLoss, nn.BCEWithLogitsLoss)
_SIGMOID_FNS: tuple[Callable[..., Any], ...] = (
    sigmoid_focal_loss,
    ghm_c_loss,
    torchvision.ops.sigmoid_focal_loss,
    F.binary_cross_entropy_with_logits,
)
_BOX_TYPES: tuple[type, ...] = (
    SmoothL1Loss, L1Loss, ASL1Loss, GIoULoss, GHMRLoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.MSELoss,
)
_BOX_FNS: tuple[Callable[..., Any], ...] = (
    smooth_l1_loss, asl1_loss, ghm_r_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.mse_loss,
    torchvision.ops.generalized_box_iou_loss, torchvision.ops.distance_box_iou_loss,
    torchvision.ops.complete_box_iou_loss,
)
# Losses defined on decoded (x1, y1, x2, y2) boxes rather than on encoded deltas.
_DECODED_TYPES: tuple[type, ...] = (GIoULoss,)
_DECODED_FNS: tuple[Callable[..., Any], ...] = (
    torchvision.ops.generalized_box_iou_loss,
    torchvision.ops.distance_box_iou_loss,
    torchvision.ops.complete_box_iou_loss,
)
# Functions that default to a reduced output: they need functools.partial(..., reduction="none").
_REDUCING_FNS: tuple[Callable[..., Any], ...] = (
    F.binary_cross_entropy_with_logits, F.cross_entropy, F.nll_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
    F.mse_loss,
)
_NORMALIZER_MODES = ("per_batch", "per_image")


def _unwrap(fn: Any) -> tuple[Any, dict[str, Any]]:
    keywords: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    return fn, keywords


def _loss_name(loss: Any) -> str:
    fn, _ = _unwrap(loss)
    return getattr(fn, "__qualname__", type(fn).__name__)


def _is_self_normalizing(loss: Any) -> bool:
    value = getattr(loss, "self_normalizing", False)
    if not isinstance(value, bool):
        raise ValueError(f"{_loss_name(loss)}.self_normalizing must be a bool, got {value!r}")
    return value


def check_loss(
    loss: Any,
    *,
    argument: str,
    wrong_types: tuple[type, ...],
    wrong_fns: tuple[Callable[..., Any], ...],
    wrong_kind: str,
) -> bool:
    """Reject a loss that cannot play the role of ``argument``; return its ``self_normalizing`` flag.

    A loss is any callable; known losses of the wrong kind (``wrong_types``/``wrong_fns``, e.g. a
    softmax loss for a sigmoid head), strings, reducing modules/functions without
    ``reduction="none"``, and the GHM *functions* (use the modules, which keep the EMA histogram) raise
    ``ValueError`` naming ``argument``.
    """
    if isinstance(loss, str) or not callable(loss):
        raise ValueError(f"{argument} must be a loss callable (e.g. a detbalance.losses module), got {loss!r}")
    fn, keywords = _unwrap(loss)
    if isinstance(fn, wrong_types) or any(fn is w for w in wrong_fns):
        raise ValueError(f"{argument}={_loss_name(loss)} is {wrong_kind}")
    if any(fn is g for g in (ghm_c_loss, ghm_r_loss)):
        raise ValueError(
            f"{argument}={_loss_name(loss)}: pass the module (GHMCLoss/GHMRLoss), which keeps the EMA "
            "gradient-density histogram and returns the paper-normalised loss"
        )
    self_normalizing = _is_self_normalizing(loss)
    if not self_normalizing:
        reduction = keywords.get("reduction", getattr(fn, "reduction", None))
        if reduction is None and any(fn is r for r in _REDUCING_FNS):
            reduction = "mean"
        if reduction is not None and reduction != "none":
            raise ValueError(
                f"{argument}={_loss_name(loss)} has reduction={reduction!r}; a loss that is not "
                "self-normalising must return per-element losses (reduction='none')"
            )
    return self_normalizing


def _takes_decoded_boxes(loss: Any) -> bool:
    fn, _ = _unwrap(loss)
    return isinstance(fn, _DECODED_TYPES) or any(fn is d for d in _DECODED_FNS) or bool(
        getattr(fn, "takes_decoded_boxes", False)
    )


def _check_normalizer(normalizer: Any) -> None:
    if isinstance(normalizer, str):
        if normalizer not in _NORMALIZER_MODES:
            raise ValueError(
                f"normalizer must be one of {_NORMALIZER_MODES} or a PositiveNormalizer, got {normalizer!r}"
            )
    elif not callable(normalizer):
        raise ValueError(f"normalizer must be a mode string or a PositiveNormalizer, got {normalizer!r}")


def _normalize(normalizer: Normalizer, per_image: Tensor, num_positives: Tensor) -> Tensor:
    if isinstance(normalizer, str):
        return normalize_by_positives(per_image, num_positives, mode=normalizer)
    return normalizer(per_image, num_positives)


def labels_from_matches(matched_idxs: Tensor, gt_labels: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Anchor labels (convention of :mod:`detbalance.types`) from torchvision's ``Matcher`` output.

    Args:
        matched_idxs: ``Tensor[B, A]``: ground-truth index per anchor, ``-1`` below the low threshold,
            ``-2`` between the thresholds.
        gt_labels: ``Tensor[G + 1]`` the labels of all images' boxes concatenated, plus one padding entry.
        offsets: ``Tensor[B]`` index of each image's first box in ``gt_labels``.

    Returns:
        ``labels: Tensor[B, A]`` (``-1``/``0``/``1..K``) and ``flat_idx: Tensor[B, A]``, the index of
        the matched box in the concatenation (the padding entry ``G`` where there is none).
    """
    fg = matched_idxs >= 0
    pad = gt_labels.shape[0] - 1
    flat_idx = torch.where(fg, matched_idxs + offsets[:, None], torch.full_like(matched_idxs, pad))
    labels = torch.where(
        fg,
        gt_labels[flat_idx],
        torch.where(matched_idxs == -2, torch.full_like(matched_idxs, IGNORE), torch.full_like(matched_idxs, BACKGROUND)),
    )
    return labels, flat_idx


def _flatten_targets(targets: Sequence[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """All boxes and labels of the batch with one padding box ``(0, 0, 1, 1)``, and per-image offsets."""
    counts = [int(t["boxes"].shape[0]) for t in targets]
    boxes = torch.cat([t["boxes"].to(device) for t in targets] + [torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device)])
    labels = torch.cat([t["labels"].to(device) for t in targets] + [torch.zeros(1, dtype=torch.int64, device=device)])
    offsets = torch.tensor([sum(counts[:i]) for i in range(len(counts))], dtype=torch.int64, device=device)
    return boxes, labels.to(torch.int64), offsets


def match_targets(
    targets: Sequence[dict[str, Tensor]], matched_idxs: Sequence[Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Anchor labels and matched boxes of a batch from torchvision's per-image ``Matcher`` output.

    Args:
        targets: ``B`` dicts with ``boxes: Tensor[G_b, 4]`` and ``labels: Tensor[G_b]`` (network coordinates).
        matched_idxs: ``B`` tensors ``[A]`` as :func:`labels_from_matches` takes them.
        device: Where the results go.

    Returns:
        ``labels: Tensor[B, A]`` (``-1``/``0``/``1..K``) and ``matched_boxes: Tensor[B, A, 4]``, the box of
        every positive anchor (a padding box ``(0, 0, 1, 1)`` elsewhere).
    """
    gt_boxes, gt_labels, offsets = _flatten_targets(targets, device)
    labels, flat_idx = labels_from_matches(torch.stack(list(matched_idxs)), gt_labels, offsets)
    return labels, gt_boxes[flat_idx]


def box_loss_inputs(
    bbox_regression: Tensor, anchors: Sequence[Tensor], matched_boxes: Tensor, box_coder: BoxCoder, *, decoded: bool
) -> tuple[Tensor, Tensor]:
    """``(pred, target)``, both ``Tensor[B A, 4]``, for a box loss, with the head's ``box_coder``.

    The predicted deltas and the matched boxes encoded against the anchors (torchvision), or, with
    ``decoded=True`` (a loss on boxes such as GIoU), the decoded predictions and the matched boxes.

    Args:
        bbox_regression: ``Tensor[B, A, 4]`` predicted deltas.
        anchors: ``B`` tensors ``[A, 4]``.
        matched_boxes: ``Tensor[B, A, 4]`` from :func:`match_targets`.
        box_coder: The head's ``BoxCoder``.
        decoded: Whether the loss takes boxes instead of deltas.
    """
    b, a = bbox_regression.shape[:2]
    anchors_flat = torch.stack(list(anchors)).reshape(b * a, 4)
    deltas = bbox_regression.reshape(b * a, 4)
    matched = matched_boxes.reshape(b * a, 4)
    if decoded:
        return box_coder.decode_single(deltas, anchors_flat), matched
    return deltas, box_coder.encode_single(matched, anchors_flat)


def positive_box_loss(elementwise: Tensor, positive: Tensor) -> Tensor:
    """Per-anchor box loss ``Tensor[B, A]``: summed over coordinates, zero off the positives.

    Args:
        elementwise: A box loss's ``reduction="none"`` output, ``[B A, 4]`` or ``[B A]``.
        positive: ``Tensor[B, A]`` bool.

    Raises:
        ValueError: if ``elementwise`` has another shape (a reducing loss).
    """
    b, a = positive.shape
    n = b * a
    if elementwise.dim() == 0 or elementwise.shape[0] != n or elementwise.numel() not in (n, n * 4):
        raise ValueError(
            f"box_loss returned shape {tuple(elementwise.shape)}, expected per-element [{n}, 4] "
            f"or [{n}] (reduction='none')"
        )
    return torch.where(positive.reshape(-1), elementwise.reshape(n, -1).sum(-1), 0.0).reshape(b, a)


# -------------------------------------------------------------------------------------------- head
class BalancedRetinaNetHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` with injected losses; forward and modules are the original's.

    Build it with :meth:`from_head` (or :func:`balance_retinanet`). ``compute_loss`` returns
    ``{"classification": w_cls * L_cls, "bbox_regression": w_box * L_box}`` (torchvision's keys).

    Args:
        classification_head: torchvision ``RetinaNetClassificationHead`` (used as is).
        regression_head: torchvision ``RetinaNetRegressionHead`` (its ``box_coder`` codes the targets).
        cls_loss: Sigmoid classification loss, see :func:`balance_retinanet`.
        box_loss: Box loss, see :func:`balance_retinanet`.
        normalizer: ``"per_batch"``, ``"per_image"`` or a ``PositiveNormalizer``-like callable
            ``(per_image_loss[B], num_positives[B]) -> scalar``. A module is deep-copied for the box
            term, so both terms update its state (e.g. detectron2's EMA) once per step, identically.
        recorder: Optional :class:`BalanceRecorder`.
        cls_loss_weight: Factor on the classification loss.
        box_loss_weight: Factor on the box loss.
    """

    def __init__(
        self,
        classification_head: nn.Module,
        regression_head: nn.Module,
        *,
        cls_loss: Callable[..., Tensor],
        box_loss: Callable[..., Tensor],
        normalizer: Normalizer = "per_batch",
        recorder: BalanceRecorder | None = None,
        cls_loss_weight: float = 1.0,
        box_loss_weight: float = 1.0,
    ) -> None:
        nn.Module.__init__(self)
        self.cls_self_normalizing = check_loss(
            cls_loss, argument="cls_loss", wrong_types=_SOFTMAX_TYPES + _BOX_TYPES,
            wrong_fns=_SOFTMAX_FNS + _BOX_FNS,
            wrong_kind="not a sigmoid (one-vs-all) classification loss, which RetinaNet's head needs",
        )
        self.box_self_normalizing = check_loss(
            box_loss, argument="box_loss", wrong_types=_SOFTMAX_TYPES + _SIGMOID_TYPES,
            wrong_fns=_SOFTMAX_FNS + _SIGMOID_FNS, wrong_kind="a classification loss, not a box loss",
        )
        _check_normalizer(normalizer)
        for name, value in (("cls_loss_weight", cls_loss_weight), ("box_loss_weight", box_loss_weight)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 0) or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if recorder is not None and not isinstance(recorder, BalanceRecorder):
            raise ValueError(f"recorder must be a BalanceRecorder or None, got {type(recorder).__name__}")
        self.classification_head = classification_head
        self.regression_head = regression_head
        self.cls_loss = cls_loss
        self.box_loss = box_loss
        self.box_decoded = _takes_decoded_boxes(box_loss)
        self.normalizer = normalizer
        self.box_normalizer = copy.deepcopy(normalizer)
        self.recorder = recorder
        self.cls_loss_weight = float(cls_loss_weight)
        self.box_loss_weight = float(box_loss_weight)
        self.anchors_per_level: list[int] = []

    @classmethod
    def from_head(
        cls,
        head: RetinaNetHead,
        *,
        cls_loss: Callable[..., Tensor],
        box_loss: Callable[..., Tensor],
        normalizer: Normalizer = "per_batch",
        recorder: BalanceRecorder | None = None,
        cls_loss_weight: float = 1.0,
        box_loss_weight: float = 1.0,
        prior_prob: float | None = 0.01,
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
        """torchvision's forward; also remembers the number of anchors per level for the recorder."""
        a = self.classification_head.num_anchors
        self.anchors_per_level = [int(f.shape[-2] * f.shape[-1] * a) for f in x]
        return super().forward(x)

    def level_index(self, num_anchors: int, device: torch.device) -> Tensor:
        """``Tensor[A]`` (int64): the pyramid level of every anchor of the last forward."""
        sizes = self.anchors_per_level
        if sum(sizes) != num_anchors:
            raise ValueError(
                f"the head's last forward had {sum(sizes)} anchors per image, the loss got {num_anchors}"
            )
        return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))

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
        labels, matched_boxes = match_targets(targets, matched_idxs, device)
        positive = labels > 0
        valid = labels >= 0
        num_positives = positive.sum(1)

        # Classification: all anchors of all images and levels in one call.
        columns = torch.arange(c, device=device)
        cls_targets = ((labels[..., None] == columns) & positive[..., None]).to(cls_logits.dtype).reshape(b * a, c)
        logits = cls_logits.reshape(b * a, c)
        per_anchor_cls = None
        if self.cls_self_normalizing:
            cls_value = self.cls_loss(logits, cls_targets, valid=valid.reshape(-1))
        else:
            elementwise = self.cls_loss(logits, cls_targets)
            if elementwise.shape != logits.shape:
                raise ValueError(
                    f"cls_loss returned shape {tuple(elementwise.shape)}, expected per-element "
                    f"{tuple(logits.shape)} (reduction='none')"
                )
            per_anchor_cls = torch.where(valid.reshape(-1), elementwise.sum(-1), 0.0).reshape(b, a)
            cls_value = _normalize(self.normalizer, per_anchor_cls.sum(1), num_positives)

        # Regression: positives only, torchvision's box coding.
        pred, target = box_loss_inputs(
            bbox_regression, anchors, matched_boxes, self.regression_head.box_coder, decoded=self.box_decoded
        )
        per_anchor_box = None
        if self.box_self_normalizing:
            box_value = self.box_loss(pred, target, valid=positive.reshape(-1))
        else:
            per_anchor_box = positive_box_loss(self.box_loss(pred, target), positive)
            box_value = _normalize(self.box_normalizer, per_anchor_box.sum(1), num_positives)

        if self.recorder is not None:
            self._record(labels, per_anchor_cls, per_anchor_box)
        return {
            "classification": self.cls_loss_weight * cls_value,
            "bbox_regression": self.box_loss_weight * box_value,
        }

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

            rec.record_counts("retinanet/anchors", per_level(labels > 0), per_level(labels == 0), per_level(labels < 0))
            if per_anchor_cls is not None:
                rec.record_class_losses("retinanet/cls", labels.reshape(-1), per_anchor_cls.reshape(-1), self.num_classes - 1)
                rec.record_losses("retinanet/cls_positive", per_anchor_cls, mask=labels > 0)
                rec.record_losses("retinanet/cls_negative", per_anchor_cls, mask=labels == 0)
            if per_anchor_box is not None:
                rec.record_losses("retinanet/box", per_anchor_box, mask=labels > 0)
            for name, loss in (("retinanet/cls", self.cls_loss), ("retinanet/box", self.box_loss)):
                density = getattr(loss, "last_density", None)
                if isinstance(density, Tensor):
                    rec.record_ghm_density(name, density)


def balance_retinanet(
    model: RetinaNet,
    *,
    cls_loss: Callable[..., Tensor],
    box_loss: Callable[..., Tensor],
    normalizer: Normalizer,
    recorder: BalanceRecorder | None = None,
    cls_loss_weight: float = 1.0,
    box_loss_weight: float = 1.0,
    prior_prob: float | None = 0.01,
) -> RetinaNet:
    """Put imbalance-aware losses into a torchvision ``RetinaNet`` (in place; returns ``model``).

    ``model.head`` becomes a :class:`BalancedRetinaNetHead` sharing the original branches, and a
    forward pre-hook validates the training targets (:func:`check_detection_targets`).

    Args:
        model: A torchvision ``RetinaNet`` (e.g. from :func:`~detbalance.detectors.build.build_detector`).
        cls_loss: Sigmoid one-vs-all loss over ``Tensor[N, C]`` logits and targets: a module with
            ``self_normalizing = False`` returning per-element losses (``SigmoidFocalLoss`` (focal:
            gamma 2, alpha 0.25; alpha-CE: gamma 0, alpha 0.75), ``nn.BCEWithLogitsLoss(reduction=
            "none")`` for CE, any callable ``(logits, targets) -> Tensor[N, C]``), or a
            self-normalising one called as ``(logits, targets, valid=Tensor[N]) -> scalar`` (``GHMCLoss``).
        box_loss: ``SmoothL1Loss``, ``L1Loss``, ``ASL1Loss`` on encoded deltas ``Tensor[N, 4]``;
            ``GIoULoss`` on decoded boxes; or ``GHMRLoss`` (self-normalising, ``valid`` = positives).
        normalizer: ``"per_batch"`` (paper), ``"per_image"`` (torchvision) or a ``PositiveNormalizer``.
        recorder: Optional sink for per-level positive/negative/ignored anchor counts, per-class
            classification loss sums, loss histograms and the GHM densities (``loss.last_density``).
        cls_loss_weight: Factor on the classification loss.
        box_loss_weight: Factor on the box loss (the GHM paper uses 10 with GHM-R, mu = 0.02).
        prior_prob: Set the classifier bias to ``-log((1 - pi) / pi)`` (Lin et al. 2017, sec. 3.3:
            every anchor starts at foreground probability ``pi``), which CE/alpha-CE need to avoid a
            huge initial background loss; ``None`` keeps the current bias.

    Raises:
        ValueError: for a model that is not a RetinaNet, an unsupported loss (a softmax loss, a box
            loss as ``cls_loss``, a string, a reducing loss), an unknown normaliser, or bad weights.
    """
    if not isinstance(model, RetinaNet):
        raise ValueError(f"model must be a torchvision RetinaNet, got {type(model).__name__}")
    model.head = BalancedRetinaNetHead.from_head(
        model.head,
        cls_loss=cls_loss,
        box_loss=box_loss,
        normalizer=normalizer,
        recorder=recorder,
        cls_loss_weight=cls_loss_weight,
        box_loss_weight=box_loss_weight,
        prior_prob=prior_prob,
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
    for anchors_per_image, targets_per_image in zip(anchors, targets_t):
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
