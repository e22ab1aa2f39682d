"""Backbones (strides, channels, sizes, norms) and build_detector (anchors, transform, train/eval forward)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

from detbalance.detectors import (
    ARCHS,
    BACKBONES,
    build_backbone,
    build_detector,
    default_anchor_sizes,
    set_training_progress,
)


@pytest.mark.parametrize(
    ("name", "channels", "strides", "max_params"),
    [
        ("tiny", 32, (4, 8, 16), 0.2e6),
        ("small", 64, (4, 8, 16), 0.5e6),
        ("resnet18_fpn", 128, (4, 8, 16, 32), 4e6),
        ("mobilenet_v3_fpn", 128, (4, 8, 16, 32), 1e6),
    ],
)
def test_backbone_levels_strides_and_channels(name, channels, strides, max_params):
    backbone = build_backbone(name).eval()
    assert backbone.out_channels == channels and tuple(backbone.strides) == strides
    num_params = sum(p.numel() for p in backbone.parameters())
    assert 0.05e6 < num_params < max_params
    assert all(p.requires_grad for p in backbone.parameters())  # nothing frozen: trained from scratch
    for size in (128, 64):
        with torch.no_grad():
            feats = backbone(torch.rand(2, 3, size, size))
        assert list(feats)[: len(strides) - 1] == [str(i) for i in range(len(strides) - 1)]
        shapes = [tuple(f.shape) for f in feats.values()]
        assert shapes == [(2, channels, size // s, size // s) for s in strides]


def test_gn_variant_has_no_batchnorm_and_same_output_shapes():
    bn, gn = build_backbone("tiny", norm="bn"), build_backbone("tiny", norm="gn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert all(m.num_channels // m.num_groups == 8 for m in gn.modules() if isinstance(m, nn.GroupNorm))
    x = torch.rand(1, 3, 64, 64)
    assert [f.shape for f in bn.eval()(x).values()] == [f.shape for f in gn.eval()(x).values()]


def test_residual_branches_start_at_zero():
    backbone = build_backbone("tiny")
    zero_init = [m.conv2[1].weight for m in backbone.modules() if type(m).__name__ == "_BasicBlock"]
    assert len(zero_init) == 3 and all(torch.all(w == 0) for w in zero_init)


@pytest.mark.parametrize(("kwargs", "match"), [({"name": "resnet50"}, "backbone"), ({"norm": "ln"}, "norm"),
                                                ({"name": "resnet18_fpn", "norm": "gn"}, "norm")])
def test_bad_backbone_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(**kwargs)


def test_default_anchor_sizes_closed_form():
    sizes = default_anchor_sizes((4, 8, 16), 128)
    expected = [[8.0, 8.0 * 2 ** (1 / 3), 8.0 * 2 ** (2 / 3)], [16.0, 16 * 2 ** (1 / 3), 16 * 2 ** (2 / 3)],
                [32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]]
    assert all(math.isclose(a, b) for lvl, exp in zip(sizes, expected) for a, b in zip(lvl, exp))
    assert default_anchor_sizes((4,), 64)[0][0] == 4.0  # scales with the image side


def test_retinanet_configuration():
    model = build_detector("retinanet", num_classes=5)
    assert isinstance(model, RetinaNet)
    assert model.head.classification_head.num_classes == 6  # K + 1, torchvision's convention
    assert model.anchor_generator.num_anchors_per_location() == [9, 9, 9]
    assert len(model.head.classification_head.conv) == 1 and len(model.head.regression_head.conv) == 1
    bias = model.head.classification_head.cls_logits.bias
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.01))
    assert model.transform.min_size == (128,) and model.transform.max_size == 128
    # 128 px images are not resized: the transform only normalises ((x - 0.5) / 0.25).
    x = torch.rand(3, 128, 128)
    batch, _ = model.transform([x])
    torch.testing.assert_close(batch.tensors[0], (x - 0.5) / 0.25)
    assert batch.image_sizes == [(128, 128)]
    anchors = model.anchor_generator(batch, [torch.zeros(1, 32, 128 // s, 128 // s) for s in (4, 8, 16)])[0]
    sides = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    assert anchors.shape == (9 * (32 * 32 + 16 * 16 + 8 * 8), 4)
    assert math.isclose(float(sides.sqrt().min()), 8.0, rel_tol=1e-3)  # smallest: 8 px on stride 4
    total = sum(p.numel() for p in model.parameters())
    assert total < 0.3e6


def test_faster_rcnn_and_ssd_configuration():
    frcnn = build_detector("faster_rcnn", num_classes=5)
    assert isinstance(frcnn, FasterRCNN)
    assert frcnn.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    assert frcnn.roi_heads.box_predictor.cls_score.out_features == 6
    assert frcnn.roi_heads.box_head.fc7.out_features == 128  # sized for 128 px (detectors/build.py)
    ssd = build_detector("ssd", num_classes=5)
    assert isinstance(ssd, SSD)
    assert ssd.head.classification_head.num_columns == 6
    assert ssd.anchor_generator.num_anchors_per_location() == [4, 4, 4]
    assert ssd.anchor_generator.scales == [8 / 128, 16 / 128, 32 / 128, 64 / 128]
    assert ssd.neg_to_pos_ratio == 3.0


def _targets(size: int) -> list[dict[str, torch.Tensor]]:
    s = size / 128
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 25.0, 24.0], [60.0, 60.0, 78.0, 70.0]]) * s, "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[90.0, 5.0, 100.0, 17.0]]) * s, "labels": torch.tensor([3])},
    ]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [128, 64])
def test_detector_forward_train_and_eval(arch, size):
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=3, image_size=size)
    images = [torch.rand(3, size, size) for _ in range(2)]
    losses = model(images, _targets(size))
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det in detections:
        boxes = det["boxes"]
        assert boxes.shape[1] == 4 and len(det["scores"]) == len(boxes) == len(det["labels"])
        assert bool((boxes >= 0).all()) and bool((boxes <= size).all())
        assert bool((det["labels"] >= 1).all()) if arch != "retinanet" else bool((det["labels"] < 4).all())


@pytest.mark.parametrize("backbone", ["small", "resnet18_fpn", "mobilenet_v3_fpn"])
def test_detectors_on_other_backbones(backbone):
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    for arch in ARCHS:
        model = build_detector(arch, num_classes=3, backbone=backbone)
        losses = model(images, _targets(128))
        assert all(bool(torch.isfinite(v)) for v in losses.values()), arch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "yolo"}, "arch"),
        ({"num_classes": 0}, "num_classes"),
        ({"backbone": "vgg"}, "backbone"),
        ({"image_size": 8}, "image_size"),
        ({"anchor_sizes": ((8.0,), (16.0,))}, "anchor_sizes"),
        ({"head_convs": -1}, "head_convs"),
        ({"image_std": (0.0, 1.0, 1.0)}, "image_std"),
    ],
)
def test_bad_build_arguments_raise(kwargs, match):
    config = {"arch": "retinanet", "num_classes": 3}
    config.update(kwargs)
    arch = config.pop("arch")
    with pytest.raises(ValueError, match=match):
        build_detector(arch, **config)


def test_set_training_progress_reaches_every_scheduled_module():
    class Scheduled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.progress = None

        def set_progress(self, progress: float) -> None:
            self.progress = progress

    model = nn.Sequential(nn.Linear(2, 2), Scheduled(), nn.Sequential(Scheduled()))
    set_training_progress(model, 0.25)
    assert [m.progress for m in model.modules() if isinstance(m, Scheduled)] == [0.25, 0.25]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="progress"):
            set_training_progress(model, bad)


def test_backbone_names_are_all_buildable():
    assert BACKBONES == ("tiny", "small", "resnet18_fpn", "mobilenet_v3_fpn")
