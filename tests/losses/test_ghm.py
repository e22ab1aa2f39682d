"""GHM-C / GHM-R: literal per-bin references, mmdetection cross-check, gradients, EMA state, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from detbalance.losses import GHMCLoss, GHMRLoss, ghm_c_loss, ghm_r_loss, gradient_density
from tests.losses.inputs import classification_inputs
from tests.reference import ghm as reference


def _g(x, y):
    return (torch.sigmoid(x) - y).abs()


def test_gradient_density_hand_computed():
    g = torch.tensor([0.0, 0.05, 0.1, 0.49, 0.5, 0.99, 1.0, 0.7])
    torch.testing.assert_close(gradient_density(g, bins=2), torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(gradient_density(g, bins=4), torch.tensor([3.0, 1.0, 2.0, 2.0]))
    valid = torch.tensor([True, False, True, True, True, True, False, True])
    torch.testing.assert_close(gradient_density(g, bins=4, valid=valid), torch.tensor([2.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(gradient_density(g, bins=1), torch.tensor([8.0]))
    assert gradient_density(torch.zeros(0), bins=3).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bins", [1, 3, 10, 30])
def test_gradient_density_matches_loop(bins):
    x, y = classification_inputs(50, 8, regime="mixed", seed=bins)
    g = _g(x.double(), y.double())
    valid = torch.rand(50, 8) > 0.2
    edges = [j / bins for j in range(bins + 1)]
    expected = [
        float(((g >= edges[j]) & ((g < edges[j + 1]) if j < bins - 1 else (g <= 1.0)) & valid).sum())
        for j in range(bins)
    ]
    assert gradient_density(g, bins=bins, valid=valid).tolist() == expected


@pytest.mark.parametrize("normalization", ["paper", "valid_bins"])
@pytest.mark.parametrize("bins", [1, 5, 30])
@pytest.mark.parametrize("with_valid", [False, True])
def test_ghm_c_matches_reference(normalization, bins, with_valid):
    x, y = classification_inputs(40, 6, regime="mixed", seed=bins, dtype=torch.float64)
    valid = (torch.rand(40) > 0.25) if with_valid else None
    expected = reference.ghm_c_reference(x, y, bins=bins, valid=valid, normalization=normalization)
    got = ghm_c_loss(x, y, bins=bins, valid=valid, normalization=normalization)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    n = 40 * 6 if valid is None else int(valid.sum()) * 6
    got_sum = ghm_c_loss(x, y, bins=bins, valid=valid, normalization=normalization, reduction="sum")
    torch.testing.assert_close(got_sum, expected * n)
    per = ghm_c_loss(x, y, bins=bins, valid=valid, normalization=normalization, reduction="none")
    torch.testing.assert_close(per.sum(), expected * n)
    if valid is not None:
        assert per[~valid].abs().sum() == 0


@pytest.mark.parametrize("bins", [4, 10, 30])
def test_valid_bins_matches_mmdetection(bins):
    x, y = classification_inputs(64, 5, regime="big", seed=bins)
    label_weight = (torch.rand(64, 5) > 0.1).float()
    mm = reference.MMDetGHMC(bins=bins)(x, y, label_weight)
    got = ghm_c_loss(x, y, bins=bins, valid=label_weight > 0, normalization="valid_bins")
    torch.testing.assert_close(got, mm)
    lit = reference.ghm_c_reference(x, y, bins=bins, valid=label_weight > 0, normalization="valid_bins")
    torch.testing.assert_close(lit.float(), mm)


def test_paper_and_valid_bins_agree_when_all_bins_populated():
    x = torch.linspace(-6, 6, 300)[:, None]
    y = torch.zeros_like(x)
    a = ghm_c_loss(x, y, bins=5, normalization="paper")
    b = ghm_c_loss(x, y, bins=5, normalization="valid_bins")
    assert (gradient_density(_g(x, y), bins=5) > 0).all()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bins", [3, 10])
def test_ghm_c_gradient_is_weighted_bce(bins):
    x, y = classification_inputs(30, 7, regime="normal", seed=11)
    valid = torch.rand(30, 7) > 0.2
    xr = x.clone().requires_grad_(True)
    ghm_c_loss(xr, y, bins=bins, valid=valid).backward()
    w = reference.beta_reference(_g(x, y), bins=bins, valid=valid).float()
    tot = valid.sum()
    torch.testing.assert_close(xr.grad, w * (torch.sigmoid(x) - y) / tot)


def test_ghm_c_uniform_gradients_equal_bce():
    # g = |sigmoid(x) - 0| hits the centre of each of M regions equally often: R_j = N / M, so beta = 1
    bins = 5
    g = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    x = torch.log(g / (1 - g)).repeat(4)[:, None]
    y = torch.zeros_like(x)
    xr, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = ghm_c_loss(xr, y, bins=bins)
    bce = F.binary_cross_entropy_with_logits(xb, y)
    got.backward()
    bce.backward()
    torch.testing.assert_close(got, bce)
    torch.testing.assert_close(xr.grad, xb.grad)


def test_ghm_c_one_bin_is_mean_bce():
    x, y = classification_inputs(25, 4, regime="mixed", seed=12)
    valid = torch.rand(25) > 0.3
    xr, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = ghm_c_loss(xr, y, bins=1, valid=valid)
    m = valid[:, None].expand(25, 4)
    bce = F.binary_cross_entropy_with_logits(xb[m], y[m])
    torch.testing.assert_close(got, bce)
    got.backward()
    bce.backward()
    torch.testing.assert_close(xr.grad, xb.grad)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ghm_c_gradcheck(reduction):
    x, y = classification_inputs(6, 3, seed=13, dtype=torch.float64)
    x.requires_grad_(True)
    w = torch.rand(6, 3, dtype=torch.float64)
    assert gradcheck(lambda t: ghm_c_loss(t, y, bins=4, weight=w, reduction=reduction), (x,))


def test_ghm_c_given_density_and_weight():
    x, y = classification_inputs(20, 5, seed=14, dtype=torch.float64)
    density = torch.rand(6, dtype=torch.float64) * 30 + 1
    expected = reference.ghm_c_reference(x, y, bins=6, density=density)
    torch.testing.assert_close(ghm_c_loss(x, y, bins=6, density=density), expected)
    w = torch.rand(20, dtype=torch.float64)
    per = ghm_c_loss(x, y, bins=6, reduction="none")
    torch.testing.assert_close(ghm_c_loss(x, y, bins=6, weight=w, reduction="none"), per * w[:, None])


def test_ghm_c_target_grad_path_matches_fused():
    x, y = classification_inputs(12, 3, soft_targets=True, seed=15)
    x1, x2, y2 = x.clone().requires_grad_(), x.clone().requires_grad_(), y.clone().requires_grad_()
    a = ghm_c_loss(x1, y, bins=7)
    b = ghm_c_loss(x2, y2, bins=7)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    assert y2.grad is not None


def test_ghm_c_saturated_empty_low_precision():
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    loss = ghm_c_loss(x, y, bins=10)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # two elements with g = 0 (bin 0) and two with g = 1 (bin 9); n = 2 non-empty bins: beta = 4 / (2 * 2)
    torch.testing.assert_close(loss, torch.tensor(1.0 * 200.0 / 4))
    # the paper's all-bins normalisation: beta = 4 / (2 * 10)
    torch.testing.assert_close(ghm_c_loss(x, y, bins=10, normalization="paper"), torch.tensor(0.2 * 200.0 / 4))
    e = torch.zeros(0, 80, requires_grad=True)
    out = ghm_c_loss(e, torch.zeros(0, 80))
    assert out.item() == 0.0
    out.backward()
    assert e.grad.shape == (0, 80)
    xs, ys = classification_inputs(64, 10, seed=16)
    for dtype in (torch.float16, torch.bfloat16):
        xl = xs.to(dtype).requires_grad_()
        got = ghm_c_loss(xl, ys.to(dtype), bins=10)
        ref = ghm_c_loss(xs.to(dtype).float(), ys, bins=10)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref)
        got.backward()
        assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()


def test_ghm_c_blocking_is_invisible(monkeypatch):
    from detbalance.losses import ghm

    x, y = classification_inputs(101, 7, regime="mixed", seed=17)
    valid = torch.rand(101) > 0.2
    xa = x.clone().requires_grad_()
    a = ghm_c_loss(xa, y, bins=10, valid=valid)
    a.backward()
    monkeypatch.setattr(ghm, "_CPU_BLOCK", 70)
    xb = x.clone().requires_grad_()
    b = ghm_c_loss(xb, y, bins=10, valid=valid)
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(xa.grad, xb.grad)


# ---------------------------------------------------------------------------------------------------- GHM-R


@pytest.mark.parametrize("normalization", ["paper", "valid_bins"])
@pytest.mark.parametrize("with_valid", [False, True])
def test_ghm_r_matches_reference_and_mmdetection(normalization, with_valid):
    gen = torch.Generator().manual_seed(18)
    pred = torch.randn(30, 4, generator=gen, dtype=torch.float64) * 0.05
    target = torch.randn(30, 4, generator=gen, dtype=torch.float64) * 0.05
    valid = (torch.rand(30, generator=gen) > 0.3) if with_valid else None
    expected = reference.ghm_r_reference(
        pred, target, mu=0.02, bins=10, valid=valid, normalization=normalization
    )
    got = ghm_r_loss(pred, target, mu=0.02, bins=10, valid=valid, normalization=normalization)
    torch.testing.assert_close(got, expected)
    if normalization == "valid_bins":
        lw = (
            torch.ones(30, 4, dtype=torch.float64) if valid is None else valid[:, None].expand(30, 4).double()
        )
        torch.testing.assert_close(got, reference.MMDetGHMR(mu=0.02, bins=10)(pred, target, lw))


def test_ghm_r_gradient_and_gradcheck():
    gen = torch.Generator().manual_seed(19)
    pred = (torch.randn(8, 4, generator=gen, dtype=torch.float64) * 0.05).requires_grad_()
    target = torch.randn(8, 4, generator=gen, dtype=torch.float64) * 0.05
    ghm_r_loss(pred, target, bins=5).backward()
    d = (pred - target).detach()
    g = d / torch.sqrt(d * d + 0.02**2)
    beta = reference.beta_reference(g.abs(), bins=5)
    torch.testing.assert_close(pred.grad, beta * g / d.numel())
    assert gradcheck(
        lambda p: ghm_r_loss(p, target, bins=5, reduction="none"), (pred.detach().requires_grad_(),)
    )


def test_ghm_r_one_bin_is_mean_asl1_and_empty():
    pred, target = torch.randn(10, 4), torch.randn(10, 4)
    d = pred - target
    torch.testing.assert_close(ghm_r_loss(pred, target, bins=1), (torch.sqrt(d * d + 0.02**2) - 0.02).mean())
    e = torch.zeros(0, 4, requires_grad=True)
    out = ghm_r_loss(e, torch.zeros(0, 4))
    assert out.item() == 0.0
    out.backward()


# --------------------------------------------------------------------------------------------------- modules


def test_module_matches_functional_without_momentum():
    x, y = classification_inputs(30, 5, seed=20)
    valid = torch.rand(30) > 0.2
    for norm in ("paper", "valid_bins"):
        mod = GHMCLoss(bins=12, momentum=None, normalization=norm)
        torch.testing.assert_close(
            mod(x, y, valid), ghm_c_loss(x, y, bins=12, valid=valid, normalization=norm)
        )
    pred, target = torch.randn(9, 4) * 0.05, torch.randn(9, 4) * 0.05
    torch.testing.assert_close(GHMRLoss(momentum=0.0)(pred, target), ghm_r_loss(pred, target))
    assert GHMCLoss.self_normalizing and GHMRLoss.self_normalizing


def test_ema_first_step_with_bias_correction_is_batch_density():
    x, y = classification_inputs(40, 6, regime="mixed", seed=21)
    mod = GHMCLoss(bins=10, momentum=0.75, bias_correction=True)
    got = mod(x, y)
    torch.testing.assert_close(got, ghm_c_loss(x, y, bins=10))
    torch.testing.assert_close(mod.last_density, gradient_density(_g(x, y), bins=10))
    assert int(mod.ema_steps) == 1


def test_ema_two_steps_by_hand():
    m, bins = 0.75, 6
    (x1, y1), (x2, y2) = (
        classification_inputs(30, 4, seed=22),
        classification_inputs(50, 4, regime="big", seed=23),
    )
    h1, h2 = gradient_density(_g(x1, y1), bins=bins), gradient_density(_g(x2, y2), bins=bins)
    # option: every bin decays (empty ones too) and the EMA is bias-corrected, paper normalisation
    mod = GHMCLoss(bins=bins, momentum=m, bias_correction=True, empty_bins="decay", normalization="paper")
    mod(x1, y1)
    out2 = mod(x2, y2)
    ema = m * (1 - m) * h1 + (1 - m) * h2
    torch.testing.assert_close(mod.ema_density, ema)
    expected_density = ema / (1 - m**2)
    torch.testing.assert_close(mod.last_density, expected_density)
    torch.testing.assert_close(
        out2, ghm_c_loss(x2, y2, bins=bins, density=expected_density, normalization="paper")
    )
    # default (mmdetection): zero-initialised EMA, first step 1/(1-m) = 4x the weights; only populated bins move
    raw = GHMCLoss(bins=bins, momentum=m)
    first = raw(x1, y1)
    torch.testing.assert_close(raw.last_density, (1 - m) * h1)
    torch.testing.assert_close(first, ghm_c_loss(x1, y1, bins=bins) / (1 - m))
    raw(x2, y2)
    keep = torch.where(h2 > 0, m * (1 - m) * h1 + (1 - m) * h2, (1 - m) * h1)
    torch.testing.assert_close(raw.ema_density, keep)
    assert raw.bin_updates.tolist() == ((h1 > 0).long() + (h2 > 0).long()).tolist()


def test_ema_matches_mmdetection_without_bias_correction_when_bins_stay_populated():
    m, bins = 0.75, 4
    x1 = torch.linspace(-5, 5, 400)[:, None]
    x2 = torch.linspace(-4, 6, 400)[:, None]
    y = torch.zeros_like(x1)
    mm = reference.MMDetGHMC(bins=bins, momentum=m)
    ours = GHMCLoss(bins=bins, momentum=m)
    for x in (x1, x2):
        torch.testing.assert_close(ours(x, y), mm(x, y, torch.ones_like(y)))


def test_eval_mode_does_not_update_and_uses_ema():
    x, y = classification_inputs(30, 4, seed=24)
    x2, y2 = classification_inputs(30, 4, regime="big", seed=25)
    mod = GHMCLoss(bins=8, bias_correction=True).eval()
    torch.testing.assert_close(mod(x, y), ghm_c_loss(x, y, bins=8))  # no EMA yet: batch density
    assert int(mod.ema_steps) == 0 and mod.ema_density.sum() == 0
    mod.train()
    mod(x, y)
    state = mod.ema_density.clone()
    mod.eval()
    out = mod(x2, y2)
    torch.testing.assert_close(mod.ema_density, state)
    assert int(mod.ema_steps) == 1
    torch.testing.assert_close(out, ghm_c_loss(x2, y2, bins=8, density=state / 0.25))


def test_ghm_r_module_ema_and_state_dict():
    pred, target = torch.randn(20, 4) * 0.05, torch.randn(20, 4) * 0.05
    mod = GHMRLoss(bias_correction=True)
    torch.testing.assert_close(mod(pred, target), ghm_r_loss(pred, target))
    sd = mod.state_dict()
    assert set(sd) == {"ema_density", "ema_steps", "bin_updates"}
    fresh = GHMRLoss(bias_correction=True)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(pred, target), mod(pred, target))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bins=0), "bins"),
        (dict(bins=2.5), "bins"),
        (dict(normalization="mmdet"), "normalization"),
        (dict(reduction="avg"), "reduction"),
        (dict(density=torch.ones(3)), "density"),
        (dict(valid=torch.ones(3, dtype=torch.bool)), "valid"),
    ],
)
def test_ghm_c_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ghm_c_loss(torch.zeros(4, 2), torch.zeros(4, 2), **kwargs)


def test_ghm_rejects_bad_args_misc():
    with pytest.raises(ValueError, match="targets"):
        ghm_c_loss(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="mu"):
        ghm_r_loss(torch.zeros(4, 4), torch.zeros(4, 4), mu=0.0)
    with pytest.raises(ValueError, match="target"):
        ghm_r_loss(torch.zeros(4, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="momentum"):
        GHMCLoss(momentum=1.0)
    with pytest.raises(ValueError, match="bins"):
        GHMRLoss(bins=0)
    with pytest.raises(ValueError, match="normalization"):
        GHMCLoss(normalization="x")
    with pytest.raises(ValueError, match="bins"):
        gradient_density(torch.zeros(3), bins=0)


def test_histogram_is_all_reduced_before_the_ema(monkeypatch):
    """With a process group up, the EMA sees SUM(counts) / world_size (here: two identical ranks)."""
    from detbalance.losses import ghm

    calls = []

    def fake_all_reduce(t, op=None):
        calls.append(op)
        t.mul_(2)  # two ranks holding the same histogram

    monkeypatch.setattr(ghm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ghm.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(ghm.dist, "get_world_size", lambda: 2)
    x, y = classification_inputs(20, 5, seed=26)
    mod = GHMCLoss(bins=6, momentum=0.75, bias_correction=True)
    out = mod(x, y)
    assert calls == [ghm.dist.ReduceOp.SUM]
    torch.testing.assert_close(mod.last_density, gradient_density(_g(x, y), bins=6))
    torch.testing.assert_close(out, ghm_c_loss(x, y, bins=6))
    mod.eval()
    mod(x, y)
    assert len(calls) == 1  # no collectives in eval mode


def test_ghm_c_any_shape_matches_flat():
    x, y = classification_inputs(24, 5, regime="mixed", seed=27)
    valid = torch.rand(24) > 0.3
    flat = ghm_c_loss(x, y, bins=7, valid=valid, reduction="none")
    got = ghm_c_loss(
        x.reshape(4, 6, 5), y.reshape(4, 6, 5), bins=7, valid=valid.reshape(4, 6), reduction="none"
    )
    torch.testing.assert_close(got.reshape(24, 5), flat)
    xt = x.t().contiguous().t()  # non-contiguous view
    torch.testing.assert_close(ghm_c_loss(xt, y, bins=7), ghm_c_loss(x, y, bins=7))
