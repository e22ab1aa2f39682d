"""The interface every detbalance dataset implements, the error type for bad data, and the collate function.

A detbalance dataset is a ``torch.utils.data.Dataset`` of ``(image, target)`` pairs where ``image`` is a
``Tensor[3, H, W]`` float32 in ``[0, 1]`` and ``target`` a :class:`~detbalance.types.DetectionTarget`
(``boxes`` ``Tensor[G, 4]`` float32 absolute ``(x1, y1, x2, y2)``, ``labels`` ``Tensor[G]`` int64 in
``1..K``, ``image_id`` int). Besides ``__len__``/``__getitem__`` it answers the questions the samplers,
the evaluator and the statistics need *without decoding images*: :meth:`DetectionDataset.target`,
:meth:`DetectionDataset.image_size`, :meth:`DetectionDataset.categories_per_image` and
:meth:`DetectionDataset.to_coco_dict`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from detbalance.types import DetectionTarget

__all__ = ["DatasetError", "DetectionDataset", "Transform", "collate_detection"]

Transform = Callable[[Tensor, DetectionTarget], tuple[Tensor, DetectionTarget]]
"""A joint transform: ``(image Tensor[3, H, W], target) -> (image, target)``, see :mod:`.transforms`."""

_MAX_LISTED_PROBLEMS = 20


class DatasetError(ValueError):
    """Invalid dataset content. ``problems`` lists *every* problem found, each naming its image/annotation.

    The message shows the source, the first 20 problems and the total count, so one run of the loader
    reports everything that needs fixing instead of crashing on the first bad record.
    """

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems: list[str] = list(problems)
        shown = self.problems[:_MAX_LISTED_PROBLEMS]
        lines = [f"{source}: {len(self.problems)} problem(s) found:"]
        lines += [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more (see DatasetError.problems)")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable across DataLoader workers despite the two-argument constructor
        return type(self), (self.source, self.problems)


class DetectionDataset(Dataset, ABC):
    """Abstract base of detbalance datasets (COCO files and the built-in benchmark).

    Subclasses set ``label_names`` (``list[str]``, index ``k - 1`` names label ``k``) and ``transforms``
    (a :data:`Transform` or ``None``) and implement :meth:`__len__`, :meth:`load_image`, :meth:`target`
    and :meth:`image_size`.
    """

    label_names: list[str]
    transforms: Transform | None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load_image(self, index: int) -> Tensor:
        """The untransformed image ``index`` as ``Tensor[3, H, W]`` uint8."""

    @abstractmethod
    def target(self, index: int) -> DetectionTarget:
        """The untransformed ground truth of image ``index``, without decoding the image."""

    @abstractmethod
    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of image ``index`` in pixels, without decoding the image."""

    @property
    def num_classes(self) -> int:
        """``K``, the number of object classes (labels run ``1..K``; 0 is background)."""
        return len(self.label_names)

    def set_mined_boxes(self, boxes: Mapping[int, Tensor] | None) -> None:
        """Attach bootstrapped boxes (confident false positives of an earlier model) to the images.

        After this call every item's target carries ``target["mined_boxes"]`` (``Tensor[M, 4]`` float32,
        xyxy, ``M = 0`` for an image not in ``boxes``), added *before* :attr:`transforms`, so a flip, crop
        or resize moves the mined boxes exactly as it moves the ground truth. ``None`` removes the key
        again. With ``DataLoader`` workers, call it before the loader's iterator is created.

        Args:
            boxes: ``{image_index: Tensor[M, 4]}`` in the untransformed image's pixel coordinates
                (``image_index`` is the dataset index, as in :meth:`load_image`); replaces what was set.

        Raises:
            ValueError: on an index out of range, or boxes that are not finite ``Tensor[M, 4]`` with
                ``x2 >= x1, y2 >= y1``, naming the index.
        """
        if boxes is None:
            self._mined_boxes: dict[int, Tensor] | None = None
            return
        n = len(self)
        stored: dict[int, Tensor] = {}
        for index, b in boxes.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                raise ValueError(f"set_mined_boxes: image index {index!r} out of range for {n} images")
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4 or not b.is_floating_point():
                raise ValueError(f"set_mined_boxes: boxes of image {index} must be a float Tensor[M, 4], got {b!r}")
            b = b.detach().to("cpu", torch.float32)
            if not bool(torch.isfinite(b).all()) or bool(((b[:, 2:] - b[:, :2]) < 0).any()):
                raise ValueError(f"set_mined_boxes: boxes of image {index} must be finite xyxy boxes, got {b.tolist()}")
            stored[index] = b.clone()
        self._mined_boxes = stored

    def mined_boxes(self, index: int) -> Tensor | None:
        """The untransformed mined boxes of image ``index`` (``None`` when :meth:`set_mined_boxes` is off)."""
        mined = getattr(self, "_mined_boxes", None)
        if mined is None:
            return None
        return mined.get(self._check_index(index), torch.zeros(0, 4)).clone()

    def __getitem__(self, index: int) -> tuple[Tensor, DetectionTarget]:
        """``(image Tensor[3, H, W] float32 in [0, 1], target)``, with ``transforms`` applied if set.

        The target also holds ``"mined_boxes"`` once :meth:`set_mined_boxes` was called.
        """
        index = self._check_index(index)
        image = self.load_image(index).to(torch.float32).div_(255.0)
        target = self.target(index)
        mined = self.mined_boxes(index)
        if mined is not None:
            target = dict(target)  # type: ignore[assignment]  # a DetectionTarget plus "mined_boxes"
            target["mined_boxes"] = mined  # type: ignore[typeddict-unknown-key]
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def categories_per_image(self) -> list[list[int]]:
        """Sorted distinct labels (``1..K``) present in each image (the input of repeat-factor sampling)."""
        return [sorted(set(self.target(i)["labels"].tolist())) for i in range(len(self))]

    def category_ids(self) -> list[int]:
        """The source's category id of each label ``1..K`` (COCO ``categories[].id``; else ``1..K``)."""
        return list(range(1, self.num_classes + 1))

    def to_coco_dict(self) -> dict[str, Any]:
        """COCO ground truth (bbox ``[x, y, w, h]``) with category ids equal to the labels ``1..K``.

        Annotation ids run from 1 (pycocotools treats a matched ground-truth id of 0 as "unmatched").
        """
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i in range(len(self)):
            t = self.target(i)
            h, w = self.image_size(i)
            images.append(
                {"id": int(t["image_id"]), "width": int(w), "height": int(h), "file_name": f"{i:06d}.png"}
            )
            annotations.extend(
                _coco_annotations(t["boxes"], t["labels"], int(t["image_id"]), len(annotations) + 1)
            )
        return {"images": images, "annotations": annotations, "categories": self._coco_categories()}

    def _coco_categories(self) -> list[dict[str, Any]]:
        return [
            {"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(self.label_names)
        ]

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return index % n


def _coco_annotations(
    boxes: Tensor, labels: Tensor, image_id: int, first_id: int, *, iscrowd: int = 0
) -> list[dict[str, Any]]:
    """COCO annotation records for ``boxes`` ``Tensor[G, 4]`` xyxy and ``labels`` ``Tensor[G]``.

    Width and height are computed in float64 from the float32 corners, so ``x + w`` reproduces ``x2``
    exactly when read back and rounded to float32.
    """
    b = boxes.to(torch.float64).tolist()
    out = []
    for j, ((x1, y1, x2, y2), label) in enumerate(zip(b, labels.tolist())):
        w, h = x2 - x1, y2 - y1
        out.append(
            {
                "id": first_id + j,
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": iscrowd,
            }
        )
    return out


def collate_detection(
    batch: Sequence[tuple[Tensor, DetectionTarget]],
) -> tuple[list[Tensor], list[DetectionTarget]]:
    """``DataLoader`` collate function: images and targets as two lists (torchvision detectors take lists).

    Args:
        batch: ``(image, target)`` pairs from a detbalance dataset.

    Returns:
        ``(images, targets)``: ``list[Tensor[3, H_i, W_i]]`` and ``list[DetectionTarget]``, same order.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def check_categories(
    expected_names: Sequence[str],
    expected_ids: Sequence[int] | None,
    got_names: Sequence[str],
    got_ids: Sequence[int] | None,
    *,
    expected: str,
    got: str,
) -> None:
    """Check that two sources give every label ``1..K`` the same category (name and, when both are known,
    source category id).

    Args:
        expected_names / expected_ids: ``label_names`` and :meth:`DetectionDataset.category_ids` of the
            reference (``None`` ids: not compared), e.g. the training data or a checkpoint.
        got_names / got_ids: The same for the other source.
        expected / got: What to call the two sources in the message (``"data.train"``, ``"--data 'x'"``).

    Raises:
        ValueError: naming the first label that differs, or the class counts.
    """
    for k in range(max(len(expected_names), len(got_names))):
        a = _category(expected_names, expected_ids, k)
        b = _category(got_names, got_ids, k)
        if a != b and (a is None or b is None or a[0] != b[0] or None not in (a[1], b[1])):
            raise ValueError(
                f"{got} does not match {expected} ({len(got_names)} vs {len(expected_names)} classes): label "
                f"{k + 1} is {_describe(b)} in {got} but {_describe(a)} in {expected}; the categories (names and "
                "ids, in ascending id order) must be the same"
            )


def _category(names: Sequence[str], ids: Sequence[int] | None, k: int) -> tuple[str, int | None] | None:
    if k >= len(names):
        return None
    return str(names[k]), (None if ids is None else int(ids[k]))


def _describe(c: tuple[str, int | None] | None) -> str:
    if c is None:
        return "missing"
    return repr(c[0]) if c[1] is None else f"{c[0]!r} (category id {c[1]})"
