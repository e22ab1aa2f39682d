"""Balanced L1 (Libra R-CNN) against mmdetection's ``balanced_l1_loss`` (tests/reference/mmdet_libra.py)."""

from __future__ import annotations

import math

import pytest
import torch

from detbalance.losses import BalancedL1Loss, balanced_l1_loss
from tests.reference import mmdet_libra as ref

HYPER = [(0.5, 1.5, 1.0), (0.3, 2.0, 0.5), (1.0, 1.0, 2.0)]


@pytest.mark.parametrize(("alpha", "gamma", "beta"), HYPER)
def test_value_and_gradient_equal_mmdetection(alpha, gamma, beta):
    g = torch.Generator().manual_seed(0)
    pred = (torch.randn(64, 4, generator=g) * 1.5).double().requires_grad_()
    target = torch.randn(64, 4, generator=g).double()
    ours = balanced_l1_loss(pred, target, alpha=alpha, gamma=gamma, beta=beta)
    pred_ref = pred.detach().clone().requires_grad_()
    theirs = ref.balanced_l1_loss(pred_ref, target, beta=beta, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(pred.grad, pred_ref.grad, rtol=1e-12, atol=1e-12)


def test_closed_form_points():
    """b = e^{gamma / alpha} - 1 = e^3 - 1; L(0) = 0; continuous at beta; outlier slope gamma; inlier slope
    alpha ln(b x / beta + 1) (the paper's eq. 7)."""
    b = math.e ** 3 - 1
    x = torch.tensor([0.0, 0.25, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    loss = balanced_l1_loss(x, torch.zeros_like(x))
    expected = [0.0, 0.5 / b * (b * 0.25 + 1) * math.log(b * 0.25 + 1) - 0.125, 1.5 + 1.5 / b - 0.5,
                3.0 + 1.5 / b - 0.5]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(x.grad[:2], 0.5 * torch.log(b * x.detach()[:2] + 1))
    torch.testing.assert_close(x.grad[2:], torch.full((2,), 1.5, dtype=torch.float64))
    # continuity at beta: the inlier branch reaches the outlier value there (alpha ln(b + 1) = gamma)
    inner = 0.5 / b * (b + 1) * math.log(b + 1) - 0.5
    assert inner == pytest.approx(1.5 + 1.5 / b - 0.5, rel=1e-12)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    pred = (torch.randn(12, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    target = torch.randn(12, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: balanced_l1_loss(p, target, beta=1.0), (pred,))
    assert torch.autograd.gradcheck(lambda p: balanced_l1_loss(p, target, alpha=0.3, gamma=2.0, beta=0.5), (pred,))


def test_module_reductions_and_half_precision():
    pred, target = torch.randn(10, 4), torch.randn(10, 4)
    per = balanced_l1_loss(pred, target)
    torch.testing.assert_close(BalancedL1Loss()(pred, target), per)
    torch.testing.assert_close(BalancedL1Loss(reduction="sum")(pred, target), per.sum())
    torch.testing.assert_close(balanced_l1_loss(pred, target, reduction="mean"), per.mean())
    half = balanced_l1_loss(pred.half(), target.half())
    assert half.dtype == torch.float32 and bool(torch.isfinite(half).all())
    assert BalancedL1Loss.kind == "box" and not BalancedL1Loss.self_normalizing


def test_saturated_and_empty_inputs():
    big = torch.tensor([[1e6, -1e6, 0.0, 3.0]], requires_grad=True)
    loss = balanced_l1_loss(big, torch.zeros_like(big))
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all()) and big.grad.abs().max() <= 1.5 + 1e-6
    empty = torch.zeros(0, 4, requires_grad=True)
    out = balanced_l1_loss(empty, torch.zeros(0, 4), reduction="sum")
    out.backward()
    assert float(out) == 0.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"alpha": 0.0}, "alpha"), ({"gamma": -1.0}, "gamma"), ({"beta": 0.0}, "beta"), ({"reduction": "avg"}, "reduction"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        balanced_l1_loss(torch.zeros(1, 4), torch.zeros(1, 4), **kwargs)
    with pytest.raises(ValueError, match=message):
        BalancedL1Loss(**kwargs)
