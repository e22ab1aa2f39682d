"""Repeat factors (LVIS) and RepeatFactorSampler: detectron2's example, the literal reference, frequencies,
epochs, DDP sharding."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from detbalance.sampling import RepeatFactorSampler, repeat_factors
from tests.reference.repeat_factor import repeat_factors_reference


def test_detectron2_example():
    # detectron2 tests/data/test_sampler.py: categories {0, 1}, {0}, {} with t = 0.5 -> [sqrt(3/2), 1, 1].
    out = repeat_factors([[0, 1], [0], []], threshold=0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(3 / 2), 1.0, 1.0], dtype=torch.float64))
    # Without the square root: t / f(1) = 0.5 / (1/3) = 1.5.
    torch.testing.assert_close(repeat_factors([[0, 1], [0], []], threshold=0.5, sqrt=False),
                               torch.tensor([1.5, 1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sqrt", [True, False])
def test_equals_literal_reference(seed, sqrt):
    rng = random.Random(seed)
    cats = [[rng.choice([1, 1, 1, 2, 2, 3, 4, 7]) for _ in range(rng.randint(0, 4))] for _ in range(300)]
    out = repeat_factors(cats, threshold=0.3, sqrt=sqrt)
    torch.testing.assert_close(out, torch.tensor(repeat_factors_reference(cats, threshold=0.3, sqrt=sqrt),
                                                 dtype=torch.float64))
    assert bool((out >= 1).all()) and bool((out > 1).any())


def test_duplicates_and_edge_cases():
    # A category listed twice in an image counts once: f(5) = 1/4 -> sqrt(0.5 / 0.25).
    torch.testing.assert_close(repeat_factors([[5, 5], [6], [6], [6]], threshold=0.5),
                               torch.tensor([math.sqrt(2.0), 1.0, 1.0, 1.0], dtype=torch.float64))
    assert repeat_factors([], threshold=0.1).shape == (0,)
    assert repeat_factors([[], []]).tolist() == [1.0, 1.0]
    assert repeat_factors([[1], [2]], threshold=1e-9).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors([[1]], threshold=0.0)
    with pytest.raises(ValueError, match="categories_per_image"):
        repeat_factors([[-1]])


def _epoch_counts(sampler: RepeatFactorSampler, epoch: int, n: int) -> torch.Tensor:
    sampler.set_epoch(epoch)
    return torch.bincount(torch.tensor(list(sampler), dtype=torch.int64), minlength=n)


def test_stochastic_rounding_converges_to_factors():
    factors = torch.tensor([1.0, 2.5, 0.3, 1.75, 4.0], dtype=torch.float64)
    sampler = RepeatFactorSampler(factors, seed=123)
    epochs = 400
    counts = torch.stack([_epoch_counts(sampler, e, 5) for e in range(epochs)]).double()
    assert bool((counts >= factors.floor()).all()) and bool((counts <= factors.ceil()).all())
    frac = factors - factors.floor()
    sigma = (frac * (1 - frac) / epochs).sqrt()
    assert bool(((counts.mean(0) - factors).abs() <= 4 * sigma + 1e-12).all())
    # Not rounded up (mmdetection's ClassBalancedDataset would give ceil(r) = 1, 3, 1, 2, 4 every epoch).
    assert abs(float(counts.sum(1).mean()) - float(factors.sum())) < 0.1


def test_set_epoch_changes_order_and_seed_reproduces():
    factors = torch.full((50,), 1.5)
    a, b, c = RepeatFactorSampler(factors, seed=1), RepeatFactorSampler(factors, seed=1), RepeatFactorSampler(factors, seed=2)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)
    c.set_epoch(1)
    assert first != second and second == list(b) and list(c) != second
    a.set_epoch(0)
    assert list(a) == first


def test_no_shuffle_keeps_dataset_order():
    sampler = RepeatFactorSampler(torch.tensor([2.0, 1.0, 3.0]), shuffle=False)
    assert list(sampler) == [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("num_replicas", [2, 3])
@pytest.mark.parametrize("epoch_length", [None, 50, 1000])
def test_sharding_disjoint_and_equal_length(num_replicas, epoch_length):
    factors = torch.linspace(0.5, 3.0, 97)
    shards = []
    for rank in range(num_replicas):
        s = RepeatFactorSampler(factors, seed=5, num_replicas=num_replicas, rank=rank, epoch_length=epoch_length)
        s.set_epoch(3)
        shards.append(list(s))
        assert len(s) == len(shards[-1])
    whole = RepeatFactorSampler(factors, seed=5, epoch_length=epoch_length)
    whole.set_epoch(3)
    full = whole.epoch_indices().tolist()
    per_rank = len(full) // num_replicas
    assert {len(x) for x in shards} == {per_rank}
    if epoch_length is not None:
        assert len(full) == epoch_length and per_rank == epoch_length // num_replicas
    # Rank k holds positions k, k + R, ...: together exactly the first per_rank * R positions, once each.
    interleaved = [shards[k][i] for i in range(per_rank) for k in range(num_replicas)]
    assert interleaved == full[: per_rank * num_replicas]


def test_fixed_epoch_length_and_dataloader():
    sampler = RepeatFactorSampler(torch.tensor([1.0, 1.2, 3.0]), seed=0, epoch_length=10)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert len(list(sampler)) == 10 == len(sampler)
    loader = DataLoader(list(range(3)), sampler=sampler, batch_size=4)
    assert len(loader) == 3 and sum(len(batch) for batch in loader) == 10


def test_defaults_from_process_group(tmp_path):
    s = RepeatFactorSampler(torch.ones(4))
    assert (s.num_replicas, s.rank) == (1, 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        s = RepeatFactorSampler(torch.ones(4))
        assert (s.num_replicas, s.rank) == (1, 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(repeat_factors=torch.tensor([1.0, -1.0])), "repeat_factors"),
        (dict(repeat_factors=torch.ones(2, 2)), "repeat_factors"),
        (dict(num_replicas=0), "num_replicas"),
        (dict(num_replicas=2, rank=2), "rank"),
        (dict(epoch_length=-1), "epoch_length"),
        (dict(seed=0.5), "seed"),
    ],
)
def test_bad_input_raises_naming_argument(kwargs, name):
    args = dict(repeat_factors=torch.ones(3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        RepeatFactorSampler(args.pop("repeat_factors"), **args)
    with pytest.raises(ValueError, match="epoch"):
        RepeatFactorSampler(torch.ones(2)).set_epoch(-1)
