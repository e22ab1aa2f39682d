"""FCOS with ATSS assignment: every term (classification, GIoU box, centerness) uses ATSS's matches on 8S anchors,
equal to the head fed those matches; an image without objects is all background."""

from __future__ import annotations

import copy

import pytest
import torch

from detbalance.detectors import balance_fcos, build_zoo_model
from detbalance.losses import SigmoidFocalLoss
from detbalance.sampling.atss import ATSSAssigner, assign_atss
from tests.detectors.inputs import make_batch

K = 3


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_zoo_model("fcos_resnet50_fpn", num_classes=K, min_size=64, max_size=64)


def test_fcos_atss_equals_the_head_fed_atss_matches(base):
    images, targets = make_batch()
    targets[0] = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 62.0, 60.0]]), "labels": torch.tensor([1, 3])}
    atss = balance_fcos(copy.deepcopy(base), cls_loss=SigmoidFocalLoss(), assigner=ATSSAssigner())
    out = atss(images, targets)
    plain = balance_fcos(copy.deepcopy(base), cls_loss=SigmoidFocalLoss())
    stock = plain(images, targets)
    image_list, targets_t = plain.transform(images, [dict(t) for t in targets])
    feats = list(plain.backbone(image_list.tensors).values())
    head_out = plain.head(feats)
    anchors = plain.anchor_generator(image_list, feats)
    # 8S anchors per location: torchvision's FCOS anchors are one stride wide
    widths = [a[:, 2] - a[:, 0] for a in anchors]
    assert all(bool((w > 0).all()) for w in widths)
    levels = list(plain.head.anchors_per_level)
    matched = []
    for a, t in zip(anchors, targets_t):
        ctr, half = (a[:, :2] + a[:, 2:]) / 2, (a[:, 2:] - a[:, :2]) * 4
        matched.append(assign_atss(torch.cat([ctr - half, ctr + half], 1), t["boxes"], levels).matched_idxs)
    ref = plain.head.compute_loss(targets_t, head_out, anchors, matched)
    for key in ("classification", "bbox_regression", "bbox_ctrness"):
        torch.testing.assert_close(out[key], ref[key])
    assert not torch.allclose(out["bbox_ctrness"], stock["bbox_ctrness"])  # not torchvision's matching
    assert bool((matched[1] == -1).all())  # the image without objects: all background
    sum(out.values()).backward()
    assert torch.isfinite(atss.head.classification_head.cls_logits.weight.grad).all()


def test_bad_arguments(base):
    with pytest.raises(ValueError, match="atss_anchor_scale"):
        balance_fcos(copy.deepcopy(base), cls_loss=SigmoidFocalLoss(), assigner=ATSSAssigner(), atss_anchor_scale=0)
    with pytest.raises(ValueError, match="assigner must be"):
        balance_fcos(copy.deepcopy(base), cls_loss=SigmoidFocalLoss(), assigner="atss")
