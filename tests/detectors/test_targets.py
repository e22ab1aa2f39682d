"""check_detection_targets: the one ground-truth check of every adapter (messages name image, box, value)."""

from __future__ import annotations

import pytest
import torch

from detbalance.detectors import check_detection_targets
from tests.detectors.inputs import make_batch

NUM_CLASSES = 4  # K + 1 columns


def test_valid_batch_passes_as_list_or_stacked_images():
    images, targets = make_batch()
    check_detection_targets(images, targets, num_classes=NUM_CLASSES)
    check_detection_targets(torch.stack(images), targets, num_classes=NUM_CLASSES)
    check_detection_targets([], [], num_classes=NUM_CLASSES)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.pop("labels"), r"expected targets\[0\] to be a dict with 'boxes' and 'labels', got \['boxes'\]"),
        (lambda t: t.update(boxes=torch.zeros(2, 5)), r"targets\[0\]\['boxes'\] of shape \[G, 4\], got \(2, 5\)"),
        (lambda t: t.update(boxes=t["boxes"].long()), r"targets\[0\]\['boxes'\] to be floating point, got torch.int64"),
        (lambda t: t.update(labels=torch.tensor([1])), r"targets\[0\]\['labels'\] of shape \[2\], got \(1,\)"),
        (lambda t: t.update(labels=t["labels"].float()), r"targets\[0\]\['labels'\] to be int64, got torch.float32"),
    ],
)
def test_wrong_keys_shapes_and_dtypes(change, match):
    images, targets = make_batch()
    change(targets[0])
    with pytest.raises(ValueError, match=match):
        check_detection_targets(images, targets, num_classes=NUM_CLASSES)


@pytest.mark.parametrize(
    ("box", "label", "match"),
    [
        ([10.0, 5.0, 10.0, 20.0], 1, r"= \[10.0, 5.0, 10.0, 20.0\] \(image_id=7\): expected x2 > x1$"),
        ([10.0, 25.0, 5.0, 20.0], 1, r"\(image_id=7\): expected x2 > x1 and y2 > y1$"),
        ([10.0, 5.0, float("nan"), 20.0], 1, r"\(image_id=7\): expected finite coordinates$"),
        ([10.0, 5.0, 20.0, 64.5], 1, r"\(image_id=7\): outside the 64x64 image, expected 0 <= x1 < x2 <= 64"),
        ([10.0, 5.0, 20.0, 20.0], 4, r"targets\[2\]\['labels'\]\[1\] = 4 \(image_id=7\): expected a label in 1\.\.3"),
    ],
)
def test_bad_box_or_label_names_image_id_box_and_value(box, label, match):
    images, targets = make_batch()
    targets[2] = {
        "boxes": torch.cat([targets[2]["boxes"], torch.tensor([box])]),
        "labels": torch.cat([targets[2]["labels"], torch.tensor([label])]),
        "image_id": torch.tensor(7),
    }
    with pytest.raises(ValueError, match=r"targets\[2\]\['(boxes|labels)'\]\[1\] = "):
        check_detection_targets(images, targets, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=match):
        check_detection_targets(images, targets, num_classes=NUM_CLASSES)


def test_image_and_target_counts_must_agree():
    images, targets = make_batch()
    with pytest.raises(ValueError, match="expected one target per image, got 3 images and 2 targets"):
        check_detection_targets(images, targets[:2], num_classes=NUM_CLASSES)
