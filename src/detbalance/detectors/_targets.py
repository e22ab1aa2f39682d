"""Validation of detection ground truth, shared by the RetinaNet, SSD and Faster R-CNN adapters.

torchvision checks targets with ``assert`` (or not at all) and only after resizing; the adapters call
:func:`check_detection_targets` on the original images first, so a bad box or label is reported as a
``ValueError`` that names the image (index and ``image_id``), the box index and the offending value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_detection_targets", "install_target_check"]


def check_detection_targets(
    images: Sequence[Tensor] | Tensor, targets: Sequence[dict[str, Tensor]], *, num_classes: int
) -> None:
    """Validate a batch of ground truth against its images before any resizing.

    Every box must be ``(x1, y1, x2, y2)`` with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H`` of its
    image, every label in ``1..num_classes - 1`` (``num_classes`` = the model's output columns,
    torchvision's count including the background). One device-to-host synchronisation per batch.

    Args:
        images: ``B`` tensors ``[C, H, W]`` (or one ``Tensor[B, C, H, W]``).
        targets: ``B`` dicts with ``boxes: Tensor[G_b, 4]`` (floating point) and ``labels: Tensor[G_b]``
            (integer), optionally ``image_id``.
        num_classes: The model's number of classes ``C`` (torchvision's convention).

    Raises:
        ValueError: for a missing key, a wrong shape or dtype, or the first bad box or label of the
            batch, naming the image index, its ``image_id`` (if any), the box index and the value.
    """
    if len(images) != len(targets):
        raise ValueError(f"expected one target per image, got {len(images)} images and {len(targets)} targets")
    bad_box, bad_label = [], []
    for i, (image, target) in enumerate(zip(images, targets)):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            keys = sorted(target) if isinstance(target, dict) else type(target).__name__
            raise ValueError(f"expected targets[{i}] to be a dict with 'boxes' and 'labels', got {keys}")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"expected targets[{i}]['boxes'] of shape [G, 4], got {_shape(boxes)}")
        if not boxes.is_floating_point():
            raise ValueError(f"expected targets[{i}]['boxes'] to be floating point, got {boxes.dtype}")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            raise ValueError(f"expected targets[{i}]['labels'] of shape [{len(boxes)}], got {_shape(labels)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"expected targets[{i}]['labels'] to be int64, got {labels.dtype}")
        h, w = image.shape[-2:]
        limit = boxes.new_tensor([w, h, w, h])
        bad_box.append(
            (boxes[:, 2:] <= boxes[:, :2]).any(1) | (boxes < 0).any(1) | (boxes > limit).any(1)
            | ~torch.isfinite(boxes).all(1)
        )
        bad_label.append((labels < 1) | (labels >= num_classes))
    if not targets or not bool((torch.cat(bad_box) | torch.cat(bad_label)).any()):
        return
    # Slow path, only to build the message: the first image with a bad entry, and its first bad entry.
    i = next(i for i, (b, lab) in enumerate(zip(bad_box, bad_label)) if bool((b | lab).any()))
    j = int((bad_box[i] | bad_label[i]).nonzero()[0, 0])
    target = targets[i]
    image_id = _image_id_note(target)
    h, w = images[i].shape[-2:]
    if not bool(bad_box[i][j]):
        raise ValueError(
            f"targets[{i}]['labels'][{j}] = {int(target['labels'][j])}{image_id}: expected a label in "
            f"1..{num_classes - 1} (the model has {num_classes} classes including the background)"
        )
    box = target["boxes"][j].tolist()
    x1, y1, x2, y2 = box
    where = f"targets[{i}]['boxes'][{j}] = {box}{image_id}"
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}: expected finite coordinates")
    if not (x2 > x1 and y2 > y1):
        need = " and ".join(c for c, ok in (("x2 > x1", x2 > x1), ("y2 > y1", y2 > y1)) if not ok)
        raise ValueError(f"{where}: expected {need}")
    raise ValueError(
        f"{where}: outside the {w}x{h} image, expected 0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h}"
    )


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _image_id_note(target: dict[str, Any]) -> str:
    image_id = target.get("image_id")
    if image_id is None:
        return ""
    if isinstance(image_id, Tensor):
        image_id = image_id.item() if image_id.numel() == 1 else image_id.tolist()
    return f" (image_id={image_id!r})"


class _TargetCheck:
    """Forward pre-hook validating ``(images, targets)`` of a detector in training mode."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        images = args[0] if args else kwargs.get("images")
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if targets is not None and images is not None:
            check_detection_targets(images, targets, num_classes=self.num_classes)


def install_target_check(model: nn.Module, num_classes: int) -> None:
    """Register (once) a forward pre-hook running :func:`check_detection_targets` on ``model``."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, _TargetCheck):
            hook.num_classes = num_classes
            return
    model.register_forward_pre_hook(_TargetCheck(num_classes), with_kwargs=True)
