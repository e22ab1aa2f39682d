"""balance_ssd: equality with torchvision's 3:1 mining, min_negatives, focal over all boxes, recorder, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from detbalance.detectors import BalancedSSD, BalanceRecorder, balance_ssd, build_detector
from detbalance.losses import (
    GHMCLoss,
    GHMRLoss,
    GIoULoss,
    L1Loss,
    SigmoidFocalLoss,
    SmoothL1Loss,
    SoftmaxFocalLoss,
)
from tests.detectors.inputs import SIZE, make_batch

K = 3


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_detector("ssd", num_classes=K, image_size=SIZE)


def per_box_outputs(model, images, targets):
    """Independent oracle: logits, labels (SSD matching re-derived with box_iou) of every default box."""
    image_list, targets_t = model.transform(images, copy.deepcopy(targets))
    features = list(model.backbone(image_list.tensors).values())
    head = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    labels = []
    for anchors_i, t in zip(anchors, targets_t):
        lab = torch.zeros(len(anchors_i), dtype=torch.int64)
        if len(t["boxes"]):
            iou = box_iou(t["boxes"], anchors_i)
            best = iou.max(0)
            lab = torch.where(best.values >= 0.5, t["labels"][best.indices], lab)
            lab[iou.argmax(1)] = t["labels"]  # each object keeps its best default box
        labels.append(lab)
    return head["cls_logits"], torch.stack(labels)


def test_equals_torchvision_with_min_negatives_zero(base_model):
    vanilla = copy.deepcopy(base_model)
    adapted = balance_ssd(copy.deepcopy(base_model), negative_ratio=3.0, min_negatives=0)
    assert isinstance(adapted, BalancedSSD)
    images, targets = make_batch()
    expected, actual = vanilla(images, targets), adapted(images, targets)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    sum(expected.values()).backward()
    sum(actual.values()).backward()
    for (name, pv), (_, pa) in zip(vanilla.named_parameters(), adapted.named_parameters()):
        torch.testing.assert_close(pa.grad, pv.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_default_takes_no_negative_from_an_image_without_objects(base_model):
    """``balance_ssd(model)`` is torchvision's SSD (the paper): an image without objects adds nothing."""
    images, targets = make_batch()
    default = balance_ssd(copy.deepcopy(base_model))(images, targets)
    zero = balance_ssd(copy.deepcopy(base_model), min_negatives=0)(images, targets)
    torch.testing.assert_close(default["classification"], zero["classification"], rtol=0, atol=0)
    with torch.no_grad():
        only_empty = balance_ssd(copy.deepcopy(base_model))([images[1]], [targets[1]])
    assert only_empty["classification"].item() == 0.0


def test_min_negatives_adds_the_hardest_boxes_of_the_empty_image(base_model):
    images, targets = make_batch()
    zero = balance_ssd(copy.deepcopy(base_model), min_negatives=0)(images, targets)
    five = balance_ssd(copy.deepcopy(base_model), min_negatives=5)(images, targets)
    with torch.no_grad():
        logits, labels = per_box_outputs(copy.deepcopy(base_model), images, targets)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    npos = int((labels > 0).sum())
    assert npos >= 3
    extra = ce[1].topk(5).values.sum() / npos
    torch.testing.assert_close(five["classification"], zero["classification"] + extra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(five["bbox_regression"], zero["bbox_regression"])


def test_no_mining_equals_cross_entropy_over_all_boxes(base_model):
    images, targets = make_batch()
    all_boxes = balance_ssd(copy.deepcopy(base_model), negative_ratio=None)(images, targets)
    focal0 = balance_ssd(copy.deepcopy(base_model), negative_ratio=None,
                         cls_loss=SoftmaxFocalLoss(gamma=0.0, alpha=None))(images, targets)
    # Mining with a budget above the number of negatives (the empty image too) keeps every box.
    huge_ratio = balance_ssd(copy.deepcopy(base_model), negative_ratio=1e9, min_negatives=10**6)(images, targets)
    with torch.no_grad():
        logits, labels = per_box_outputs(copy.deepcopy(base_model), images, targets)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    expected = ce / int((labels > 0).sum())
    for out in (all_boxes, focal0, huge_ratio):
        torch.testing.assert_close(out["classification"], expected, rtol=1e-5, atol=1e-5)


def test_focal_is_below_cross_entropy(base_model):
    images, targets = make_batch()
    ce = balance_ssd(copy.deepcopy(base_model), negative_ratio=None)(images, targets)
    focal = balance_ssd(copy.deepcopy(base_model), negative_ratio=None, cls_loss=SoftmaxFocalLoss(gamma=2.0))(
        images, targets
    )
    assert 0 < float(focal["classification"].detach()) < float(ce["classification"].detach())


@pytest.mark.parametrize(
    ("ratio", "cls_loss", "box_loss"),
    [
        (3.0, None, None),
        (None, SoftmaxFocalLoss(gamma=2.0, alpha=0.25), None),
        (3.0, None, SmoothL1Loss(beta=1.0 / 9.0)),
        (3.0, None, GIoULoss()),
        (3.0, None, GHMRLoss()),
    ],
    ids=["mining", "focal", "smooth_l1_1_9", "giou", "ghm_r"],
)
def test_every_remedy_trains_one_step(base_model, ratio, cls_loss, box_loss):
    model = balance_ssd(copy.deepcopy(base_model), negative_ratio=ratio, cls_loss=cls_loss, box_loss=box_loss)
    images, targets = make_batch()
    losses = model(images, targets)
    assert all(bool(torch.isfinite(v)) and float(v.detach()) > 0 for v in losses.values())
    sum(losses.values()).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len([p for p in params if p.grad is not None and bool(torch.isfinite(p.grad).all())]) == len(params)


def test_recorder_counts_match_mining_budget(base_model):
    rec = BalanceRecorder()
    model = balance_ssd(copy.deepcopy(base_model), min_negatives=4, recorder=rec)
    images, targets = make_batch()
    model(images, targets)
    with torch.no_grad():
        _, labels = per_box_outputs(copy.deepcopy(base_model), images, targets)
    pos = (labels > 0).sum(1)
    neg = (labels == 0).sum(1)
    budget = torch.where(pos > 0, 3 * pos, torch.full_like(pos, 4))
    expected_neg = int(torch.minimum(budget, neg).sum())
    record = rec.to_records()[0]
    counts = record["counts"]["ssd/default_boxes"]
    assert counts == {"positives": int(pos.sum()), "negatives": expected_neg,
                      "ignored": labels.numel() - int(pos.sum()) - expected_neg}
    cls = record["class_losses"]["ssd/cls"]
    assert cls["count"][0] == expected_neg and sum(cls["count"][1:]) == int(pos.sum())


def test_from_ssd_shares_modules_and_settings(base_model):
    model = copy.deepcopy(base_model)
    adapted = balance_ssd(model)
    assert adapted.head is model.head and adapted.backbone is model.backbone
    assert adapted.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(adapted.parameters(), model.parameters()))
    assert adapted.neg_to_pos_ratio == model.neg_to_pos_ratio and adapted.transform is model.transform
    adapted.eval()
    with torch.no_grad():
        detections = adapted(make_batch()[0])
    assert len(detections) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cls_loss": SigmoidFocalLoss()}, "softmax"),
        ({"cls_loss": GHMCLoss()}, "softmax"),
        ({"cls_loss": "focal"}, "cls_loss"),
        ({"cls_loss": nn.CrossEntropyLoss()}, "DetectionLoss"),
        ({"box_loss": SoftmaxFocalLoss()}, "box_loss"),
        ({"box_loss": L1Loss(reduction="mean")}, "reduction"),
        ({"negative_ratio": -1.0}, "negative_ratio"),
        ({"min_negatives": -1}, "min_negatives"),
        ({"min_negatives": 2.5}, "min_negatives"),
    ],
)
def test_bad_configuration_raises(base_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        balance_ssd(copy.deepcopy(base_model), **kwargs)


def test_non_ssd_and_bad_targets_raise(base_model):
    with pytest.raises(ValueError, match="SSD"):
        balance_ssd(nn.Linear(2, 2))
    model = balance_ssd(copy.deepcopy(base_model))
    images, targets = make_batch()
    targets[2]["labels"] = torch.tensor([K + 1])
    with pytest.raises(ValueError, match=r"targets\[2\]\['labels'\]\[0\] = 4"):
        model(images, targets)
    images, targets = make_batch()
    targets[0]["boxes"][1, 2] = 65.0
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[1\]"):
        model(images, targets)
