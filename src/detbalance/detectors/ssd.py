"""SSD with configurable hard negative mining or a softmax focal loss over all default boxes.

torchvision's ``SSD.compute_loss`` is a method of the model, so the injection point is a subclass:
:meth:`BalancedSSD.from_ssd` builds a :class:`BalancedSSD` that shares every module, buffer and setting
of the given model and overrides only ``compute_loss``. Matching (``SSDMatcher`` at IoU 0.5 plus the
best default box of every object), box coding (``BoxCoder(10, 10, 5, 5)``), the transform and the
post-processing stay torchvision's.

The loss of a batch (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, eq. 1-2), with ``N``
the number of positive default boxes in the batch (at least 1):

* ``classification = (1/N) sum_{i in selected} CE_i`` where *selected* is every positive plus, per
  image, the ``negative_ratio * P_b`` background boxes with the highest loss
  (:func:`detbalance.sampling.mine_hard_negatives`; an image without objects keeps ``min_negatives``);
  with ``negative_ratio=None`` every non-ignored box is selected (use it with a
  :class:`~detbalance.losses.SoftmaxFocalLoss`, Lin et al. 2017);
* ``bbox_regression = (1/N) sum_{i positive} smooth_L1_{beta=1}(deltas_i - targets_i)`` (torchvision's
  ``F.smooth_l1_loss`` default), or any box loss.

With ``negative_ratio=3.0, min_negatives=0`` and the defaults, the losses equal torchvision's (a test).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD

from detbalance.detectors._dense import box_loss_inputs, loss_for_slot, match_targets, positive_box_loss
from detbalance.detectors._targets import install_target_check
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.losses import DetectionLoss, declare_loss
from detbalance.sampling import mine_hard_negatives

__all__ = ["BalancedSSD", "balance_ssd", "init_background_prior"]


def _smooth_l1_beta1(pred: Tensor, target: Tensor) -> Tensor:
    """torchvision SSD's box loss per element: ``F.smooth_l1_loss(beta=1.0, reduction="none")``."""
    return F.smooth_l1_loss(pred, target, reduction="none")


def _cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """torchvision SSD's classification loss per default box: softmax cross-entropy (times ``weight``)."""
    loss = F.cross_entropy(logits, labels, reduction="none")
    return loss if weight is None else loss * weight


_CROSS_ENTROPY: DetectionLoss = declare_loss(_cross_entropy, kind="softmax")
_SMOOTH_L1: DetectionLoss = declare_loss(_smooth_l1_beta1, kind="box")


def init_background_prior(model: SSD, prior: float) -> None:
    r"""Set an SSD classifier's biases so that every default box starts at foreground probability ``prior``.

    The softmax counterpart of the focal loss's prior (Lin et al. 2017, sec. 3.3, for the sigmoid): with
    background bias :math:`b_0 = \log(K (1 - \pi) / \pi)` and class biases 0, zero features give
    :math:`p_0 = 1 - \pi` and :math:`p_k = \pi / K`. Without it a stock SSD's classifier (bias 0) starts at
    :math:`p_0 = 1 / (K + 1)`, and a softmax focal loss over every box (no mining) begins with the loss of
    thousands of negatives near chance: at step 1 of a from-scratch SSDlite (K = 5) 11x the 3:1 mining loss, 0.15x
    with ``prior = 0.01`` (``docs/pilots/ssd-background-prior/``).
    Only the bias of the last conv of each level's classification branch changes (in place).

    Args:
        model: A torchvision ``SSD`` (or :class:`BalancedSSD`).
        prior: The initial foreground probability ``pi`` in ``(0, 1)`` (0.01 as the focal paper's).
    """
    if not isinstance(model, SSD):
        raise ValueError(f"model must be a torchvision SSD, got {type(model).__name__}")
    if isinstance(prior, bool) or not isinstance(prior, int | float) or not 0.0 < prior < 1.0:
        raise ValueError(f"background_prior must lie in (0, 1), got {prior!r}")
    head = model.head.classification_head
    columns = int(head.num_columns)
    background = math.log((columns - 1) * (1.0 - prior) / prior)
    with torch.no_grad():
        for block in head.module_list:
            conv = block[-1] if isinstance(block, nn.Sequential) else block
            bias = conv.bias.view(-1, columns)
            bias.zero_()
            bias[:, 0] = background


class BalancedSSD(SSD):
    """torchvision ``SSD`` whose ``compute_loss`` mines hard negatives or uses an injected loss.

    Create it with :meth:`from_ssd` (or :func:`balance_ssd`); the arguments are described there.
    """

    negative_ratio: float | None
    min_negatives: int

    @classmethod
    def from_ssd(
        cls,
        model: SSD,
        *,
        negative_ratio: float | None = 3.0,
        min_negatives: int = 0,
        cls_loss: DetectionLoss | None = None,
        box_loss: DetectionLoss | None = None,
        recorder: BalanceRecorder | None = None,
        background_prior: float | None = None,
    ) -> BalancedSSD:
        """A ``BalancedSSD`` sharing every module, parameter, buffer and setting of ``model``."""
        if not isinstance(model, SSD):
            raise ValueError(f"model must be a torchvision SSD, got {type(model).__name__}")
        if negative_ratio is not None and (
            isinstance(negative_ratio, bool)
            or not isinstance(negative_ratio, int | float)
            or not negative_ratio >= 0
            or math.isinf(negative_ratio)
        ):
            raise ValueError(f"negative_ratio must be a finite number >= 0 or None, got {negative_ratio!r}")
        if isinstance(min_negatives, bool) or not isinstance(min_negatives, int) or min_negatives < 0:
            raise ValueError(f"min_negatives must be an int >= 0, got {min_negatives!r}")
        cls_fn = _CROSS_ENTROPY if cls_loss is None else loss_for_slot(cls_loss, slot="cls_loss", kind="softmax")
        if cls_fn.self_normalizing:
            raise ValueError(
                f"cls_loss={type(cls_fn).__name__} is self-normalising; SSD needs per-box losses to mine"
            )
        box = _SMOOTH_L1 if box_loss is None else loss_for_slot(box_loss, slot="box_loss", kind="box")
        if recorder is not None and not isinstance(recorder, BalanceRecorder):
            raise ValueError(f"recorder must be a BalanceRecorder or None, got {type(recorder).__name__}")
        if background_prior is not None:
            init_background_prior(model, background_prior)

        new = cls.__new__(cls)
        nn.Module.__init__(new)
        # Share the modules and settings; the containers themselves are copied so that registering
        # something on one model does not register it on the other.
        new.__dict__.update({k: copy.copy(v) if isinstance(v, dict | set) else v for k, v in model.__dict__.items()})
        new.negative_ratio = None if negative_ratio is None else float(negative_ratio)
        new.min_negatives = min_negatives
        new.cls_loss = cls_fn
        new.box_loss = box
        new.recorder = recorder
        install_target_check(new, new.num_classes)
        return new

    @property
    def num_classes(self) -> int:
        """Softmax columns ``C = K + 1`` (column 0 the background)."""
        return int(self.head.classification_head.num_columns)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """SSD's loss with the configured mining and losses; shapes ``[B, A, C]`` and ``[B, A, 4]``."""
        cls_logits = head_outputs["cls_logits"]
        bbox_regression = head_outputs["bbox_regression"]
        b, a, c = cls_logits.shape
        labels, matched_boxes = match_targets(targets, matched_idxs, cls_logits.device)
        positive = labels > 0
        num_fg = positive.sum().clamp(min=1).to(torch.float32)

        # Regression on positives.
        pred, target = box_loss_inputs(
            bbox_regression, anchors, matched_boxes, self.box_coder, decoded=self.box_loss.decoded_boxes
        )
        per_box_loss = None
        if self.box_loss.self_normalizing:
            box_value = self.box_loss(pred, target, valid=positive.reshape(-1))
        else:
            per_box_loss = positive_box_loss(self.box_loss(pred, target), positive)
            box_value = per_box_loss.sum() / num_fg

        # Classification over the selected default boxes.
        per_anchor = self.cls_loss(cls_logits.reshape(b * a, c), labels.clamp(min=0).reshape(-1))
        if per_anchor.shape != (b * a,):
            raise ValueError(
                f"cls_loss returned shape {tuple(per_anchor.shape)}, expected per-box [{b * a}] (reduction='none')"
            )
        per_anchor = per_anchor.reshape(b, a)
        if self.negative_ratio is None:
            selected = labels >= 0
        else:
            selected = mine_hard_negatives(
                per_anchor, labels, negative_ratio=self.negative_ratio, min_negatives=self.min_negatives
            )
        cls_value = torch.where(selected, per_anchor, 0.0).sum() / num_fg

        if self.recorder is not None:
            self._record(labels, selected, per_anchor, per_box_loss)
        return {"bbox_regression": box_value, "classification": cls_value}

    def _record(self, labels: Tensor, selected: Tensor, per_anchor: Tensor, per_box_loss: Tensor | None) -> None:
        rec = self.recorder
        if rec is None:
            return
        with torch.no_grad():
            pos = labels > 0
            neg = selected & (labels == 0)
            rec.record_counts("ssd/default_boxes", pos.sum(), neg.sum(), (~selected).sum())
            used = torch.where(selected, labels, torch.full_like(labels, -1))
            rec.record_class_losses("ssd/cls", used.reshape(-1), per_anchor.reshape(-1), self.num_classes - 1)
            rec.record_losses("ssd/cls_positive", per_anchor, mask=pos)
            rec.record_losses("ssd/cls_negative", per_anchor, mask=neg)
            if per_box_loss is not None:
                rec.record_losses("ssd/box", per_box_loss, mask=pos)
            if self.box_loss.last_density is not None:
                rec.record_ghm_density("ssd/box", self.box_loss.last_density)


def balance_ssd(
    model: SSD,
    *,
    negative_ratio: float | None = 3.0,
    min_negatives: int = 0,
    cls_loss: DetectionLoss | None = None,
    box_loss: DetectionLoss | None = None,
    recorder: BalanceRecorder | None = None,
    background_prior: float | None = None,
) -> BalancedSSD:
    """Return a :class:`BalancedSSD` sharing ``model``'s modules (use the returned model).

    Args:
        model: A torchvision ``SSD`` (e.g. from :func:`~detbalance.detectors.build.build_detector`).
        negative_ratio: Hard negatives per positive per image (SSD: 3.0); ``None`` disables mining and
            puts every default box into the classification loss (for a focal loss).
        min_negatives: Hardest negatives kept in an image without objects; 0 (torchvision and the paper)
            means such an image adds nothing to the classification loss.
        cls_loss: A ``"softmax"`` :class:`~detbalance.losses.DetectionLoss` ``(logits[N, C], labels[N]) ->
            Tensor[N]``, e.g. :class:`~detbalance.losses.SoftmaxFocalLoss` (a per-class ``alpha`` weights each
            box by its class, background by ``alpha[0]``) or a ``ClassWeightedLoss``; ``None`` is
            cross-entropy (torchvision). It also ranks the negatives when mining.
        box_loss: A ``"box"`` loss on encoded deltas ``Tensor[N, 4]`` (``GIoULoss``: decoded boxes) returning
            per-element losses, or a self-normalising one (``GHMRLoss``, one call for all default boxes);
            ``None`` is torchvision's smooth L1 with ``beta = 1``.
        recorder: Optional sink for positive / selected negative / unused box counts, per-class
            classification loss sums of the selected boxes and loss histograms.
        background_prior: Initialise the classifier biases with :func:`init_background_prior` (foreground
            probability ``pi`` at the start, e.g. 0.01) for a softmax focal loss over every box; ``None`` (default)
            leaves them (torchvision: 0). Apply it only to a freshly created classifier, never to a loaded one.

    Raises:
        ValueError: for a model that is not an SSD, a loss whose declared kind does not fit its slot (naming
            the slot), a self-normalising ``cls_loss``, or a bad ratio.
    """
    return BalancedSSD.from_ssd(
        model,
        negative_ratio=negative_ratio,
        min_negatives=min_negatives,
        cls_loss=cls_loss,
        box_loss=box_loss,
        recorder=recorder,
        background_prior=background_prior,
    )

