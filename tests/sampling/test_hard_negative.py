"""SSD hard negative mining: hand case, torchvision's SSD.compute_loss, empty images, invariants."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.ssd import SSD

from detbalance.sampling import mine_hard_negatives


def test_hand_computed_case():
    losses = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7]])
    labels = torch.tensor([[1, 0, 0, 0, -1, 0, 0]])
    mask = mine_hard_negatives(losses, labels)
    # 1 positive -> 3 negatives: 0.9 (1), 0.7 (6), 0.5 (2); the ignored 0.8 (4) never.
    assert mask.tolist() == [[True, True, True, False, False, False, True]]


def test_image_without_positives_gets_min_negatives():
    losses = torch.tensor([[0.4, 0.9, 0.1, 0.8, 0.5], [0.4, 0.9, 0.1, 0.8, 0.5]])
    labels = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 2, 0, 0]])
    assert mine_hard_negatives(losses, labels, min_negatives=3).tolist() == [
        [False, True, False, True, True],  # min_negatives = 3: 0.9, 0.8, 0.5
        [False, True, True, True, True],  # the positive (2) and 3 of 4 negatives: 0.9, 0.8, 0.5
    ]
    # default (the SSD paper, torchvision): an image without objects gives no negative
    assert mine_hard_negatives(losses, labels)[0].tolist() == [False] * 5
    assert mine_hard_negatives(losses, labels, min_negatives=1)[0].tolist() == [False, True, False, False, False]


def test_fractional_ratio_rounds_up_like_torchvision():
    losses = torch.arange(20, dtype=torch.float32)[None]
    labels = torch.tensor([[1, 1, 1] + [0] * 17])
    mask = mine_hard_negatives(losses, labels, negative_ratio=2.5)  # 7.5 -> 8 negatives
    assert int(mask.sum()) == 3 + 8
    assert mask[0, 12:].all() and not mask[0, 3:12].any()


@pytest.mark.parametrize("seed", range(3))
def test_min_negatives_zero_matches_torchvision_ssd_compute_loss(seed):
    g = torch.Generator().manual_seed(seed)
    num_images, num_anchors, num_classes = 4, 300, 6
    anchors = torch.rand(num_anchors, 2, generator=g) * 100
    anchors = torch.cat([anchors, anchors + 10], dim=1)
    targets, matched = [], []
    for b in range(num_images):
        num_gt = b  # image 0 has no objects
        gt_boxes = torch.rand(num_gt, 2, generator=g) * 100
        targets.append({"boxes": torch.cat([gt_boxes, gt_boxes + 20], 1),
                        "labels": torch.randint(1, num_classes, (num_gt,), generator=g)})
        m = torch.full((num_anchors,), -1)
        if num_gt:
            pos = torch.randperm(num_anchors, generator=g)[: 5 * num_gt]
            m[pos] = torch.randint(num_gt, (pos.numel(),), generator=g)
        matched.append(m)
    logits = torch.randn(num_images, num_anchors, num_classes, generator=g, dtype=torch.float64)
    head = {"cls_logits": logits, "bbox_regression": torch.randn(num_images, num_anchors, 4, generator=g)}
    fake_ssd = SimpleNamespace(neg_to_pos_ratio=(1.0 - 0.25) / 0.25, box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)))
    tv = SSD.compute_loss(fake_ssd, targets, head, [anchors] * num_images, matched)

    cls_targets = torch.stack([torch.where(m >= 0, t["labels"][m.clamp(min=0)] if len(t["labels"]) else 0, 0)
                               for t, m in zip(targets, matched, strict=True)])
    cls_loss = F.cross_entropy(logits.flatten(0, 1), cls_targets.flatten(), reduction="none").view(num_images, -1)
    mask = mine_hard_negatives(cls_loss, cls_targets, negative_ratio=3.0, min_negatives=0)
    num_fg = int((cls_targets > 0).sum())
    torch.testing.assert_close(cls_loss[mask].sum() / max(1, num_fg), tv["classification"], rtol=1e-12, atol=0)

    # The same mask as torchvision's formula, element for element.
    fg = cls_targets > 0
    neg_loss = cls_loss.clone()
    neg_loss[fg] = -float("inf")
    _, idx = neg_loss.sort(1, descending=True)
    bg = idx.sort(1)[1] < 3.0 * fg.sum(1, keepdim=True)
    assert torch.equal(mask, fg | bg)
    assert not mask[0].any()  # the image without objects contributes nothing with min_negatives=0


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.sampled_from([-1, 0, 0, 0, 1, 3]), min_size=12, max_size=12), min_size=1, max_size=4),
    ratio=st.sampled_from([0.0, 1.0, 2.5, 3.0]),
    min_negatives=st.integers(0, 5),
    seed=st.integers(0, 100),
)
def test_invariants(rows, ratio, min_negatives, seed):
    labels = torch.tensor(rows)
    losses = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))
    mask = mine_hard_negatives(losses, labels, negative_ratio=ratio, min_negatives=min_negatives)
    assert not (mask & (labels < 0)).any()
    assert torch.equal(mask & (labels > 0), labels > 0)
    for b in range(labels.shape[0]):
        npos, neg = int((labels[b] > 0).sum()), labels[b] == 0
        budget = math.ceil(ratio * npos) if npos else min_negatives
        chosen = mask[b] & neg
        assert int(chosen.sum()) == min(int(neg.sum()), budget)
        if chosen.any() and (neg & ~chosen).any():
            assert float(losses[b][chosen].min()) >= float(losses[b][neg & ~chosen].max())


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(losses=torch.rand(2, 4)), "labels"),
        (dict(losses=torch.rand(5)), "losses"),
        (dict(negative_ratio=-1.0), "negative_ratio"),
        (dict(min_negatives=-1), "min_negatives"),
        (dict(labels=torch.zeros(2, 5)), "labels"),
        (dict(losses=torch.tensor([[1.0, float("nan"), 0.0, 0.0, 0.0]] * 2)), "losses"),
        (dict(losses=torch.tensor([[1.0, float("inf"), 0.0, 0.0, 0.0]] * 2)), "losses"),
    ],
)
def test_bad_input_raises_naming_argument(change, name):
    args = dict(losses=torch.rand(2, 5), labels=torch.zeros(2, 5, dtype=torch.int64))
    args.update(change)
    with pytest.raises(ValueError, match=name):
        mine_hard_negatives(args.pop("losses"), args.pop("labels"), **args)
