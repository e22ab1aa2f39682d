"""QFL and VFL: mmdetection 3.3 transcription (value, gradient, 3 optimisation steps), gradcheck, dtypes, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from detbalance.losses import (
    AnchorBatch,
    QualityFocalLoss,
    ScaledLoss,
    SigmoidFocalLoss,
    VarifocalLoss,
    aligned_box_iou,
    quality_focal_loss,
    quality_targets,
    varifocal_loss,
)
from tests.losses.inputs import REGIMES, classification_inputs
from tests.reference import mmdet_quality as mm


def _quality_inputs(n, k, *, regime="normal", seed=0, pos_fraction=0.3, dtype=torch.float64):
    """Logits and one-hot soft IoU targets (one positive column per positive row), plus labels 0..K-1 / K (mmdet)."""
    x, _ = classification_inputs(n, k, regime=regime, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    pos = torch.rand(n, generator=gen) < pos_fraction
    cls = torch.randint(0, k, (n,), generator=gen)
    score = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    score[::7] = 0.0  # a positive whose IoU is 0 (GFL does not clamp)
    label_mm = torch.where(pos, cls, torch.full_like(cls, k))
    y = torch.zeros(n, k, dtype=dtype)
    y[pos.nonzero().squeeze(1), cls[pos]] = score[pos]
    return x, y, label_mm, torch.where(pos, score, torch.zeros_like(score))


def _grad(fn, x, *args, **kw):
    x = x.clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out.sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.0, 3.0, 1.5])
@pytest.mark.parametrize("regime", REGIMES)
def test_qfl_matches_mmdet_both_target_forms(beta, regime):
    x, y, label, score = _quality_inputs(41, 6, regime=regime, seed=1)
    ours, g_ours = _grad(quality_focal_loss, x, y, beta=beta)
    ref_t, g_t = _grad(mm.quality_focal_loss_tensor_target, x, y, beta=beta, reduction="none")
    ref_l, g_l = _grad(mm.quality_focal_loss, x, (label, score), beta=beta, reduction="none")
    torch.testing.assert_close(ours.sum(1), ref_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.sum(1), ref_l, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_ours, g_l, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha,gamma,iou_weighted", [(0.75, 2.0, True), (0.75, 2.0, False), (0.25, 1.0, True),
                                                      (1.0, 0.0, True), (0.5, 3.0, False), (0.75, 1.5, True)])
@pytest.mark.parametrize("regime", REGIMES)
def test_vfl_matches_mmdet(alpha, gamma, iou_weighted, regime):
    x, y, _, _ = _quality_inputs(41, 6, regime=regime, seed=2)
    kw = dict(alpha=alpha, gamma=gamma, iou_weighted=iou_weighted)
    ours, g_ours = _grad(varifocal_loss, x, y, **kw)
    ref, g_ref = _grad(mm.varifocal_loss, x, y, reduction="none", **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


def test_three_steps_equal_the_modules_of_mmdet():
    """Three SGD steps: ours (reduction none, summed / avg_factor as the heads do) and mmdet's modules agree."""
    x0, y, _, _ = _quality_inputs(64, 5, seed=3)
    w = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for ours_mod, ref_mod in (
        (QualityFocalLoss(), mm.QualityFocalLoss(beta=2.0)),
        (VarifocalLoss(), mm.VarifocalLoss(alpha=0.75, gamma=2.0, iou_weighted=True)),
    ):
        xa, xb = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        opt_a, opt_b = torch.optim.SGD([xa], lr=5.0), torch.optim.SGD([xb], lr=5.0)
        for _ in range(3):
            opt_a.zero_grad()
            opt_b.zero_grad()
            avg = float((y > 0).sum())
            eps = torch.finfo(torch.float32).eps  # weight_reduce_loss divides by avg_factor + eps
            la = ours_mod(xa, y, weight=w.squeeze(1)).sum() / (avg + eps)
            ref_weight = w.squeeze(1) if isinstance(ref_mod, mm.QualityFocalLoss) else w.expand_as(y)
            lb = ref_mod(xb, y, weight=ref_weight, avg_factor=avg)
            la.backward()
            lb.backward()
            torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
            opt_a.step()
            opt_b.step()
        torch.testing.assert_close(xa, xb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fn,kw", [(quality_focal_loss, {"beta": 2.0}), (quality_focal_loss, {"beta": 1.5}),
                                   (varifocal_loss, {}), (varifocal_loss, {"iou_weighted": False, "gamma": 1.0})])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradcheck_float64(fn, kw, reduction):
    x, y, _, _ = _quality_inputs(9, 4, seed=4)
    x = x.requires_grad_(True)
    w = torch.rand(9, dtype=torch.float64)
    assert gradcheck(lambda t: fn(t, y, weight=w, reduction=reduction, **kw), (x,), eps=1e-6, atol=1e-8)


def test_closed_forms_and_degenerate_cases():
    x, y, _, _ = _quality_inputs(30, 4, seed=5)
    p = torch.sigmoid(x)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    torch.testing.assert_close(quality_focal_loss(x, y, beta=0.0), bce)  # beta 0: soft BCE
    torch.testing.assert_close(quality_focal_loss(x, y), bce * (y - p) ** 2)
    pos = y > 0
    vfl = varifocal_loss(x, y)
    torch.testing.assert_close(vfl[pos], (y * bce)[pos])
    torch.testing.assert_close(vfl[~pos], (0.75 * p**2 * bce)[~pos])
    # with hard 0/1 targets, QFL is focal loss without alpha (gamma = beta)
    hard = (y > 0).double()
    torch.testing.assert_close(quality_focal_loss(x, hard), SigmoidFocalLoss(alpha=None, gamma=2.0)(x, hard))
    # invariant: QFL <= BCE elementwise (|y - p| <= 1); VFL <= BCE
    assert (quality_focal_loss(x, y) <= bce + 1e-12).all() and (vfl <= bce + 1e-12).all()


def test_weight_per_row_and_per_element_and_module_equals_function():
    x, y, _, _ = _quality_inputs(12, 3, seed=6)
    w_row = torch.rand(12, dtype=torch.float64)
    base = quality_focal_loss(x, y)
    torch.testing.assert_close(quality_focal_loss(x, y, weight=w_row), base * w_row[:, None])
    torch.testing.assert_close(quality_focal_loss(x, y, weight=w_row[:, None].expand(12, 3)), base * w_row[:, None])
    torch.testing.assert_close(QualityFocalLoss(beta=1.0)(x, y), quality_focal_loss(x, y, beta=1.0))
    torch.testing.assert_close(
        VarifocalLoss(alpha=0.5, gamma=1.0, iou_weighted=False)(x, y),
        varifocal_loss(x, y, alpha=0.5, gamma=1.0, iou_weighted=False),
    )


@pytest.mark.parametrize("fn", [quality_focal_loss, varifocal_loss])
def test_saturated_empty_and_low_precision(fn):
    x, y, _, _ = _quality_inputs(20, 5, regime="saturated", seed=7, dtype=torch.float32)
    loss, g = _grad(fn, x, y)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    empty = torch.zeros(0, 5, requires_grad=True)
    out = fn(empty, torch.zeros(0, 5), reduction="mean")
    assert out.item() == 0.0
    out.backward()
    x, y, _, _ = _quality_inputs(50, 8, seed=8, dtype=torch.float32)
    ref = fn(x, y)
    for dt in (torch.float16, torch.bfloat16):
        got = fn(x.to(dt), y.to(dt))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(x.to(dt).float(), y.to(dt).float()))
        torch.testing.assert_close(got, ref, rtol=0.05, atol=5e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x, y).dtype == torch.float32
    # fp16 gradient is the float32 gradient cast once
    xh = x.half().requires_grad_(True)
    fn(xh, y.half(), reduction="sum").backward()
    x32 = x.half().float().requires_grad_(True)
    fn(x32, y.half().float(), reduction="sum").backward()
    torch.testing.assert_close(xh.grad, x32.grad.half())


def test_targets_requiring_grad_use_autograd_path():
    x, y, _, _ = _quality_inputs(10, 3, seed=10)
    yg = y.clone().requires_grad_(True)
    torch.testing.assert_close(quality_focal_loss(x, yg), quality_focal_loss(x, y))
    torch.testing.assert_close(varifocal_loss(x, yg), varifocal_loss(x, y))


def test_bad_input_is_named():
    x, y, _, _ = _quality_inputs(6, 3, seed=11)
    with pytest.raises(ValueError, match=r"targets \(IoU quality\) must lie in \[0, 1\]"):
        quality_focal_loss(x, y + 1.5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        varifocal_loss(x, y - 0.5)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="logits must not be NaN, got 1 NaN"):
        quality_focal_loss(bad, y)
    with pytest.raises(ValueError, match="logits must not be NaN"):
        varifocal_loss(bad, y)
    quality_focal_loss(bad, y, validate_args=False)  # the check is behind validate_args
    with pytest.raises(ValueError, match="build it from labels and IoUs with quality_targets"):
        quality_focal_loss(x, torch.zeros(6, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="beta must be"):
        quality_focal_loss(x, y, beta=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        VarifocalLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="reduction must be"):
        varifocal_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="targets must have the shape"):
        varifocal_loss(x, y[:, :2])
    labels = torch.tensor([0, 1, 3, -1])
    with pytest.raises(ValueError, match=r"label"):
        quality_targets(torch.tensor([0, 4]), torch.tensor([0.5, 0.5]), num_classes=3)
    with pytest.raises(ValueError, match=r"label"):
        quality_targets(torch.tensor([-2, 1]), torch.tensor([0.5, 0.5]), num_classes=3)
    with pytest.raises(ValueError, match=r"quality \(IoU of the positives\) must lie in \[0, 1\]"):
        quality_targets(labels, torch.tensor([0.0, 1.2, 0.3, 0.0]), num_classes=3)
    with pytest.raises(ValueError, match=r"quality \(IoU of the positives\) must lie in \[0, 1\]"):
        quality_targets(labels, torch.tensor([0.0, float("nan"), 0.3, 0.0]), num_classes=3)


def test_quality_targets_and_aligned_iou_against_mmdet():
    labels = torch.tensor([0, 2, -1, 3, 1])
    q = torch.tensor([0.9, 0.4, 0.8, 0.0, 1.0])  # background/ignored qualities are not read
    t = quality_targets(labels, q, num_classes=3)
    expected = torch.tensor([[0, 0, 0], [0, 0.4, 0], [0, 0, 0], [0, 0, 0.0], [1.0, 0, 0]])
    torch.testing.assert_close(t, expected)
    gen = torch.Generator().manual_seed(12)
    a = torch.rand(50, 2, generator=gen) * 50
    b = torch.rand(50, 2, generator=gen) * 50
    boxes1 = torch.cat([a, a + torch.rand(50, 2, generator=gen) * 30], 1).double()
    boxes2 = torch.cat([b, b + torch.rand(50, 2, generator=gen) * 30], 1).double()
    boxes2[:5] = boxes1[:5]
    boxes1[5] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # degenerate: union floored at eps, IoU 0
    got = aligned_box_iou(boxes1, boxes2)
    torch.testing.assert_close(got, mm.bbox_overlaps_aligned(boxes1, boxes2))
    torch.testing.assert_close(got[:5], torch.ones(5, dtype=torch.float64))


def _dense_batch(seed=13, n=60, k=4):
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.rand(n, 2, generator=gen) * 100
    anchors = torch.cat([anchors, anchors + 10 + torch.rand(n, 2, generator=gen) * 40], 1)
    matched = anchors + torch.randn(n, 4, generator=gen) * 4
    matched[:, 2:] = torch.maximum(matched[:, 2:], matched[:, :2] + 1)
    pred = anchors + torch.randn(n, 4, generator=gen) * 8
    pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2] + 1)
    pred[3] = matched[3] + 500  # a positive whose predicted box misses: IoU 0
    labels = torch.randint(-1, k + 1, (n,), generator=gen)
    labels[3] = 2
    logits = torch.randn(n, k, generator=gen, requires_grad=True)
    return AnchorBatch(logits=logits, labels=labels, anchors=anchors, matched_boxes=matched,
                       pred_boxes=pred.requires_grad_(True))


def test_dense_targets_follow_the_reference_heads():
    batch = _dense_batch()
    k = batch.logits.shape[1]
    mm_labels = torch.where(batch.labels > 0, batch.labels - 1, torch.full_like(batch.labels, k))
    pos = batch.labels > 0
    # GFL: (labels, score) with score = IoU of the detached decoded box, no clamp
    _, score = mm.gfl_cls_targets(mm_labels, batch.pred_boxes[pos], batch.matched_boxes[pos], k)
    qfl_t = QualityFocalLoss().dense_targets(batch)
    assert not qfl_t.requires_grad
    expected = torch.zeros(len(mm_labels), k)
    expected[pos.nonzero().squeeze(1), mm_labels[pos]] = score[pos]
    torch.testing.assert_close(qfl_t, expected)
    assert qfl_t[3, 1] == 0.0
    ref_loss = mm.QualityFocalLoss()(batch.logits, (mm_labels, score), weight=(batch.labels >= 0).float(),
                                     avg_factor=float(pos.sum()))
    ours = torch.where((batch.labels >= 0)[:, None], QualityFocalLoss()(batch.logits, qfl_t), 0.0).sum()
    torch.testing.assert_close(ours / float(pos.sum()), ref_loss, rtol=1e-5, atol=1e-6)
    # VFNet: IoU clamped at 1e-6, zeros elsewhere
    vfl_t = VarifocalLoss().dense_targets(batch)
    ref_t = mm.vfnet_cls_targets(batch.logits.detach(), mm_labels, batch.pred_boxes[pos],
                                 batch.matched_boxes[pos], k)
    torch.testing.assert_close(vfl_t, ref_t)
    assert vfl_t[3, 1] == pytest.approx(1e-6)
    # wrappers delegate; the default (focal) is the one-hot labels
    torch.testing.assert_close(ScaledLoss(VarifocalLoss(), 2.0).dense_targets(batch), vfl_t)
    expected_onehot = torch.zeros(len(mm_labels), k)
    expected_onehot[pos.nonzero().squeeze(1), mm_labels[pos]] = 1.0
    torch.testing.assert_close(SigmoidFocalLoss().dense_targets(batch), expected_onehot)


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_gradient_finite_where_the_target_is_met(beta):
    """``p == y`` exactly (saturated logits on hard targets, a 0.5 target at logit 0): the gradient is finite."""
    x = torch.tensor([[100.0, -100.0, 0.0, 3.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    for fn, kw in ((quality_focal_loss, {"beta": beta}), (varifocal_loss, {"gamma": beta})):
        x.grad = None
        fn(x, y, **kw).sum().backward()
        assert torch.isfinite(x.grad).all(), (fn.__name__, x.grad)
        assert x.grad[0, 0] == 0.0 and x.grad[0, 1] == 0.0
