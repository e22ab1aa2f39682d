"""Seesaw, EQLv2, federated loss: gradcheck, closed forms, state rules and bad input (the reference match is in
``test_longtail_reference.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detbalance.losses import (
    EQLv2Loss,
    FederatedLoss,
    SeesawLoss,
    eqlv2_loss,
    federated_class_weights,
    federated_classes,
    federated_loss,
    seesaw_factors,
    seesaw_loss,
)

K = 4


def _inputs(n: int = 12, extra: int = 1, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K + extra, generator=gen, dtype=dtype)
    labels = torch.randint(-1, K + 1, (n,), generator=gen)
    return logits, labels


def test_gradcheck_float64() -> None:
    logits, labels = _inputs(extra=2)
    cum = torch.tensor([50.0, 40, 3, 0, 9], dtype=torch.float64)
    # q = 0: the mitigation factor is a constant of the counts; the compensation factor uses detached scores
    # (a constant for autograd, as in the reference), so finite differences see it move: checked below instead
    assert torch.autograd.gradcheck(lambda z: seesaw_loss(z, labels, cum_samples=cum, q=0.0), logits.requires_grad_())
    logits, labels = _inputs()
    ratio = torch.tensor([0.1, 0.7, 0.9, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: eqlv2_loss(z, labels, pos_neg=ratio), logits.requires_grad_())
    mask = torch.tensor([False, True, False, True, True])
    assert torch.autograd.gradcheck(lambda z: federated_loss(z, labels, classes=mask), logits.requires_grad_())


def test_seesaw_gradient_treats_the_factors_as_constants() -> None:
    """d/dz of the class term is softmax(z + log S) - onehot, S the (constant) seesaw factors."""
    logits, labels = _inputs(n=20, extra=2)
    labels = labels.clamp(min=1)
    cum = torch.tensor([0.0, 400, 50, 3, 1], dtype=torch.float64)
    z = logits.clone().requires_grad_()
    seesaw_loss(z, labels, cum_samples=cum).sum().backward()
    m, c = seesaw_factors(logits, labels, cum_samples=cum)
    shifted = logits[:, 1:K + 1] + (m * c).log()
    expected = shifted.softmax(1) - F.one_hot(labels - 1, K).double()
    torch.testing.assert_close(z.grad[:, 1:K + 1], expected)


def test_seesaw_degenerates_to_two_cross_entropies() -> None:
    """p = q = 0: objectness CE + plain CE over the classes for foreground rows."""
    logits, labels = _inputs(extra=2)
    got = seesaw_loss(logits, labels, cum_samples=torch.ones(K + 1), p=0.0, q=0.0)
    obj = F.cross_entropy(torch.stack([logits[:, K + 1], logits[:, 0]], 1), (labels <= 0).long(), reduction="none")
    cls = F.cross_entropy(logits[:, 1:K + 1], (labels - 1).clamp(min=0), reduction="none")
    expected = torch.where(labels > 0, obj + cls, obj)
    torch.testing.assert_close(got, torch.where(labels >= 0, expected, torch.zeros_like(expected)))


def test_seesaw_factors_closed_form() -> None:
    """M_ij = (N_j / N_i)^p below 1; C_ij = (s_j / s_i)^q above 1 (hand values)."""
    logits = torch.tensor([[0.0, 0.0, math.log(4.0), 0.0, 0.0]], dtype=torch.float64)  # K = 3; class 2 scores 4x
    labels = torch.tensor([1])
    cum = torch.tensor([0.0, 100.0, 25.0, 0.0], dtype=torch.float64)  # class 3 never seen: counts as 1
    m, c = seesaw_factors(logits, labels, cum_samples=cum, p=0.5, q=2.0)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.5, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(c, torch.tensor([[1.0, 16.0, 1.0]], dtype=torch.float64))
    # the loss shifts the other classes' logits by log(M C)
    got = seesaw_loss(logits, labels, cum_samples=cum, p=0.5, q=2.0)
    z = torch.tensor([0.0, math.log(4.0) + math.log(8.0), math.log(0.1)], dtype=torch.float64)
    expected = F.cross_entropy(z[None], torch.tensor([0])) + math.log(2.0)
    torch.testing.assert_close(got, expected[None])


def test_seesaw_class_never_seen_is_finite() -> None:
    logits, labels = _inputs(extra=2, dtype=torch.float32)
    loss = SeesawLoss(num_classes=K).eval()  # eval: the counts stay zero
    logits.requires_grad_()
    out = loss(logits, labels)
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(logits.grad).all())
    assert float(loss.cum_samples.sum()) == 0.0


def test_state_updates_only_in_training_mode() -> None:
    logits, labels = _inputs(extra=2, dtype=torch.float32)
    seesaw = SeesawLoss(num_classes=K)
    seesaw.eval()(logits, labels)
    assert float(seesaw.cum_samples.sum()) == 0
    seesaw.train()(logits, labels)
    expected = torch.bincount(labels[labels >= 0], minlength=K + 1).double()
    torch.testing.assert_close(seesaw.cum_samples, expected)
    eql = EQLv2Loss(num_classes=K)
    logits, labels = _inputs(dtype=torch.float32)
    eql.eval()(logits, labels)
    assert float(eql.pos_grad.sum()) == 0 and float(eql.pos_neg.min()) == 100
    eql.train()(logits, labels)
    assert float(eql.pos_grad.sum()) > 0


def test_eqlv2_ignored_rows_take_no_part() -> None:
    logits, labels = _inputs(dtype=torch.float32)
    labels[:3] = -1
    a = EQLv2Loss(num_classes=K).train()
    out = a(logits, labels)
    assert bool((out[:3] == 0).all())
    b = EQLv2Loss(num_classes=K).train()
    b(logits[3:], labels[3:])
    torch.testing.assert_close(a.pos_grad, b.pos_grad)
    torch.testing.assert_close(a.neg_grad, b.neg_grad)


def test_eqlv2_initial_weights_are_bce() -> None:
    """With the initial ratio 100 both weights are 1: the row sum of BCE over all K + 1 columns."""
    logits, labels = _inputs()
    labels = labels.clamp(min=0)
    got = eqlv2_loss(logits, labels, pos_neg=torch.full((K,), 100.0, dtype=torch.float64))
    target = F.one_hot(labels, K + 1).double()
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1))


def test_federated_all_classes_is_sigmoid_ce() -> None:
    logits, labels = _inputs()
    labels = labels.clamp(min=0)
    got = federated_loss(logits, labels, classes=torch.ones(K + 1, dtype=torch.bool))
    target = F.one_hot(labels, K + 1).double()[:, 1:]
    expected = F.binary_cross_entropy_with_logits(logits[:, 1:], target, reduction="none").sum(1)
    torch.testing.assert_close(got, expected)


def test_federated_sampling_depends_on_the_generator_only() -> None:
    weights = torch.ones(30)
    labels = torch.tensor([0, 3, 3, 7])
    draw = [federated_classes(labels, class_weights=weights, num_classes_kept=10,
                              generator=torch.Generator().manual_seed(s))[0] for s in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert int(draw[0].sum()) == 9 and bool(draw[0][3]) and bool(draw[0][7]) and not bool(draw[0][0])
    # fewer drawable classes than asked: every class with a weight, no error (detectron2 would raise)
    in_loss, _ = federated_classes(labels, class_weights=torch.tensor([1.0, 0, 1, 0, 0, 0, 0]), num_classes_kept=50)
    assert torch.nonzero(in_loss).squeeze(1).tolist() == [1, 3, 7]
    # zero-weight classes are never drawn
    w = torch.zeros(30)
    w[10] = 1.0
    in_loss, sampled = federated_classes(labels, class_weights=w, num_classes_kept=10)
    assert torch.nonzero(sampled).squeeze(1).tolist() == [11]  # weight j is class j + 1


def test_federated_module_is_reproducible_by_seed() -> None:
    logits, labels = _inputs(n=40, dtype=torch.float32)
    weights = federated_class_weights(torch.tensor([100, 50, 3, 1]), power=0.5)
    a = FederatedLoss(class_weights=weights, num_classes_kept=3, seed=7)
    b = FederatedLoss(class_weights=weights, num_classes_kept=3, seed=7)
    a.track_stats = True
    for _ in range(3):
        torch.testing.assert_close(a(logits, labels), b(logits, labels))
    assert a.last_stats is not None and set(a.last_stats) == {"federated/in_loss", "federated/sampled"}


@pytest.mark.parametrize("make", ["seesaw", "eqlv2", "federated"])
def test_bad_input_is_a_clear_error(make: str) -> None:
    extra = 2 if make == "seesaw" else 1
    loss = {"seesaw": lambda: SeesawLoss(num_classes=K), "eqlv2": lambda: EQLv2Loss(num_classes=K),
            "federated": lambda: FederatedLoss(class_weights=torch.ones(K))}[make]().train()
    logits, labels = _inputs(extra=extra, dtype=torch.float32)
    bad = labels.clone()
    bad[5] = K + 1
    with pytest.raises(ValueError, match=rf"labels must lie in -1..{K}.*got {K + 1} at row 5"):
        loss(logits, bad)
    bad[5] = -2
    with pytest.raises(ValueError, match="got -2 at row 5"):
        loss(logits, bad)
    nan = logits.clone()
    fg = labels.clone()
    fg[2] = 3
    nan[2, 3] = float("nan")  # its own class's logit: in the loss of every one of the three
    with pytest.raises(ValueError, match="logits must be finite.*row 2"):
        loss(nan, fg)
    with pytest.raises(ValueError, match=rf"logits must have shape \(N, {K + extra}\)"):
        loss(logits[:, :-1], labels)
    with pytest.raises(ValueError, match="integer tensor"):
        loss(logits, labels.float())


def test_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="p must be"):
        SeesawLoss(num_classes=3, p=-1.0)
    with pytest.raises(ValueError, match="eps must be"):
        SeesawLoss(num_classes=3, eps=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        EQLv2Loss(num_classes=0)
    with pytest.raises(ValueError, match="reduction"):
        EQLv2Loss(num_classes=3, reduction="avg")
    with pytest.raises(ValueError, match="class_weights must be finite"):
        FederatedLoss(class_weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="num_classes_kept"):
        FederatedLoss(class_weights=torch.ones(3), num_classes_kept=0)
    with pytest.raises(ValueError, match="image_counts"):
        federated_class_weights(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("make", ["seesaw", "eqlv2", "federated"])
def test_empty_saturated_and_half(make: str) -> None:
    extra = 2 if make == "seesaw" else 1
    loss = {"seesaw": lambda: SeesawLoss(num_classes=K), "eqlv2": lambda: EQLv2Loss(num_classes=K),
            "federated": lambda: FederatedLoss(class_weights=torch.ones(K), seed=0)}[make]().train()
    empty = torch.zeros(0, K + extra, requires_grad=True)
    out = loss(empty, torch.zeros(0, dtype=torch.int64))
    out.sum().backward()
    assert out.shape == (0,)
    logits, labels = _inputs(extra=extra, dtype=torch.float32)
    sat = (torch.sign(logits) * 100).requires_grad_()
    out = loss(sat, labels)
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(sat.grad).all())
    if make == "federated":
        loss = FederatedLoss(class_weights=torch.ones(K), seed=0)
        ref = FederatedLoss(class_weights=torch.ones(K), seed=0)
    else:
        ref = type(loss)(num_classes=K).train()
        loss = type(loss)(num_classes=K).train()
    half = loss(logits.half(), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref(logits.half().float(), labels), rtol=1e-3, atol=1e-3)
