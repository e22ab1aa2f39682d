"""COCO box AP with the official evaluator (faster-coco-eval; pycocotools gives the same numbers, a test).

:func:`predict` runs a detector over a loader and returns COCO result records; :func:`coco_metrics` scores
records against COCO ground truth; :func:`evaluate` does both (gathering the records of every rank
under DDP). Metrics are fractions in ``[0, 1]``; a value COCO cannot define (no ground truth in that
area range or class) is ``nan``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detbalance.engine.distributed import all_gather_objects, unwrap

__all__ = ["COCO_METRICS", "coco_metrics", "evaluate", "predict"]

#: The first six COCO summary statistics, in ``COCOeval.stats`` order.
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Any]]]],
    *,
    device: torch.device | str = "cpu",
    image_sizes: dict[int, tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """Detections as COCO result records ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

    Labels ``1..K`` become category ids ``1..K`` (the ids of :meth:`DetectionDataset.to_coco_dict`).

    Args:
        model: A torchvision detector; it is put in eval mode for the pass and restored afterwards.
        loader: Yields ``(images, targets)``; each target's ``image_id`` names the image.
        device: Where images are moved.
        image_sizes: ``image_id -> (height, width)`` of the ground truth; boxes of images fed at another
            size (a resizing eval transform) are scaled back to it. ``None``: no rescaling.
    """
    device = torch.device(device)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    records: list[dict[str, Any]] = []
    try:
        for images, targets in loader:
            outputs = net([img.to(device) for img in images])
            for img, target, out in zip(images, targets, outputs):
                image_id = int(target["image_id"])
                boxes = out["boxes"].detach().to("cpu", torch.float64)
                if image_sizes is not None and image_id in image_sizes:
                    h0, w0 = image_sizes[image_id]
                    h, w = img.shape[-2:]
                    if (h, w) != (h0, w0):
                        boxes = boxes * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=torch.float64)
                xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
                scores = out["scores"].detach().cpu().tolist()
                labels = out["labels"].detach().cpu().tolist()
                records.extend(
                    {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
                    for b, s, c in zip(xywh, scores, labels)
                )
    finally:
        net.train(was_training)
    return records


def coco_metrics(
    gt: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    *,
    label_names: Sequence[str] | None = None,
    backend: str = "faster_coco_eval",
) -> dict[str, Any]:
    """COCO bbox metrics of ``detections`` against the ground truth dict ``gt``.

    Args:
        gt: COCO ground truth (``images``, ``annotations``, ``categories``).
        detections: COCO result records (see :func:`predict`).
        label_names: Names for ``per_class`` (category ``k`` is ``label_names[k - 1]``); ``None`` uses the
            categories' names.
        backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"`` (the reference, for the tests).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (IoU 0.5:0.95 / 0.5 / 0.75, area ranges; 100
        detections per image) and ``"per_class": {name: AP}``: per category, the mean precision over IoU
        thresholds and recall points at area "all" (as detectron2 computes it).
    """
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval

        coco_gt = COCO(_copy_gt(gt))
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        coco_gt = COCO()
        coco_gt.dataset = _copy_gt(gt)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
    else:
        raise ValueError(f"backend must be 'faster_coco_eval' or 'pycocotools', got {backend!r}")
    cats = sorted(c["id"] for c in gt["categories"])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    if label_names is not None:
        names = {k: label_names[k - 1] for k in cats}
    if not detections:
        has = _areas_with_gt(gt)
        metrics: dict[str, Any] = {k: (0.0 if has[k] else math.nan) for k in COCO_METRICS}
        cat_has_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
        metrics["per_class"] = {names[k]: (0.0 if k in cat_has_gt else math.nan) for k in cats}
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats[: len(COCO_METRICS)]]
    metrics = {k: (math.nan if s < 0 else s) for k, s in zip(COCO_METRICS, stats)}
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    cat_ids = list(ev.params.catIds)
    per_class = {}
    for k in cats:
        p = precision[:, :, cat_ids.index(k), 0, -1]
        p = p[p > -1]
        per_class[names[k]] = float(p.mean()) if p.size else math.nan
    metrics["per_class"] = per_class
    return metrics


def _copy_gt(gt: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in gt.items() if k not in ("images", "annotations", "categories")}
    out["images"] = [dict(r) for r in gt["images"]]
    out["annotations"] = [dict(r) for r in gt["annotations"]]
    out["categories"] = [dict(r) for r in gt["categories"]]
    return out


def _areas_with_gt(gt: dict[str, Any]) -> dict[str, bool]:
    areas = [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in gt["annotations"] if not a.get("iscrowd", 0)]
    return {
        "AP": bool(areas),
        "AP50": bool(areas),
        "AP75": bool(areas),
        "APs": any(a < 32**2 for a in areas),
        "APm": any(32**2 <= a < 96**2 for a in areas),
        "APl": any(a >= 96**2 for a in areas),
    }


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Any]]]],
    *,
    device: torch.device | str = "cpu",
    gt: dict[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """COCO AP of ``model`` on ``loader`` (see :func:`coco_metrics` for the keys).

    Under DDP each rank predicts its shard of the loader; the records are gathered and every rank gets
    the same metrics.

    Args:
        model: A torchvision detector.
        loader: Yields ``(images, targets)``; its ``dataset`` gives the ground truth when ``gt`` is None.
        device: Where images are moved.
        gt: COCO ground truth; ``None`` takes ``loader.dataset.to_coco_dict()``.
        label_names: Class names for ``per_class``; ``None`` takes ``loader.dataset.label_names``.
    """
    dataset = getattr(loader, "dataset", None)
    if gt is None:
        if dataset is None or not hasattr(dataset, "to_coco_dict"):
            raise ValueError("evaluate needs gt= when loader.dataset has no to_coco_dict()")
        gt = dataset.to_coco_dict()
    if label_names is None and dataset is not None:
        label_names = getattr(dataset, "label_names", None)
    sizes = {int(r["id"]): (int(r["height"]), int(r["width"])) for r in gt["images"] if "height" in r}
    records = predict(model, loader, device=device, image_sizes=sizes)
    gathered = [r for part in all_gather_objects(records) for r in part]
    return coco_metrics(gt, gathered, label_names=label_names)
