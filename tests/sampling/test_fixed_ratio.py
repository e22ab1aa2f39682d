"""Fixed-ratio sampling: hand cases, invariants (Hypothesis), generator use, torchvision's distribution."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from detbalance.sampling import sample_fixed_ratio, sample_fixed_ratio_batched

label_vectors = st.lists(st.sampled_from([-1, 0, 0, 1, 2]), min_size=0, max_size=64).map(
    lambda xs: torch.tensor(xs, dtype=torch.int64)
)
fractions = st.one_of(st.sampled_from([0.0, 1.0, 0.25, 0.5]), st.floats(0.0, 1.0))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(idx, labels: torch.Tensor, num_samples: int, positive_fraction: float) -> None:
    num_pos = int((labels > 0).sum())
    num_neg = int((labels == 0).sum())
    want_pos = min(num_pos, int(num_samples * positive_fraction))
    assert len(idx.positive) == want_pos
    assert len(idx.negative) == min(num_neg, num_samples - want_pos)
    assert bool((labels[idx.positive] > 0).all()) and bool((labels[idx.negative] == 0).all())
    both = torch.cat([idx.positive, idx.negative])
    assert both.unique().numel() == both.numel()
    assert torch.equal(idx.positive, idx.positive.sort().values)
    assert torch.equal(idx.negative, idx.negative.sort().values)


def test_hand_computed_case():
    labels = torch.tensor([1, 0, 0, 0, 0, -1])
    pos, neg = sample_fixed_ratio(labels, 4, 0.5, generator=_gen())
    assert pos.tolist() == [0]
    assert len(neg) == 3 and set(neg.tolist()) <= {1, 2, 3, 4}


def test_positives_capped_negatives_fill():
    labels = torch.tensor([1] * 10 + [0] * 10)
    pos, neg = sample_fixed_ratio(labels, 8, 0.25, generator=_gen())
    assert len(pos) == 2 and len(neg) == 6
    pos, neg = sample_fixed_ratio(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 8, 0.5, generator=_gen())
    assert pos.tolist() == [0] and len(neg) == 7  # too few positives: negatives fill the budget


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_above_candidates_returns_everything(seed):
    labels = torch.tensor([1, -1, 0, 2, 0, -1, 0])
    pos, neg = sample_fixed_ratio(labels, 100, 0.5, generator=_gen(seed))
    assert pos.tolist() == [0, 3] and neg.tolist() == [2, 4, 6]


@settings(derandomize=True, max_examples=60, deadline=None)
@given(labels=label_vectors, num_samples=st.integers(0, 64), positive_fraction=fractions, seed=st.integers(0, 3))
def test_invariants(labels, num_samples, positive_fraction, seed):
    idx = sample_fixed_ratio(labels, num_samples, positive_fraction, generator=_gen(seed))
    _check(idx, labels, num_samples, positive_fraction)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(batch=st.lists(label_vectors, min_size=1, max_size=5), num_samples=st.integers(0, 32), positive_fraction=fractions)
def test_batched_list_invariants(batch, num_samples, positive_fraction):
    out = sample_fixed_ratio_batched(batch, num_samples, positive_fraction, generator=_gen())
    assert len(out) == len(batch)
    for idx, labels in zip(out, batch, strict=True):
        _check(idx, labels, num_samples, positive_fraction)  # also: padding (-1) never selected


def test_all_ignored_and_zero_budget():
    assert [len(t) for t in sample_fixed_ratio(torch.full((10,), -1), 5, 0.5, generator=_gen())] == [0, 0]
    assert [len(t) for t in sample_fixed_ratio(torch.tensor([1, 0, 0]), 0, 0.5, generator=_gen())] == [0, 0]
    assert [len(t) for t in sample_fixed_ratio(torch.zeros(0, dtype=torch.int64), 5, 0.5)] == [0, 0]


def test_generator_determines_the_draw():
    labels = torch.tensor([1] * 50 + [0] * 200)
    a = sample_fixed_ratio(labels, 32, 0.25, generator=_gen(7))
    b = sample_fixed_ratio(labels, 32, 0.25, generator=_gen(7))
    c = sample_fixed_ratio(labels, 32, 0.25, generator=_gen(8))
    assert torch.equal(a.positive, b.positive) and torch.equal(a.negative, b.negative)
    assert not torch.equal(a.negative, c.negative)


def test_rows_over_and_under_the_positive_cap_in_one_batch():
    labels = torch.tensor([[1] * 10 + [0] * 20, [1] + [0] * 20 + [-1] * 9])
    over, under = sample_fixed_ratio_batched(labels, 8, 0.25, generator=_gen())
    assert (len(over.positive), len(over.negative)) == (2, 6)  # 10 positives > cap 2: second draw of negatives
    assert (len(under.positive), len(under.negative)) == (1, 7)
    assert bool((labels[0, over.negative] == 0).all()) and bool((labels[1, under.negative] == 0).all())


def test_padded_batch_equals_list():
    rows = [torch.tensor([1, 0, 0, -1, 2]), torch.tensor([0, 0, 1])]
    padded = torch.tensor([[1, 0, 0, -1, 2], [0, 0, 1, -1, -1]])
    a = sample_fixed_ratio_batched(rows, 3, 0.5, generator=_gen(3))
    b = sample_fixed_ratio_batched(padded, 3, 0.5, generator=_gen(3))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.positive, y.positive) and torch.equal(x.negative, y.negative)


def test_same_distribution_as_torchvision():
    """Counts equal torchvision's per image; each candidate is drawn with probability k / n in both."""
    labels = torch.tensor([1] * 20 + [0] * 50 + [-1] * 10)
    draws, num_samples, fraction = 3000, 16, 0.25
    ours = sample_fixed_ratio_batched(labels.expand(draws, -1), num_samples, fraction, generator=_gen(0))
    tv_pos, tv_neg = BalancedPositiveNegativeSampler(num_samples, fraction)([labels] * draws)
    ours_pos = torch.zeros(labels.numel())
    ours_neg = torch.zeros(labels.numel())
    for idx in ours:
        ours_pos[idx.positive] += 1
        ours_neg[idx.negative] += 1
    tv_pos_freq = torch.stack(tv_pos).double().mean(0)
    tv_neg_freq = torch.stack(tv_neg).double().mean(0)
    assert {len(i.positive) for i in ours} == set(torch.stack(tv_pos).sum(1).tolist()) == {4}
    assert {len(i.negative) for i in ours} == set(torch.stack(tv_neg).sum(1).tolist()) == {12}
    expected = torch.cat([torch.full((20,), 4 / 20), torch.full((50,), 12 / 50), torch.zeros(10)]).double()
    sigma = (expected * (1 - expected) / draws).sqrt()
    for freq in (ours_pos.double() / draws + ours_neg.double() / draws, tv_pos_freq + tv_neg_freq):
        assert bool(((freq - expected).abs() <= 5 * sigma + 1e-12).all())


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((torch.tensor([1, 0]), -1, 0.5), "num_samples"),
        ((torch.tensor([1, 0]), 2, 1.5), "positive_fraction"),
        ((torch.tensor([1, 0]), 2, -0.1), "positive_fraction"),
        ((torch.tensor([1.0, 0.0]), 2, 0.5), "labels"),
        ((torch.tensor([1, -2]), 2, 0.5), "labels"),
        ((torch.tensor([[1, 0]]), 2, 0.5), "labels"),
    ],
)
def test_bad_input_raises_naming_argument(args, name):
    with pytest.raises(ValueError, match=name):
        sample_fixed_ratio(*args)
