"""OHEM and S-OHEM: hand cases, the literal reference (tests/reference/ohem.py), invariants, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detbalance.sampling import (
    default_loss_weights,
    default_stratum_distribution,
    select_hard_examples,
    select_hard_examples_stratified,
    stratum_quotas,
)
from tests.reference.ohem import ohem_reference
from tests.sampling.inputs import random_rois


def _reference(batch, **kwargs):
    return ohem_reference(
        batch.losses.tolist(), batch.labels.tolist(), batch.boxes.tolist(), batch.batch_idx.tolist(), **kwargs
    )


def _lists(idx):
    return idx.positive.tolist(), idx.negative.tolist()


def test_hand_computed_case():
    losses = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.5])
    labels = torch.tensor([1, 0, 0, -1, 0])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 9.0],  # IoU 0.9 with RoI 0, which has a higher loss: suppressed
            [50.0, 50.0, 60.0, 60.0],
            [20.0, 20.0, 30.0, 30.0],  # ignored
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with RoI 0: kept
        ]
    )
    out = select_hard_examples(losses, labels, boxes, torch.zeros(5, dtype=torch.int64), num_samples=2)
    assert _lists(out) == ([0], [4])
    out = select_hard_examples(losses, labels, boxes, torch.zeros(5, dtype=torch.int64), num_samples=2, nms_iou=None)
    assert _lists(out) == ([0], [1])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("num_samples", "nms_iou", "positive_fraction"),
    [(16, 0.7, None), (64, 0.7, None), (16, 0.5, 0.25), (16, None, None), (40, 0.7, 0.0), (40, 0.7, 1.0)],
)
def test_equals_literal_reference(seed, num_samples, nms_iou, positive_fraction):
    batch = random_rois(3, 150, seed=seed)
    out = select_hard_examples(
        batch.losses, batch.labels, batch.boxes, batch.batch_idx,
        num_samples=num_samples, nms_iou=nms_iou, positive_fraction=positive_fraction,
    )
    expected = _reference(batch, num_samples=num_samples, nms_iou=nms_iou, positive_fraction=positive_fraction)
    assert _lists(out) == expected


@pytest.mark.parametrize("seed", range(3))
def test_ties_broken_by_index_like_the_reference(seed):
    batch = random_rois(2, 200, tie_decimals=1, seed=seed)
    out = select_hard_examples(batch.losses, batch.labels, batch.boxes, batch.batch_idx, num_samples=32)
    assert _lists(out) == _reference(batch, num_samples=32, nms_iou=0.7)


def test_generator_breaks_ties_and_nothing_else():
    tied = random_rois(2, 200, tie_decimals=0, seed=0)
    args = (tied.losses, tied.labels, tied.boxes, tied.batch_idx)
    runs = [_lists(select_hard_examples(*args, num_samples=16, generator=torch.Generator().manual_seed(s))) for s in range(4)]
    assert runs[0] == _lists(select_hard_examples(*args, num_samples=16, generator=torch.Generator().manual_seed(0)))
    assert len({str(r) for r in runs}) > 1
    distinct = random_rois(2, 200, seed=0)
    args = (distinct.losses, distinct.labels, distinct.boxes, distinct.batch_idx)
    plain = _lists(select_hard_examples(*args, num_samples=16))
    assert all(_lists(select_hard_examples(*args, num_samples=16, generator=torch.Generator().manual_seed(s))) == plain
               for s in range(3))


def test_budget_above_candidates_without_nms_is_everything():
    batch = random_rois(2, 50, seed=1)
    out = select_hard_examples(batch.losses, batch.labels, batch.boxes, batch.batch_idx, num_samples=100, nms_iou=None)
    assert torch.equal(out.all(), (batch.labels >= 0).nonzero().squeeze(1))


@settings(derandomize=True, max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    num_images=st.integers(1, 3),
    rois=st.integers(0, 40),
    num_samples=st.integers(0, 24),
    positive_fraction=st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0, 1)),
    ignore_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    fg_fraction=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_invariants(seed, num_images, rois, num_samples, positive_fraction, ignore_fraction, fg_fraction):
    batch = random_rois(num_images, rois, seed=seed, ignore_fraction=ignore_fraction, fg_fraction=fg_fraction)
    out = select_hard_examples(
        batch.losses, batch.labels, batch.boxes, batch.batch_idx,
        num_samples=num_samples, positive_fraction=positive_fraction,
    )
    both = out.all()
    assert both.unique().numel() == both.numel()
    assert bool((batch.labels[out.positive] > 0).all()) and bool((batch.labels[out.negative] == 0).all())
    per_image = torch.bincount(batch.batch_idx[both], minlength=num_images)
    assert bool((per_image <= num_samples).all())
    if positive_fraction is not None:
        pos_per_image = torch.bincount(batch.batch_idx[out.positive], minlength=num_images)
        assert bool((pos_per_image <= int(num_samples * positive_fraction)).all())
    assert _lists(out) == _reference(batch, num_samples=num_samples, nms_iou=0.7, positive_fraction=positive_fraction)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(losses=torch.zeros(3)), "losses"),
        (dict(boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3 + [[5.0, 0.0, 1.0, 1.0]])), "boxes"),
        (dict(boxes=torch.zeros(4, 3)), "boxes"),
        (dict(batch_idx=torch.zeros(3, dtype=torch.int64)), "batch_idx"),
        (dict(batch_idx=torch.zeros(4)), "batch_idx"),
        (dict(num_samples=-1), "num_samples"),
        (dict(nms_iou=1.5), "nms_iou"),
        (dict(positive_fraction=2.0), "positive_fraction"),
        (dict(labels=torch.tensor([0, 1, 2, -3])), "labels"),
        # a NaN or inf loss is not "the hardest": OHEM picked [1, 5] over a finite 2.0 before this check
        (dict(losses=torch.tensor([float("nan"), 2.0, 0.1, 0.3])), "losses"),
        (dict(losses=torch.tensor([0.5, float("inf"), 0.1, 0.3])), "losses"),
        (dict(boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3 + [[0.0, float("nan"), 1.0, 1.0]])), "boxes"),
    ],
)
def test_bad_input_raises_naming_argument(change, name):
    args = dict(
        losses=torch.rand(4), labels=torch.tensor([0, 1, 0, -1]), boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4),
        batch_idx=torch.zeros(4, dtype=torch.int64), num_samples=2,
    )
    args.update(change)
    with pytest.raises(ValueError, match=name):
        select_hard_examples(args.pop("losses"), args.pop("labels"), args.pop("boxes"), args.pop("batch_idx"), **args)


# ----------------------------------------------------------------------------------------------- S-OHEM


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_samples", [8, 64, 500])
@pytest.mark.parametrize("tie_decimals", [None, 1])
def test_stratified_one_stratum_equals_ohem(seed, num_samples, tie_decimals):
    batch = random_rois(3, 150, seed=seed, tie_decimals=tie_decimals)
    common = (batch.labels, batch.boxes, batch.batch_idx)
    ohem = select_hard_examples(batch.cls_losses + batch.loc_losses, *common, num_samples=num_samples)
    for progress in (0.0, 0.7):
        s = select_hard_examples_stratified(
            batch.cls_losses, batch.loc_losses, *common,
            num_samples=num_samples, progress=progress, strata=1, loss_weights=(1.0, 1.0),
        )
        assert _lists(s) == _lists(ohem)
    # The default weights are (1, 1) halfway through training.
    s = select_hard_examples_stratified(batch.cls_losses, batch.loc_losses, *common, num_samples=num_samples,
                                        progress=0.5, strata=1)
    assert _lists(s) == _lists(ohem)


def _eight_rois():
    """Eight disjoint RoIs of one image with losses 8, 7, ..., 1 (RoI i has loss 8 - i); quartile strata
    are {0, 1}, {2, 3}, {4, 5}, {6, 7} (edges 6.25, 4.5, 2.75)."""
    cls = torch.arange(8, 0, -1, dtype=torch.float32)
    boxes = torch.stack([torch.tensor([20.0 * i, 0.0, 20.0 * i + 10.0, 10.0]) for i in range(8)])
    labels = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0])
    return cls, torch.zeros(8), labels, boxes, torch.zeros(8, dtype=torch.int64)


@pytest.mark.parametrize(
    ("quotas", "expected"),
    [
        ([0.5, 0.0, 0.0, 0.5], [0, 1, 6, 7]),  # hardest two of the top and of the bottom quartile
        ([1.0, 0.0, 0.0, 0.0], [0, 1, 2, 3]),  # top quartile has 2: its unfilled quota passes down
        ([0.0, 0.0, 0.0, 1.0], [0, 1, 6, 7]),  # bottom quartile has 2: the rest goes to the hardest left
        ([0.25, 0.25, 0.25, 0.25], [0, 2, 4, 6]),  # one (the hardest) from each quartile
    ],
)
def test_stratified_hand_computed(quotas, expected):
    out = select_hard_examples_stratified(*_eight_rois(), num_samples=4, progress=0.0, loss_weights=(1.0, 1.0),
                                          quotas=quotas)
    assert out.all().tolist() == expected
    assert out.positive.tolist() == [i for i in expected if i in (0, 3)]


def test_stratified_loss_weights_follow_progress():
    cls = torch.tensor([3.0, 1.0, 0.0, 0.5])
    loc = torch.tensor([0.0, 0.0, 4.0, 1.0])
    labels = torch.tensor([0, 0, 1, 1])
    boxes = torch.stack([torch.tensor([20.0 * i, 0.0, 20.0 * i + 10.0, 10.0]) for i in range(4)])
    args = (cls, loc, labels, boxes, torch.zeros(4, dtype=torch.int64))
    # Default weights: early (1.5, 0.5): losses 4.5, 1.5, 2.0, 1.25 -> hardest is RoI 0;
    # late (0.5, 1.5): losses 1.5, 0.5, 6.0, 1.75 -> hardest is RoI 2.
    early = select_hard_examples_stratified(*args, num_samples=1, progress=0.0, strata=1)
    late = select_hard_examples_stratified(*args, num_samples=1, progress=1.0, strata=1)
    assert early.all().tolist() == [0] and late.all().tolist() == [2]
    seen = []
    out = select_hard_examples_stratified(
        *args, num_samples=1, progress=0.3, strata=1, loss_weights=lambda p: seen.append(p) or (0.0, 1.0)
    )
    assert seen == [0.3] and out.all().tolist() == [2]
    assert default_loss_weights(0.0) == (1.5, 0.5) and default_loss_weights(1.0) == (0.5, 1.5)


def test_default_distribution_and_quotas():
    early, late = default_stratum_distribution(0.0, 4), default_stratum_distribution(1.0, 4)
    expected_early = [math.exp(-s) for s in range(4)]
    assert early == pytest.approx([w / sum(expected_early) for w in expected_early])
    assert early[0] > late[0] and early[3] < late[3] and sum(late) == pytest.approx(1.0)
    assert stratum_quotas(early, 128) == [83, 30, 11, 4]  # 82.42, 30.32, 11.15, 4.10
    assert stratum_quotas([1, 1, 1], 10) == [4, 3, 3]
    assert sum(stratum_quotas(late, 127)) == 127
    assert default_stratum_distribution(0.3, 1) == [1.0]


@pytest.mark.parametrize("seed", range(2))
def test_stratified_uses_whole_budget_per_image(seed):
    batch = random_rois(2, 300, seed=seed)
    common = (batch.labels, batch.boxes, batch.batch_idx)
    out = select_hard_examples_stratified(batch.cls_losses, batch.loc_losses, *common, num_samples=32, progress=0.4)
    survivors = select_hard_examples(batch.losses, *common, num_samples=10_000)
    per_image = torch.bincount(batch.batch_idx[out.all()], minlength=2)
    available = torch.bincount(batch.batch_idx[survivors.all()], minlength=2)
    assert per_image.tolist() == available.clamp(max=32).tolist()
    assert bool((batch.labels[out.all()] >= 0).all())


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(loc_losses=torch.zeros(3)), "loc_losses"),
        (dict(progress=1.5), "progress"),
        (dict(strata=0), "strata"),
        (dict(quotas=[1.0, 1.0]), "quotas"),
        (dict(quotas=[1.0, -1.0, 0.0, 0.0]), "quotas"),
        (dict(loss_weights=(1.0, -1.0)), "loss_weights"),
        (dict(num_samples=-2), "num_samples"),
        (dict(boxes=torch.tensor([[0.0, 0.0, -1.0, 1.0]] * 4)), "boxes"),
        (dict(cls_losses=torch.tensor([float("nan"), 0.1, 0.2, 0.3])), "cls_losses"),
        (dict(loc_losses=torch.tensor([0.0, float("-inf"), 0.2, 0.3])), "loc_losses"),
    ],
)
def test_stratified_bad_input_raises_naming_argument(change, name):
    args = dict(
        cls_losses=torch.rand(4), loc_losses=torch.rand(4), labels=torch.tensor([0, 1, 0, -1]),
        boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4), batch_idx=torch.zeros(4, dtype=torch.int64),
        num_samples=2, progress=0.5,
    )
    args.update(change)
    positional = [args.pop(k) for k in ("cls_losses", "loc_losses", "labels", "boxes", "batch_idx")]
    with pytest.raises(ValueError, match=name):
        select_hard_examples_stratified(*positional, **args)
