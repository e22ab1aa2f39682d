"""Offline bootstrapping: mine a trained detector's confident false positives and train on them again.

Bootstrapping (Sung and Poggio, 1994/1998; used for detectors by Felzenszwalb et al., TPAMI 2010, and
R-CNN's hard negative mining) alternates training with a pass over the training set that collects the
detector's false positives, which are then over-represented in the next round. Here the pass is
:func:`find_hard_negatives` over a trained model's detections (``model.eval()`` outputs, in the original
image's pixel coordinates), and the result, a :class:`HardNegativeSet`, is used two ways:

* image level: :meth:`HardNegativeSet.sampling_weights` gives every image a weight ``>= 1`` that grows with
  its number of hard false positives, for ``torch.utils.data.WeightedRandomSampler`` or directly as the
  repeat factors of :class:`~detbalance.sampling.RepeatFactorSampler`;
* RoI level: :class:`BootstrapHook` is the training hook that runs the mining pass on the un-augmented
  training images at scheduled steps and hands the boxes to the dataset
  (:meth:`~detbalance.data.DetectionDataset.set_mined_boxes`); the dataset emits them as
  ``target["mined_boxes"]`` *before* augmentation, so they follow flips and crops, and the Faster R-CNN
  head adds them to the proposals as extra background RoIs (sampled first by
  :class:`~detbalance.sampling.BootstrappedSampler`). The engine only calls the hook; it does not know
  which remedy it serves.

A false positive here is a *background* error: a detection with ``score >= score_threshold`` whose IoU with
every ground-truth box (of any class) is ``< iou``. A detection on an object of another class is a
classification error, not background, and would be labelled foreground by the RoI head's assignment, so it
is not mined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from detbalance.sampling.assign import check_boxes, check_fraction
from detbalance.types import DetectionTarget

__all__ = ["BootstrapHook", "HardNegativeSet", "build_bootstrap_hook", "find_hard_negatives"]


def find_hard_negatives(
    detections: Sequence[Mapping[str, Tensor]],
    targets: Sequence[DetectionTarget],
    *,
    iou: float = 0.5,
    score_threshold: float = 0.5,
    max_per_image: int | None = None,
) -> HardNegativeSet:
    """Collect confident background false positives per image.

    Args:
        detections: per image, torchvision's eval output ``{"boxes": Tensor[D, 4], "scores": Tensor[D], ...}``.
        targets: per image, the ground truth (:class:`~detbalance.types.DetectionTarget` with ``boxes`` in the
            same coordinates and an ``image_id``); images with no objects are included (every confident
            detection there is a false positive).
        iou: a detection with IoU ``>= iou`` with some ground-truth box is not a background false positive
            (the PASCAL/COCO match threshold 0.5).
        score_threshold: only detections with ``score >= score_threshold`` count as confident (default 0.5).
        max_per_image: keep at most this many per image, the highest-scoring; ``None`` keeps all.

    Returns:
        A :class:`HardNegativeSet` over every image passed (also those with no false positive).

    Raises:
        ValueError: if the lists differ in length, thresholds are outside ``[0, 1]``, boxes are degenerate or
            an ``image_id`` repeats.
    """
    if len(detections) != len(targets):
        raise ValueError(f"detections and targets must have the same length, got {len(detections)} and {len(targets)}")
    check_fraction(iou, "iou")
    check_fraction(score_threshold, "score_threshold")
    if max_per_image is not None and (
        isinstance(max_per_image, bool) or not isinstance(max_per_image, int) or max_per_image < 0
    ):
        raise ValueError(f"max_per_image must be a non-negative int or None, got {max_per_image!r}")
    mined = HardNegativeSet(iou=iou, score_threshold=score_threshold)
    for i, (det, target) in enumerate(zip(detections, targets, strict=True)):
        boxes, scores = det["boxes"], det["scores"]
        check_boxes(boxes, f"detections[{i}]['boxes']")
        if scores.shape != (boxes.shape[0],):
            raise ValueError(f"detections[{i}]['scores'] must have shape [{boxes.shape[0]}], got {tuple(scores.shape)}")
        gt = target["boxes"].to(boxes)
        check_boxes(gt, f"targets[{i}]['boxes']")
        confident = scores >= score_threshold
        if gt.shape[0]:
            confident &= box_iou(boxes, gt).max(dim=1).values < iou
        boxes, scores = boxes[confident], scores[confident]
        order = scores.sort(descending=True, stable=True).indices
        if max_per_image is not None:
            order = order[:max_per_image]
        image_id = int(target["image_id"])
        if image_id in mined:
            raise ValueError(f"targets[{i}]['image_id'] = {image_id} appears twice")
        mined.add(image_id, boxes[order], scores[order])
    return mined


class HardNegativeSet:
    """Mined hard negatives keyed by ``image_id``; checkpointable as tensors only.

    Round trip (the state dict holds only tensors, so it loads with ``weights_only=True``)::

        mined = find_hard_negatives(detections, targets, score_threshold=0.5)
        torch.save(mined.state_dict(), "hard_negatives.pt")
        restored = HardNegativeSet()
        restored.load_state_dict(torch.load("hard_negatives.pt", weights_only=True))
        restored.boxes_for([17, 42])          # [Tensor[n_17, 4], Tensor[n_42, 4]]
        weights = restored.sampling_weights(dataset_image_ids)   # Tensor[N] >= 1

    Args:
        iou: the IoU threshold used when mining (kept for the record).
        score_threshold: the score threshold used when mining (kept for the record).
    """

    def __init__(self, *, iou: float = 0.5, score_threshold: float = 0.5) -> None:
        self.iou = float(iou)
        self.score_threshold = float(score_threshold)
        self._boxes: dict[int, Tensor] = {}
        self._scores: dict[int, Tensor] = {}

    def add(self, image_id: int, boxes: Tensor, scores: Tensor) -> None:
        """Record (or replace) the mined boxes ``Tensor[n, 4]`` and scores ``Tensor[n]`` of one image."""
        check_boxes(boxes, "boxes")
        if scores.shape != (boxes.shape[0],):
            raise ValueError(f"scores must have shape [{boxes.shape[0]}], got {tuple(scores.shape)}")
        self._boxes[int(image_id)] = boxes.detach().to("cpu", torch.float32)
        self._scores[int(image_id)] = scores.detach().to("cpu", torch.float32)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._boxes

    def __len__(self) -> int:
        """Number of images searched (including those without a false positive)."""
        return len(self._boxes)

    @property
    def num_boxes(self) -> int:
        """Total number of mined boxes."""
        return sum(b.shape[0] for b in self._boxes.values())

    def counts(self, image_ids: Iterable[int]) -> Tensor:
        """``Tensor[N] (int64)``: mined boxes per image (0 for images not searched)."""
        return torch.tensor([self._boxes[i].shape[0] if i in self._boxes else 0 for i in map(int, image_ids)],
                            dtype=torch.int64)

    def sampling_weights(
        self,
        image_ids: Iterable[int],
        *,
        per_negative: float = 1.0,
        max_weight: float | None = None,
    ) -> Tensor:
        """Per-image weights ``w = 1 + per_negative * n_fp`` (clipped to ``max_weight``).

        Every weight is ``>= 1``, so the vector can be used as :class:`RepeatFactorSampler` factors (an image
        with ``n`` mined false positives is revisited ``1 + per_negative * n`` times per epoch in expectation)
        or as ``WeightedRandomSampler`` weights.

        Args:
            image_ids: the dataset's image ids, in dataset order.
            per_negative: extra weight per mined false positive, ``>= 0``.
            max_weight: upper bound of a weight (``>= 1``); ``None`` for none.

        Returns:
            ``Tensor[N] (float64)``.
        """
        if isinstance(per_negative, bool) or not isinstance(per_negative, int | float) or not per_negative >= 0:
            raise ValueError(f"per_negative must be a non-negative number, got {per_negative!r}")
        if max_weight is not None and not (isinstance(max_weight, int | float) and max_weight >= 1):
            raise ValueError(f"max_weight must be a number >= 1 or None, got {max_weight!r}")
        weights = 1.0 + float(per_negative) * self.counts(image_ids).double()
        return weights if max_weight is None else weights.clamp(max=float(max_weight))

    def boxes_for(self, image_ids: Iterable[int], *, device: torch.device | str | None = None) -> list[Tensor]:
        """The mined boxes of each image, ``Tensor[n_i, 4]`` (``n_i = 0`` for an image without any).

        The boxes are in the coordinates of the detections they were mined from (torchvision's eval output:
        original image pixels); scale them like the ground truth before adding them to the proposals.
        """
        empty = torch.zeros(0, 4)
        return [self._boxes.get(int(i), empty).to(device) for i in image_ids]

    def scores_for(self, image_ids: Iterable[int], *, device: torch.device | str | None = None) -> list[Tensor]:
        """The detector scores of the mined boxes of each image, ``Tensor[n_i]``."""
        empty = torch.zeros(0)
        return [self._scores.get(int(i), empty).to(device) for i in image_ids]

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors: ``image_ids [U]`` (every image searched), ``counts [U]``, ``boxes [M, 4]``,
        ``scores [M]``, and the thresholds ``iou``, ``score_threshold`` as 0-d tensors."""
        ids = sorted(self._boxes)
        return {
            "image_ids": torch.tensor(ids, dtype=torch.int64),
            "counts": torch.tensor([self._boxes[i].shape[0] for i in ids], dtype=torch.int64),
            "boxes": torch.cat([self._boxes[i] for i in ids]) if ids else torch.zeros(0, 4),
            "scores": torch.cat([self._scores[i] for i in ids]) if ids else torch.zeros(0),
            "iou": torch.tensor(self.iou, dtype=torch.float64),
            "score_threshold": torch.tensor(self.score_threshold, dtype=torch.float64),
        }

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Replace the contents with those of :meth:`state_dict`'s output."""
        expected = {"image_ids", "counts", "boxes", "scores", "iou", "score_threshold"}
        if set(state_dict) != expected:
            raise ValueError(f"state_dict must have keys {sorted(expected)}, got {sorted(state_dict)}")
        ids, counts = state_dict["image_ids"], state_dict["counts"]
        boxes, scores = state_dict["boxes"], state_dict["scores"]
        if ids.shape != counts.shape or int(counts.sum()) != boxes.shape[0] or scores.shape != (boxes.shape[0],):
            raise ValueError(
                f"state_dict is inconsistent: image_ids {tuple(ids.shape)}, counts sum {int(counts.sum())}, "
                f"boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)}"
            )
        split = counts.tolist()
        self._boxes = dict(zip(ids.tolist(), boxes.float().split(split), strict=True))
        self._scores = dict(zip(ids.tolist(), scores.float().split(split), strict=True))
        self.iou = float(state_dict["iou"])
        self.score_threshold = float(state_dict["score_threshold"])


class BootstrapHook:
    """Offline bootstrapping as a training hook: mine at scheduled steps, hand the boxes to the dataset.

    Implements the engine's ``TrainingHook`` protocol (``steps``, ``run``, ``state_dict``,
    ``load_state_dict``). The training budget is split into ``rounds + 1`` equal segments and mining runs
    after each of the first ``rounds`` (:meth:`steps`). A mining pass (:meth:`run`) evaluates the model on
    every *un-augmented* training image (``train_set.load_image`` / ``train_set.target``), keeps the
    confident background false positives (:func:`find_hard_negatives`) and calls
    ``train_set.set_mined_boxes({image_index: Tensor[M, 4]})`` in original image coordinates.

    Args:
        rounds: Mining rounds.
        iou: A detection with IoU ``>= iou`` with a ground-truth box is not a false positive.
        score_threshold: Only detections scoring ``>= score_threshold`` are mined.
        max_per_image: Keep at most this many per image (highest score first); ``None`` keeps all.
        batch_size: Images per forward pass while mining.
    """

    def __init__(
        self,
        *,
        rounds: int = 1,
        iou: float = 0.5,
        score_threshold: float = 0.5,
        max_per_image: int | None = None,
        batch_size: int = 16,
    ) -> None:
        for name, value, minimum in (("rounds", rounds, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        check_fraction(iou, "iou")
        check_fraction(score_threshold, "score_threshold")
        if max_per_image is not None and (
            isinstance(max_per_image, bool) or not isinstance(max_per_image, int) or max_per_image < 1
        ):
            raise ValueError(f"max_per_image must be an int >= 1 or None, got {max_per_image!r}")
        self.rounds = rounds
        self.iou = float(iou)
        self.score_threshold = float(score_threshold)
        self.max_per_image = max_per_image
        self.batch_size = batch_size
        self.rounds_done = 0
        self.mined: dict[int, Tensor] | None = None
        self._datasets: list[Any] = []

    def steps(self, total_steps: int) -> list[int]:
        """Optimiser steps after which :meth:`run` is called: ``round(r * total / (rounds + 1))``."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < self.rounds + 1:
            raise ValueError(f"total_steps must be an int >= rounds + 1 = {self.rounds + 1}, got {total_steps!r}")
        return [round(r * total_steps / (self.rounds + 1)) for r in range(1, self.rounds + 1)]

    def attach(self, train_set: Any) -> None:
        """Give ``train_set`` the current mined boxes now and after every later :meth:`load_state_dict`."""
        if all(d is not train_set for d in self._datasets):
            self._datasets.append(train_set)
        if self.mined is not None:
            train_set.set_mined_boxes(self.mined)

    @torch.no_grad()
    def run(self, step: int, *, model: nn.Module, train_set: Any, device: torch.device) -> dict[str, Any]:
        """Mine every training image (this rank's share under DDP, gathered) and set the dataset's boxes.

        Returns:
            The log record ``{"type": "bootstrap", "step", "round", "hard_negatives", "images"}``.
        """
        import torch.distributed as dist

        net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        was_training = net.training
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        indices = list(range(rank, len(train_set), world))
        detections: list[dict[str, Tensor]] = []
        targets: list[dict[str, Any]] = []
        net.eval()
        try:
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                images = [train_set.load_image(i).to(device=device, dtype=torch.float32).div_(255.0) for i in chunk]
                outputs = net(images)
                detections += [{k: v.detach().cpu() for k, v in o.items()} for o in outputs]
                targets += [{"boxes": train_set.target(i)["boxes"], "image_id": i} for i in chunk]
        finally:
            net.train(was_training)
        found = find_hard_negatives(
            detections, targets, iou=self.iou, score_threshold=self.score_threshold,
            max_per_image=self.max_per_image,
        )
        mined = {i: b for i, b in zip(indices, found.boxes_for(indices))}
        if distributed:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, mined)
            mined = {k: v for part in parts for k, v in part.items()}
        self.mined = mined
        self.rounds_done += 1
        self.attach(train_set)
        return {
            "type": "bootstrap",
            "step": int(step),
            "round": self.rounds_done,
            "hard_negatives": int(sum(b.shape[0] for b in mined.values())),
            "images": int(sum(1 for b in mined.values() if b.shape[0])),
        }

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (loads with ``weights_only=True``): rounds done, image indices, counts, boxes."""
        ids = sorted(self.mined) if self.mined is not None else []
        return {
            "rounds_done": torch.tensor(self.rounds_done, dtype=torch.int64),
            "has_mined": torch.tensor(self.mined is not None),
            "image_index": torch.tensor(ids, dtype=torch.int64),
            "counts": torch.tensor([self.mined[i].shape[0] for i in ids] if self.mined else [], dtype=torch.int64),
            "boxes": torch.cat([self.mined[i] for i in ids]) if ids and self.mined else torch.zeros(0, 4),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the mined boxes go back to every attached dataset.

        Raises:
            ValueError: on missing keys or inconsistent shapes.
        """
        expected = {"rounds_done", "has_mined", "image_index", "counts", "boxes"}
        if set(state) != expected:
            raise ValueError(f"state must have keys {sorted(expected)}, got {sorted(state)}")
        ids, counts, boxes = state["image_index"], state["counts"], state["boxes"]
        if ids.shape != counts.shape or int(counts.sum()) != boxes.shape[0]:
            raise ValueError(
                f"state is inconsistent: image_index {tuple(ids.shape)}, counts sum {int(counts.sum())}, "
                f"boxes {tuple(boxes.shape)}"
            )
        self.rounds_done = int(state["rounds_done"])
        self.mined = (
            dict(zip(ids.tolist(), boxes.float().split(counts.tolist()), strict=True))
            if bool(state["has_mined"]) else None
        )
        for dataset in self._datasets:
            dataset.set_mined_boxes(self.mined)


def build_bootstrap_hook(cfg_section: Any) -> BootstrapHook:
    """A :class:`BootstrapHook` from a ``[remedy.bootstrap]`` section (``rounds``, ``iou``,
    ``score_threshold``, ``max_per_image``); pure, reads no file."""
    return BootstrapHook(
        rounds=cfg_section.rounds, iou=cfg_section.iou, score_threshold=cfg_section.score_threshold,
        max_per_image=cfg_section.max_per_image,
    )
