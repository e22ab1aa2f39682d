"""Helpers shared by the dense-head adapters (RetinaNet, SSD): matching to labels, box-loss inputs, normalisers.

Private module. Labels follow :mod:`detbalance.types` (``-1`` ignore, ``0`` background, ``1..K``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

from detbalance.losses import DetectionLoss, check_slot, normalize_by_positives
from detbalance.losses.contract import LossKind
from detbalance.types import BACKGROUND, IGNORE

Normalizer = str | Callable[[Tensor, Tensor], Tensor]
NORMALIZER_MODES = ("per_batch", "per_image")


def loss_for_slot(loss: object, *, slot: str, kind: LossKind) -> DetectionLoss:
    """The loss if its declared contract fits ``slot`` (see :func:`detbalance.losses.check_slot`)."""
    return check_slot(loss, slot=slot, kind=kind)


def check_weight(name: str, value: float) -> float:
    """A loss weight: a finite number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 0) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_normalizer(normalizer: object) -> None:
    """Raise ``ValueError`` unless ``normalizer`` is a mode string or a callable."""
    if isinstance(normalizer, str):
        if normalizer not in NORMALIZER_MODES:
            raise ValueError(
                f"normalizer must be one of {NORMALIZER_MODES} or a PositiveNormalizer, got {normalizer!r}"
            )
    elif not callable(normalizer):
        raise ValueError(f"normalizer must be a mode string or a PositiveNormalizer, got {normalizer!r}")


def normalize(normalizer: Normalizer, per_image: Tensor, num_positives: Tensor) -> Tensor:
    """Apply a mode string or a ``PositiveNormalizer``-like callable."""
    if isinstance(normalizer, str):
        return normalize_by_positives(per_image, num_positives, mode=normalizer, validate_args=False)
    return normalizer(per_image, num_positives)


def labels_from_matches(matched_idxs: Tensor, gt_labels: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Anchor labels (``-1``/``0``/``1..K``) and flat box index from torchvision's ``Matcher`` output.

    Args:
        matched_idxs: ``Tensor[B, A]``: ground-truth index per anchor, ``-1`` below the low threshold,
            ``-2`` between the thresholds.
        gt_labels: ``Tensor[G + 1]`` the labels of all images' boxes concatenated, plus one padding entry.
        offsets: ``Tensor[B]`` index of each image's first box in ``gt_labels``.

    Returns:
        ``labels: Tensor[B, A]`` and ``flat_idx: Tensor[B, A]``, the index of the matched box in the
        concatenation (the padding entry ``G`` where there is none).
    """
    fg = matched_idxs >= 0
    pad = gt_labels.shape[0] - 1
    flat_idx = torch.where(fg, matched_idxs + offsets[:, None], torch.full_like(matched_idxs, pad))
    other = torch.where(
        matched_idxs == -2, torch.full_like(matched_idxs, IGNORE), torch.full_like(matched_idxs, BACKGROUND)
    )
    return torch.where(fg, gt_labels[flat_idx], other), flat_idx


def match_targets(
    targets: Sequence[dict[str, Tensor]], matched_idxs: Sequence[Tensor], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Anchor labels ``Tensor[B, A]`` and matched boxes ``Tensor[B, A, 4]`` (padding box off the positives)."""
    counts = [int(t["boxes"].shape[0]) for t in targets]
    pad_box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device)
    boxes = torch.cat([t["boxes"].to(device) for t in targets] + [pad_box])
    gt_labels = torch.cat(
        [t["labels"].to(device) for t in targets] + [torch.zeros(1, dtype=torch.int64, device=device)]
    ).to(torch.int64)
    offsets = torch.tensor([sum(counts[:i]) for i in range(len(counts))], dtype=torch.int64, device=device)
    labels, flat_idx = labels_from_matches(torch.stack(list(matched_idxs)), gt_labels, offsets)
    return labels, boxes[flat_idx]


def box_loss_inputs(
    bbox_regression: Tensor, anchors: Sequence[Tensor], matched_boxes: Tensor, box_coder: BoxCoder, *, decoded: bool
) -> tuple[Tensor, Tensor]:
    """``(pred, target)``, both ``Tensor[B A, 4]``: deltas and encoded matched boxes, or decoded boxes (GIoU)."""
    b, a = bbox_regression.shape[:2]
    anchors_flat = torch.stack(list(anchors)).reshape(b * a, 4)
    deltas = bbox_regression.reshape(b * a, 4)
    matched = matched_boxes.reshape(b * a, 4)
    if decoded:
        return box_coder.decode_single(deltas, anchors_flat), matched
    return deltas, box_coder.encode_single(matched, anchors_flat)


def positive_box_loss(elementwise: Tensor, positive: Tensor) -> Tensor:
    """Per-anchor box loss ``Tensor[B, A]`` summed over coordinates, zero off the positives.

    Raises:
        ValueError: if ``elementwise`` is not ``[B A, 4]`` or ``[B A]`` (a reducing loss).
    """
    b, a = positive.shape
    n = b * a
    if elementwise.dim() == 0 or elementwise.shape[0] != n or elementwise.numel() not in (n, n * 4):
        raise ValueError(
            f"box_loss returned shape {tuple(elementwise.shape)}, expected per-element [{n}, 4] "
            f"or [{n}] (reduction='none')"
        )
    return torch.where(positive.reshape(-1), elementwise.reshape(n, -1).sum(-1), 0.0).reshape(b, a)


def level_slices(anchors_per_level: Sequence[int], num_anchors: int) -> list[slice]:
    """Slices of the concatenated anchor axis, one per pyramid level."""
    if sum(anchors_per_level) != num_anchors or not anchors_per_level:
        raise ValueError(
            f"the head's last forward had {sum(anchors_per_level)} anchors per image, the loss got {num_anchors}"
        )
    out, start = [], 0
    for n in anchors_per_level:
        out.append(slice(start, start + n))
        start += n
    return out
