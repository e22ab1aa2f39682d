r"""Federated loss: a sigmoid RoI classifier trained only on the classes present plus frequency-sampled negatives.

Zhou, Koltun, Krähenbühl, "Probabilistic two-stage detection", 2021, https://arxiv.org/abs/2103.07461
(sec. 5, for LVIS's federated annotation). Reference: detectron2 ``roi_heads/fast_rcnn.py``
(``use_fed_loss``, ``get_fed_loss_classes``, ``sigmoid_cross_entropy_loss``) and
``data/detection_utils.get_fed_loss_cls_weights`` (held to a transcription in
``tests/reference/detectron2_fed_loss.py``).

Per batch, the federated set ``S`` is the labels of the batch's RoIs (background included and counted) plus
negatives drawn without replacement with probability proportional to ``w_c = (images with class c) ** 0.5``
until ``|S| = 50``. The loss of a RoI is the BCE of its class columns in ``S`` (column 0, the background, is
never trained: at inference the class scores are plain sigmoids).
"""

from __future__ import annotations

import torch
from torch import Tensor

from detbalance.losses._reduction import check_nonnegative, compute_dtype, reduce_loss, should_validate
from detbalance.losses._roi_class import IGNORE, RoIClassLoss, check_loss_finite, check_roi_inputs
from detbalance.types import Reduction

__all__ = ["FederatedLoss", "federated_classes", "federated_loss", "federated_class_weights"]


def federated_class_weights(image_counts: Tensor, *, power: float = 0.5) -> Tensor:
    """``Tensor[K]`` sampling weights ``image_counts ** power`` (detectron2's ``get_fed_loss_cls_weights``).

    Args:
        image_counts: ``Tensor[K]`` number of training images holding each class ``1..K``.
        power: detectron2's ``FED_LOSS_FREQ_WEIGHT_POWER`` (0.5).

    Raises:
        ValueError: On a negative or non-finite count, or a negative power.
    """
    check_nonnegative("power", power)
    if not isinstance(image_counts, Tensor) or image_counts.dim() != 1 or image_counts.numel() == 0:
        raise ValueError(f"image_counts must be a non-empty 1-D tensor [K], got {image_counts!r}")
    counts = image_counts.to(torch.float32)
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("image_counts must be finite and >= 0")
    return counts**power


def federated_classes(
    labels: Tensor, *, class_weights: Tensor, num_classes_kept: int = 50, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The federated set of a batch: the labels present plus frequency-sampled negative classes.

    detectron2's ``get_fed_loss_classes``: the unique labels (background counted) and, while fewer than
    ``num_classes_kept``, classes drawn by ``torch.multinomial(w, n, replacement=False)`` (``w`` zeroed at the
    present classes), in the reference's class order, so that one generator state draws what detectron2 draws.
    Ours: ``n`` is capped at the number of classes with a non-zero weight (detectron2 raises when ``K`` is
    small or few classes can be drawn); randomness only through ``generator``.

    Args:
        labels: ``Tensor[N]`` int64 in ``-1..K`` (``-1`` rows ignored).
        class_weights: ``Tensor[K]`` sampling weights of the classes (:func:`federated_class_weights`).
        num_classes_kept: ``|S|`` including the background (detectron2's ``FED_LOSS_NUM_CLASSES``, 50).
        generator: The sampling generator (``None``: torch's global one).

    Returns:
        ``(in_loss, sampled)``: ``Tensor[K + 1]`` bool masks indexed by label (index 0 always ``False``):
        the classes whose columns enter the loss, and those of them drawn as negatives.
    """
    k = class_weights.shape[0]
    if isinstance(num_classes_kept, bool) or not isinstance(num_classes_kept, int) or num_classes_kept < 1:
        raise ValueError(f"num_classes_kept must be an int >= 1, got {num_classes_kept!r}")
    valid = labels >= 0
    present = torch.bincount(torch.where(valid, labels, torch.full_like(labels, k + 1)), minlength=k + 2)[: k + 1] > 0
    prob = torch.cat([class_weights.to(device=labels.device, dtype=torch.float32), class_weights.new_zeros(1)])
    prob = torch.where(torch.cat([present[1:], present[:1]]), torch.zeros_like(prob), prob)  # detectron2's order
    n_present, n_drawable = torch.stack([present.sum(), (prob > 0).sum()]).tolist()  # one host sync
    n = min(num_classes_kept - n_present, n_drawable)
    sampled = torch.zeros(k + 1, dtype=torch.bool, device=labels.device)
    if n > 0:
        draw = torch.multinomial(prob, n, replacement=False, generator=generator)
        sampled[draw + 1] = True  # detectron2's column j is our class j + 1
    in_loss = present | sampled
    in_loss[0] = False
    return in_loss, sampled


def federated_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    classes: Tensor,
    weight: Tensor | None = None,
    reduction: Reduction = "none",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Sigmoid BCE of each RoI over the class columns in the federated set ``classes``.

    .. math:: L_i = \sum_{c \in S, c \ge 1} \mathrm{BCE}(z_{ic}, [y_i = c])

    Args:
        logits: ``Tensor[N, K + 1]``, column 0 the background (never trained).
        labels: ``Tensor[N]`` int64, ``-1`` ignore (loss 0), ``0`` background, ``1..K`` foreground.
        classes: ``Tensor[K + 1]`` bool mask of the federated set (:func:`federated_classes`; all ``True``
            gives the plain sigmoid CE of detectron2's ``use_sigmoid_ce``).
        weight: Optional per-RoI ``Tensor[N]``.
        reduction: ``'none'`` (``Tensor[N]``), ``'sum'``, or ``'mean'`` over the non-ignored RoIs (detectron2:
            ``sum / N``).
        validate_args: Check labels and finite logits (one host sync); ``None``: not on CUDA.

    Returns:
        float32 loss (float64 input stays float64).

    Example:
        >>> federated_loss(torch.zeros(2, 4), torch.tensor([0, 2]), classes=torch.tensor([False, False, True, True]))
        tensor([1.3863, 1.3863])
    """
    if not isinstance(classes, Tensor) or classes.dtype != torch.bool or classes.dim() != 1:
        raise ValueError(f"classes must be a 1-D bool tensor [K + 1], got {classes!r}")
    k = classes.shape[0] - 1
    validate = should_validate(validate_args, logits)
    check_roi_inputs(logits, labels, num_classes=k, columns=k + 1, name="federated_loss", validate=validate)
    if weight is not None and weight.shape != labels.shape:
        raise ValueError(f"weight must have shape {tuple(labels.shape)}, got {tuple(weight.shape)}")
    dtype = compute_dtype(logits)
    keep = labels != IGNORE
    with torch.autocast(logits.device.type, enabled=False):
        z = logits.to(dtype)
        mask = classes.to(device=z.device, dtype=dtype)
        mask = torch.cat([mask.new_zeros(1), mask[1:]])
        safe = labels.clamp(min=0)
        z_own = z.gather(1, safe[:, None]).squeeze(1)
        loss = torch.nn.functional.softplus(z) @ mask - mask[safe] * z_own  # mask[0] = 0: background rows
        if weight is not None:
            loss = loss * weight.to(dtype)
        loss = torch.where(keep, loss, torch.zeros((), dtype=dtype, device=loss.device))
    check_loss_finite(loss, name="federated_loss", validate=validate)
    return reduce_loss(loss, reduction, count=keep.sum())


class FederatedLoss(RoIClassLoss):
    """Module form: the class weights (a buffer), the set size and a :class:`torch.Generator` for the draws.

    Each call draws the batch's federated set with :func:`federated_classes` and returns
    :func:`federated_loss`. Nothing is accumulated, so there is nothing to synchronise across ranks: each
    rank draws from its own batch, as in detectron2. The generator is created on the logits' device on first
    use and seeded with ``seed`` (``None``: a seed drawn from torch's global generator at construction).
    Inference scores (:meth:`class_probabilities`) are sigmoids (detectron2's ``predict_probs``).

    Args:
        class_weights: ``Tensor[K]`` sampling weights (:func:`federated_class_weights` of the training set's
            image counts).
        num_classes_kept: ``|S|`` (detectron2: 50, for LVIS's 1203 classes).
        seed: Seed of the sampling generator.
        reduction: ``'none'`` for the RoI head.
        validate_args: See :func:`federated_loss`.
    """

    class_weights: Tensor

    def __init__(self, *, class_weights: Tensor, num_classes_kept: int = 50, seed: int | None = None,
                 reduction: Reduction = "none", validate_args: bool | None = None) -> None:
        super().__init__()
        if not isinstance(class_weights, Tensor) or class_weights.dim() != 1 or class_weights.numel() == 0:
            raise ValueError(f"class_weights must be a non-empty 1-D tensor [K], got {class_weights!r}")
        if not bool(torch.isfinite(class_weights).all()) or bool((class_weights < 0).any()):
            raise ValueError("class_weights must be finite and >= 0")
        if isinstance(num_classes_kept, bool) or not isinstance(num_classes_kept, int) or num_classes_kept < 1:
            raise ValueError(f"num_classes_kept must be an int >= 1, got {num_classes_kept!r}")
        reduce_loss(torch.zeros(0), reduction)
        self.num_classes = int(class_weights.numel())
        self.num_classes_kept, self.reduction, self.validate_args = num_classes_kept, reduction, validate_args
        self.register_buffer("class_weights", class_weights.detach().to(torch.float32).clone())
        self.seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64)) if seed is None else int(seed)
        self._generator: torch.Generator | None = None
        self.track_stats = False
        self.last_stats: dict[str, tuple[Tensor, Tensor]] | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The sampling generator on ``device`` (created and seeded on first use)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """``Tensor[N, K + 1]``: the sigmoid of every column (column 0 is never trained nor used)."""
        return torch.sigmoid(logits)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """Draw the federated set of this batch, then :func:`federated_loss`."""
        validate = should_validate(self.validate_args, logits)
        check_roi_inputs(logits, labels, num_classes=self.num_classes, columns=self.num_classes + 1,
                         name="FederatedLoss", validate=validate)
        in_loss, sampled = federated_classes(labels, class_weights=self.class_weights,
                                             num_classes_kept=self.num_classes_kept,
                                             generator=self.generator(labels.device))
        if self.track_stats:
            ones = torch.ones(self.num_classes, device=labels.device)
            self.last_stats = {"federated/in_loss": (in_loss[1:].float(), ones),
                               "federated/sampled": (sampled[1:].float(), ones)}
        loss = federated_loss(logits, labels, classes=in_loss, weight=weight, reduction="none", validate_args=False)
        check_loss_finite(loss, name="FederatedLoss", validate=validate)
        return reduce_loss(loss, self.reduction, count=(labels != IGNORE).sum())

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_classes_kept={self.num_classes_kept}, seed={self.seed}"
