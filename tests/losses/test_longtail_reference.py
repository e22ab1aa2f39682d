"""Seesaw, EQLv2 and the federated loss against literal transcriptions of their references, over 3 steps.

Value, gradient (w.r.t. the logits) and state (Seesaw's ``cum_samples``, EQLv2's ``pos_grad``/``neg_grad``/
``pos_neg``) after each step. The references use mmdetection's / detectron2's layouts (background last); ours
keeps column ``c`` = label ``c`` with column 0 the background (see each module), so the logits are permuted.
"""

from __future__ import annotations

import pytest
import torch

from detbalance.losses import (
    EQLv2Loss,
    FederatedLoss,
    SeesawLoss,
    federated_class_weights,
    federated_classes,
)
from tests.reference.detectron2_fed_loss import (
    get_fed_loss_classes,
    get_fed_loss_cls_weights,
    predict_probs,
    sigmoid_cross_entropy_loss,
)
from tests.reference.mmdet_eqlv2 import RefEQLV2Loss
from tests.reference.mmdet_seesaw import RefSeesawLoss

STEPS = 3


def _labels(n: int, k: int, gen: torch.Generator, *, fg: float = 0.4) -> torch.Tensor:
    """Long-tailed labels: background with probability 1 - fg, else class c with probability ~ 1 / c^2."""
    probs = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 2
    cls = torch.multinomial(probs, n, replacement=True, generator=gen) + 1
    is_fg = torch.rand(n, generator=gen) < fg
    return torch.where(is_fg, cls, torch.zeros_like(cls))


def _to_ref_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.where(labels > 0, labels - 1, torch.full_like(labels, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("p", "q"), [(0.8, 2.0), (0.0, 2.0), (0.8, 0.0)])
def test_seesaw_matches_mmdet_over_three_steps(dtype: torch.dtype, p: float, q: float) -> None:
    k, n = 7, 48
    gen = torch.Generator().manual_seed(1)
    ours, ref = SeesawLoss(num_classes=k, p=p, q=q), RefSeesawLoss(p=p, q=q, num_classes=k, reduction="none")
    ours.train()
    ref.to(dtype)  # the reference's float32 counts would round its float64 ratios
    for _ in range(STEPS):
        logits = (torch.randn(n, k + 2, generator=gen) * 3).to(dtype).requires_grad_()
        labels = _labels(n, k, gen)
        ref_logits = torch.cat([logits[:, 1:k + 1], logits[:, k + 1:], logits[:, :1]], dim=1)
        ref_labels = _to_ref_labels(labels, k)
        out = ref(ref_logits, ref_labels)
        expected = out["loss_cls_objectness"].clone()
        fg = ref_labels < k
        expected = expected.index_add(0, torch.nonzero(fg).squeeze(1), out["loss_cls_classes"].to(expected.dtype))
        got = ours(logits, labels)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, expected.to(got.dtype), **tol)
        g_ours, = torch.autograd.grad(got.sum(), logits)
        g_ref, = torch.autograd.grad(expected.sum(), logits)
        torch.testing.assert_close(g_ours, g_ref, **tol)
        ref_counts = torch.cat([ref.cum_samples[k:], ref.cum_samples[:k]])
        torch.testing.assert_close(ours.cum_samples, ref_counts.to(torch.float64))
    # the scores of a detection: mmdetection's get_activation, background moved to column 0
    act = ref.get_activation(ref_logits.detach())
    torch.testing.assert_close(ours.class_probabilities(logits.detach()),
                               torch.cat([act[:, k:], act[:, :k]], dim=1), **tol)


def test_seesaw_mean_reduction_matches_mmdet_avg_factor() -> None:
    """The head's sum / N equals mmdetection's ``reduction='mean', avg_factor=N`` of both terms."""
    k, n = 5, 32
    gen = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(n, k + 2, generator=gen), _labels(n, k, gen)
    ref = RefSeesawLoss(num_classes=k)
    out = ref(torch.cat([logits[:, 1:k + 1], logits[:, k + 1:], logits[:, :1]], 1), _to_ref_labels(labels, k),
              avg_factor=n)
    ours = SeesawLoss(num_classes=k).train()(logits, labels).sum() / n
    torch.testing.assert_close(ours, out["loss_cls_objectness"] + out["loss_cls_classes"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eqlv2_matches_mmdet_over_three_steps(dtype: torch.dtype) -> None:
    k, n = 9, 64
    gen = torch.Generator().manual_seed(2)
    ours, ref = EQLv2Loss(num_classes=k).train(), RefEQLV2Loss(num_classes=k).to(dtype)
    ours.to(dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for step in range(STEPS + 2):  # beyond 3: the ratio has left 100, the weights differ from 1
        logits = (torch.randn(n, k + 1, generator=gen) * 2).to(dtype).requires_grad_()
        labels = _labels(n, k, gen)
        ref_logits = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
        expected = ref(ref_logits, _to_ref_labels(labels, k))
        got = ours(logits, labels)
        torch.testing.assert_close(got.sum() / n, expected, **tol)
        g_ours, = torch.autograd.grad(got.sum() / n, logits)
        g_ref, = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(g_ours, g_ref, **tol)
        for name in ("pos_grad", "neg_grad", "pos_neg"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **tol, msg=f"{name} at step {step}")
    assert float(ours.pos_neg.max()) < 10  # the weights were no longer trivial
    act = ref.get_activation(ref_logits.detach().clone())
    torch.testing.assert_close(ours.class_probabilities(logits.detach()), torch.cat([act[:, k:], act[:, :k]], 1), **tol)


@pytest.mark.parametrize("kept", [50, 12, 3])
def test_federated_matches_detectron2_over_three_steps(kept: int) -> None:
    k, n = 80, 96
    gen = torch.Generator().manual_seed(4)
    image_count = torch.randint(0, 400, (k,), generator=gen)
    weights = federated_class_weights(image_count, power=0.5)
    torch.testing.assert_close(weights, get_fed_loss_cls_weights(image_count, 0.5))
    ours = FederatedLoss(class_weights=weights, num_classes_kept=kept, seed=123)
    torch.manual_seed(123)  # detectron2 draws from the global generator; ours from its own, same seed
    for _ in range(STEPS):
        logits = torch.randn(n, k + 1, generator=gen, dtype=torch.float64).requires_grad_()
        labels = _labels(n, k, gen, fg=0.3)
        ref_logits = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
        ref_labels = _to_ref_labels(labels, k)
        state = torch.get_rng_state()
        ref_classes = get_fed_loss_classes(ref_labels, kept, k, weights)
        torch.set_rng_state(state)
        expected = sigmoid_cross_entropy_loss(ref_logits, ref_labels, fed_loss_num_classes=kept,
                                              fed_loss_cls_weights=weights)
        got = ours(logits, labels)
        torch.testing.assert_close(got.sum() / n, expected, rtol=1e-10, atol=1e-12)
        g_ours, = torch.autograd.grad(got.sum() / n, logits)
        g_ref, = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
        ref_set = set((ref_classes[ref_classes < k] + 1).tolist())
        assert ours.last_stats is None  # not tracked unless asked
        in_loss, _ = federated_classes(labels, class_weights=weights, num_classes_kept=kept,
                                       generator=torch.Generator().manual_seed(0))
        present = set(labels[labels > 0].tolist())
        assert present <= ref_set
        assert present <= set(torch.nonzero(in_loss).squeeze(1).tolist())
    torch.testing.assert_close(torch.sigmoid(logits.detach()), predict_probs(logits.detach()))


def test_federated_draws_what_detectron2_draws() -> None:
    """Same generator state -> the same federated set as detectron2's ``get_fed_loss_classes``."""
    k = 40
    gen = torch.Generator().manual_seed(5)
    weights = torch.rand(k, generator=gen) + 0.1
    for seed in range(5):
        labels = _labels(30, k, gen, fg=0.2)
        torch.manual_seed(seed)
        ref = get_fed_loss_classes(_to_ref_labels(labels, k), 20, k, weights)
        in_loss, sampled = federated_classes(labels, class_weights=weights, num_classes_kept=20,
                                             generator=torch.Generator().manual_seed(seed))
        assert set(torch.nonzero(in_loss).squeeze(1).tolist()) == set((ref[ref < k] + 1).tolist())
        assert int(in_loss.sum()) + int((labels == 0).any()) == 20
        assert not bool((sampled & torch.isin(torch.arange(k + 1), labels)).any())
