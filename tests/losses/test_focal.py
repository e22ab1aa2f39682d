"""Focal loss: reference oracle, torchvision equivalence, degenerate cases, invariants, gradcheck, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from detbalance.losses import (
    SigmoidFocalLoss,
    SoftmaxFocalLoss,
    focal,
    sigmoid_focal_loss,
    softmax_focal_loss,
)
from tests.losses.inputs import REGIMES, classification_inputs
from tests.reference import focal as reference

HYPER = [(0.25, 2.0), (None, 2.0), (0.75, 0.0), (0.5, 1.0), (0.25, 0.5), (0.9, 3.5)]


def _loss_and_grad(fn, x, y, **kw):
    x = x.clone().requires_grad_(True)
    loss = fn(x, y, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("alpha,gamma", HYPER)
@pytest.mark.parametrize("regime", ["normal", "big", "mixed", "saturated"])
def test_sigmoid_matches_reference(alpha, gamma, regime):
    x, y = classification_inputs(13, 7, regime=regime, seed=1)
    expected = reference.sigmoid_focal(x, y, alpha=alpha, gamma=gamma)
    got64 = sigmoid_focal_loss(x.double(), y.double(), alpha=alpha, gamma=gamma)
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-12)
    got32 = sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(got32, expected.float(), rtol=1e-5, atol=1e-6)
    for reduction, op in (("sum", torch.sum), ("mean", torch.mean)):
        red = sigmoid_focal_loss(x.double(), y.double(), alpha=alpha, gamma=gamma, reduction=reduction)
        torch.testing.assert_close(red, op(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha,gamma", HYPER)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_matches_torchvision(alpha, gamma, regime, reduction):
    x, y = classification_inputs(37, 11, regime=regime, seed=2)
    a = -1 if alpha is None else alpha  # torchvision's "disable" sentinel
    ours, g_ours = _loss_and_grad(sigmoid_focal_loss, x, y, alpha=alpha, gamma=gamma, reduction=reduction)
    tv, g_tv = _loss_and_grad(tv_sigmoid_focal_loss, x, y, alpha=a, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(ours, tv, rtol=1e-5, atol=1e-6)
    # torchvision's gradient is NaN where p_t == 1 and gamma < 1 (0 * inf); ours is finite there (the limit, 0)
    assert torch.isfinite(g_ours).all()
    finite = torch.isfinite(g_tv)
    assert gamma < 1 or finite.all()
    torch.testing.assert_close(g_ours[finite], g_tv[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_matches_torchvision_soft_targets_and_target_grad(gamma):
    x, y = classification_inputs(9, 5, soft_targets=True, seed=3)
    ours, g_ours = _loss_and_grad(sigmoid_focal_loss, x, y, alpha=0.3, gamma=gamma)
    tv, g_tv = _loss_and_grad(tv_sigmoid_focal_loss, x, y, alpha=0.3, gamma=gamma)
    torch.testing.assert_close(ours, tv)
    torch.testing.assert_close(g_ours, g_tv)
    # targets that need a gradient take the plain-autograd path; both gradients match torchvision
    grads = []
    for fn, a in ((sigmoid_focal_loss, 0.3), (tv_sigmoid_focal_loss, 0.3)):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        fn(xx, yy, alpha=a, gamma=gamma, reduction="sum").backward()
        grads.append((xx.grad, yy.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_sigmoid_weight_per_element_and_per_row():
    x, y = classification_inputs(20, 6, seed=4)
    w_row = torch.rand(20)
    w_el = w_row[:, None].expand(20, 6).contiguous()
    base, g_base = _loss_and_grad(tv_sigmoid_focal_loss, x, y)
    for w in (w_row, w_el):
        got, g = _loss_and_grad(sigmoid_focal_loss, x, y, weight=w)
        torch.testing.assert_close(got, base * w_el)
        torch.testing.assert_close(g, g_base * w_el)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_degenerate_is_bce(reduction):
    x, y = classification_inputs(50, 9, regime="mixed", seed=5)
    got, g_got = _loss_and_grad(sigmoid_focal_loss, x, y, alpha=None, gamma=0.0, reduction=reduction)
    bce, g_bce = _loss_and_grad(F.binary_cross_entropy_with_logits, x, y, reduction=reduction)
    torch.testing.assert_close(got, bce)
    torch.testing.assert_close(g_got, g_bce)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 1.0), (0.75, 0.5)])
def test_sigmoid_invariants(alpha, gamma):
    x, y = classification_inputs(40, 8, regime="normal", seed=6)
    x, y = x.double(), y.double()
    focal_loss = sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert torch.all(focal_loss <= bce)
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
    torch.testing.assert_close(focal_loss / bce, (1 - p_t) ** gamma * alpha_t)


@pytest.mark.parametrize("alpha,gamma", HYPER)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sigmoid_gradcheck(alpha, gamma, reduction):
    x, y = classification_inputs(6, 4, seed=7, dtype=torch.float64)
    x.requires_grad_(True)
    w = torch.rand(6, 4, dtype=torch.float64)
    assert gradcheck(
        lambda t: sigmoid_focal_loss(t, y, alpha=alpha, gamma=gamma, weight=w, reduction=reduction), (x,)
    )


def test_sigmoid_gradcheck_soft_targets_and_target_grad():
    x, y = classification_inputs(5, 3, seed=8, dtype=torch.float64, soft_targets=True)
    x.requires_grad_(True)
    assert gradcheck(lambda t: sigmoid_focal_loss(t, y, gamma=1.5), (x,))
    y.requires_grad_(True)
    assert gradcheck(lambda t, u: sigmoid_focal_loss(t, u, gamma=2.0), (x, y))


def test_sigmoid_blocking_is_invisible(monkeypatch):
    """Several blocks (with a ragged last one) give the same loss and gradient as one block."""
    x, y = classification_inputs(101, 7, regime="mixed", seed=9)
    w = torch.rand(101)
    one = [_loss_and_grad(sigmoid_focal_loss, x, y, weight=w, reduction=r) for r in ("none", "sum")]
    monkeypatch.setattr(focal, "_CPU_BLOCK", 7 * 10)
    many = [_loss_and_grad(sigmoid_focal_loss, x, y, weight=w, reduction=r) for r in ("none", "sum")]
    for (l1, g1), (l2, g2) in zip(one, many, strict=True):
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("shape", [(17,), (2, 3, 5), (4, 1)])
def test_sigmoid_any_shape_and_non_contiguous(shape):
    x, y = classification_inputs(1, int(torch.tensor(shape).prod()), seed=10)
    x, y = x.reshape(shape), y.reshape(shape)
    got, g = _loss_and_grad(sigmoid_focal_loss, x, y)
    tv, g_tv = _loss_and_grad(tv_sigmoid_focal_loss, x, y)
    torch.testing.assert_close(got, tv)
    torch.testing.assert_close(g, g_tv)
    xt, yt = classification_inputs(8, 5, seed=11)
    got, g = _loss_and_grad(sigmoid_focal_loss, xt.t(), yt.t())
    tv, g_tv = _loss_and_grad(tv_sigmoid_focal_loss, xt.t(), yt.t())
    torch.testing.assert_close(got, tv)
    torch.testing.assert_close(g, g_tv)


def test_sigmoid_saturated_logits_finite():
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0]])
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    for gamma in (0.0, 0.5, 2.0):
        loss, g = _loss_and_grad(sigmoid_focal_loss, x, y, alpha=0.25, gamma=gamma)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        torch.testing.assert_close(loss[0, :2], torch.zeros(2))  # confident and right: no loss
        torch.testing.assert_close(g[0, :2], torch.zeros(2))
        torch.testing.assert_close(loss[0, 2:], torch.tensor([0.75 * 100.0, 0.25 * 100.0]))
        torch.testing.assert_close(g[0, 2:], torch.tensor([0.75, -0.25]))  # d/dx = alpha_t (p - y)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_empty_input(reduction):
    x = torch.zeros(0, 5, requires_grad=True)
    loss = sigmoid_focal_loss(x, torch.zeros(0, 5), reduction=reduction)
    assert loss.shape == ((0, 5) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sigmoid_low_precision(dtype):
    x, y = classification_inputs(64, 10, regime="normal", seed=12)
    xl, yl = x.to(dtype), y.to(dtype)
    ref, g_ref = _loss_and_grad(sigmoid_focal_loss, xl.float(), yl.float(), reduction="sum")
    got, g = _loss_and_grad(sigmoid_focal_loss, xl, yl, reduction="sum")
    assert got.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # float32 inside: same as upcasting first
    torch.testing.assert_close(g.float(), g_ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-3)


def test_sigmoid_autocast_computes_in_float32():
    x, y = classification_inputs(32, 6, seed=13)
    ref = sigmoid_focal_loss(x, y, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sigmoid_focal_loss(x, y, reduction="sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_sigmoid_fp16_large_sum_is_finite():
    """200k x 80 fp16 logits: the float32 accumulation stays finite (torchvision's fp16 sum overflows)."""
    x, y = classification_inputs(200_000, 80, regime="normal", seed=14)
    x, y = (x * 4).half(), y.half()
    got = sigmoid_focal_loss(x, y, reduction="sum")
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() > float(torch.finfo(torch.float16).max)  # the true sum is beyond fp16's range
    torch.testing.assert_close(got, sigmoid_focal_loss(x.float(), y.float(), reduction="sum"))
    assert torch.isinf(tv_sigmoid_focal_loss(x, y, reduction="sum"))  # the defect we avoid


def test_sigmoid_second_backward_with_retain_graph():
    x, y = classification_inputs(4, 3, seed=15)
    x.requires_grad_(True)
    loss = sigmoid_focal_loss(x, y, reduction="sum")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_sigmoid_no_grad_path():
    x, y = classification_inputs(10, 4, seed=16)
    with torch.no_grad():
        got = sigmoid_focal_loss(x.requires_grad_(), y)
    torch.testing.assert_close(got, tv_sigmoid_focal_loss(x.detach(), y))


def test_sigmoid_module_matches_functional():
    x, y = classification_inputs(10, 4, seed=17)
    w = torch.rand(10)
    mod = SigmoidFocalLoss(alpha=0.4, gamma=1.5, reduction="sum")
    assert mod.self_normalizing is False
    torch.testing.assert_close(
        mod(x, y, w), sigmoid_focal_loss(x, y, alpha=0.4, gamma=1.5, weight=w, reduction="sum")
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(reduction="avg"), "reduction"),
        (dict(gamma=-1.0), "gamma"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-1), "alpha"),
        (dict(weight=torch.ones(3)), "weight"),
    ],
)
def test_sigmoid_rejects_bad_args(kwargs, match):
    x, y = torch.zeros(4, 2), torch.zeros(4, 2)
    with pytest.raises(ValueError, match=match):
        sigmoid_focal_loss(x, y, **kwargs)


def test_sigmoid_rejects_shape_mismatch_and_int_logits():
    with pytest.raises(ValueError, match="targets"):
        sigmoid_focal_loss(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="logits"):
        sigmoid_focal_loss(torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="gamma"):
        SigmoidFocalLoss(gamma=-0.5)


# ---------------------------------------------------------------------------------------------- softmax focal


def _softmax_inputs(n=30, c=6, seed=20, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen) * 3
    labels = torch.randint(0, c, (n,), generator=gen)
    if ignore:
        labels[::7] = -1
    return x, labels


@pytest.mark.parametrize("alpha", [None, 0.25, "tensor"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_matches_reference(alpha, gamma):
    x, labels = _softmax_inputs()
    a = torch.linspace(0.1, 0.9, 6, dtype=torch.float64) if alpha == "tensor" else alpha
    expected = reference.softmax_focal(x, labels, alpha=a, gamma=gamma)
    got = softmax_focal_loss(x.double(), labels, alpha=a, gamma=gamma)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    keep = labels != -1
    torch.testing.assert_close(
        softmax_focal_loss(x.double(), labels, alpha=a, gamma=gamma, reduction="mean"),
        expected.sum() / keep.sum(),
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_softmax_degenerate_is_cross_entropy(reduction):
    x, labels = _softmax_inputs(seed=21)
    got, g = _loss_and_grad(softmax_focal_loss, x, labels, alpha=None, gamma=0.0, reduction=reduction)
    ce, g_ce = _loss_and_grad(F.cross_entropy, x, labels, ignore_index=-1, reduction=reduction)
    torch.testing.assert_close(got, ce)
    torch.testing.assert_close(g, g_ce)


def test_softmax_invariants_and_alpha_semantics():
    x, labels = _softmax_inputs(seed=22, ignore=False)
    x = x.double()
    ce = F.cross_entropy(x, labels, reduction="none")
    p_t = F.softmax(x, 1).gather(1, labels[:, None]).squeeze(1)
    got = softmax_focal_loss(x, labels, alpha=0.25, gamma=2.0)
    alpha_t = torch.where(labels > 0, 0.25, 0.75).double()
    assert torch.all(got <= ce)
    torch.testing.assert_close(got / ce, (1 - p_t) ** 2 * alpha_t)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_softmax_gradcheck(gamma):
    x, labels = _softmax_inputs(n=7, c=4, seed=23)
    x = x.double().requires_grad_(True)
    w = torch.rand(7, dtype=torch.float64)
    assert gradcheck(lambda t: softmax_focal_loss(t, labels, alpha=0.3, gamma=gamma, weight=w), (x,))


def test_softmax_saturated_empty_and_low_precision():
    x = torch.tensor([[100.0, -100.0], [-100.0, 100.0]], requires_grad=True)
    loss = softmax_focal_loss(x, torch.tensor([0, 0]), gamma=0.5)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.detach(), torch.tensor([0.0, 200.0]))
    e = torch.zeros(0, 3, requires_grad=True)
    out = softmax_focal_loss(e, torch.zeros(0, dtype=torch.int64), reduction="mean")
    assert out.item() == 0.0
    out.backward()
    xs, labels = _softmax_inputs(seed=24)
    ref = softmax_focal_loss(xs.half().float(), labels, gamma=2.0, reduction="sum")
    got = softmax_focal_loss(xs.half(), labels, gamma=2.0, reduction="sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_softmax_module_matches_functional():
    x, labels = _softmax_inputs(seed=25)
    a = torch.rand(6)
    mod = SoftmaxFocalLoss(alpha=a, gamma=1.0, reduction="mean")
    assert mod.self_normalizing is False
    torch.testing.assert_close(
        mod(x, labels), softmax_focal_loss(x, labels, alpha=a, gamma=1.0, reduction="mean")
    )
    mod2 = SoftmaxFocalLoss(alpha=0.3)
    torch.testing.assert_close(mod2(x, labels), softmax_focal_loss(x, labels, alpha=0.3))


@pytest.mark.parametrize(
    "labels,kwargs,match",
    [
        (torch.tensor([0, 1, 6]), {}, "labels"),
        (torch.tensor([0, 1, -2]), {}, "labels"),
        (torch.tensor([0, 1]), {}, "labels"),
        (torch.tensor([0.0, 1.0, 2.0]), {}, "labels"),
        (torch.tensor([0, 1, 2]), dict(alpha=torch.ones(5)), "alpha"),
        (torch.tensor([0, 1, 2]), dict(alpha=2.0), "alpha"),
        (torch.tensor([0, 1, 2]), dict(gamma=-2.0), "gamma"),
        (torch.tensor([0, 1, 2]), dict(reduction="batch"), "reduction"),
        (torch.tensor([0, 1, 2]), dict(weight=torch.ones(2)), "weight"),
    ],
)
def test_softmax_rejects_bad_args(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        softmax_focal_loss(torch.zeros(3, 6), labels, **kwargs)


def test_sigmoid_no_gradient_sweep_without_grad(monkeypatch):
    seen = []
    original = focal._focal_block

    def spy(*args):
        seen.append(args[-1] is None)  # grad_out
        return original(*args)

    monkeypatch.setattr(focal, "_focal_block", spy)
    x, y = classification_inputs(10, 4, seed=18)
    x.requires_grad_(True)
    with torch.no_grad():
        sigmoid_focal_loss(x, y)
    sigmoid_focal_loss(x.detach(), y)
    assert seen == [True, True]
    sigmoid_focal_loss(x, y)
    assert seen[-1] is False
