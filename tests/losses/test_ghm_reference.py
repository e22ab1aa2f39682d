"""GHM defaults against the literal mmdetection oracles (tests/reference/mmdet_ghm.py): module and RetinaNet adapter.

Consecutive calls share the EMA state on both sides, so a wrong momentum, bias correction, empty-bin update or
normalisation shows up by the second call. Tolerances: float32 against float32, different summation order.
"""

from __future__ import annotations

import copy

import pytest
import torch

from detbalance.detectors import anchor_outputs, balance_retinanet, build_detector
from detbalance.losses import GHMCLoss, GHMRLoss, ghm_c_loss, gradient_density
from tests.detectors.inputs import SIZE, make_batch
from tests.losses.inputs import classification_inputs
from tests.reference import ghm as paper_reference
from tests.reference.mmdet_ghm import RefGHMC, RefGHMR, retinanet_ghm_losses

REGIMES = ("mixed", "saturated", "big")


def test_ghmc_default_equals_mmdetection_over_three_calls():
    ours, ref = GHMCLoss(), RefGHMC(bins=30, momentum=0.75)
    empty_seen = False
    for step, regime in enumerate(REGIMES):
        x, y = classification_inputs(200, 6, regime=regime, seed=step)
        label_weight = (torch.rand(200, generator=torch.Generator().manual_seed(step)) > 0.15).float()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = ours(x1, y, label_weight > 0)
        expected = ref(x2, y, label_weight[:, None].expand(-1, 6))
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-7)
        got.backward()
        expected.backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(ours.ema_density, ref.acc_sum, rtol=1e-6, atol=1e-6)
        batch = gradient_density((torch.sigmoid(x) - y).abs(), bins=30, valid=(label_weight > 0)[:, None].expand(-1, 6))
        empty_seen |= bool((batch == 0).any())
    assert empty_seen  # some region was never populated: only populated ones are updated


def test_ghmr_default_equals_mmdetection_over_three_calls():
    ours, ref = GHMRLoss(), RefGHMR(mu=0.02, bins=10, momentum=0.7, loss_weight=1.0)
    g = torch.Generator().manual_seed(3)
    for scale in (0.01, 0.05, 0.2):
        pred, target = torch.randn(120, 4, generator=g) * scale, torch.randn(120, 4, generator=g) * scale
        pos = torch.rand(120, generator=g) > 0.6
        p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        got = ours(p1, target, pos)
        expected = ref(p2, target, pos.float()[:, None].expand(-1, 4))
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-7)
        got.backward()
        expected.backward()
        torch.testing.assert_close(p1.grad, p2.grad, rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(ours.ema_density, ref.acc_sum, rtol=1e-6, atol=1e-6)


def test_ghmr_elementwise_mask_equals_mmdetection_and_ignores_what_it_masks():
    # A per-coordinate mask takes the element path of the CPU compaction; a NaN in a masked-out element is ignored.
    ours, ref = GHMRLoss(), RefGHMR(mu=0.02, bins=10, momentum=0.7, loss_weight=1.0)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        pred, target = torch.randn(90, 4, generator=g) * 0.05, torch.randn(90, 4, generator=g) * 0.05
        keep = torch.rand(90, 4, generator=g) > 0.5
        p1, p2 = pred.clone(), pred.clone()
        p1[~keep] = float("nan")  # never read: outside the mask
        p1.requires_grad_()
        p2.requires_grad_()
        got = ours(p1, target, keep)
        expected = ref(p2, target, keep.float())
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-7)
        got.backward()
        expected.backward()
        torch.testing.assert_close(p1.grad, p2.grad, rtol=2e-5, atol=1e-9)
        assert bool((p1.grad[~keep] == 0).all())


def test_paper_option_keeps_the_literal_per_bin_oracle():
    """The old default, now ``normalization='paper'``, still equals the paper's per-bin formula."""
    x, y = classification_inputs(40, 6, regime="mixed", seed=5, dtype=torch.float64)
    valid = torch.rand(40, generator=torch.Generator().manual_seed(5)) > 0.25
    expected = paper_reference.ghm_c_reference(x, y, bins=30, valid=valid, normalization="paper")
    torch.testing.assert_close(ghm_c_loss(x, y, bins=30, valid=valid, normalization="paper"), expected)


@pytest.fixture(scope="module")
def retinanet():
    torch.manual_seed(0)
    return build_detector("retinanet", num_classes=3, image_size=SIZE)


def test_retinanet_adapter_equals_mmdetection_per_level_usage_over_three_steps(retinanet):
    """balance_retinanet(cls_loss=GHMCLoss(), box_loss=GHMRLoss()) == mmdetection's retinanet_ghm head loss.

    The batch has ignored anchors and an image without objects; three SGD steps, EMA carried on both sides.
    """
    model = balance_retinanet(copy.deepcopy(retinanet), cls_loss=GHMCLoss(), box_loss=GHMRLoss())
    ghmc, ghmr = RefGHMC(bins=30, momentum=0.75, loss_weight=1.0), RefGHMR(mu=0.02, bins=10, momentum=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    captured: dict[str, torch.Tensor] = {}

    def keep(module, args, out):
        if not torch.is_grad_enabled():
            return
        for key in ("cls_logits", "bbox_regression"):
            out[key].retain_grad()
            captured[key] = out[key]

    model.head.register_forward_hook(keep)
    images, targets = make_batch()
    for _ in range(3):
        model.train()
        losses = model(images, targets)
        opt.zero_grad()
        (losses["classification"] + losses["bbox_regression"]).backward()
        cls_out, box_out = captured["cls_logits"], captured["bbox_regression"]
        with torch.no_grad():
            out = anchor_outputs(model, images, targets)  # labels and targets of the same matching
        assert bool((out.labels < 0).any()) and bool((out.labels[1] == 0).all())
        sizes = [int((out.level == lvl).sum()) for lvl in range(int(out.level.max()) + 1)]
        c_ref = cls_out.detach().clone().requires_grad_()
        b_ref = box_out.detach().clone().requires_grad_()
        ref_cls, ref_box = retinanet_ghm_losses(
            c_ref[..., 1:], b_ref, out.labels, out.target_regression, sizes, ghmc, ghmr
        )
        torch.testing.assert_close(losses["classification"], ref_cls, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(losses["bbox_regression"], ref_box, rtol=2e-5, atol=1e-7)
        (ref_cls + ref_box).backward()
        torch.testing.assert_close(cls_out.grad, c_ref.grad, rtol=2e-5, atol=1e-9)
        assert bool((cls_out.grad[..., 0] == 0).all())  # torchvision's column 0 takes no part
        torch.testing.assert_close(box_out.grad, b_ref.grad, rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(model.head.cls_loss.ema_density, ghmc.acc_sum, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.head.box_loss.ema_density, ghmr.acc_sum, rtol=1e-6, atol=1e-6)
        opt.step()
    assert int(model.head.cls_loss.ema_steps) == 3 * len(sizes)
    assert model.head.box_loss_weight == 10.0
