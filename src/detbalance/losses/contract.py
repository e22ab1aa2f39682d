"""The loss contract: what a detector adapter passes to a loss and what it gets back, declared once.

Every loss the adapters accept is a :class:`DetectionLoss`. Its class (or instance) declares

* ``kind``: which slot it fills. ``"sigmoid"``: one-vs-all classification, called
  ``(logits[N, K], targets[N, K], **kw)``; ``"softmax"``: multi-class classification over ``K + 1`` columns
  (column 0 the background), called ``(logits[N, K + 1], labels[N], **kw)``; ``"box"``: box regression,
  called ``(pred[N, 4], target[N, 4], **kw)``.
* ``self_normalizing``: ``False`` when the loss returns per-element values (``reduction="none"``, the shape
  of ``logits``/``pred``, or ``Tensor[N]`` for a softmax loss) that the adapter sums and divides by the
  positive count; ``True`` when it returns the paper's normalised scalar itself (GHM-C, GHM-R) and takes a
  ``valid: Tensor[N]`` mask (classification: the non-ignored anchors; boxes: the positives).
* ``decoded_boxes``: a box loss on decoded ``(x1, y1, x2, y2)`` boxes (GIoU) instead of encoded deltas.
* ``per_level``: a self-normalising loss that the RetinaNet adapter calls once per FPN level (level losses
  summed, as mmdetection's ``AnchorHead.loss_by_feat`` does) instead of once for all levels.
* ``reference_weight``: the loss weight its authors use when the adapter is given none (GHM-R: 10).
* ``last_density``: the gradient-density histogram of the latest call (GHM), else ``None``, for recorders.

A RoI classification loss for long tails (Seesaw, EQLv2, federated loss) is a ``"softmax"``-slot loss that may
also define ``classifier_columns(K)`` (the classifier's width: Seesaw's ``K + 2``) and ``class_probabilities``
(the detection scores, mmdetection's ``get_activation``), and a ``last_stats`` dict of per-class values for
recorders; the Faster R-CNN adapter reads these methods, with no branch per loss.

A dense head (RetinaNet) hands a ``"sigmoid"`` loss its per-anchor batch, an :class:`AnchorBatch` (logits,
labels, anchors, matched boxes, decoded predicted boxes), and asks it for its targets through
:meth:`DetectionLoss.dense_targets`: the one-hot labels by default (focal, GHM-C, CE), the IoU quality of the
positives' predicted boxes for QFL and VFL. The adapter keeps no branch per loss; a new loss that needs other
per-anchor facts overrides ``dense_targets``.

Classification losses accept ``weight=`` (per element or per row) for per-sample class weights. A plain
function or a foreign module (``nn.BCEWithLogitsLoss``) enters through :func:`declare_loss`, which states its
contract explicitly; the adapters read nothing else and guess nothing, so a loss in the wrong slot fails with
a ``ValueError`` naming the slot (:func:`check_slot`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from torch import Tensor, nn

from detbalance.losses._reduction import check_nonnegative
from detbalance.types import one_hot_targets

__all__ = ["AnchorBatch", "DetectionLoss", "LossKind", "ScaledLoss", "check_slot", "declare_loss"]

LossKind = Literal["sigmoid", "softmax", "box"]
KINDS: tuple[str, ...] = ("sigmoid", "softmax", "box")


class AnchorBatch(NamedTuple):
    """What a dense head knows about every anchor of a batch, flattened over images and levels (``N = B A``).

    ``logits: Tensor[N, K]`` the classification scores of the ``K`` object classes; ``labels: Tensor[N]``
    int64 (``-1`` ignore, ``0`` background, ``1..K``); ``anchors: Tensor[N, 4]``; ``matched_boxes:
    Tensor[N, 4]`` the assigned ground-truth box (meaningful where ``labels > 0``); ``pred_boxes: Tensor[N, 4]``
    the decoded predicted boxes, detached. Boxes are ``(x1, y1, x2, y2)`` pixels of the transformed image.
    """

    logits: Tensor
    labels: Tensor
    anchors: Tensor
    matched_boxes: Tensor
    pred_boxes: Tensor


class DetectionLoss(nn.Module):
    """Base class of every loss an adapter accepts; subclasses set the class attributes below.

    Attributes:
        kind: ``"sigmoid"``, ``"softmax"`` or ``"box"`` (the slot it fills); a subclass that declares none
            fits no slot.
        self_normalizing: Whether ``forward`` returns the normalised scalar (and takes ``valid=``).
        decoded_boxes: Box loss on decoded boxes rather than encoded deltas.
        per_level: Called once per FPN level by the RetinaNet adapter (self-normalising losses only).
        reference_weight: Loss weight used by an adapter that is given none.
        reduction: ``"none"`` for a per-element loss (what the adapters need unless ``self_normalizing``).
        last_density: GHM's density of the latest call, else ``None``.
    """

    kind: LossKind | None = None  # a subclass must declare it
    self_normalizing: bool = False
    decoded_boxes: bool = False
    per_level: bool = False
    reference_weight: float = 1.0
    reduction: str = "none"
    last_density: Tensor | None = None

    def dense_targets(self, batch: AnchorBatch) -> Tensor:
        """One-vs-all targets ``Tensor[N, K]`` of a sigmoid loss on a dense head: the one-hot labels.

        QFL and VFL override it (the IoU quality of the positives' predicted boxes). Ignored and background
        anchors get all-zero rows; the adapter masks the ignored ones out.
        """
        return one_hot_targets(batch.labels, batch.logits.shape[-1], dtype=batch.logits.dtype, validate_args=False)


class _DeclaredLoss(DetectionLoss):
    """A callable with an explicitly declared contract (see :func:`declare_loss`)."""

    def __init__(
        self, fn: Callable[..., Tensor], *, kind: LossKind, self_normalizing: bool, decoded_boxes: bool
    ) -> None:
        super().__init__()
        self.fn = fn
        self.kind = kind
        self.self_normalizing = self_normalizing
        self.decoded_boxes = decoded_boxes

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"fn={name}, kind={self.kind!r}, self_normalizing={self.self_normalizing}"


def declare_loss(
    fn: Callable[..., Tensor],
    *,
    kind: LossKind,
    self_normalizing: bool = False,
    decoded_boxes: bool = False,
) -> DetectionLoss:
    """Wrap a plain callable (a function, ``nn.BCEWithLogitsLoss(reduction="none")``) with a declared contract.

    Args:
        fn: The loss, called with the arguments its ``kind`` implies (see the module docstring).
        kind: ``"sigmoid"``, ``"softmax"`` or ``"box"``.
        self_normalizing: Whether ``fn`` returns the normalised scalar and takes ``valid=``.
        decoded_boxes: For ``"box"``: ``fn`` takes decoded boxes.

    Returns:
        A :class:`DetectionLoss` (``fn`` itself when it already is one with this contract).

    Raises:
        ValueError: for an unknown ``kind`` or a ``fn`` that is not callable or is a string.

    Example:
        >>> from torch import nn
        >>> bce = declare_loss(nn.BCEWithLogitsLoss(reduction="none"), kind="sigmoid")
        >>> bce.kind, bce.self_normalizing
        ('sigmoid', False)
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(fn, str) or not callable(fn):
        raise ValueError(f"fn must be a loss callable, got {fn!r}")
    reduction = getattr(fn, "reduction", "none")
    if not self_normalizing and isinstance(fn, nn.Module) and reduction != "none":
        raise ValueError(f"fn={type(fn).__name__} has reduction={reduction!r}; declare it with reduction='none'")
    return _DeclaredLoss(fn, kind=kind, self_normalizing=bool(self_normalizing), decoded_boxes=bool(decoded_boxes))


class ScaledLoss(DetectionLoss):
    """``scale * loss(...)``: the one place where a loss weight is applied (builders wrap every loss with it).

    Linear, so it commutes with the adapters' normalisation and with the per-level sum. The contract
    (``kind``, ``self_normalizing``, ``decoded_boxes``, ``per_level``, ``last_density``) is the wrapped loss's;
    ``reference_weight`` is 1 (the weight is already applied).

    Args:
        loss: A :class:`DetectionLoss`.
        scale: The loss weight ``>= 0``.
    """

    def __init__(self, loss: DetectionLoss, scale: float) -> None:
        super().__init__()
        if not isinstance(loss, DetectionLoss):
            raise ValueError(f"loss must be a DetectionLoss, got {type(loss).__name__}")
        check_nonnegative("scale", scale)
        self.loss = loss
        self.scale = float(scale)
        self.kind = loss.kind
        self.self_normalizing = loss.self_normalizing
        self.decoded_boxes = loss.decoded_boxes
        self.per_level = loss.per_level
        self.reduction = loss.reduction

    @property
    def last_density(self) -> Tensor | None:  # type: ignore[override]
        return self.loss.last_density

    def dense_targets(self, batch: AnchorBatch) -> Tensor:
        return self.loss.dense_targets(batch)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.loss(*args, **kwargs) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def check_slot(loss: object, *, slot: str, kind: LossKind) -> DetectionLoss:
    """Return ``loss`` if it declares ``kind``, else raise ``ValueError`` naming ``slot``.

    Args:
        loss: What the user passed.
        slot: The argument's name (``"cls_loss"``, ``"box_loss"``, ``"box_cls_loss"``).
        kind: The kind the slot needs.
    """
    if not isinstance(loss, DetectionLoss):
        name = type(loss).__name__ if not callable(loss) or isinstance(loss, nn.Module) else getattr(
            loss, "__qualname__", type(loss).__name__
        )
        raise ValueError(
            f"{slot} must be a {kind} DetectionLoss (a detbalance.losses module, or "
            f"declare_loss(fn, kind={kind!r}) for your own callable), got {name}"
        )
    if loss.kind != kind:
        raise ValueError(f"{slot} needs a {kind} loss, got {type(loss).__name__} (kind {loss.kind!r})")
    if not loss.self_normalizing and loss.reduction != "none":
        raise ValueError(
            f"{slot}={type(loss).__name__} has reduction={loss.reduction!r}; a loss that is not self-normalising "
            "must return per-element losses (reduction='none')"
        )
    return loss
