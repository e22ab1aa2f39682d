"""Joint image + box transforms: presets on :mod:`torchvision.transforms.v2`.

Every preset returns a :class:`DetectionTransform`: a callable ``(image, target) -> (image, target)`` that
takes and returns *plain* tensors (``image`` ``Tensor[3, H, W]`` float in ``[0, 1]`` or uint8,
``target["boxes"]`` ``Tensor[G, 4]`` xyxy) and wraps them as ``tv_tensors`` inside, so that every box
moves with its image by torchvision's own geometry and ``SanitizeBoundingBoxes`` removes a degenerate box
together with its label. Randomness comes from torch's global generator (``torch.manual_seed`` makes a
preset deterministic), as in torchvision.

Bootstrapped boxes (``target["mined_boxes"]``, ``Tensor[M, 4]`` xyxy, see
:meth:`~detbalance.data.DetectionDataset.set_mined_boxes`) are wrapped as a second ``BoundingBoxes`` entry, so
flip, zoom-out, crop and resize move them exactly as they move the ground truth; the IoU crop and the
sanitising step handle the two box sets separately (torchvision's versions assume one box set per sample),
and the crop is chosen from the ground truth alone, as without mined boxes.

Note that torchvision detectors resize their inputs themselves (``GeneralizedRCNNTransform``) and map
predictions back to the size of the image they were given; ``size`` here is for fixed-size training
inputs such as SSD's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detbalance.types import DetectionTarget

__all__ = ["SSD_FILL", "DetectionTransform", "eval_transform", "train_basic", "train_ssd"]

SSD_FILL: tuple[float, float, float] = (123 / 255, 117 / 255, 104 / 255)
"""Zoom-out fill of torchvision's SSD reference recipe (its uint8 mean ``(123, 117, 104)``) on the [0, 1] scale."""

Size = int | tuple[int, int]

MINED_BOXES_KEY = "mined_boxes"


class DetectionTransform:
    """Applies a ``torchvision.transforms.v2`` pipeline to ``(image, target)`` with plain tensors outside.

    Args:
        transforms: the v2 transforms (or plain ``(image, target) -> (image, target)`` callables), in order.
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)
        self.pipeline = v2.Compose(self.transforms) if self.transforms else None

    def __call__(self, image: Tensor, target: DetectionTarget) -> tuple[Tensor, DetectionTarget]:
        """Transform one sample.

        Args:
            image: ``Tensor[C, H, W]``.
            target: dict with ``boxes`` ``Tensor[G, 4]`` (xyxy, pixels) and ``labels`` ``Tensor[G]``; other
                keys pass through unchanged.

        Returns:
            ``(image, target)`` as plain tensors; ``boxes`` float32.
        """
        if image.dim() != 3:
            raise ValueError(f"image must be Tensor[C, H, W], got shape {tuple(image.shape)}")
        if self.pipeline is None:
            return image, target
        boxes = target["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target['boxes'] must be Tensor[G, 4], got shape {tuple(boxes.shape)}")
        sample = dict(target)
        keys = ["boxes"] + ([MINED_BOXES_KEY] if MINED_BOXES_KEY in target else [])
        for key in keys:
            if target[key].dim() != 2 or target[key].shape[-1] != 4:
                raise ValueError(f"target[{key!r}] must be Tensor[M, 4], got shape {tuple(target[key].shape)}")
            sample[key] = tv_tensors.BoundingBoxes(
                target[key].to(torch.float32),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=tuple(image.shape[-2:]),
            )
        out_image, out_target = self.pipeline(tv_tensors.Image(image), sample)
        for key in keys:
            out_target[key] = out_target[key].as_subclass(Tensor).to(torch.float32)
        return out_image.as_subclass(Tensor), out_target

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"DetectionTransform([\n    {inner}\n])" if inner else "DetectionTransform([])"


class _SkipWithoutBoxes:
    """Apply ``transform`` only to samples that have at least one box.

    ``RandomIoUCrop`` looks for a crop containing a box centre and, for an image without boxes, only
    stops when it happens to draw its "keep the whole image" option; skipping it is what it converges to.
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if target["boxes"].shape[0] == 0:
            return image, target
        return self.transform(image, target)

    def __repr__(self) -> str:
        return f"_SkipWithoutBoxes({self.transform!r})"


class _IoUCrop(v2.RandomIoUCrop):
    """torchvision's ``RandomIoUCrop`` (same crop, chosen from the ground truth) for every box set.

    torchvision marks the boxes whose centre leaves the crop with the mask of the *first* box set; here
    each ``BoundingBoxes`` entry gets the mask of its own centres (identical for the ground truth).
    """

    def transform(self, inpt, params):  # type: ignore[no-untyped-def]  # torchvision's signature
        if len(params) < 1 or not isinstance(inpt, tv_tensors.BoundingBoxes):
            return super().transform(inpt, params)
        xyxy = F.convert_bounding_box_format(
            inpt.as_subclass(Tensor), inpt.format, tv_tensors.BoundingBoxFormat.XYXY
        )
        cx, cy = 0.5 * (xyxy[..., 0] + xyxy[..., 2]), 0.5 * (xyxy[..., 1] + xyxy[..., 3])
        left, top = params["left"], params["top"]
        right, bottom = left + params["width"], top + params["height"]
        within = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
        output = F.crop(inpt, top=top, left=left, height=params["height"], width=params["width"])
        output[~within] = 0  # degenerate: removed by the sanitising step, as in torchvision
        return output


class _Sanitize:
    """``SanitizeBoundingBoxes`` on the ground truth (with its labels), then on the mined boxes alone."""

    def __init__(self) -> None:
        self.gt = v2.SanitizeBoundingBoxes()
        self.mined = v2.SanitizeBoundingBoxes(labels_getter=None)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        mined = target.pop(MINED_BOXES_KEY, None)
        image, target = self.gt(image, target)
        if mined is not None:
            target[MINED_BOXES_KEY] = self.mined({"boxes": mined})["boxes"]
        return image, target

    def __repr__(self) -> str:
        return "SanitizeBoundingBoxes()"


def _resize(size: Size | None) -> list[Callable]:
    if size is None:
        return []
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise ValueError(
            f"size must be a positive int or a (height, width) pair of positive ints, got {size!r}"
        )
    return [v2.Resize(hw, antialias=True)]


def train_basic(*, size: Size | None = None, flip: float | None = 0.5) -> DetectionTransform:
    """Horizontal flip and an optional resize: the standard detection training augmentation.

    Args:
        size: output size; an int gives a square ``size x size`` image, a pair is ``(height, width)``
            (both change the aspect ratio as needed, unlike ``v2.Resize(int)``). ``None`` keeps the size.
        flip: probability of a horizontal flip; ``None`` or 0 disables it.

    Boxes that a resize shrinks below 1 px are removed with their labels (``SanitizeBoundingBoxes``).
    """
    if flip is not None and not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must be a probability in [0, 1] or None, got {flip!r}")
    steps: list[Callable] = []
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=flip))
    resize = _resize(size)
    if resize:
        steps += [*resize, v2.ClampBoundingBoxes(), _Sanitize()]
    return DetectionTransform(steps)


def train_ssd(
    *,
    size: Size,
    fill: float | tuple[float, float, float] = SSD_FILL,
    zoom_out: tuple[float, float] = (1.0, 4.0),
    flip: float | None = 0.5,
) -> DetectionTransform:
    """The SSD data augmentation (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, sec. 2.2).

    As in torchvision's SSD reference recipe: ``RandomPhotometricDistort`` -> ``RandomZoomOut`` (expand
    the canvas up to ``zoom_out[1]`` times, filled with ``fill``; p = 0.5) -> ``RandomIoUCrop`` (a patch
    whose IoU with some object is at least one of {0.1, 0.3, 0.5, 0.7, 0.9}, or the whole image) ->
    ``RandomHorizontalFlip`` -> resize to ``size`` -> ``ClampBoundingBoxes`` -> ``SanitizeBoundingBoxes``
    (drops boxes cropped away or shrunk below 1 px, with their labels). Images without boxes skip the
    IoU crop.

    Args:
        size: output size (int: square; pair: ``(height, width)``).
        fill: zoom-out fill for float images in [0, 1] (a value or one per channel).
        zoom_out: ``side_range`` of ``RandomZoomOut``.
        flip: horizontal-flip probability; ``None`` or 0 disables it.
    """
    if flip is not None and not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must be a probability in [0, 1] or None, got {flip!r}")
    if not (len(zoom_out) == 2 and 1.0 <= zoom_out[0] <= zoom_out[1]):
        raise ValueError(f"zoom_out must be a (min, max) pair with 1 <= min <= max, got {zoom_out!r}")
    steps: list[Callable] = [
        v2.RandomPhotometricDistort(),
        v2.RandomZoomOut(fill=fill, side_range=tuple(zoom_out)),
        _SkipWithoutBoxes(_IoUCrop()),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=flip))
    steps += [*_resize(size), v2.ClampBoundingBoxes(), _Sanitize()]
    return DetectionTransform(steps)


def eval_transform(*, size: Size | None = None) -> DetectionTransform:
    """Evaluation transform: an optional deterministic resize (``None``: identity), no box is dropped.

    Args:
        size: output size (int: square; pair: ``(height, width)``), or ``None``.
    """
    return DetectionTransform(_resize(size))
