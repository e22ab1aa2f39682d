"""assign_by_iou: hand-computed IoUs, agreement with torchvision's Matcher, empty ground truth, bad input."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from detbalance.sampling import assign_by_iou


def test_hand_computed_rpn_thresholds():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    gt_labels = torch.tensor([3, 2])
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 with gt 0 -> class 3
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with gt 0 -> between 0.3 and 0.7 -> ignore
            [0.0, 0.0, 10.0, 2.0],  # IoU 0.2 -> background
            [20.0, 20.0, 30.0, 30.0],  # IoU 0 -> background
            [100.0, 100.0, 110.0, 104.0],  # IoU 0.4 with gt 1: its best anchor -> low-quality match, class 2
            [100.0, 100.0, 110.0, 103.0],  # IoU 0.3 -> ignore (0.3 is not < low)
        ]
    )
    out = assign_by_iou(anchors, gt, gt_labels, high=0.7, low=0.3)
    assert out.labels.tolist() == [3, -1, 0, 0, 2, -1]
    assert out.matched_gt.tolist() == [0, -1, -1, -1, 1, -1]
    torch.testing.assert_close(out.iou, torch.tensor([1.0, 0.5, 0.2, 0.0, 0.4, 0.3]))

    strict = assign_by_iou(anchors, gt, gt_labels, high=0.7, low=0.3, allow_low_quality=False)
    assert strict.labels.tolist() == [3, -1, 0, 0, -1, -1]
    assert strict.matched_gt.tolist() == [0, -1, -1, -1, -1, -1]


def test_low_quality_ties_keep_all_best_anchors():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 4.0], [0.0, 6.0, 10.0, 10.0], [0.0, 0.0, 10.0, 1.0]])  # 0.4, 0.4, 0.1
    out = assign_by_iou(anchors, gt, torch.tensor([1]), high=0.5, low=0.5)
    assert out.labels.tolist() == [1, 1, 0]


def _random_case(seed: int, num_gt: int, num_anchors: int):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_gt, 2, generator=g) * 80
    gt = torch.cat([xy, xy + 10 + torch.rand(num_gt, 2, generator=g) * 30], dim=1)
    # Half the anchors jitter around ground truth (so every gt overlaps something), half anywhere.
    near = gt[torch.randint(num_gt, (num_anchors // 2,), generator=g)] + torch.randn(num_anchors // 2, 4, generator=g) * 4
    near = torch.cat([near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 1)], dim=1)
    axy = torch.rand(num_anchors - num_anchors // 2, 2, generator=g) * 100
    far = torch.cat([axy, axy + 5 + torch.rand(axy.shape[0], 2, generator=g) * 40], dim=1)
    labels = torch.randint(1, 6, (num_gt,), generator=g)
    return torch.cat([near, far]), gt, labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("high", "low", "allow"), [(0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, True), (0.5, 0.4, False)])
def test_agrees_with_torchvision_matcher(seed, high, low, allow):
    anchors, gt, gt_labels = _random_case(seed, num_gt=5, num_anchors=300)
    matches = Matcher(high, low, allow_low_quality_matches=allow)(box_iou(gt, anchors))
    expected_labels = torch.where(matches >= 0, gt_labels[matches.clamp(min=0)], torch.where(matches == -1, 0, -1))
    out = assign_by_iou(anchors, gt, gt_labels, high=high, low=low, allow_low_quality=allow)
    assert torch.equal(out.labels, expected_labels)
    assert torch.equal(out.matched_gt, torch.where(matches >= 0, matches, -1))
    torch.testing.assert_close(out.iou, box_iou(gt, anchors).max(0).values)
    assert bool((out.labels > 0).any())


def test_no_ground_truth_gives_all_background():
    anchors = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 5.0, 5.0]])
    out = assign_by_iou(anchors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), high=0.7, low=0.3)
    assert out.labels.tolist() == [0, 0]
    assert out.matched_gt.tolist() == [-1, -1]
    assert out.iou.tolist() == [0.0, 0.0]


def test_gt_without_any_overlap_gets_no_low_quality_match():
    # torchvision's Matcher turns every IoU-0 anchor into a match for such a gt; we do not (documented).
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [500.0, 500.0, 510.0, 510.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    out = assign_by_iou(anchors, gt, torch.tensor([1, 2]), high=0.7, low=0.3)
    assert out.labels.tolist() == [1, 0, 0]
    tv = Matcher(0.7, 0.3, allow_low_quality_matches=True)(box_iou(gt, anchors))
    assert tv.tolist() == [0, 0, 0]  # torchvision's behaviour that we deliberately do not copy


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(anchors_or_proposals=torch.tensor([[5.0, 0.0, 1.0, 1.0]])), "anchors_or_proposals"),
        (dict(gt_boxes=torch.tensor([[0.0, 5.0, 1.0, 1.0]])), "gt_boxes"),
        (dict(gt_labels=torch.tensor([1, 2])), "gt_labels"),
        (dict(gt_labels=torch.tensor([0])), "gt_labels"),
        (dict(high=1.5), "high"),
        (dict(low=-0.1), "low"),
        (dict(high=0.3, low=0.7), "low"),
    ],
)
def test_bad_input_raises_naming_argument(kwargs, name):
    args = dict(
        anchors_or_proposals=torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
        gt_boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
        gt_labels=torch.tensor([1]),
        high=0.7,
        low=0.3,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        assign_by_iou(args.pop("anchors_or_proposals"), args.pop("gt_boxes"), args.pop("gt_labels"), **args)
