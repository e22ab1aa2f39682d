"""QFL and VFL on RetinaNet: the adapter's loss equals mmdetection's heads (GFLHead, VFNetHead) on the same anchors."""

from __future__ import annotations

import copy

import pytest
import torch

from detbalance.builders import build_cls_loss
from detbalance.config import ConfigError, QFLConfig, RemedyConfig, VFLConfig, load_toml
from detbalance.detectors import anchor_outputs, balance_retinanet, build_detector
from detbalance.losses import L1Loss, QualityFocalLoss, ScaledLoss, VarifocalLoss
from tests.detectors.inputs import SIZE, make_batch
from tests.reference import mmdet_quality as mm

K = 3


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_detector("retinanet", num_classes=K, image_size=SIZE)


def _reference_inputs(model, images, targets):
    """Flattened mmdet-convention inputs from the model's own matching: logits, labels (0..K-1, K bg), boxes."""
    with torch.no_grad():
        out = anchor_outputs(model, images, targets)
    b, a, c = out.cls_logits.shape
    coder = model.head.regression_head.box_coder
    anchors = out.anchors.reshape(b * a, 4)
    pred = coder.decode_single(out.bbox_regression.reshape(b * a, 4), anchors)
    gt = coder.decode_single(out.target_regression.reshape(b * a, 4), anchors)
    labels = out.labels.reshape(-1)
    mm_labels = torch.where(labels > 0, labels - 1, torch.full_like(labels, K))
    return out.cls_logits.reshape(b * a, c)[:, 1:], labels, mm_labels, pred, gt


def test_qfl_equals_gfl_head(base_model):
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=QualityFocalLoss(), box_loss=L1Loss(),
                              normalizer="per_batch", prior_prob=None)
    images, targets = make_batch()
    losses = model(images, targets)
    logits, labels, mm_labels, pred, gt = _reference_inputs(model, images, targets)
    pos = labels > 0
    assert int(pos.sum()) >= 3
    _, score = mm.gfl_cls_targets(mm_labels, pred[pos], gt[pos], K)
    assert float(score[pos].min()) < float(score[pos].max())  # genuinely soft targets
    # GFLHead: label_weights 0 on ignored anchors, avg_factor = number of positives (PseudoSampler)
    expected = mm.QualityFocalLoss(beta=2.0)(logits, (mm_labels, score), weight=(labels >= 0).float(),
                                             avg_factor=float(pos.sum()))
    torch.testing.assert_close(losses["classification"], expected, rtol=1e-4, atol=1e-6)


def test_vfl_equals_vfnet_head(base_model):
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=VarifocalLoss(), box_loss=L1Loss(),
                              normalizer="per_batch", prior_prob=None)
    images, targets = make_batch()
    losses = model(images, targets)
    logits, labels, mm_labels, pred, gt = _reference_inputs(model, images, targets)
    pos = labels > 0
    cls_iou_targets = mm.vfnet_cls_targets(logits, mm_labels, pred[pos], gt[pos], K)
    # VFNetHead passes no label weights (ATSS has no ignored anchors); RetinaNet's IoU matcher has some, which
    # the adapter leaves out of every loss, so the reference is given them as weights here.
    expected = mm.VarifocalLoss()(logits, cls_iou_targets, weight=(labels >= 0).float()[:, None].expand_as(logits),
                                  avg_factor=mm.vfnet_avg_factor(int(pos.sum())))
    torch.testing.assert_close(losses["classification"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", [QualityFocalLoss(), VarifocalLoss()], ids=["qfl", "vfl"])
def test_quality_target_is_detached_and_background_column_gets_zero(base_model, loss):
    images, targets = make_batch()
    a = balance_retinanet(copy.deepcopy(base_model), cls_loss=loss, box_loss=L1Loss(), prior_prob=None)
    b = balance_retinanet(copy.deepcopy(base_model), cls_loss=loss, box_loss=L1Loss(), prior_prob=None,
                          background_column=True)
    la, lb = a(images, targets), b(images, targets)
    # the target is detached: the classification loss sends no gradient into the box branch
    la["classification"].backward()
    assert all(p.grad is None or not p.grad.any() for p in a.head.regression_head.parameters())
    # column 0 only adds its negative term
    assert float(lb["classification"].detach()) > float(la["classification"].detach())


def test_config_and_builder():
    cfg = load_toml("[remedy.cls_loss]\nname = 'qfl'\n")
    assert cfg.remedy.cls_loss == QFLConfig(beta=2.0)
    loss = build_cls_loss(cfg.remedy, "retinanet")
    assert isinstance(loss, QualityFocalLoss) and loss.beta == 2.0
    cfg = load_toml("[remedy.cls_loss]\nname = 'vfl'\nalpha = 0.5\n")
    loss = build_cls_loss(cfg.remedy, "retinanet")
    assert isinstance(loss, VarifocalLoss) and (loss.alpha, loss.gamma, loss.iou_weighted, loss.iou_floor) == (
        0.5, 2.0, True, 1e-6)
    with pytest.raises(ConfigError, match="remedy.cls_loss.beta: must be >= 0"):
        load_toml("[remedy.cls_loss]\nname = 'qfl'\nbeta = -1.0\n")
    with pytest.raises(ConfigError, match="remedy.cls_loss.iou_floor"):
        load_toml("[remedy.cls_loss]\nname = 'vfl'\niou_floor = 2.0\n")
    with pytest.raises(ConfigError, match="remedy.cls_loss: VFL .* needs a retinanet or fcos model"):
        load_toml("[model]\narch = 'faster_rcnn'\n[remedy.cls_loss]\nname = 'vfl'\n")
    assert RemedyConfig(cls_loss=VFLConfig()).cls_loss.alpha == 0.75


def test_configs_in_repo_build():
    from pathlib import Path

    from detbalance.builders import _weighted
    from detbalance.config import load_config

    root = Path(__file__).resolve().parents[2]
    for name, cls in (("retinanet_qfl.toml", QualityFocalLoss), ("retinanet_vfl.toml", VarifocalLoss)):
        cfg = load_config(root / "configs" / name)
        loss = _weighted(build_cls_loss(cfg.remedy, cfg.model.arch), cfg.remedy.cls_loss)
        inner = loss.loss if isinstance(loss, ScaledLoss) else loss
        assert isinstance(inner, cls)
