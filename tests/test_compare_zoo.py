"""Done-when of issue 20, kept running: compare on torchvision's ResNet-50 / MobileNet detectors, on a COCO folder of
512-1024 px photos, names the model in its report. One arm per family here (CI has 2 CPU cores); README states
the wall times of the full suites run by hand."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from detbalance.compare import SUITES, run_compare
from tests.cocofolders import SIZES, write_coco_folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "suite", "family"),
    [
        ("retinanet_resnet50_fpn_v2", "losses", "retinanet"),
        ("fasterrcnn_resnet50_fpn_v2", "samplers", "faster_rcnn"),
        ("ssdlite320_mobilenet_v3_large", "ssd", "ssd"),
    ],
)
def test_compare_a_zoo_model_on_photos(tmp_path, monkeypatch, model, suite, family):
    paths = write_coco_folder(tmp_path / "D", layout="make-data", train_sizes=SIZES[:2], val_sizes=SIZES[2:3])
    s = SUITES[suite]
    baseline = next(m for m in s.methods if m.key == s.baseline)
    monkeypatch.setitem(SUITES, suite, replace(s, methods=(baseline,)))
    report = run_compare(
        suite=suite, iters=2, seeds=1, output=tmp_path / "out", batch_size=2, device="cpu", progress=False,
        data=str(tmp_path / "D" / "train"), val=str(tmp_path / "D" / "test"),
        overrides=[f"model.name={model}", "model.min_size=256"],
    )
    text = report.read_text()
    assert model in text and "M parameters" in text and "weights none" in text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    entry = results["suites"][suite]
    assert entry["model"]["name"] == model and entry["model"]["family"] == family
    assert entry["model"]["parameters"] > 1_000_000
    (run,) = entry["methods"][0]["runs"]
    assert "AP" in run["metrics"] and f'name = "{model}"' in run["config"]
    assert paths["train"].is_file()  # the user's files are where they were
