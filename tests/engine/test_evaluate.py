"""COCO evaluation: known AP cases, agreement with pycocotools, and the predict/evaluate path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detbalance.engine import coco_metrics, evaluate, predict

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 20, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 12], "area": 120, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
}


def _perfect() -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in GT["annotations"]]


def test_perfect_detections_give_ap_one() -> None:
    m = coco_metrics(GT, _perfect())
    assert (m["AP"], m["AP50"], m["AP75"], m["APs"], m["APm"]) == pytest.approx((1.0, 1.0, 1.0, 1.0, 1.0))
    assert math.isnan(m["APl"])  # no large object: COCO's -1 becomes nan
    assert m["per_class"] == pytest.approx({"one": 1.0, "two": 1.0})


def test_no_or_wrong_detections_give_ap_zero() -> None:
    empty = coco_metrics(GT, [])
    assert (empty["AP"], empty["APs"], empty["APm"]) == (0.0, 0.0, 0.0) and math.isnan(empty["APl"])
    assert empty["per_class"] == {"one": 0.0, "two": 0.0}
    wrong = [dict(d, category_id=3 - d["category_id"]) for d in _perfect()]
    assert coco_metrics(GT, wrong)["AP"] == 0.0


def test_one_missed_class_halves_ap() -> None:
    dets = [d for d in _perfect() if d["category_id"] == 1]
    m = coco_metrics(GT, dets, label_names=["a", "b"])
    assert m["per_class"] == pytest.approx({"a": 1.0, "b": 0.0})
    assert m["AP"] == pytest.approx(0.5)


def test_agrees_with_pycocotools() -> None:
    g = torch.Generator().manual_seed(0)
    dets = []
    for a in GT["annotations"]:  # jittered true positives, duplicates and false positives with random scores
        for _ in range(3):
            x, y, w, h = a["bbox"]
            j = (torch.rand(4, generator=g) - 0.5) * torch.tensor([6.0, 6.0, 6.0, 6.0])
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                         "bbox": [x + float(j[0]), y + float(j[1]), w + float(j[2]), h + float(j[3])],
                         "score": float(torch.rand((), generator=g))})
    for i in range(6):
        dets.append({"image_id": 1 + i % 2, "category_id": 1 + i % 2, "bbox": [60.0, 50.0, 15.0, 15.0 + i],
                     "score": float(torch.rand((), generator=g))})
    ours = coco_metrics(GT, dets)
    ref = coco_metrics(GT, dets, backend="pycocotools")
    assert 0.0 < ours["AP"] < 1.0
    for k in ("AP", "AP50", "AP75", "APs", "APm"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
    assert ours["per_class"] == pytest.approx(ref["per_class"], abs=1e-9)
    with pytest.raises(ValueError, match="backend must be"):
        coco_metrics(GT, dets, backend="mine")


class _Oracle(nn.Module):
    """Returns the targets it is told about as detections (in the coordinates of the images it gets)."""

    def __init__(self, boxes: dict[int, torch.Tensor], scale: float = 1.0) -> None:
        super().__init__()
        self.boxes, self.scale = boxes, scale
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        assert not self.training
        outs = []
        for img in images:
            image_id = int(img[0, 0, 0])
            b = self.boxes[image_id] * self.scale
            outs.append({"boxes": b, "scores": torch.full((len(b),), 0.8), "labels": torch.ones(len(b), dtype=torch.int64)})
        return outs


def test_predict_rescales_and_evaluate_end_to_end() -> None:
    gt = {"images": [{"id": 7, "width": 40, "height": 40}], "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [4, 8, 10, 12], "area": 120, "iscrowd": 0}]}
    half = torch.zeros(3, 20, 20)
    half[0, 0, 0] = 7  # the oracle reads the image id from the pixel
    model = _Oracle({7: torch.tensor([[4.0, 8.0, 14.0, 20.0]])}, scale=0.5)  # boxes at the fed (half) size
    model.train()
    loader = [([half], [{"image_id": 7}])]
    records = predict(model, loader, image_sizes={7: (40, 40)})
    assert records == [{"image_id": 7, "category_id": 1, "bbox": [4.0, 8.0, 10.0, 12.0], "score": pytest.approx(0.8)}]
    assert model.training  # mode restored
    m = evaluate(model, loader, gt=gt)
    assert m["AP"] == pytest.approx(1.0) and m["per_class"] == {"x": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="needs gt="):
        evaluate(model, loader)
