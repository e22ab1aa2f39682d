"""fp16 custom backwards, bad input, per-sample class weights, the loss contract and positive-count normalisers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detbalance.detectors import balance_retinanet, build_detector
from detbalance.losses import (
    ClassWeightedLoss,
    DetectionLoss,
    GHMCLoss,
    GHMRLoss,
    L1Loss,
    PositiveNormalizer,
    ScaledLoss,
    SigmoidFocalLoss,
    SoftmaxFocalLoss,
    check_slot,
    declare_loss,
    ghm_c_loss,
    ghm_r_loss,
    normalize_by_positives,
    sample_class_weights,
    sigmoid_focal_gradient,
    sigmoid_focal_loss,
)
from tests.detectors.inputs import SIZE, make_batch
from tests.losses.inputs import classification_inputs

UPSTREAM = 2.0**16  # GradScaler's initial scale


# ------------------------------------------------------------------------------------------------ fp16
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_focal_fp16_backward_is_float32_cast_once(reduction):
    """200k x 80 fp16 logits, upstream gradient 2^16: no inf/NaN, equal to the fp32 gradient rounded once."""
    x, y = classification_inputs(200_000, 80, regime="normal", seed=0)
    x16 = x.half().requires_grad_()
    loss = sigmoid_focal_loss(x16, y.half(), reduction=reduction)
    upstream = torch.full_like(loss, UPSTREAM)
    loss.backward(upstream)
    assert x16.grad.dtype == torch.float16 and bool(torch.isfinite(x16.grad).all())
    x32 = x16.detach().float().requires_grad_()
    ref = sigmoid_focal_loss(x32, y.half().float(), reduction=reduction)
    ref.backward(torch.full_like(ref, UPSTREAM))
    expected = x32.grad.half()  # the fp32 gradient, rounded to fp16 once
    assert torch.equal(x16.grad, expected)
    nonzero = x32.grad != 0
    # "mean": 1/N is applied in float32, so the gradients survive (an fp16 buffer flushed most of them to 0)
    assert float((x16.grad[nonzero] != 0).float().mean()) > 0.99


def test_ghm_c_fp16_backward_is_float32_cast_once():
    x, y = classification_inputs(20_000, 80, regime="normal", seed=1)
    x16 = x.half().requires_grad_()
    loss = ghm_c_loss(x16, y.half())
    loss.backward(torch.tensor(UPSTREAM))
    x32 = x16.detach().float().requires_grad_()
    ghm_c_loss(x32, y.half().float()).backward(torch.tensor(UPSTREAM))
    assert bool(torch.isfinite(x16.grad).all())
    assert torch.equal(x16.grad, x32.grad.half())


def test_sigmoid_focal_gradient_is_the_autograd_gradient():
    x, y = classification_inputs(50, 7, regime="mixed", seed=2, dtype=torch.float64)
    for alpha, gamma in ((0.25, 2.0), (None, 0.0), (0.75, 0.5)):
        xg = x.clone().requires_grad_()
        sigmoid_focal_loss(xg, y, alpha=alpha, gamma=gamma, reduction="sum").backward()
        torch.testing.assert_close(sigmoid_focal_gradient(x, y, alpha=alpha, gamma=gamma), xg.grad)
    torch.testing.assert_close(sigmoid_focal_gradient(x, y, alpha=None, gamma=0.0), torch.sigmoid(x) - y)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ghm_rejects_non_finite_input_naming_the_argument(bad):
    x, y = torch.zeros(4, 3), torch.zeros(4, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="logits"):
        ghm_c_loss(x, y)
    with pytest.raises(ValueError, match="logits"):
        GHMCLoss()(x, y)
    p = torch.zeros(4, 4)
    p[2, 1] = bad
    with pytest.raises(ValueError, match="pred"):
        ghm_r_loss(p, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="pred"):
        GHMRLoss()(p, torch.zeros(4, 4))


def test_unvalidated_nan_is_excluded_from_the_histogram_not_a_bincount_error():
    x, y = torch.zeros(4, 3), torch.zeros(4, 3)
    x[0, 0] = float("nan")
    mod = GHMCLoss(bins=5, validate_args=False)
    mod(x, y)
    assert float(mod.ema_density.sum()) == pytest.approx((1 - 0.75) * 11)  # 11 finite elements counted
    p = torch.zeros(3, 4)
    p[0, 0] = float("inf")
    ghm_r_loss(p, torch.zeros(3, 4), validate_args=False)  # no RuntimeError


@pytest.mark.parametrize("bad", [2.0, -1.0, float("nan")])
def test_targets_outside_unit_interval_raise(bad):
    y = torch.zeros(3, 2)
    y[1, 1] = bad
    with pytest.raises(ValueError, match="targets"):
        sigmoid_focal_loss(torch.zeros(3, 2), y)
    with pytest.raises(ValueError, match="targets"):
        ghm_c_loss(torch.zeros(3, 2), y)
    sigmoid_focal_loss(torch.zeros(3, 2), y, validate_args=False)  # the check can be skipped


def test_negative_positive_counts_raise():
    with pytest.raises(ValueError, match="num_positives"):
        normalize_by_positives(torch.ones(2), torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="num_positives"):
        PositiveNormalizer()(torch.ones(2), torch.tensor([3, -1]))


# ----------------------------------------------------------------------------------------- contract
def test_contract_names_the_slot():
    with pytest.raises(ValueError, match="box_loss needs a box loss"):
        check_slot(SigmoidFocalLoss(), slot="box_loss", kind="box")
    with pytest.raises(ValueError, match="cls_loss must be a sigmoid DetectionLoss"):
        check_slot(torch.sigmoid, slot="cls_loss", kind="sigmoid")
    with pytest.raises(ValueError, match="reduction"):
        declare_loss(nn.BCEWithLogitsLoss(), kind="sigmoid")
    with pytest.raises(ValueError, match="reduction"):
        check_slot(L1Loss(reduction="mean"), slot="box_loss", kind="box")

    class MyLoss(DetectionLoss):  # a new loss declares itself; nothing else is needed
        kind = "softmax"

        def forward(self, logits, labels, weight=None):
            return nn.functional.cross_entropy(logits, labels, reduction="none")

    assert check_slot(MyLoss(), slot="cls_loss", kind="softmax").kind == "softmax"
    with pytest.raises(ValueError, match="cls_loss needs a sigmoid loss"):
        check_slot(MyLoss(), slot="cls_loss", kind="sigmoid")
    scaled = ScaledLoss(GHMRLoss(), 10.0)
    assert (scaled.kind, scaled.self_normalizing, scaled.per_level, scaled.reference_weight) == ("box", True, True, 1.0)


# ------------------------------------------------------------------------------------- class weights
def test_sample_class_weights_by_label():
    labels = torch.tensor([[-1, 0, 1], [2, 3, 0]])
    cw = torch.tensor([0.5, 2.0, 4.0])
    torch.testing.assert_close(
        sample_class_weights(labels, cw), torch.tensor([[0.0, 1.0, 0.5], [2.0, 4.0, 1.0]])
    )
    torch.testing.assert_close(
        sample_class_weights(labels, cw, background_weight=0.25), torch.tensor([[0.0, 0.25, 0.5], [2.0, 4.0, 0.25]])
    )
    with pytest.raises(ValueError, match="background_weight"):
        sample_class_weights(labels, cw, background_weight=-1.0)
    with pytest.raises(ValueError, match="class_weight"):
        sample_class_weights(labels, torch.ones(2, 2))


def test_class_weighted_sigmoid_loss_weights_rows_by_class():
    x, _ = classification_inputs(6, 3, seed=3)
    y = torch.zeros(6, 3)
    y[0, 0] = y[1, 2] = y[2, 1] = 1.0  # classes 1, 3, 2; rows 3-5 background
    cw = torch.tensor([0.5, 2.0, 4.0])
    got = ClassWeightedLoss(SigmoidFocalLoss(), cw, background_weight=0.1)(x, y)
    row = torch.tensor([0.5, 4.0, 2.0, 0.1, 0.1, 0.1])[:, None]
    torch.testing.assert_close(got, sigmoid_focal_loss(x, y) * row)
    # torchvision's K + 1 columns: column 0 never positive, the class of column j is j
    y1 = torch.cat([torch.zeros(6, 1), y], 1)
    x1 = torch.cat([torch.zeros(6, 1), x], 1)
    got1 = ClassWeightedLoss(SigmoidFocalLoss(), cw, background_weight=0.1)(x1, y1)
    torch.testing.assert_close(got1, sigmoid_focal_loss(x1, y1) * row)


def test_class_weighted_softmax_equals_per_class_alpha():
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 3, -1, 0, 2, 1])
    cw = torch.tensor([0.5, 2.0, 4.0])
    got = ClassWeightedLoss(SoftmaxFocalLoss(gamma=0.0), cw)(logits, labels)
    expected = SoftmaxFocalLoss(gamma=0.0, alpha=torch.tensor([1.0, 0.5, 2.0, 4.0]))(logits, labels)
    torch.testing.assert_close(got, expected)


def _trunk_gradient(model, images, targets) -> torch.Tensor:
    model.zero_grad()
    losses = model(images, targets)
    losses["classification"].backward()
    return torch.cat([p.grad.reshape(-1) for p in model.backbone.parameters() if p.grad is not None])


def test_class_weights_change_the_trunk_direction_not_only_its_scale():
    """Two classes, weights 1 : 10: the shared trunk's gradient turns (cosine clearly below 1)."""
    torch.manual_seed(0)
    base = build_detector("retinanet", num_classes=3, image_size=SIZE)
    images, targets = make_batch()
    plain = balance_retinanet(copy.deepcopy(base), cls_loss=SigmoidFocalLoss(), normalizer="per_batch")
    weighted = balance_retinanet(
        copy.deepcopy(base),
        cls_loss=ClassWeightedLoss(SigmoidFocalLoss(), torch.tensor([1.0, 10.0, 1.0])),
        normalizer="per_batch",
    )
    g0, g1 = _trunk_gradient(plain, images, targets), _trunk_gradient(weighted, images, targets)
    cosine = float(torch.nn.functional.cosine_similarity(g0, g1, dim=0))
    assert cosine < 0.95
    # a uniform weight (every sample, background included) only rescales: cosine 1
    uniform = balance_retinanet(
        copy.deepcopy(base),
        cls_loss=ClassWeightedLoss(SigmoidFocalLoss(), torch.full((3,), 3.0), background_weight=3.0),
        normalizer="per_batch",
    )
    g2 = _trunk_gradient(uniform, images, targets)
    assert float(torch.nn.functional.cosine_similarity(g0, g2, dim=0)) == pytest.approx(1.0, abs=1e-5)


# -------------------------------------------------------------------------------------- normalisers
def test_per_batch_positives_are_all_reduced_before_clamping(monkeypatch):
    """Two ranks, 1 positive in all: each rank returns W sum_local / max(1, P_global), not sum / clamp(P / W)."""
    from detbalance.losses import normalizer as mod

    other_rank_positives = torch.tensor(0.0)

    def fake_all_reduce(t, op=None):
        t.add_(other_rank_positives)

    monkeypatch.setattr(mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mod.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(mod.dist, "get_world_size", lambda: 2)
    norm = PositiveNormalizer("per_batch")
    out = norm(torch.tensor([4.0, 4.0]), torch.tensor([1, 0]))
    # single process over both ranks' images (this rank: loss 8, the other: 0): 8 / max(1, 1) = 8;
    # DDP averages the two ranks' gradients, so this rank must return 2 * 8 / 1 = 16
    assert float(out) == 16.0


def test_ssd_class_weights_per_box_turn_the_trunk_and_keep_the_mining():
    """SSD (softmax): each default box weighted by its class, background by background_weight."""
    from detbalance.detectors import balance_ssd

    torch.manual_seed(0)
    base = build_detector("ssd", num_classes=3, image_size=SIZE)
    images, targets = make_batch()
    plain = balance_ssd(copy.deepcopy(base), cls_loss=SoftmaxFocalLoss(gamma=0.0))
    weighted = balance_ssd(
        copy.deepcopy(base),
        cls_loss=ClassWeightedLoss(SoftmaxFocalLoss(gamma=0.0), torch.tensor([1.0, 10.0, 1.0]), background_weight=0.5),
    )
    g0, g1 = _trunk_gradient(plain, images, targets), _trunk_gradient(weighted, images, targets)
    assert float(torch.nn.functional.cosine_similarity(g0, g1, dim=0)) < 0.95
    # per-box weights: the selected boxes' losses equal the unweighted ones times w[label]
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2, 3, -1, 0])
    got = weighted.cls_loss(logits, labels)
    expected = SoftmaxFocalLoss(gamma=0.0)(logits, labels) * torch.tensor([0.5, 1.0, 10.0, 1.0, 0.0, 0.5])
    torch.testing.assert_close(got, expected)
