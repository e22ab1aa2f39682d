"""Score-HLR sampling (PISA's ISR-N): equal to mmdetection's ``ScoreHLRSampler._sample_neg`` and mmcv's
``nms_match`` (literal transcriptions), hypothesis invariants, NaN scores rejected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder

from detbalance.sampling.roi_sampler import RoIBatch, RoILosses, ScoreHLRSampler, WeightedSample
from detbalance.sampling.score_hlr import nms_match_rank, sample_score_hlr
from tests.reference import mmdet_pisa

CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def _decode(rois, deltas):
    return CODER.decode_single(deltas, rois)


def _image(seed: int, n: int = 60, k: int = 3, num_pos: int = 6, spread: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 50
    rois = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * 20], 1)
    mm_logits = torch.randn(n, k + 1, generator=gen) * spread  # mmdetection layout: background last
    bbox_pred = torch.randn(n, 4 * k, generator=gen) * 0.3
    labels = torch.zeros(n, dtype=torch.int64)
    labels[torch.randperm(n, generator=gen)[:num_pos]] = 1 + torch.randint(0, k, (num_pos,), generator=gen)
    probs = mm_logits.softmax(-1)[:, :-1]
    scores, arg = probs.max(-1)
    pred_boxes = _decode(rois, bbox_pred.view(n, k, 4)[torch.arange(n), arg])
    neg_loss = F.cross_entropy(mm_logits, torch.full((n,), k), reduction="none")
    return rois, mm_logits, bbox_pred, labels, scores, pred_boxes, neg_loss


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("k", "bias", "iou_thr"), [(0.5, 0.0, 0.5), (1.0, 0.2, 0.3)])
def test_matches_mmdet_when_valid_negatives_fill_the_budget(seed, k, bias, iou_thr) -> None:
    rois, mm_logits, bbox_pred, labels, scores, pred_boxes, neg_loss = _image(seed)
    num_samples = 24  # 6 positives (cap 6) + 18 negatives out of 54, all valid at these scores
    idx, w = sample_score_hlr(labels, torch.zeros_like(labels), pred_boxes, scores, neg_loss, num_images=1,
                              num_samples=num_samples, positive_fraction=0.25, k=k, bias=bias, iou_thr=iou_thr,
                              generator=torch.Generator().manual_seed(0))
    neg = torch.nonzero(labels == 0).flatten()
    ref_idx, ref_w = mmdet_pisa.score_hlr_sample_neg(
        neg, num_samples - 6, mm_logits[neg], bbox_pred[neg], neg_loss[neg], rois[neg], _decode,
        k=k, bias=bias, iou_thr=iou_thr)
    assert idx.positive.tolist() == torch.nonzero(labels > 0).flatten().tolist()
    order = ref_idx.argsort()
    assert idx.negative.tolist() == ref_idx[order].tolist()
    torch.testing.assert_close(w, ref_w[order])


def test_random_part_when_few_negatives_are_valid() -> None:
    rois, mm_logits, bbox_pred, labels, scores, pred_boxes, neg_loss = _image(1, spread=1.0)
    scores = torch.where(torch.arange(60) % 3 == 0, scores, torch.zeros_like(scores))  # 2/3 invalid
    idx, w = sample_score_hlr(labels, torch.zeros_like(labels), pred_boxes, scores, neg_loss, num_images=1,
                              num_samples=50, generator=torch.Generator().manual_seed(0))
    valid = (labels == 0) & (scores > 0.05)
    assert idx.negative.numel() == 44  # min(54 negatives, 50 - 6)
    assert set(torch.nonzero(valid).flatten().tolist()) <= set(idx.negative.tolist())  # every valid one ranked
    rand = ~valid[idx.negative]
    assert bool((w[rand] == w[rand][0]).all())  # random ones share the smallest weight
    assert bool((w[rand][0] <= w[~rand] + 1e-6).all())
    torch.testing.assert_close((w * neg_loss[idx.negative]).sum(), neg_loss[idx.negative].sum())


def test_no_valid_negative_gives_unit_weights() -> None:
    rois, _, _, labels, scores, pred_boxes, neg_loss = _image(2)
    idx, w = sample_score_hlr(labels, torch.zeros_like(labels), pred_boxes, torch.zeros_like(scores), neg_loss,
                              num_images=1, num_samples=20, generator=torch.Generator().manual_seed(0))
    assert idx.negative.numel() == 15  # 20 - int(20 * 0.25) positives
    torch.testing.assert_close(w, torch.ones(15))


@pytest.mark.parametrize("seed", range(4))
def test_nms_match_rank_matches_mmcv(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(40, 2, generator=gen) * 30
    boxes = torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=gen) * 10], 1)
    scores = torch.rand(40, generator=gen)
    rank = nms_match_rank(boxes, scores, iou_thr=0.4)
    groups = mmdet_pisa.nms_match(torch.cat([boxes, scores[:, None]], 1), 0.4)
    expected = torch.empty(40, dtype=torch.int64)
    for g in groups:
        expected[g] = torch.arange(len(g))
    assert rank.tolist() == expected.tolist()


def test_nan_scores_rejected_by_name() -> None:
    rois, _, _, labels, scores, pred_boxes, neg_loss = _image(0)
    scores[3] = float("nan")
    with pytest.raises(ValueError, match="scores must be finite"):
        sample_score_hlr(labels, torch.zeros_like(labels), pred_boxes, scores, neg_loss, num_images=1)
    batch = RoIBatch(labels, rois, torch.zeros_like(labels), torch.zeros(60), torch.zeros(60, dtype=torch.bool),
                     0.0, 1)
    with pytest.raises(ValueError, match="scores"):
        ScoreHLRSampler()(batch, losses=RoILosses(neg_loss, torch.zeros(60), scores, pred_boxes))
    with pytest.raises(ValueError, match="scores and pred_boxes"):
        ScoreHLRSampler()(batch, losses=RoILosses(neg_loss, torch.zeros(60)))


def test_sampler_contract_two_images() -> None:
    parts = [_image(s) for s in (3, 4)]
    labels = torch.cat([p[3] for p in parts])
    batch = RoIBatch(labels, torch.cat([p[0] for p in parts]), torch.arange(2).repeat_interleave(60),
                     torch.zeros(120), torch.zeros(120, dtype=torch.bool), 0.0, 2)
    losses = RoILosses(torch.cat([p[6] for p in parts]), torch.zeros(120), torch.cat([p[4] for p in parts]),
                       torch.cat([p[5] for p in parts]))
    sampler = ScoreHLRSampler(num_samples=24)
    assert sampler.needs_losses
    out = sampler(batch, losses=losses, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, WeightedSample)
    for i, p in enumerate(parts):  # per image equal to the one-image call
        idx, w = sample_score_hlr(p[3], torch.zeros_like(p[3]), p[5], p[4], p[6], num_images=1, num_samples=24,
                                  generator=torch.Generator().manual_seed(0))
        sel = (out.indices.negative >= 60 * i) & (out.indices.negative < 60 * (i + 1))
        assert (out.indices.negative[sel] - 60 * i).tolist() == idx.negative.tolist()
        torch.testing.assert_close(out.negative_weight[sel], w)


def test_ungrouped_batch_idx_gives_the_grouped_result() -> None:
    """RoIs of the two images interleaved: the sampler groups them (as FixedRatioSampler does), so each image keeps its
    own budget and NMS-match, and the result is the grouped batch's, mapped back to the caller's indices."""
    parts = [_image(s) for s in (5, 6)]
    batch_idx = torch.arange(2).repeat_interleave(60)
    cat = lambda j: torch.cat([p[j] for p in parts])  # noqa: E731
    grouped = RoIBatch(cat(3), cat(0), batch_idx, torch.zeros(120), torch.zeros(120, dtype=torch.bool), 0.0, 2)
    losses = RoILosses(cat(6), torch.zeros(120), cat(4), cat(5))
    flip = torch.stack([torch.arange(60), torch.arange(60, 120)], 1).flatten()  # position j holds RoI flip[j]
    flipped = grouped._replace(labels=grouped.labels[flip], boxes=grouped.boxes[flip],
                               batch_idx=batch_idx[flip], max_iou=grouped.max_iou[flip], mined=grouped.mined[flip])
    flipped_losses = RoILosses(*(v[flip] for v in losses))
    sampler = ScoreHLRSampler(num_samples=24)
    ref = sampler(grouped, losses=losses, generator=torch.Generator().manual_seed(0))
    out = sampler(flipped, losses=flipped_losses, generator=torch.Generator().manual_seed(0))
    assert flip[out.indices.positive].sort().values.tolist() == ref.indices.positive.tolist()
    back, perm = flip[out.indices.negative].sort()
    assert back.tolist() == ref.indices.negative.tolist()
    torch.testing.assert_close(out.negative_weight[perm], ref.negative_weight)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    labels=st.lists(st.integers(-1, 3), min_size=0, max_size=48),
    num_samples=st.integers(1, 48),
    fraction=st.floats(0.0, 1.0),
    thr=st.floats(0.0, 1.0),
    seed=st.integers(0, 3),
)
def test_invariants(labels, num_samples, fraction, thr, seed) -> None:
    n = len(labels)
    lab = torch.tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    img = (torch.arange(n) >= n // 2).to(torch.int64)
    xy = torch.rand(n, 2, generator=gen) * 20
    boxes = torch.cat([xy, xy + 5], 1)
    scores = torch.rand(n, generator=gen)
    loss = torch.rand(n, generator=gen) + 0.01
    idx, w = sample_score_hlr(lab, img, boxes, scores, loss, num_images=2, num_samples=num_samples,
                              positive_fraction=fraction, score_thr=thr, generator=torch.Generator().manual_seed(1))
    pos, neg = idx.positive, idx.negative
    assert bool((lab[pos] > 0).all()) and bool((lab[neg] == 0).all())
    assert len(set(pos.tolist()) | set(neg.tolist())) == pos.numel() + neg.numel()
    assert w.shape == neg.shape and bool(torch.isfinite(w).all()) and bool((w > 0).all())
    for i in range(2):
        p_i, n_i = int((img[pos] == i).sum()), int((img[neg] == i).sum())
        assert p_i <= int(num_samples * fraction)
        assert p_i + n_i <= num_samples
        assert n_i == min(int(((lab == 0) & (img == i)).sum()), num_samples - p_i)  # negatives fill the rest
        m = img[neg] == i
        torch.testing.assert_close((w[m] * loss[neg][m]).sum(), loss[neg][m].sum())  # loss-preserving
    again = sample_score_hlr(lab, img, boxes, scores, loss, num_images=2, num_samples=num_samples,
                             positive_fraction=fraction, score_thr=thr, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0].negative, neg) and torch.equal(again[0].positive, pos)
