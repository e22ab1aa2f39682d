"""balance_retinanet: equality with torchvision, every remedy trains, recorder counts, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from detbalance.detectors import (
    BalancedRetinaNetHead,
    BalanceRecorder,
    anchor_outputs,
    balance_retinanet,
    build_detector,
    check_detection_targets,
)
from detbalance.losses import (
    ASL1Loss,
    GHMCLoss,
    GHMRLoss,
    GIoULoss,
    L1Loss,
    PositiveNormalizer,
    QualityFocalLoss,
    SigmoidFocalLoss,
    SmoothL1Loss,
    SoftmaxFocalLoss,
    VarifocalLoss,
    declare_loss,
)
from tests.detectors.inputs import SIZE, make_batch

K = 3  # object classes; the model has K + 1 = 4 columns, column 0 never positive


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_detector("retinanet", num_classes=K, image_size=SIZE)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("loss_type", "box_loss"),
    [("l1", L1Loss()), ("smooth_l1", SmoothL1Loss(beta=1.0)), ("giou", GIoULoss())],
    ids=["l1", "smooth_l1", "giou"],
)
def test_equals_torchvision_losses_and_gradients(base_model, loss_type, box_loss):
    vanilla = copy.deepcopy(base_model)
    vanilla.head.regression_head._loss_type = loss_type
    adapted = balance_retinanet(
        copy.deepcopy(base_model),
        cls_loss=SigmoidFocalLoss(alpha=0.25, gamma=2.0),
        box_loss=box_loss,
        normalizer="per_image",
        prior_prob=None,
        background_column=True,  # torchvision's loss includes its never-positive column 0
    )
    assert isinstance(adapted.head, BalancedRetinaNetHead)
    images, targets = make_batch()
    expected = vanilla(images, targets)
    actual = adapted(images, targets)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    sum(expected.values()).backward()
    sum(actual.values()).backward()
    gv, ga = grads(vanilla), grads(adapted)
    assert gv.keys() == ga.keys()
    for name in gv:
        torch.testing.assert_close(ga[name], gv[name], rtol=1e-4, atol=1e-6, msg=name)


def test_per_batch_normaliser_equals_independent_sum_over_all_positives(base_model):
    model = balance_retinanet(
        copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_batch",
        prior_prob=None,
    )
    images, targets = make_batch()
    losses = model(images, targets)
    with torch.no_grad():
        out = anchor_outputs(model, images, targets)
    valid, pos = out.labels >= 0, out.labels > 0
    onehot = torch.zeros_like(out.cls_logits)
    onehot[pos, out.labels[pos]] = 1.0
    # column 0 (never a class in torchvision's K + 1 columns) is left out by default
    focal = torchvision.ops.sigmoid_focal_loss(out.cls_logits[valid][:, 1:], onehot[valid][:, 1:], reduction="sum")
    l1 = (out.bbox_regression[pos] - out.target_regression[pos]).abs().sum()
    npos = max(1, int(pos.sum()))
    assert int(pos.sum()) >= 3  # every object has at least its best anchor (low-quality matches)
    torch.testing.assert_close(losses["classification"], focal / npos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["bbox_regression"], l1 / npos, rtol=1e-5, atol=1e-6)


def test_loss_weights_scale_the_terms(base_model):
    images, targets = make_batch()
    kw = dict(cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_batch", prior_prob=None)
    ref = balance_retinanet(copy.deepcopy(base_model), **kw)(images, targets)
    out = balance_retinanet(copy.deepcopy(base_model), cls_loss_weight=0.5, box_loss_weight=10.0, **kw)(images, targets)
    torch.testing.assert_close(out["classification"], 0.5 * ref["classification"])
    torch.testing.assert_close(out["bbox_regression"], 10.0 * ref["bbox_regression"])


def test_prior_initialises_classifier_bias(base_model):
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(0.3)
    kept = balance_retinanet(copy.deepcopy(model), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(),
                             normalizer="per_batch", prior_prob=None)
    assert torch.all(kept.head.classification_head.cls_logits.bias == 0.3)
    weight_before = model.head.classification_head.cls_logits.weight.clone()
    prior = balance_retinanet(model, cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_batch",
                              prior_prob=0.05)
    bias = prior.head.classification_head.cls_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(0.95 / 0.05)))
    torch.testing.assert_close(torch.sigmoid(bias), torch.full_like(bias, 0.05))
    assert torch.equal(prior.head.classification_head.cls_logits.weight, weight_before)  # no re-init


CLS_LOSSES = {
    "ce_prior": lambda: SigmoidFocalLoss(alpha=None, gamma=0.0),
    "bce_module": lambda: declare_loss(nn.BCEWithLogitsLoss(reduction="none"), kind="sigmoid"),
    "alpha_ce": lambda: SigmoidFocalLoss(alpha=0.75, gamma=0.0),
    "focal": lambda: SigmoidFocalLoss(alpha=0.25, gamma=2.0),
    "ghm_c": lambda: GHMCLoss(bins=30, momentum=0.75),
    "qfl": lambda: QualityFocalLoss(beta=2.0),
    "vfl": lambda: VarifocalLoss(alpha=0.75, gamma=2.0),
}
BOX_LOSSES = {
    "smooth_l1": lambda: SmoothL1Loss(beta=1.0 / 9.0),
    "l1": lambda: L1Loss(),
    "giou": lambda: GIoULoss(),
    "asl1": lambda: ASL1Loss(mu=0.02),
    "ghm_r": lambda: GHMRLoss(mu=0.02, bins=10, momentum=0.7),
}


@pytest.mark.parametrize(
    ("cls_name", "box_name"),
    [(c, "l1") for c in CLS_LOSSES] + [("focal", b) for b in BOX_LOSSES if b != "l1"],
)
def test_every_remedy_trains_one_step(base_model, cls_name, box_name):
    model = balance_retinanet(
        copy.deepcopy(base_model), cls_loss=CLS_LOSSES[cls_name](), box_loss=BOX_LOSSES[box_name](),
        normalizer="per_batch", box_loss_weight=10.0 if box_name == "ghm_r" else 1.0,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    images, targets = make_batch()
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(bool(torch.isfinite(v)) and float(v.detach()) > 0 for v in losses.values())
    opt.zero_grad()
    sum(losses.values()).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    with_grad = [p for p in params if p.grad is not None and bool(torch.isfinite(p.grad).all())]
    assert len(with_grad) == len(params)  # timm's num_params == num_grad
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.parametrize("per_level", [True, False], ids=["per_level_reference", "all_levels_option"])
def test_ghm_c_calls_per_level_or_once(base_model, per_level):
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    class Spy(GHMCLoss):
        def forward(self, pred, target, valid=None, weight=None):
            calls.append((tuple(pred.shape), tuple(valid.shape)))
            return super().forward(pred, target, valid=valid, weight=weight)

    rec = BalanceRecorder()
    loss = Spy(per_level=per_level)
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=loss, box_loss=L1Loss(), normalizer="per_batch",
                              recorder=rec)
    images, targets = make_batch()
    model(images, targets)
    with torch.no_grad():
        out = anchor_outputs(model, images, targets)
    b, a, c = out.cls_logits.shape
    sizes = [int((out.level == lvl).sum()) for lvl in range(int(out.level.max()) + 1)]
    if per_level:  # mmdetection: one call per FPN level with all images, K columns (no column 0)
        assert calls == [((b * n, c - 1), (b * n,)) for n in sizes]
    else:
        assert calls == [((b * a, c - 1), (b * a,))]
    assert int(loss.ema_steps) == len(calls)
    density = rec.to_records()[0]["ghm_density"]["retinanet/cls"]
    assert density == loss.last_density.tolist()
    if not per_level:  # the histogram counts every valid (anchor, class column) element once
        assert math.isclose(sum(density) / (1 - loss.momentum), int((out.labels >= 0).sum()) * (c - 1), rel_tol=1e-6)


def test_recorder_counts_and_class_losses_match_independent_computation(base_model):
    rec = BalanceRecorder()
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(),
                              normalizer="per_batch", recorder=rec, prior_prob=None)
    images, targets = make_batch()
    rec.start_step(0)
    model(images, targets)
    with torch.no_grad():
        out = anchor_outputs(model, images, targets)
    record = rec.to_records()[0]
    counts = record["counts"]["retinanet/anchors"]
    num_levels = int(out.level.max()) + 1
    assert num_levels == 3
    for name, mask in (("positives", out.labels > 0), ("negatives", out.labels == 0), ("ignored", out.labels < 0)):
        expected = [int(mask[:, out.level == lvl].sum()) for lvl in range(num_levels)]
        assert counts[name] == expected, name
    assert sum(counts["positives"]) >= 3 and sum(counts["ignored"]) > 0
    # Per-class sums: focal loss of each anchor (summed over columns), grouped by its label.
    valid = out.labels >= 0
    onehot = torch.zeros_like(out.cls_logits)
    onehot[out.labels > 0, out.labels[out.labels > 0]] = 1.0
    per_anchor = torchvision.ops.sigmoid_focal_loss(out.cls_logits[..., 1:], onehot[..., 1:]).sum(-1)
    cls = record["class_losses"]["retinanet/cls"]
    for k in range(K + 1):
        sel = valid & (out.labels == k)
        assert cls["count"][k] == int(sel.sum())
        assert math.isclose(cls["sum"][k], float(per_anchor[sel].sum()), rel_tol=1e-4)
    assert record["losses"]["retinanet/cls_positive"]["count"] == sum(counts["positives"])
    assert record["losses"]["retinanet/box"]["count"] == sum(counts["positives"])


def test_labels_follow_torchvision_matching(base_model):
    images, targets = make_batch()
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        out = anchor_outputs(model, images, targets)
        anchors = out.anchors[0]
        iou = torchvision.ops.box_iou(targets[0]["boxes"], anchors)
    best = iou.max(0)
    expected = torch.where(best.values >= 0.5, targets[0]["labels"][best.indices], torch.zeros_like(best.indices))
    expected[(best.values >= 0.4) & (best.values < 0.5)] = -1
    # Low-quality matches: each object's best anchor(s) are positive whatever their IoU.
    for g in range(len(targets[0]["boxes"])):
        top = iou[g] == iou[g].max()
        expected[top] = targets[0]["labels"][g]
    assert torch.equal(out.labels[0], expected)
    assert torch.all(out.labels[1] == 0)  # the image without objects is all background
    pos = out.labels > 0
    assert torch.all(out.target_regression[~pos] == 0)


def test_ema_normaliser_updates_once_per_step(base_model):
    norm = PositiveNormalizer("ema", momentum=0.9, initial=100.0)
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(),
                              normalizer=norm, prior_prob=None)
    ref = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(),
                            normalizer="per_batch", prior_prob=None)
    images, targets = make_batch()
    with torch.no_grad():
        npos = int((anchor_outputs(ref, images, targets).labels > 0).sum())
    out, base = model(images, targets), ref(images, targets)
    ema = 0.9 * 100.0 + 0.1 * npos
    assert math.isclose(float(model.head.normalizer.ema), ema, rel_tol=1e-6)
    assert math.isclose(float(model.head.box_normalizer.ema), ema, rel_tol=1e-6)
    for key in out:
        torch.testing.assert_close(out[key], base[key] * npos / ema, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cls_loss": SoftmaxFocalLoss()}, "sigmoid"),
        ({"cls_loss": nn.CrossEntropyLoss(reduction="none")}, "sigmoid"),
        ({"cls_loss": "focal"}, "cls_loss"),
        ({"cls_loss": L1Loss()}, "sigmoid"),
        ({"cls_loss": SigmoidFocalLoss(reduction="sum")}, "reduction"),
        ({"cls_loss": nn.BCEWithLogitsLoss(reduction="none")}, "DetectionLoss"),
        ({"box_loss": SigmoidFocalLoss()}, "box_loss"),
        ({"box_loss": GHMCLoss()}, "box_loss"),
        ({"box_loss": "giou"}, "box_loss"),
        ({"normalizer": "per_anchor"}, "normalizer"),
        ({"prior_prob": 1.0}, "prior_prob"),
        ({"box_loss_weight": -1.0}, "box_loss_weight"),
    ],
)
def test_bad_configuration_raises(base_model, kwargs, match):
    config = dict(cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_batch")
    config.update(kwargs)
    with pytest.raises(ValueError, match=match):
        balance_retinanet(copy.deepcopy(base_model), **config)


def test_non_retinanet_raises():
    with pytest.raises(ValueError, match="RetinaNet"):
        balance_retinanet(nn.Linear(2, 2), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_batch")


@pytest.mark.parametrize(
    ("image", "box", "label", "match"),
    [
        (1, [10.0, 10.0, 70.0, 20.0], 1, r"targets\[1\]\['boxes'\]\[0\].*64x64"),
        (2, [10.0, 10.0, 10.0, 20.0], 1, r"targets\[2\]\['boxes'\]\[1\]"),
        (0, [-1.0, 10.0, 10.0, 20.0], 1, r"targets\[0\]\['boxes'\]\[2\]"),
        (0, [1.0, 10.0, 10.0, 20.0], 4, r"targets\[0\]\['labels'\]\[2\] = 4.*1\.\.3"),
        (2, [1.0, 10.0, 10.0, 20.0], 0, r"targets\[2\]\['labels'\]\[1\] = 0"),
    ],
)
def test_bad_targets_name_image_and_box(base_model, image, box, label, match):
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(),
                              normalizer="per_batch")
    images, targets = make_batch()
    targets[image] = {
        "boxes": torch.cat([targets[image]["boxes"], torch.tensor([box])]),
        "labels": torch.cat([targets[image]["labels"], torch.tensor([label])]),
    }
    with pytest.raises(ValueError, match=match):
        model(images, targets)
    with pytest.raises(ValueError, match=match):
        check_detection_targets(images, targets, num_classes=K + 1)


def test_adapting_twice_keeps_one_target_check(base_model):
    model = copy.deepcopy(base_model)
    for _ in range(2):
        model = balance_retinanet(model, cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_batch")
    assert len(model._forward_pre_hooks) == 1
    model.eval()
    with torch.no_grad():
        detections = model(make_batch()[0])
    assert len(detections) == 3 and all(d["boxes"].shape[-1] == 4 for d in detections)
