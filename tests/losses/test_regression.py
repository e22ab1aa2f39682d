"""Smooth L1, ASL1, L1 and GIoU: closed forms, torch/torchvision equivalence, gradcheck, dtypes, bad args."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torchvision.ops import generalized_box_iou_loss

from detbalance.losses import ASL1Loss, GIoULoss, L1Loss, SmoothL1Loss, asl1_loss, smooth_l1_loss


def _pair(n=20, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen).to(dtype) * 0.3, torch.randn(n, 4, generator=gen).to(dtype) * 0.3


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9.0, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_smooth_l1_matches_torch(beta, reduction):
    p, t = _pair(seed=1)
    torch.testing.assert_close(
        smooth_l1_loss(p, t, beta=beta, reduction=reduction),
        F.smooth_l1_loss(p, t, beta=beta, reduction=reduction),
    )


def test_smooth_l1_hand_computed():
    p = torch.tensor([0.0, 0.05, 0.5, -2.0])
    got = smooth_l1_loss(p, torch.zeros(4), beta=0.1)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5 * 0.05**2 / 0.1, 0.5 - 0.05, 2.0 - 0.05]))


def test_asl1_closed_form_and_gradient():
    mu = 0.02
    d = torch.tensor([0.0, 1e-4, 0.02, 0.3, -1.0], dtype=torch.float64, requires_grad=True)
    loss = asl1_loss(d, torch.zeros(5, dtype=torch.float64), mu=mu)
    expected = torch.tensor([math.sqrt(v * v + mu * mu) - mu for v in d.tolist()], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    torch.testing.assert_close(d.grad, d.detach() / torch.sqrt(d.detach() ** 2 + mu**2))
    assert torch.all(d.grad.abs() < 1)
    # tiny residuals: no cancellation (sqrt(d^2 + mu^2) - mu in float32 would give 0 here)
    tiny = asl1_loss(torch.tensor([1e-5]), torch.zeros(1), mu=0.02)
    torch.testing.assert_close(tiny, torch.tensor([1e-10 / 0.04]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("fn", ["smooth_l1", "asl1"])
def test_regression_gradcheck(fn):
    p, t = _pair(6, seed=2, dtype=torch.float64)
    p.requires_grad_(True)
    f = (
        (lambda a: smooth_l1_loss(a, t, beta=0.1))
        if fn == "smooth_l1"
        else (lambda a: asl1_loss(a, t, mu=0.05))
    )
    assert gradcheck(f, (p,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_regression_low_precision_and_autocast(dtype):
    p, t = _pair(seed=3)
    for fn, kw in ((smooth_l1_loss, dict(beta=0.1)), (asl1_loss, dict(mu=0.02))):
        got = fn(p.to(dtype), t.to(dtype), reduction="sum", **kw)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, fn(p.to(dtype).float(), t.to(dtype).float(), reduction="sum", **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert asl1_loss(p, t).dtype == torch.float32


def test_regression_empty_input():
    for fn in (smooth_l1_loss, asl1_loss):
        p = torch.zeros(0, 4, requires_grad=True)
        out = fn(p, torch.zeros(0, 4), reduction="mean")
        assert out.item() == 0.0
        out.backward()


def test_modules_match_functional():
    p, t = _pair(seed=4)
    torch.testing.assert_close(SmoothL1Loss(beta=0.2)(p, t), smooth_l1_loss(p, t, beta=0.2))
    torch.testing.assert_close(
        ASL1Loss(mu=0.1, reduction="sum")(p, t), asl1_loss(p, t, mu=0.1, reduction="sum")
    )
    torch.testing.assert_close(L1Loss()(p, t), (p - t).abs())
    for cls in (SmoothL1Loss, ASL1Loss, L1Loss, GIoULoss):
        assert cls.self_normalizing is False


def test_giou_matches_torchvision():
    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(10, 2, generator=gen) * 50
    a = torch.cat([xy, xy + torch.rand(10, 2, generator=gen) * 20 + 1], 1)
    xy = torch.rand(10, 2, generator=gen) * 50
    b = torch.cat([xy, xy + torch.rand(10, 2, generator=gen) * 20 + 1], 1)
    torch.testing.assert_close(GIoULoss()(a, b), generalized_box_iou_loss(a, b))
    torch.testing.assert_close(GIoULoss()(a, a), torch.zeros(10), atol=1e-6, rtol=0)
    assert GIoULoss(reduction="sum")(a.half(), b.half()).dtype == torch.float32


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: smooth_l1_loss(torch.zeros(2, 4), torch.zeros(2, 4), beta=-1.0), "beta"),
        (lambda: asl1_loss(torch.zeros(2, 4), torch.zeros(2, 4), mu=0.0), "mu"),
        (lambda: asl1_loss(torch.zeros(2, 4), torch.zeros(2, 3)), "target"),
        (lambda: smooth_l1_loss(torch.zeros(2, 4), torch.zeros(2, 4), reduction="avg"), "reduction"),
        (lambda: GIoULoss()(torch.zeros(2, 3), torch.zeros(2, 3)), "pred"),
        (lambda: L1Loss(reduction="x"), "reduction"),
        (lambda: smooth_l1_loss(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)), "pred"),
    ],
)
def test_regression_rejects_bad_args(call, match):
    with pytest.raises(ValueError, match=match):
        call()
