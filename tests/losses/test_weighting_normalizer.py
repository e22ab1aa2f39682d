"""Class-frequency weights and positive-count normalisers: hand-computed values, zero positives, EMA, DDP."""

from __future__ import annotations

import math

import pytest
import torch

from detbalance.losses import PositiveNormalizer, class_frequency_weights, normalize_by_positives
from detbalance.losses import normalizer as normalizer_module


def test_inverse_and_sqrt_inverse_hand_computed():
    counts = torch.tensor([1, 3, 9])
    w = class_frequency_weights(counts, method="inverse")
    raw = torch.tensor([1.0, 1 / 3, 1 / 9])
    torch.testing.assert_close(w, raw * 3 / raw.sum())
    assert math.isclose(float(w.sum()), 3.0, rel_tol=1e-6)
    w = class_frequency_weights(counts, method="sqrt_inverse")
    raw = torch.tensor([1.0, 1 / math.sqrt(3), 1 / 3])
    torch.testing.assert_close(w, raw * 3 / raw.sum())


def test_effective_number_hand_computed_and_limits():
    counts = torch.tensor([10.0, 100.0, 1000.0], dtype=torch.float64)
    beta = 0.99
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in counts.tolist()], dtype=torch.float64)
    torch.testing.assert_close(
        class_frequency_weights(counts, method="effective_number", beta=beta), raw * 3 / raw.sum()
    )
    torch.testing.assert_close(
        class_frequency_weights(counts, method="effective_number", beta=0.0), torch.ones(3).double()
    )
    near_inverse = class_frequency_weights(counts, method="effective_number", beta=1 - 1e-9)
    torch.testing.assert_close(
        near_inverse, class_frequency_weights(counts, method="inverse"), rtol=1e-5, atol=1e-6
    )


def test_zero_count_is_finite():
    w = class_frequency_weights(torch.tensor([0, 1, 4]), method="inverse")
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0], w[1])


@pytest.mark.parametrize(
    "counts,kwargs,match",
    [
        (torch.tensor([1, -1]), {}, "counts"),
        (torch.tensor([[1, 2]]), {}, "counts"),
        (torch.tensor([]), {}, "counts"),
        (torch.tensor([1, 2]), dict(method="log"), "method"),
        (torch.tensor([1, 2]), dict(method="effective_number", beta=1.0), "beta"),
    ],
)
def test_weights_reject_bad_args(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_frequency_weights(counts, **kwargs)


def test_normalize_by_positives_modes():
    loss = torch.tensor([4.0, 6.0, 2.0])
    npos = torch.tensor([2, 0, 3])
    torch.testing.assert_close(normalize_by_positives(loss, npos, mode="per_batch"), torch.tensor(12.0 / 5))
    torch.testing.assert_close(
        normalize_by_positives(loss, npos, mode="per_image"), torch.tensor((2.0 + 6.0 + 2 / 3) / 3)
    )
    # zero positives: divide by 1, keep the negatives' loss
    torch.testing.assert_close(
        normalize_by_positives(loss, torch.zeros(3), mode="per_batch"), torch.tensor(12.0)
    )
    assert normalize_by_positives(torch.zeros(0), torch.zeros(0), mode="per_image").item() == 0.0
    with pytest.raises(ValueError, match="mode"):
        normalize_by_positives(loss, npos, mode="ema")
    with pytest.raises(ValueError, match="num_positives"):
        normalize_by_positives(loss, torch.ones(2))


def test_positive_normalizer_ema_detectron2():
    norm = PositiveNormalizer("ema", momentum=0.9)
    loss = torch.tensor([3.0, 1.0])
    out = norm(loss, torch.tensor([10, 10]))
    ema1 = 0.9 * 100 + 0.1 * 20
    torch.testing.assert_close(out, torch.tensor(4.0 / ema1))
    out = norm(loss, torch.tensor([0, 0]))  # zero positives counts as 1
    ema2 = 0.9 * ema1 + 0.1 * 1
    torch.testing.assert_close(out, torch.tensor(4.0 / ema2))
    norm.eval()
    norm(loss, torch.tensor([50, 50]))
    torch.testing.assert_close(norm.ema, torch.tensor(ema2))
    assert "ema" in norm.state_dict()


def test_positive_normalizer_matches_functional_and_rejects():
    loss, npos = torch.tensor([4.0, 6.0]), torch.tensor([1, 3])
    for mode in ("per_batch", "per_image"):
        torch.testing.assert_close(
            PositiveNormalizer(mode)(loss, npos), normalize_by_positives(loss, npos, mode=mode)
        )
    with pytest.raises(ValueError, match="mode"):
        PositiveNormalizer("global")
    with pytest.raises(ValueError, match="momentum"):
        PositiveNormalizer("ema", momentum=1.5)


def test_positive_normalizer_all_reduces_positive_count(monkeypatch):
    monkeypatch.setattr(normalizer_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(normalizer_module.dist, "all_reduce", lambda t, op=None: t.add_(6.0))  # other rank: 6
    monkeypatch.setattr(normalizer_module.dist, "get_world_size", lambda: 2)
    out = PositiveNormalizer("per_batch")(torch.tensor([5.0, 3.0]), torch.tensor([1, 1]))
    torch.testing.assert_close(out, torch.tensor(8.0 / 4.0))  # mean positives over ranks = (2 + 6) / 2
    out = PositiveNormalizer("per_batch", all_reduce=False)(torch.tensor([5.0, 3.0]), torch.tensor([1, 1]))
    torch.testing.assert_close(out, torch.tensor(4.0))
