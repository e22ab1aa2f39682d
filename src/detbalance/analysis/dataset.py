"""Class imbalance of a dataset: instances and images per class, objects per image, empty images, COCO box
sizes, and the repeat factors of LVIS repeat-factor sampling (Gupta et al., 2019) that
:class:`detbalance.sampling.RepeatFactorSampler` would use (image factors from
:func:`detbalance.sampling.repeat_factors` itself).

Every result is a frozen dataclass holding only JSON-native values; undefined ratios are ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from detbalance.types import DetectionTarget

__all__ = ["COCO_MEDIUM_AREA", "COCO_SMALL_AREA", "DatasetStats", "class_repeat_factors", "dataset_stats"]


COCO_SMALL_AREA: float = 32.0**2
"""COCO "small": box area < 32^2 pixels."""
COCO_MEDIUM_AREA: float = 96.0**2



@dataclass(frozen=True)
class DatasetStats:
    """Class, size and density statistics of a detection dataset's ground truth.

    Attributes:
        num_images: number of images.
        num_objects: number of ground-truth boxes.
        num_empty_images: images without any box.
        objects_per_image_mean: mean boxes per image (empty images included).
        objects_per_image_max: most boxes in one image.
        objects_per_image_hist: ``hist[n]`` = number of images with exactly ``n`` boxes.
        class_names: ``K`` names, index ``k - 1`` for label ``k``.
        instance_counts: boxes per class (``K``).
        image_counts: images containing the class at least once (``K``); LVIS's ``f(c) * num_images``.
        imbalance_ratio: most frequent / least frequent instance count over the classes present
            (``None`` when fewer than one class is present).
        most_common: name of the class with the most instances (``None`` if no boxes).
        rarest: name of the present class with the fewest instances (``None`` if no boxes).
        absent_classes: names of classes with no instance.
        size_counts: ``{"small", "medium", "large"}`` box counts under COCO's area thresholds
            (area = box width x height in pixels; 32^2 and 96^2).
        sqrt_area_edges: bin edges (pixels) of ``sqrt_area_hist``, log2-spaced.
        sqrt_area_hist: boxes per ``sqrt(area)`` bin (values outside the edges go to the end bins).
        repeat_threshold: LVIS threshold ``t``.
        class_repeat_factors: ``r(c) = max(1, sqrt(t / f(c)))`` per class, ``f(c)`` = fraction of images
            containing ``c`` (``1.0`` for absent classes, which never enter an image's maximum).
        image_repeat_factors_mean: mean over images of ``r(i) = max_{c in i} r(c)`` (as the sampler uses).
        image_repeat_factors_max: largest image repeat factor.
        num_images_repeated: images with ``r(i) > 1``.
        expected_epoch_size: ``sum_i r(i)``, the images one repeat-factor epoch draws in expectation.
    """

    num_images: int
    num_objects: int
    num_empty_images: int
    objects_per_image_mean: float
    objects_per_image_max: int
    objects_per_image_hist: list[int]
    class_names: list[str]
    instance_counts: list[int]
    image_counts: list[int]
    imbalance_ratio: float | None
    most_common: str | None
    rarest: str | None
    absent_classes: list[str]
    size_counts: dict[str, int]
    sqrt_area_edges: list[float]
    sqrt_area_hist: list[int]
    repeat_threshold: float
    class_repeat_factors: list[float]
    image_repeat_factors_mean: float
    image_repeat_factors_max: float
    num_images_repeated: int
    expected_epoch_size: float


def class_repeat_factors(image_counts: Tensor, num_images: int, *, threshold: float = 0.001) -> Tensor:
    """LVIS class repeat factors ``r(c) = max(1, sqrt(t / f(c)))`` (Gupta et al., 2019, section 4).

    Args:
        image_counts: ``Tensor[K]``, images containing each class.
        num_images: dataset size (``f(c) = image_counts[c] / num_images``).
        threshold: ``t``; classes in fewer than ``t * num_images`` images are oversampled.

    Returns:
        ``Tensor[K]`` float64; ``1.0`` for classes with no image (they cannot raise any image's factor).
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    freq = image_counts.to(torch.float64) / num_images
    r = torch.sqrt(threshold / freq.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(1.0)
    return torch.where(image_counts > 0, r, torch.ones_like(r))


def _flatten_targets(targets: Sequence[DetectionTarget]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Concatenate targets: boxes[M, 4] float64, labels[M], image index[M], boxes per image[N]."""
    counts = torch.tensor([int(t["labels"].numel()) for t in targets], dtype=torch.int64)
    if int(counts.sum()) == 0:
        return (
            torch.zeros(0, 4, dtype=torch.float64),
            torch.zeros(0, dtype=torch.int64),
            counts.new_zeros(0),
            counts,
        )
    boxes = torch.cat([t["boxes"].reshape(-1, 4).to(torch.float64) for t in targets])
    labels = torch.cat([t["labels"].reshape(-1).to(torch.int64) for t in targets])
    image = torch.repeat_interleave(torch.arange(len(targets)), counts)
    return boxes, labels, image, counts


def dataset_stats(
    targets: Sequence[DetectionTarget],
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    repeat_threshold: float = 0.001,
) -> DatasetStats:
    """Class imbalance, box sizes and repeat factors of a dataset, from its targets alone (no images).

    Args:
        targets: one :class:`~detbalance.types.DetectionTarget` per image (``boxes: Tensor[G, 4]`` absolute
            ``x1y1x2y2`` pixels, ``labels: Tensor[G]`` in ``1..K``).
        num_classes: ``K``.
        class_names: ``K`` names (index ``k - 1`` for label ``k``); default ``"1".."K"``.
        repeat_threshold: LVIS repeat-factor threshold ``t`` (paper default 0.001).

    Returns:
        :class:`DatasetStats`.

    Raises:
        ValueError: empty dataset, labels outside ``1..K``, or ``class_names`` of the wrong length.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(targets) == 0:
        raise ValueError("targets is empty: the dataset has no images to profile")
    names = (
        [str(k) for k in range(1, num_classes + 1)] if class_names is None else [str(n) for n in class_names]
    )
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names, expected num_classes={num_classes}")
    boxes, labels, image, per_image = _flatten_targets(targets)
    num_images = len(targets)
    if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
        raise ValueError(
            f"target labels must lie in 1..{num_classes}, got min {int(labels.min())}, max {int(labels.max())}"
        )

    instance_counts = (
        torch.bincount(labels - 1, minlength=num_classes)
        if labels.numel()
        else torch.zeros(num_classes, dtype=torch.int64)
    )
    pairs = torch.unique(image * (num_classes + 1) + labels)  # distinct (image, class) pairs
    image_counts = (
        torch.bincount(pairs % (num_classes + 1) - 1, minlength=num_classes)
        if pairs.numel()
        else (torch.zeros(num_classes, dtype=torch.int64))
    )

    present = instance_counts > 0
    if bool(present.any()):
        big = int(instance_counts.argmax())
        masked = torch.where(present, instance_counts, instance_counts.max() + 1)
        small = int(masked.argmin())
        ratio: float | None = float(instance_counts[big]) / float(instance_counts[small])
        most_common, rarest = names[big], names[small]
    else:
        ratio, most_common, rarest = None, None, None

    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0)
    area = wh[:, 0] * wh[:, 1]
    size_counts = {
        "small": int((area < COCO_SMALL_AREA).sum()),
        "medium": int(((area >= COCO_SMALL_AREA) & (area < COCO_MEDIUM_AREA)).sum()),
        "large": int((area >= COCO_MEDIUM_AREA).sum()),
    }
    edges = torch.pow(2.0, torch.arange(0.0, 11.01, 0.5, dtype=torch.float64))  # 1 .. 2048 px
    idx = (torch.bucketize(area.sqrt(), edges, right=True) - 1).clamp(0, len(edges) - 2)
    sqrt_area_hist = torch.bincount(idx, minlength=len(edges) - 1)

    r_class = class_repeat_factors(image_counts, num_images, threshold=repeat_threshold)
    r_image = _image_repeat_factors(labels, image, num_images, repeat_threshold)

    return DatasetStats(
        num_images=num_images,
        num_objects=int(labels.numel()),
        num_empty_images=int((per_image == 0).sum()),
        objects_per_image_mean=float(per_image.double().mean()),
        objects_per_image_max=int(per_image.max()),
        objects_per_image_hist=torch.bincount(per_image).tolist(),
        class_names=names,
        instance_counts=instance_counts.tolist(),
        image_counts=image_counts.tolist(),
        imbalance_ratio=ratio,
        most_common=most_common,
        rarest=rarest,
        absent_classes=[n for n, p in zip(names, present.tolist()) if not p],
        size_counts=size_counts,
        sqrt_area_edges=edges.tolist(),
        sqrt_area_hist=sqrt_area_hist.tolist(),
        repeat_threshold=float(repeat_threshold),
        class_repeat_factors=r_class.tolist(),
        image_repeat_factors_mean=float(r_image.mean()),
        image_repeat_factors_max=float(r_image.max()),
        num_images_repeated=int((r_image > 1.0).sum()),
        expected_epoch_size=float(r_image.sum()),
    )


def _image_repeat_factors(labels: Tensor, image: Tensor, num_images: int, threshold: float) -> Tensor:
    """``r(i) = max_{c in image i} r(c)`` (1 for images without boxes), from the sampler's own function.

    :func:`detbalance.sampling.repeat_factors` is what :class:`~detbalance.sampling.RepeatFactorSampler`
    draws with, so the numbers reported are the sampler's.
    """
    from detbalance.sampling.repeat_factor import repeat_factors

    categories: list[list[int]] = [[] for _ in range(num_images)]
    for i, c in zip(image.tolist(), labels.tolist()):
        categories[i].append(c)
    return repeat_factors(categories, threshold=threshold, sqrt=True).to(torch.float64)


