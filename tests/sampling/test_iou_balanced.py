"""Libra R-CNN's IoU-balanced sampler against mmdetection's (tests/reference/mmdet_libra.py).

The selected sets cannot equal the reference's draw for draw (another random stream), so the tests hold
ours to it (1) exactly wherever no draw is random (every group at or under its quota), (2) in distribution:
each RoI's inclusion frequency over many draws, and (3) by invariants over random inputs (hypothesis): the
counts per image, per IoU bin and per ground-truth instance that the reference's rule fixes.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from detbalance.sampling import IoUBalancedSampler, RoIBatch, sample_iou_balanced
from tests.reference import mmdet_libra as ref


def _one_image(gt_inds: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """labels, batch_idx, gt_index of one image from mmdetection's gt_inds (0 bg, i > 0 matched to gt i - 1)."""
    labels = (gt_inds > 0).long()
    return labels, torch.zeros_like(labels), torch.where(gt_inds > 0, gt_inds - 1, -1)


def _reference(gt_inds, iou, *, num, pos_fraction, generator, floor_thr=-1, floor_fraction=0.0, num_bins=3,
               first_call=False):
    """mmdetection's CombinedSampler in training: its negative sampler has been called before (floor_thr -1 -> 0)
    unless ``first_call``."""
    neg = ref.IoUBalancedNegSampler(generator, floor_thr=floor_thr, floor_fraction=floor_fraction, num_bins=num_bins)
    if not first_call:
        neg._sample_neg(torch.zeros(1, dtype=torch.long), torch.zeros(1), 0)  # its first call (mutates floor_thr)
    pos = ref.InstanceBalancedPosSampler(generator)
    return ref.combined_sample(gt_inds, iou, pos_sampler=pos, neg_sampler=neg, num=num, pos_fraction=pos_fraction)


def _scene(seed: int, num_rois: int = 80, num_pos: int = 20, num_gts: int = 3, zeros: int = 20):
    g = torch.Generator().manual_seed(seed)
    gt_inds = torch.zeros(num_rois, dtype=torch.long)
    gt_inds[:num_pos] = torch.randint(1, num_gts + 1, (num_pos,), generator=g)
    iou = torch.rand(num_rois, generator=g) * 0.5
    iou[:num_pos] = 0.5 + 0.5 * torch.rand(num_pos, generator=g)
    iou[0] = 1.0  # a ground-truth box among the RoIs
    iou[num_pos:num_pos + zeros] = 0.0
    return gt_inds, iou


# ------------------------------------------------------------------------------- exact (no randomness)
def test_equals_the_reference_when_every_group_is_within_its_quota():
    """Budget 16 at 0.25: 4 positives (all kept), 12 negatives to draw. IoU bins over [0, 1): [0, 1/3) holds
    4, [1/3, 2/3) holds 4 with IoU > 0, the floor (IoU 0) 4: each bin keeps all (quota int(12 / 3) = 4), the
    floor fills 4: nothing is random, so both give the same set."""
    iou = torch.tensor([1.0, 0.8, 0.7, 0.6,  0.1, 0.2, 0.25, 0.3,  0.35, 0.4, 0.45, 0.49,  0.0, 0.0, 0.0, 0.0])
    gt_inds = torch.tensor([1, 1, 2, 2] + [0] * 12)
    labels, batch_idx, gt_index = _one_image(gt_inds, iou)
    ours = sample_iou_balanced(labels, iou, batch_idx, gt_index, num_images=1, num_samples=16,
                               generator=torch.Generator().manual_seed(0))
    pos, neg = _reference(gt_inds, iou, num=16, pos_fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert ours.positive.tolist() == pos.tolist() == [0, 1, 2, 3]
    assert ours.negative.tolist() == neg.tolist() == list(range(4, 16))


def test_zeros_only_fill_a_shortfall_as_mmdetection_trains():
    """8 negatives with IoU > 0 in bins of 4 + 4 (quota 4 each of 12) -> 8 from the bins, then 4 of the 12 IoU-0
    negatives: the 8 non-zero ones are always selected, by both."""
    iou = torch.tensor([1.0] + [0.1, 0.2, 0.25, 0.3] + [0.35, 0.4, 0.45, 0.49] + [0.0] * 12)
    gt_inds = torch.tensor([1] + [0] * 20)
    labels, batch_idx, gt_index = _one_image(gt_inds, iou)
    for seed in range(5):
        ours = sample_iou_balanced(labels, iou, batch_idx, gt_index, num_images=1, num_samples=13,
                                   generator=torch.Generator().manual_seed(seed))
        _, neg = _reference(gt_inds, iou, num=13, pos_fraction=0.25, generator=torch.Generator().manual_seed(seed))
        for chosen in (ours.negative, neg):
            assert len(chosen) == 12 and set(range(1, 9)) <= set(chosen.tolist())


def test_floor_thr_none_is_mmdetections_first_call():
    """``floor_thr=None`` bins every negative from IoU 0 (mmdetection's first call with floor_thr=-1): with 4
    non-zero negatives in the first bin and 12 zeros, the first bin is capped at its quota, unlike the default."""
    iou = torch.tensor([1.0] + [0.1, 0.15, 0.2, 0.25] + [0.0] * 12)
    gt_inds = torch.tensor([1] + [0] * 16)
    labels, batch_idx, gt_index = _one_image(gt_inds, iou)
    trials, counts_ours, counts_ref = 200, 0, 0
    for seed in range(trials):
        s = sample_iou_balanced(labels, iou, batch_idx, gt_index, num_images=1, num_samples=7, floor_thr=None,
                                generator=torch.Generator().manual_seed(seed))
        _, neg = _reference(gt_inds, iou, num=7, pos_fraction=0.25, first_call=True,
                            generator=torch.Generator().manual_seed(seed))
        assert len(s.negative) == len(neg) == 6
        counts_ours += int((s.negative <= 4).sum())
        counts_ref += int((neg <= 4).sum())
        default = sample_iou_balanced(labels, iou, batch_idx, gt_index, num_images=1, num_samples=7,
                                      generator=torch.Generator().manual_seed(seed))
        assert int((default.negative <= 4).sum()) == 4  # IoU > 0 first: all four, then two zeros
    # every negative lies in bin [0, 1/3): 2 by quota + 4 extra = 6 uniform draws of 16, of which 4 are
    # non-zero: 1.5 expected (sd of the mean over 200 draws: 0.06)
    assert abs(counts_ours / trials - 1.5) < 0.25 and abs(counts_ref / trials - 1.5) < 0.25


# ------------------------------------------------------------------------------- distribution
@pytest.mark.parametrize(("num", "floor_thr", "floor_fraction", "num_bins"), [
    (32, 0.0, 0.0, 3),       # Libra's config, as mmdetection trains (floor_thr -1 -> 0)
    (24, 0.1, 0.5, 3),       # a floor set below IoU 0.1 sampled half the time
    (40, 0.0, 0.0, 1),       # one bin: uniform sampling of the IoU > 0 negatives
])
def test_inclusion_frequencies_match_the_reference(num, floor_thr, floor_fraction, num_bins):
    gt_inds, iou = _scene(0)
    labels, batch_idx, gt_index = _one_image(gt_inds, iou)
    trials = 1500
    ours, theirs = torch.zeros(len(iou)), torch.zeros(len(iou))
    g = torch.Generator().manual_seed(1)
    ref_floor = -1 if floor_thr == 0.0 else floor_thr
    for _ in range(trials):
        s = sample_iou_balanced(labels, iou, batch_idx, gt_index, num_images=1, num_samples=num,
                                floor_thr=floor_thr, floor_fraction=floor_fraction, num_bins=num_bins, generator=g)
        ours[s.all()] += 1
        pos, neg = _reference(gt_inds, iou, num=num, pos_fraction=0.25, generator=g, floor_thr=ref_floor,
                              floor_fraction=floor_fraction, num_bins=num_bins)
        theirs[pos] += 1
        theirs[neg] += 1
    # each frequency is a binomial proportion (sd <= 0.013 at 1500 trials): 0.06 is > 4 sd of the difference
    torch.testing.assert_close(ours / trials, theirs / trials, atol=0.06, rtol=0)


# ------------------------------------------------------------------------------- invariants
@st.composite
def batches(draw):
    num_images = draw(st.integers(1, 3))
    labels, ious, images, gts = [], [], [], []
    next_gt = 0
    for b in range(num_images):
        n_gt = draw(st.integers(0, 3))
        n = draw(st.integers(0, 40))
        for _ in range(n):
            kind = draw(st.sampled_from(["pos", "neg", "zero", "ignore"])) if n_gt else draw(
                st.sampled_from(["zero", "ignore", "neg0"]))
            if kind == "pos":
                labels.append(1)
                ious.append(draw(st.floats(0.5, 1.0)))
                gts.append(next_gt + draw(st.integers(0, n_gt - 1)))
            else:
                labels.append(-1 if kind == "ignore" else 0)
                ious.append(draw(st.floats(0.0, 0.49)) if kind == "neg" else 0.0)
                gts.append(-1)
            images.append(b)
        next_gt += n_gt
    return (torch.tensor(labels, dtype=torch.long), torch.tensor(ious, dtype=torch.float32),
            torch.tensor(images, dtype=torch.long), torch.tensor(gts, dtype=torch.long), num_images)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=batches(), num=st.integers(0, 24), fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       num_bins=st.integers(1, 4), floor_thr=st.sampled_from([None, 0.0, 0.2]), seed=st.integers(0, 3))
def test_invariants(batch, num, fraction, num_bins, floor_thr, seed):
    labels, iou, image, gt_index, num_images = batch
    s = sample_iou_balanced(labels, iou, image, gt_index, num_images=num_images, num_samples=num,
                            positive_fraction=fraction, num_bins=num_bins, floor_thr=floor_thr,
                            generator=torch.Generator().manual_seed(seed))
    assert bool((labels[s.positive] > 0).all()) and bool((labels[s.negative] == 0).all())
    assert len(set(s.all().tolist())) == len(s.all())
    max_pos = int(num * fraction)
    for b in range(num_images):
        mine = image == b
        pos_b, neg_b = s.positive[mine[s.positive]], s.negative[mine[s.negative]]
        n_pos, n_neg = int(((labels == 1) & mine).sum()), int(((labels == 0) & mine).sum())
        # counts: as many positives as fixed-ratio sampling takes, the negatives fill the budget
        assert len(pos_b) == min(n_pos, max_pos)
        assert len(neg_b) == min(n_neg, num - len(pos_b))
        if n_pos > max_pos and len(pos_b):  # instance balance: no ground truth above its quota unless others ran short
            gts = gt_index[pos_b]
            per_gt = int(round(max_pos / float(len(gt_index[(labels == 1) & mine].unique())))) + 1
            assert int(torch.bincount(gts).max()) <= max(per_gt, max_pos)
        # the negatives with IoU > 0 (default floor 0) come first: a zero is taken only if every
        # non-zero negative of the image is
        if floor_thr == 0.0 and len(neg_b) and bool((iou[neg_b] == 0).any()):
            nonzero = ((labels == 0) & mine & (iou > 0)).nonzero().squeeze(1)
            assert set(nonzero.tolist()) <= set(neg_b.tolist())


def test_bin_quotas_hold_when_every_bin_is_full():
    """Three full bins: exactly int(E / 3) from each when no bin runs short (E = 30 -> 10 each)."""
    iou = torch.cat([torch.tensor([1.0]), torch.linspace(0.01, 0.32, 40), torch.linspace(0.34, 0.49, 40)])
    # bins over [0, 1): [0, 1/3) 40 negatives, [1/3, 2/3) 40 negatives, [2/3, 1) none -> 15 + 15 then extras
    gt_inds = torch.tensor([1] + [0] * 80)
    labels, batch_idx, gt_index = _one_image(gt_inds, iou)
    for seed in range(10):
        s = sample_iou_balanced(labels, iou, batch_idx, gt_index, num_images=1, num_samples=31,
                                generator=torch.Generator().manual_seed(seed))
        low = int((iou[s.negative] < 1 / 3).sum())
        assert len(s.negative) == 30 and low >= 10 and 30 - low >= 10


def test_images_are_independent_and_the_batch_equals_per_image_calls_in_distribution():
    """Two images in one call: each image's counts are those of the image alone."""
    gt_a, iou_a = _scene(0)
    gt_b, iou_b = _scene(1, num_rois=50, num_pos=5, num_gts=2, zeros=30)
    gt_b = torch.where(gt_b > 0, gt_b + 3, 0)
    labels = torch.cat([(gt_a > 0), (gt_b > 0)]).long()
    gt_index = torch.cat([gt_a, gt_b]) - 1
    gt_index = torch.where(labels > 0, gt_index, -1)
    image = torch.cat([torch.zeros(80), torch.ones(50)]).long()
    s = sample_iou_balanced(labels, torch.cat([iou_a, iou_b]), image, gt_index, num_images=2, num_samples=32,
                            generator=torch.Generator().manual_seed(0))
    assert int((s.positive < 80).sum()) == 8 and int((s.positive >= 80).sum()) == 5
    assert int((s.negative < 80).sum()) == 24 and int((s.negative >= 80).sum()) == 27


# ------------------------------------------------------------------------------- bad and empty input
def test_zero_rois_give_an_empty_sample():
    """No proposal and no ground truth (mmdetection: empty gt_inds -> empty pos_inds and neg_inds)."""
    empty = torch.zeros(0, dtype=torch.long)
    s = sample_iou_balanced(empty, torch.zeros(0), empty, empty, num_images=2)
    assert s.positive.numel() == 0 and s.negative.numel() == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_bins": 0}, "num_bins must be an int >= 1"),
    ({"floor_fraction": 1.5}, "floor_fraction must be a number in"),
    ({"floor_thr": -1.0}, "floor_thr must be a number in"),
    ({"num_samples": -1}, "num_samples must be a non-negative int"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    labels, batch_idx, gt_index = _one_image(torch.tensor([1, 0]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=message):
        sample_iou_balanced(labels, torch.tensor([1.0, 0.0]), batch_idx, gt_index, num_images=1, **kwargs)


def test_bad_tensors_name_the_argument():
    labels = torch.tensor([1, 0])
    z = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="max_iou must be finite"):
        sample_iou_balanced(labels, torch.tensor([float("nan"), 0.0]), z, torch.tensor([0, -1]), num_images=1)
    with pytest.raises(ValueError, match="gt_index must give the matched ground truth"):
        sample_iou_balanced(labels, torch.tensor([1.0, 0.0]), z, torch.tensor([-1, -1]), num_images=1)
    with pytest.raises(ValueError, match="gt_index must have shape"):
        sample_iou_balanced(labels, torch.tensor([1.0, 0.0]), z, torch.tensor([0]), num_images=1)


def test_the_sampler_class_needs_the_ground_truth_index():
    rois = RoIBatch(torch.tensor([1, 0]), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.tensor([1.0, 0.0]),
                    torch.zeros(2, dtype=torch.bool), 0.0, 1)
    with pytest.raises(ValueError, match="rois.gt_index"):
        IoUBalancedSampler()(rois)
    s = IoUBalancedSampler(num_samples=2, positive_fraction=0.5)(rois._replace(gt_index=torch.tensor([0, -1])),
                                          generator=torch.Generator().manual_seed(0))
    assert s.positive.tolist() == [0] and s.negative.tolist() == [1]
    assert not IoUBalancedSampler.needs_losses
