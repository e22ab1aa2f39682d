"""Libra R-CNN through the Faster R-CNN adapter: IoU-balanced sampling on the RoI-sampler contract and balanced L1
on the box-loss contract, equal to mmdetection's loss (tests/reference/mmdet_libra.py), and empty input."""

from __future__ import annotations

import pytest
import torch

from detbalance.builders import build_model
from detbalance.config import ConfigError, load_config, load_toml
from detbalance.detectors.faster_rcnn import balance_faster_rcnn, roi_losses
from detbalance.losses import BalancedL1Loss, GHMRLoss, ScaledLoss
from detbalance.sampling import FixedRatioSampler, IoUBalancedSampler
from tests.detectors.test_faster_rcnn import BIG, NUM_CLASSES, batch, tiny_faster_rcnn
from tests.reference import mmdet_libra as ref


def test_roi_losses_with_balanced_l1_equal_mmdetections_bbox_head_loss():
    """Per RoI: balanced L1 of the matched class's deltas, summed over the 4 coordinates, 0 for background;
    their sum over the sampled RoIs divided by their count is mmdetection's BBoxHead loss."""
    g = torch.Generator().manual_seed(0)
    n = 12
    logits = torch.randn(n, NUM_CLASSES, generator=g, dtype=torch.float64)
    deltas = (torch.randn(n, 4 * NUM_CLASSES, generator=g, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 3, 0, 1, 0, 0, 2, -1, 3])
    targets = torch.randn(n, 4, generator=g, dtype=torch.float64)
    _, loc = roi_losses(logits, deltas, labels, targets, box_loss=BalancedL1Loss())
    fg = labels > 0
    pos_pred = deltas.reshape(n, NUM_CLASSES, 4)[torch.arange(n), labels.clamp(min=0)][fg]
    expected = ref.balanced_l1_loss(pos_pred, targets[fg]).sum(1)
    torch.testing.assert_close(loc[fg], expected.to(loc.dtype))
    assert bool((loc[~fg] == 0).all())
    mine = loc.sum() / n
    theirs = ref.roi_head_box_loss(pos_pred, targets[fg], n)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)  # theirs divides by n + float32 eps
    grad_mine = torch.autograd.grad(mine, deltas)[0]
    grad_theirs = torch.autograd.grad(theirs, deltas)[0]
    torch.testing.assert_close(grad_mine, grad_theirs, rtol=1e-6, atol=1e-12)


def test_box_loss_of_the_wrong_kind_is_refused():
    with pytest.raises(ValueError, match="normalises itself or needs decoded boxes"):
        balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=FixedRatioSampler(), box_loss=GHMRLoss())
    with pytest.raises(ValueError, match="per-coordinate losses"):
        roi_losses(torch.zeros(2, NUM_CLASSES), torch.zeros(2, 4 * NUM_CLASSES), torch.tensor([1, 0]),
                   torch.zeros(2, 4), box_loss=BalancedL1Loss(reduction="sum"))


def test_libra_head_takes_everything_under_a_large_budget_and_gives_the_reference_box_loss():
    """Budget above every count: the sampler takes all RoIs (no randomness); the head's loss_box_reg is then
    mmdetection's balanced-L1 BBoxHead loss over all RoIs, and the classifier loss is torchvision's."""
    images, targets = batch()
    torch.manual_seed(0)
    libra = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=IoUBalancedSampler(num_samples=BIG, positive_fraction=1.0),
                                box_loss=BalancedL1Loss())
    torch.manual_seed(0)
    fixed = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=FixedRatioSampler(BIG, 1.0))
    torch.manual_seed(5)
    out_libra = libra(images, targets)
    torch.manual_seed(5)
    out_fixed = fixed(images, targets)
    torch.testing.assert_close(out_libra["loss_classifier"], out_fixed["loss_classifier"])
    assert float(out_libra["loss_box_reg"].detach()) != pytest.approx(float(out_fixed["loss_box_reg"].detach()))
    # the same RoIs, so the same per-RoI deltas: recompute both box losses from the fixed model's head
    head = fixed.roi_heads
    feats = fixed.backbone(fixed.transform(images, targets)[0].tensors)
    im, tg = fixed.transform(images, targets)
    torch.manual_seed(5)
    proposals, _ = fixed.rpn(im, {"0": feats}, tg)
    rois, reg_targets = head.prepare_training_rois(proposals, im.image_sizes, tg)
    pooled = head.box_roi_pool({"0": feats}, list(rois.boxes.split(rois.counts())), im.image_sizes)
    _, deltas = head.box_predictor(head.box_head(pooled))
    n = rois.labels.numel()
    fg = rois.labels > 0
    pos_pred = deltas.reshape(n, -1, 4)[torch.arange(n), rois.labels.clamp(min=0)][fg]
    expected = ref.roi_head_box_loss(pos_pred, reg_targets[fg], int((rois.labels >= 0).sum()))
    torch.testing.assert_close(out_libra["loss_box_reg"], expected, rtol=1e-5, atol=1e-7)


def test_libra_trains_every_parameter():
    images, targets = batch()
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=IoUBalancedSampler(num_samples=16),
                                box_loss=BalancedL1Loss())
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_zero_proposals_and_no_objects_give_an_empty_sample_and_zero_roi_losses():
    """An image with no proposal and no object has no RoI (mmdetection: empty pos/neg indices); the head gives
    zero RoI losses, not an error or a NaN."""
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=IoUBalancedSampler(num_samples=16),
                                box_loss=BalancedL1Loss())
    head = model.roi_heads
    features = {"0": torch.randn(1, 16, 8, 8)}
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    _, losses = head(features, [torch.zeros(0, 4)], [(64, 64)], targets)
    assert float(losses["loss_classifier"].detach()) == 0.0 and float(losses["loss_box_reg"].detach()) == 0.0


def test_config_builds_libra_and_rejects_what_does_not_fit():
    cfg = load_config("configs/faster_rcnn_libra.toml")
    model = build_model(cfg, num_classes=3, image_size=64)
    assert model.roi_heads.sampler == IoUBalancedSampler()
    assert isinstance(model.roi_heads.box_loss, BalancedL1Loss)
    assert (model.roi_heads.box_loss.alpha, model.roi_heads.box_loss.gamma, model.roi_heads.box_loss.beta) == (0.5, 1.5, 1.0)
    weighted = load_toml("[model]\narch = 'faster_rcnn'\n[remedy.box_loss]\nname = 'balanced_l1'\nloss_weight = 2.0\n")
    assert isinstance(build_model(weighted, num_classes=3, image_size=64).roi_heads.box_loss, ScaledLoss)
    with pytest.raises(ConfigError, match="remedy.roi_sampler.num_bins: must be an int >= 1"):
        load_toml("[model]\narch = 'faster_rcnn'\n[remedy.roi_sampler]\nname = 'iou_balanced'\nnum_bins = 0\n")
    with pytest.raises(ConfigError, match="remedy.box_loss.gamma: must be > 0"):
        load_toml("[remedy.box_loss]\nname = 'balanced_l1'\ngamma = 0.0\n")
    with pytest.raises(ConfigError, match="remedy.roi_sampler"):
        load_toml("[model]\narch = 'retinanet'\n[remedy.roi_sampler]\nname = 'iou_balanced'\n")
