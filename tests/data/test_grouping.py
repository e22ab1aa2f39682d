"""Aspect-ratio grouping equals torchvision's reference (tests/reference/tv_group_by_aspect_ratio.py), and the
engine's passes use it."""

from __future__ import annotations

import pytest
import torch

from detbalance.data import aspect_ratio_groups, group_batches, make_benchmark
from detbalance.engine.run import _pass_samples, pass_batches
from tests.reference.tv_group_by_aspect_ratio import GroupedBatchSampler, create_aspect_ratio_groups


def _sizes(n: int, seed: int) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    hw = torch.randint(200, 1400, (n, 2), generator=g).tolist()
    # ratios exactly on the edges 1/2, 1 and 2
    return [tuple(x) for x in hw] + [(500, 250), (300, 600), (640, 640), (641, 640), (640, 641)]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_groups_equal_the_reference(k):
    sizes = _sizes(300, seed=k)
    ours = aspect_ratio_groups(sizes, factor=k)
    assert ours.tolist() == create_aspect_ratio_groups(sizes, k=k)
    assert int(ours.max()) <= 2 * k + 1 if k else int(ours.max()) <= 1


def test_groups_of_a_dataset_and_bad_input():
    bench = make_benchmark("tiny", split="test")
    assert aspect_ratio_groups(bench, factor=3).tolist() == [4] * len(bench)  # square: one group
    with pytest.raises(ValueError, match="factor must be an integer >= 0"):
        aspect_ratio_groups([(10, 10)], factor=-1)
    with pytest.raises(ValueError, match=r"image 1 has a non-positive size"):
        aspect_ratio_groups([(10, 10), (0, 5)], factor=3)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_batches_equal_the_reference_grouped_batch_sampler(seed, batch_size):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 60, (1,), generator=g))
    num_groups = int(torch.randint(1, 6, (1,), generator=g))
    group_ids = torch.randint(0, num_groups, (n,), generator=g).tolist()
    order = torch.randperm(n, generator=g).tolist()
    expected = list(GroupedBatchSampler(order, group_ids, batch_size))
    batches = group_batches(order, group_ids, batch_size=batch_size)
    assert [[order[p] for p in b] for b in batches] == expected
    assert len(batches) == n // batch_size
    for b in batches:
        assert len({group_ids[order[p]] for p in b}) == 1


def test_one_group_gives_the_plain_cut():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0)).tolist()
    batches = group_batches(order, [0] * 23, batch_size=4)
    assert batches == [list(range(i, i + 4)) for i in range(0, 20, 4)]


def test_pass_batches_with_one_group_equal_the_ungrouped_pass():
    kw = dict(batch_size=4, accumulate=2, seed=3, epoch=1, rank=1, world_size=2)
    assert pass_batches(50, **kw, group_ids=torch.full((50,), 4)) == pass_batches(50, **kw)
    plain = _pass_samples(50, **kw, repeat_factors=None)
    assert _pass_samples(50, **kw, repeat_factors=None, group_ids=torch.zeros(50, dtype=torch.int64)) == plain


def test_pass_batches_group_by_aspect_ratio_and_repeats_get_their_own_seed():
    group_ids = torch.tensor([0] * 7 + [1] * 3)
    samples = _pass_samples(10, batch_size=4, accumulate=1, seed=0, epoch=0, rank=0, world_size=1,
                            repeat_factors=None, group_ids=group_ids)
    assert len(samples) == 2
    for batch in samples:
        assert len({int(group_ids[i]) for i, _ in batch}) == 1
    keys = [key for batch in samples for key in batch]
    seeds = [s for _, s in keys]
    assert len(set(seeds)) == len(seeds)  # a sample repeated to complete a batch is augmented afresh
