"""detbalance.analysis.stats: hand-built datasets and assignments with known answers, oracles for the grads."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import Matcher, SSDMatcher
from torchvision.ops import box_iou

from detbalance.analysis.stats import (
    QUADRANTS,
    GradientAccumulator,
    assignment_stats,
    class_repeat_factors,
    dataset_stats,
    detector_assignment_stats,
    focal_gradient_magnitude,
    gradient_stats,
    match_anchors,
    per_class_ap,
    sigmoid_targets,
)


def _t(boxes, labels, image_id=0):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": image_id,
    }


# ------------------------------------------------------------------------------------------------ dataset


def _toy_dataset():
    return [
        _t([[0, 0, 10, 10], [0, 0, 40, 40], [0, 0, 100, 100]], [1, 1, 2], 0),  # small, medium, large
        _t([[5, 5, 25, 25]], [1], 1),  # 20x20: small
        _t([], [], 2),  # empty
        _t([[0, 0, 96, 96]], [3], 3),  # exactly 96^2: large
    ]


def test_dataset_stats_known_answers():
    s = dataset_stats(_toy_dataset(), num_classes=4, class_names=["a", "b", "c", "d"], repeat_threshold=0.5)
    assert (s.num_images, s.num_objects, s.num_empty_images) == (4, 5, 1)
    assert s.objects_per_image_mean == 1.25 and s.objects_per_image_max == 3
    assert s.objects_per_image_hist == [1, 2, 0, 1]
    assert s.instance_counts == [3, 1, 1, 0]
    assert s.image_counts == [2, 1, 1, 0]
    assert s.imbalance_ratio == 3.0
    assert (s.most_common, s.rarest, s.absent_classes) == ("a", "b", ["d"])
    assert s.size_counts == {"small": 2, "medium": 1, "large": 2}
    assert sum(s.sqrt_area_hist) == 5
    # sqrt(area) 10 lies in [8, 11.31): bin 6 of the log2 half-octave edges from 1 px
    assert s.sqrt_area_edges[6] == 8.0 and s.sqrt_area_hist[6] == 1
    # LVIS: f = [2/4, 1/4, 1/4, 0], t = 0.5 -> r = [1, sqrt 2, sqrt 2, 1 (absent)]
    assert s.class_repeat_factors == pytest.approx([1, 2**0.5, 2**0.5, 1.0])
    # images: max over their classes -> [sqrt 2, 1, 1, sqrt 2]
    assert s.num_images_repeated == 2
    assert s.expected_epoch_size == pytest.approx(2 + 2 * 2**0.5)
    assert s.image_repeat_factors_max == pytest.approx(2**0.5)
    assert s.image_repeat_factors_mean == pytest.approx((2 + 2 * 2**0.5) / 4)


def test_dataset_repeat_factors_detectron2_example():
    # detectron2's test: categories {0, 1}, {0}, {} with t = 0.5 -> [sqrt(3/2), 1, 1] (labels shifted by one)
    targets = [_t([[0, 0, 5, 5], [0, 0, 6, 6]], [1, 2]), _t([[0, 0, 5, 5]], [1]), _t([], [])]
    s = dataset_stats(targets, num_classes=2, repeat_threshold=0.5)
    assert s.expected_epoch_size == pytest.approx(math.sqrt(1.5) + 2)
    assert s.class_repeat_factors == pytest.approx([1.0, math.sqrt(1.5)])
    assert s.class_names == ["1", "2"]


def test_dataset_stats_equals_sampler_repeat_factors():
    from detbalance.sampling import repeat_factors

    g = torch.Generator().manual_seed(1)
    targets = []
    for i in range(200):
        n = int(torch.randint(0, 4, (1,), generator=g))
        labels = (torch.rand(n, generator=g) ** 4 * 6).long() + 1
        targets.append(
            {"boxes": torch.tensor([[0.0, 0, 8, 8]]).repeat(n, 1), "labels": labels, "image_id": i}
        )
    s = dataset_stats(targets, num_classes=6, repeat_threshold=0.05)
    r = repeat_factors([t["labels"].tolist() for t in targets], threshold=0.05)
    assert s.expected_epoch_size == pytest.approx(float(r.sum()))
    assert s.image_repeat_factors_max == pytest.approx(float(r.max()))
    # class factors in closed form agree with the per-image maxima the sampler uses
    rc = class_repeat_factors(torch.tensor(s.image_counts), 200, threshold=0.05)
    per_image = torch.stack(
        [rc[t["labels"] - 1].max() if len(t["labels"]) else torch.tensor(1.0).double() for t in targets]
    )
    torch.testing.assert_close(per_image, r)


@pytest.mark.parametrize(
    ("targets", "kwargs", "match"),
    [
        ([], {"num_classes": 3}, "empty"),
        ([_t([[0, 0, 1, 1]], [4])], {"num_classes": 3}, "1..3"),
        ([_t([[0, 0, 1, 1]], [0])], {"num_classes": 3}, "1..3"),
        ([_t([], [])], {"num_classes": 2, "class_names": ["a"]}, "class_names"),
        ([_t([], [])], {"num_classes": 0}, "num_classes"),
    ],
)
def test_dataset_stats_bad_input(targets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataset_stats(targets, **kwargs)


def test_dataset_without_boxes_has_no_ratio():
    s = dataset_stats([_t([], []), _t([], [])], num_classes=2)
    assert s.imbalance_ratio is None and s.most_common is None and s.num_empty_images == 2
    assert s.absent_classes == ["1", "2"]


# --------------------------------------------------------------------------------------------- matching


def _random_boxes(n, g, size=64.0):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 2
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("mode", ["all_ties", "best_anchor", None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_anchors_equals_torchvision_matcher(mode, seed):
    g = torch.Generator().manual_seed(seed)
    anchors = _random_boxes(300, g)
    anchors = torch.cat([anchors, anchors[:20]])  # exact ties between anchors
    num_gt = [5, 0, 1, 8]
    gts = [_random_boxes(n, g) for n in num_gt]
    boxes = torch.zeros(len(gts), max(num_gt), 4)
    valid = torch.zeros(len(gts), max(num_gt), dtype=torch.bool)
    for b, x in enumerate(gts):
        boxes[b, : len(x)] = x
        valid[b, : len(x)] = True
    high, low = (0.5, 0.5) if mode == "best_anchor" else (0.5, 0.4)
    matches, _ = match_anchors(anchors, boxes, valid, high=high, low=low, low_quality_matches=mode)
    for b, x in enumerate(gts):
        if len(x) == 0:
            assert bool((matches[b] == -1).all())
            continue
        if mode == "best_anchor":
            ref = SSDMatcher(0.5)(box_iou(x, anchors))
        else:
            ref = Matcher(high, low, allow_low_quality_matches=mode == "all_ties")(box_iou(x, anchors))
        torch.testing.assert_close(matches[b], ref, rtol=0, atol=0)


def _toy_anchors():
    anchors = torch.tensor(
        [[0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 20, 20], [20, 0, 40, 20]], dtype=torch.float32
    )
    return anchors, torch.tensor([0, 0, 1, 1])


def test_assignment_stats_known_answers():
    anchors, levels = _toy_anchors()
    targets = [
        # g0 matches a0 (IoU 1); g1 (a 2 px box inside a0) has its best anchor a0 taken by g0: no anchor at all
        _t([[0, 0, 10, 10], [0, 0, 2, 2]], [1, 2], 10),
        # g0 matches a3 (IoU .8); g1 ties at IoU 9/19 on a0 and a1 (both positive by the low-quality rule),
        # and IoU .45 with a2 (ignored, between 0.4 and 0.5)
        _t([[20, 0, 40, 16], [0, 0, 20, 9]], [3, 1], 11),
        _t([], [], 12),  # all negative
    ]
    s = assignment_stats(anchors, levels, targets, high=0.5, low=0.4, level_names=["P3", "P4"])
    assert s.level_names == ["P3", "P4"]
    assert s.anchors_per_level == [6, 6]
    assert s.positives_per_level == [3, 1]
    assert s.negatives_per_level == [3, 4]
    assert s.ignored_per_level == [0, 1]
    assert s.positives_per_image == [1, 3, 0]
    assert s.negatives_per_image == [3, 0, 4]
    assert s.ignored_per_image == [0, 1, 0]
    assert s.negatives_per_positive == pytest.approx(7 / 4)
    assert s.num_gt == 4 and s.num_unmatched_gt == 1 and s.num_low_quality_gt == 2
    (u,) = s.unmatched
    assert (u.image, u.image_id, u.label, u.box) == (0, 10, 2, [0.0, 0.0, 2.0, 2.0])
    assert u.max_iou == pytest.approx(0.04)
    assert sum(s.gt_max_iou_hist) == 4 and s.gt_max_iou_hist[0] == 1 and s.gt_max_iou_hist[19] == 1


def test_assignment_stats_without_low_quality_rule_reports_box_below_high():
    anchors, levels = _toy_anchors()
    # IoU 0.45 with a2 at best: ignored, never positive, reported
    s = assignment_stats(
        anchors, levels, [_t([[0, 0, 20, 9]], [1])], high=0.5, low=0.4, low_quality_matches=None
    )
    assert s.num_unmatched_gt == 1 and s.positives_per_level == [0, 0] and s.negatives_per_positive is None


def test_assignment_stats_per_image_anchors_and_chunks_agree():
    g = torch.Generator().manual_seed(3)
    anchors = _random_boxes(200, g)
    levels = (torch.arange(200) >= 120).long()
    targets = [_t(_random_boxes(n, g).tolist(), [1] * n) for n in (3, 1, 0, 6, 2)]
    shared = assignment_stats(anchors, levels, targets, high=0.5, low=0.4)
    per_image = assignment_stats([anchors] * 5, [levels] * 5, targets, high=0.5, low=0.4, max_pairs=1)
    assert shared == per_image
    # per image, the counts are those of torchvision's Matcher
    for b, t in enumerate(targets):
        if len(t["labels"]) == 0:
            continue
        m = Matcher(0.5, 0.4, True)(box_iou(t["boxes"], anchors))
        assert shared.positives_per_image[b] == int((m >= 0).sum())
        assert shared.ignored_per_image[b] == int((m == -2).sum())


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"high": 0.4, "low": 0.5}, "low <= high"), ({"high": 1.5, "low": 0.4}, "high")]
)
def test_assignment_stats_bad_thresholds(kwargs, match):
    anchors, levels = _toy_anchors()
    with pytest.raises(ValueError, match=match):
        assignment_stats(anchors, levels, [_t([], [])], **kwargs)


def test_assignment_stats_no_images():
    anchors, levels = _toy_anchors()
    with pytest.raises(ValueError, match="empty"):
        assignment_stats(anchors, levels, [], high=0.5, low=0.4)


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "ssd"])
def test_detector_assignment_stats_matches_the_model(arch):
    from detbalance.detectors.build import build_detector

    torch.manual_seed(0)
    model = build_detector(arch, num_classes=3, image_size=64)
    targets = [
        _t([[4, 4, 14, 16], [30, 30, 50, 44]], [1, 3], 0),
        _t([[10, 40, 18, 50]], [2], 1),
        _t([], [], 2),
    ]
    s = detector_assignment_stats(model, targets, [(64, 64)] * 3)
    # oracle: the model's own generator and matcher on one real forward of the transform + backbone
    model.eval()
    with torch.no_grad():
        images, tt = model.transform([torch.zeros(3, 64, 64)] * 3, [dict(t) for t in targets])
        feats = list(model.backbone(images.tensors).values())
        if arch == "faster_rcnn":
            anchors = model.rpn.anchor_generator(images, feats)
            matcher = model.rpn.proposal_matcher
        else:
            anchors = model.anchor_generator(images, feats)
            matcher = model.proposal_matcher
    assert sum(s.anchors_per_level) == 3 * anchors[0].shape[0]
    assert len(s.level_names) == len(feats) and s.level_names[0] == "stride 4"
    for b, t in enumerate(tt):
        if len(t["labels"]) == 0:
            assert s.positives_per_image[b] == 0
            continue
        m = matcher(box_iou(t["boxes"], anchors[b]))
        assert s.positives_per_image[b] == int((m >= 0).sum())
        assert s.ignored_per_image[b] == int((m == -2).sum())
    assert (s.high, s.low) == (
        (0.7, 0.3) if arch == "faster_rcnn" else (0.5, 0.4) if arch == "retinanet" else (0.5, 0.5)
    )


def test_detector_assignment_stats_rejects_other_models():
    with pytest.raises(ValueError, match="anchor generator"):
        detector_assignment_stats(torch.nn.Linear(2, 2), [_t([], [])], [(8, 8)])


# ------------------------------------------------------------------------------------------------ grads


def _grad_inputs(seed=0, n=400, c=4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, c + 1, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.6] = 0
    targets, valid = sigmoid_targets(labels, c, background_column=False)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3 + targets.double() * 2 - 1
    return logits, targets.double(), valid


def test_quadrant_shares_sum_to_one_and_counts_partition():
    logits, targets, valid = _grad_inputs()
    s = gradient_stats(logits, targets, valid=valid)
    for name in ("ce", "focal", "ghm_c"):
        assert sum(s.gradient_share[name].values()) == pytest.approx(1.0)
        assert set(s.gradient_share[name]) == set(QUADRANTS)
        assert sum(s.bin_share[name]) == pytest.approx(1.0)
    n_valid = int(valid.sum()) * logits.shape[1]
    assert sum(s.quadrant_counts.values()) == s.num_examples == n_valid
    assert s.num_positive == int((targets * valid).sum())
    assert s.num_positive + s.num_negative == n_valid


def test_density_matches_losses_gradient_density():
    from detbalance.losses import gradient_density

    logits, targets, valid = _grad_inputs(1)
    s = gradient_stats(logits, targets, valid=valid, bins=17)
    g = (torch.sigmoid(logits.float()) - targets.float()).abs()
    full = valid.expand_as(g)
    assert s.density == gradient_density(g, bins=17, valid=full).tolist()
    assert s.density_positive == gradient_density(g, bins=17, valid=full & (targets > 0)).tolist()
    assert s.density_negative == gradient_density(g, bins=17, valid=full & (targets == 0)).tolist()


def _quadrant_of(logits, targets, threshold):
    g = (torch.sigmoid(logits) - targets).abs()
    pos, hard = targets > 0.5, g >= threshold
    return {
        "easy_positive": pos & ~hard,
        "hard_positive": pos & hard,
        "easy_negative": ~pos & ~hard,
        "hard_negative": ~pos & hard,
    }


@pytest.mark.parametrize("threshold", [0.5, 0.1])
def test_gradient_shares_equal_autograd_of_each_loss(threshold):
    """Shares from the per-bin sums equal sum |dL/dx| per quadrant from autograd of the real losses."""
    from detbalance.losses import ghm_c_loss

    logits, targets, valid = _grad_inputs(2)
    s = gradient_stats(logits, targets, valid=valid, easy_threshold=threshold)
    full = valid.expand_as(logits)
    quads = _quadrant_of(logits, targets, threshold)
    x = logits.clone().requires_grad_(True)
    losses = {
        "ce": lambda x: (
            torch.nn.functional.binary_cross_entropy_with_logits(x, targets, reduction="none") * full
        ).sum(),
        "focal": lambda x: (
            torchvision.ops.sigmoid_focal_loss(x, targets, alpha=0.25, gamma=2.0) * full
        ).sum(),
        "ghm_c": lambda x: ghm_c_loss(x, targets, bins=30, valid=full),
    }
    for name, fn in losses.items():
        (grad,) = torch.autograd.grad(fn(x), x)
        mag = grad.abs() * full
        total = mag.sum()
        for q in QUADRANTS:
            assert s.gradient_share[name][q] == pytest.approx(
                float((mag * quads[q]).sum() / total), rel=1e-5, abs=1e-9
            )


def test_focal_gradient_magnitude_is_autograd_of_focal():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(500, generator=g, dtype=torch.float64) * 6).requires_grad_(True)
    y = (torch.rand(500, generator=g) < 0.3).double()
    for alpha, gamma in ((0.25, 2.0), (None, 0.5), (0.75, 0.0)):
        loss = torchvision.ops.sigmoid_focal_loss(
            x, y, alpha=-1 if alpha is None else alpha, gamma=gamma
        ).sum()
        (grad,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(
            focal_gradient_magnitude(x.detach(), y, alpha=alpha, gamma=gamma).double(),
            grad.abs(),
            rtol=1e-5,
            atol=1e-7,
        )
    # gamma 0, no alpha: CE's g = |p - y|
    torch.testing.assert_close(
        focal_gradient_magnitude(x.detach(), y, alpha=None, gamma=0.0).double(),
        (torch.sigmoid(x.detach()) - y).abs(),
        rtol=1e-5,
        atol=1e-7,
    )


def test_mean_gradient_is_ghm_figure_2():
    logits, targets, valid = _grad_inputs(5)
    s = gradient_stats(logits, targets, valid=valid, bins=10)
    g = (torch.sigmoid(logits) - targets).abs()[valid.expand_as(logits)]
    n = g.numel()
    for j in range(10):
        in_bin = (g * 10).floor().clamp(max=9) == j
        if not bool(in_bin.any()):
            assert s.mean_gradient["ce"][j] is None
            continue
        count = int(in_bin.sum())
        assert s.mean_gradient["ce"][j] == pytest.approx(float(g[in_bin].mean()), rel=1e-5)
        # GHM-C: beta = N / (count * M) times g
        assert s.mean_gradient["ghm_c"][j] == pytest.approx(
            float(g[in_bin].mean()) * n / (count * 10), rel=1e-5
        )


def test_loss_cdf_exact_at_example_boundaries():
    # 4 negatives with well separated losses: the CDF at 1/4, 2/4, 3/4 is the exact cumulative share
    x = torch.tensor([[-6.0, -3.0, 0.0, 2.0]]).T
    y = torch.zeros_like(x)
    s = gradient_stats(x, y, cdf_gammas=(0.0, 2.0), cdf_points=101)
    p = torch.sigmoid(x.double().flatten())
    for gi, gamma in enumerate((0.0, 2.0)):
        loss = (p**gamma * -torch.log1p(-p)).sort().values
        cum = loss.cumsum(0) / loss.sum()
        for k in (1, 2, 3):
            assert s.cdf_negative[gi][25 * k] == pytest.approx(float(cum[k - 1]), abs=2e-3)
        assert s.cdf_negative[gi][0] == 0.0 and s.cdf_negative[gi][-1] == pytest.approx(1.0)
    assert s.num_positive == 0 and s.cdf_positive[0] == [0.0] * 101
    # focusing moves the loss to the hardest examples (focal figure 4)
    assert s.cdf_negative[1][75] < s.cdf_negative[0][75]


def test_accumulator_streams_exactly():
    logits, targets, valid = _grad_inputs(6, n=600)
    whole = gradient_stats(logits, targets, valid=valid)
    acc = GradientAccumulator()
    for sl in (slice(0, 100), slice(100, 450), slice(450, 600)):
        acc.update(logits[sl], targets[sl], valid[sl])
    part = acc.result()
    assert part.quadrant_counts == whole.quadrant_counts and part.density == whole.density
    for name in ("ce", "focal", "ghm_c"):
        for q in QUADRANTS:
            assert part.gradient_share[name][q] == pytest.approx(whole.gradient_share[name][q], rel=1e-5)


def test_easy_threshold_moves_examples():
    logits, targets, valid = _grad_inputs(7)
    lo = gradient_stats(logits, targets, valid=valid, easy_threshold=0.1)
    hi = gradient_stats(logits, targets, valid=valid, easy_threshold=0.9)
    g = (torch.sigmoid(logits) - targets).abs()[valid.expand_as(logits)]
    assert lo.quadrant_counts["easy_negative"] + lo.quadrant_counts["easy_positive"] == int((g < 0.1).sum())
    assert hi.quadrant_counts["easy_negative"] + hi.quadrant_counts["easy_positive"] == int((g < 0.9).sum())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bins": 0}, "bins"),
        ({"easy_threshold": 0.0}, "easy_threshold"),
        ({"focal_alpha": 2.0}, "focal_alpha"),
        ({"focal_gamma": -1.0}, "gamma"),
    ],
)
def test_gradient_stats_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradient_stats(torch.zeros(2, 2), torch.zeros(2, 2), **kwargs)


def test_gradient_stats_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        gradient_stats(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="0 or 1"):
        gradient_stats(torch.zeros(2, 2), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="no valid"):
        gradient_stats(torch.zeros(2, 2), torch.zeros(2, 2), valid=torch.zeros(2, 1, dtype=torch.bool))


def test_sigmoid_targets_both_conventions():
    labels = torch.tensor([-1, 0, 1, 3])
    t, v = sigmoid_targets(labels, 4, background_column=True)  # torchvision RetinaNet: column k is label k
    assert t.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert v.flatten().tolist() == [False, True, True, True]
    t, _ = sigmoid_targets(labels, 3, background_column=False)  # column k - 1
    assert t.tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="columns"):
        sigmoid_targets(labels, 3, background_column=True)


# ----------------------------------------------------------------------------------------------- AP


def test_per_class_ap_known_answers():
    targets = [_t([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 2]), _t([[5, 5, 25, 25]], [2])]
    perfect = [
        {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets
    ]
    assert per_class_ap(perfect, targets, num_classes=3) == [1.0, 1.0, None]
    # class 1 detected with the wrong label: AP 0 for it; class 2 perfect
    wrong = [dict(perfect[0], labels=torch.tensor([3, 2])), perfect[1]]
    assert per_class_ap(wrong, targets, num_classes=3) == [0.0, 1.0, None]
    with pytest.raises(ValueError, match="predictions"):
        per_class_ap(perfect[:1], targets, num_classes=3)


def test_box_overlapping_no_anchor_is_unmatched_despite_torchvision_ties():
    anchors, levels = _toy_anchors()
    target = _t([[100, 100, 110, 110]], [1])
    # torchvision's Matcher ties every anchor at IoU 0 for this box and marks them all positive ...
    ref = Matcher(0.5, 0.4, True)(box_iou(target["boxes"], anchors))
    assert bool((ref == 0).all())
    s = assignment_stats(anchors, levels, [target], high=0.5, low=0.4)
    assert s.positives_per_level == [2, 2]  # ... which the counts reproduce ...
    assert s.num_unmatched_gt == 1 and s.unmatched[0].max_iou == 0.0  # ... and the box is reported
