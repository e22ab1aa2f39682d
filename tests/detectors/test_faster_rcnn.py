"""Tests of the Faster R-CNN adapter (detbalance.detectors.faster_rcnn).

The models are tiny torchvision ``FasterRCNN``s (one stride-8 feature map, 16 channels) on 64 px images,
so every test runs a full forward (and mostly a backward) in well under a second on one CPU thread.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import MultiScaleRoIAlign, box_iou

from detbalance.detectors import faster_rcnn as frcnn
from detbalance.detectors.faster_rcnn import (
    BalancedRoIHeads,
    BalancedRPN,
    BalancedTransform,
    balance_faster_rcnn,
    roi_losses,
)
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.losses.focal import SoftmaxFocalLoss
from detbalance.sampling import BootstrappedSampler, RoIBatch
from detbalance.sampling import roi_sampler as rs
from detbalance.sampling.roi_sampler import FixedRatioSampler as FixedRatioRoISampler
from detbalance.sampling.roi_sampler import OHEMSampler as OHEMRoISampler
from detbalance.sampling.roi_sampler import StratifiedOHEMSampler as StratifiedOHEMRoISampler
from detbalance.types import SampledIndices

NUM_CLASSES = 4  # C = K + 1 columns: background + 3 object classes
BIG = 10**6  # a budget above every candidate count: the samplers take everything, no randomness


def tiny_faster_rcnn(*, seed: int = 0) -> FasterRCNN:
    """A torchvision FasterRCNN small enough for CPU tests (unmodified torchvision classes)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
    )
    backbone.out_channels = 16
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(sizes=((8, 16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=40,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=40,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=4, sampling_ratio=2),
        box_head=TwoMLPHead(16 * 4 * 4, 32),
        box_predictor=FastRCNNPredictor(32, NUM_CLASSES),
    )
    return model.train()


def batch() -> tuple[list[torch.Tensor], list[dict]]:
    """Three images: two objects; no object; one object in a 32 px image (resized x2 to 64 px)."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g),
              torch.rand(3, 32, 32, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 28.0, 30.0], [30.0, 10.0, 60.0, 40.0]]),
         "labels": torch.tensor([1, 2]), "image_id": 10},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 11},
        {"boxes": torch.tensor([[2.0, 2.0, 14.0, 16.0]]), "labels": torch.tensor([3]), "image_id": 12},
    ]
    return images, targets


class Calls:
    """Records (grad enabled, input rows) of each box-head call and the boxes given to RoI pooling."""

    def __init__(self, model: FasterRCNN) -> None:
        self.head: list[tuple[bool, int]] = []
        self.pool_boxes: list[list[torch.Tensor]] = []
        self.pool_out: list[torch.Tensor] = []
        model.roi_heads.box_head.register_forward_hook(
            lambda m, args, out: self.head.append((torch.is_grad_enabled(), args[0].shape[0]))
        )
        model.roi_heads.box_roi_pool.register_forward_hook(self._pool)

    def _pool(self, module, args, out):
        self.pool_boxes.append([b.detach().clone() for b in args[1]])
        self.pool_out.append(out)


def spy(monkeypatch, name: str) -> list[tuple[tuple, dict, object]]:
    """Wrap ``faster_rcnn.<name>`` (or ``roi_sampler.<name>``) and record (args, kwargs, result) of each call."""
    calls: list[tuple[tuple, dict, object]] = []
    module = frcnn if hasattr(frcnn, name) else rs
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, wrapper)
    return calls


# ----------------------------------------------------------------------------------------- equivalence
def test_torchvision_sampler_with_budget_above_counts_takes_all() -> None:
    labels = torch.tensor([1, 0, -1, 2, 0, 0, 3, -1])
    pos, neg = BalancedPositiveNegativeSampler(BIG, 0.5)([labels])
    assert torch.equal(pos[0].bool(), labels >= 1)
    assert torch.equal(neg[0].bool(), labels == 0)


def test_roi_losses_sum_to_torchvision_fastrcnn_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, NUM_CLASSES, generator=g)
    deltas = torch.randn(9, 4 * NUM_CLASSES, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 3, 0, 1, 0, 0])
    targets = torch.randn(9, 4, generator=g)
    cls, loc = roi_losses(logits, deltas, labels, targets)
    ref_cls, ref_loc = fastrcnn_loss(logits, deltas, [labels], [targets])
    torch.testing.assert_close(cls.mean(), ref_cls)
    torch.testing.assert_close(loc.sum() / 9, ref_loc)
    # per-RoI oracle: CE of each row; smooth L1 (beta 1/9) of the matched class, 0 for background
    torch.testing.assert_close(cls, -F.log_softmax(logits, 1)[torch.arange(9), labels])
    d = deltas.reshape(9, NUM_CLASSES, 4)[torch.arange(9), labels] - targets
    sl1 = torch.where(d.abs() < 1 / 9, 0.5 * d**2 * 9, d.abs() - 0.5 / 9).sum(1)
    torch.testing.assert_close(loc, torch.where(labels > 0, sl1, torch.zeros(9)))
    # ignored rows contribute nothing
    cls_i, loc_i = roi_losses(logits, deltas, torch.where(labels == 1, -1, labels), targets)
    assert torch.all(cls_i[labels == 1] == 0) and torch.all(loc_i[labels == 1] == 0)


def test_fixed_ratio_equals_vanilla_torchvision_losses_and_gradients() -> None:
    vanilla = tiny_faster_rcnn()
    vanilla.roi_heads.fg_bg_sampler = BalancedPositiveNegativeSampler(BIG, 0.5)
    vanilla.rpn.fg_bg_sampler = BalancedPositiveNegativeSampler(BIG, 0.5)
    adapted = balance_faster_rcnn(
        copy.deepcopy(vanilla),
        roi_sampler=FixedRatioRoISampler(num_samples=BIG, positive_fraction=0.5),
        rpn_sampler=FixedRatioRoISampler(num_samples=BIG, positive_fraction=0.5),
    )
    assert isinstance(adapted.roi_heads, BalancedRoIHeads) and isinstance(adapted.rpn, BalancedRPN)
    images, targets = batch()
    ref = vanilla(images, targets)
    out = adapted(images, targets)
    assert set(out) == set(ref) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-7)
    assert float(ref["loss_box_reg"].detach()) > 0 and float(ref["loss_rpn_box_reg"].detach()) > 0
    sum(ref.values()).backward()
    sum(out.values()).backward()
    for (name, p), q in zip(vanilla.named_parameters(), adapted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_adapter_shares_modules_and_inference_is_unchanged() -> None:
    vanilla = tiny_faster_rcnn()
    adapted = balance_faster_rcnn(copy.deepcopy(vanilla), roi_sampler=OHEMRoISampler())
    shared = copy.deepcopy(vanilla)
    heads = shared.roi_heads
    balance_faster_rcnn(shared, roi_sampler=FixedRatioRoISampler())
    assert shared.roi_heads.box_head is heads.box_head and shared.roi_heads.box_predictor is heads.box_predictor
    assert shared.roi_heads.box_roi_pool is heads.box_roi_pool
    images, _ = batch()
    vanilla.eval()
    adapted.eval()
    with torch.no_grad():
        ref, out = vanilla(images), adapted(images)
    for r, o in zip(ref, out):
        assert r.keys() == o.keys()
        for key in r:
            torch.testing.assert_close(o[key], r[key])


# --------------------------------------------------------------------------------------------- samplers
def test_fixed_ratio_spy_called_and_budget_obeyed(monkeypatch) -> None:
    calls = spy(monkeypatch, "sample_fixed_ratio_batched")
    rec = BalanceRecorder()
    model = balance_faster_rcnn(
        tiny_faster_rcnn(), roi_sampler=FixedRatioRoISampler(num_samples=8, positive_fraction=0.25),
        rpn_sampler=FixedRatioRoISampler(num_samples=16, positive_fraction=0.5), recorder=rec,
    )
    seen = Calls(model)
    images, targets = batch()
    model(images, targets)
    (rpn_args, rpn_kw, rpn_out), (roi_args, roi_kw, roi_out) = calls
    assert rpn_args[1:] == (16, 0.5) and roi_args[1:] == (8, 0.25)
    assert isinstance(rpn_kw["generator"], torch.Generator) and isinstance(roi_kw["generator"], torch.Generator)
    expected_pos, expected_total = 0, 0
    for labels, s in zip(roi_args[0], roi_out):
        num_pos = min(int((labels > 0).sum()), 2)  # int(8 * 0.25)
        num_neg = min(int((labels == 0).sum()), 8 - num_pos)
        assert (s.positive.numel(), s.negative.numel()) == (num_pos, num_neg)
        assert torch.all(labels[s.positive] > 0) and torch.all(labels[s.negative] == 0)
        expected_pos, expected_total = expected_pos + num_pos, expected_total + num_pos + num_neg
    assert seen.head == [(True, expected_total)]  # one head pass, with gradients, on the sample only
    rpn_pos = sum(s.positive.numel() for s in rpn_out)
    assert all(s.positive.numel() <= 8 and s.positive.numel() + s.negative.numel() == 16 for s in rpn_out)
    counts = rec.to_records()[0]["counts"]
    assert counts["faster_rcnn/roi"]["positives"] == expected_pos
    assert counts["faster_rcnn/roi"]["negatives"] == expected_total - expected_pos
    assert counts["faster_rcnn/rpn"] == {"positives": rpn_pos, "negatives": 48 - rpn_pos, "ignored": None}


def test_fixed_ratio_sampling_is_seeded_by_the_global_generator_at_adaptation() -> None:
    def sampled_boxes(adapt_seed: int) -> list[torch.Tensor]:
        model = tiny_faster_rcnn()
        torch.manual_seed(adapt_seed)
        model = balance_faster_rcnn(model, roi_sampler=FixedRatioRoISampler(num_samples=6))
        seen = Calls(model)
        images, targets = batch()
        model(images, targets)
        return seen.pool_boxes[0]

    a, b, c = sampled_boxes(0), sampled_boxes(0), sampled_boxes(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("sampler", [OHEMRoISampler(num_samples=8), StratifiedOHEMRoISampler(num_samples=8)])
def test_ohem_runs_read_only_pass_then_backprops_only_the_selection(monkeypatch, sampler) -> None:
    name = "select_hard_examples" if isinstance(sampler, OHEMRoISampler) else "select_hard_examples_stratified"
    calls = spy(monkeypatch, name)
    rec = BalanceRecorder()
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler, recorder=rec)
    seen = Calls(model)
    images, targets = batch()
    losses = model(images, targets)
    ((args, kwargs, selected),) = calls
    labels, boxes, batch_idx = args[-3:]
    num_rois = labels.numel()
    num_sel = selected.positive.numel() + selected.negative.numel()
    assert kwargs["num_samples"] == 8 and kwargs["nms_iou"] == 0.7
    # first pass: every RoI (proposals + GT), no autograd; second: exactly the selection, with autograd
    assert seen.head == [(False, num_rois), (True, num_sel)]
    assert num_rois == sum(b.shape[0] for b in seen.pool_boxes[0]) > num_sel > 0
    assert not seen.pool_out[0].requires_grad and seen.pool_out[1].requires_grad
    chosen = selected.all()
    torch.testing.assert_close(torch.cat(seen.pool_boxes[1]), boxes[chosen])
    assert torch.equal(torch.bincount(batch_idx[chosen], minlength=3),
                       torch.tensor([b.shape[0] for b in seen.pool_boxes[1]]))
    assert torch.all(torch.bincount(batch_idx[chosen], minlength=3) <= 8)
    # the losses back-propagated are those of the selection, recomputed with gradients (S-OHEM at
    # progress 0 weights them 1.5 cls + 0.5 loc, the same weights it ranked with)
    cls = args[0] if isinstance(sampler, OHEMRoISampler) else args[0] + args[1]  # per-RoI cls + loc
    weighted = args[0] if isinstance(sampler, OHEMRoISampler) else 1.5 * args[0] + 0.5 * args[1]
    total = losses["loss_classifier"] + losses["loss_box_reg"]
    torch.testing.assert_close(total, weighted[chosen].sum() / num_sel, rtol=1e-5, atol=1e-6)
    record = rec.to_records()[0]
    assert record["losses"]["ohem/all"]["count"] == num_rois
    assert record["losses"]["faster_rcnn/roi"]["count"] == num_sel
    torch.testing.assert_close(record["losses"]["faster_rcnn/roi"]["sum"], float(cls[chosen].sum()),
                               rtol=1e-5, atol=1e-5)
    class_sums = record["class_losses"]["faster_rcnn/roi_cls"]
    assert class_sums["count"] == torch.bincount(labels[chosen], minlength=NUM_CLASSES).tolist()
    assert record["counts"]["faster_rcnn/roi"]["positives"] == int((labels[chosen] > 0).sum())


def test_ohem_selection_is_the_hardest_rois() -> None:
    """Without NMS, OHEM keeps each image's top-B RoIs by cls + loc loss of the read-only pass."""
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=OHEMRoISampler(num_samples=5, nms_iou=None))
    images, targets = batch()
    seen = Calls(model)
    model(images, targets)
    heads = model.roi_heads
    # recompute the per-RoI losses of all RoIs exactly as the adapter's read-only pass saw them
    all_boxes, chosen = seen.pool_boxes[0], seen.pool_boxes[1]
    for i, (rois, picked) in enumerate(zip(all_boxes, chosen)):
        t = targets[i]
        gt = t["boxes"] * (2.0 if i == 2 else 1.0)
        matched, labels = heads.assign_targets_to_proposals([rois], [gt], [t["labels"]])
        ref_gt = (gt if gt.numel() else torch.zeros(1, 4))[matched[0]]
        reg = heads.box_coder.encode_single(ref_gt, rois)
        reg = torch.where((labels[0] > 0)[:, None], reg, torch.zeros_like(reg))
        with torch.no_grad():
            feats = model.backbone(model.transform([images[i]])[0].tensors)
            logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool({"0": feats}, [rois],
                                                                                   [(64, 64)])))
        cls, loc = roi_losses(logits, deltas, labels[0], reg)
        top = (cls + loc).topk(5).indices
        assert torch.equal(box_iou(rois[top], picked).max(1).values > 0.999, torch.ones(5, dtype=torch.bool))


def test_stratified_with_one_stratum_selects_what_ohem_selects() -> None:
    images, targets = batch()
    outs, rows, boxes = [], [], []
    for sampler in (OHEMRoISampler(num_samples=8),
                    StratifiedOHEMRoISampler(num_samples=8, strata=1, cls_weight=(1.0, 1.0),
                                             loc_weight=(1.0, 1.0))):
        model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler)
        seen = Calls(model)
        outs.append(model(images, targets))
        rows.append(seen.head)
        boxes.append(torch.cat(seen.pool_boxes[1]))
    assert rows[0] == rows[1]
    torch.testing.assert_close(boxes[1], boxes[0])
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key])


def test_set_training_progress_reaches_the_head(monkeypatch) -> None:
    from detbalance.detectors.build import set_training_progress

    calls = spy(monkeypatch, "select_hard_examples_stratified")
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=StratifiedOHEMRoISampler(num_samples=8))
    assert model.roi_heads.progress == 0.0
    set_training_progress(model, 0.7)
    assert model.roi_heads.progress == 0.7
    images, targets = batch()
    model(images, targets)
    assert calls[0][1]["progress"] == 0.7
    with pytest.raises(ValueError, match="progress"):
        model.roi_heads.set_progress(1.5)


def test_box_cls_loss_replaces_cross_entropy() -> None:
    images, targets = batch()
    sampler = FixedRatioRoISampler(num_samples=BIG, positive_fraction=0.5)
    ref = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler)(images, targets)

    def doubled_ce(logits, labels):
        return 2.0 * F.cross_entropy(logits, labels, reduction="none")

    out = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler, box_cls_loss=doubled_ce)(images, targets)
    torch.testing.assert_close(out["loss_classifier"], 2.0 * ref["loss_classifier"])
    torch.testing.assert_close(out["loss_box_reg"], ref["loss_box_reg"])

    # softmax focal loss with gamma 0 and no alpha is cross entropy
    focal = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler,
                                box_cls_loss=SoftmaxFocalLoss(alpha=None, gamma=0.0))(images, targets)
    torch.testing.assert_close(focal["loss_classifier"], ref["loss_classifier"])

    with pytest.raises(ValueError, match="per-RoI"):
        balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler,
                            box_cls_loss=lambda z, y: F.cross_entropy(z, y))(images, targets)


# -------------------------------------------------------------------------------------------- bootstrap
def with_mined(targets: list[dict]) -> list[dict]:
    """Image 10 (64 px): two mined boxes away from its objects; image 12 (32 px, resized x2): one box."""
    mined = [torch.tensor([[40.0, 44.0, 60.0, 62.0], [2.0, 40.0, 20.0, 60.0]]), torch.zeros(0, 4),
             torch.tensor([[18.0, 18.0, 30.0, 30.0]])]
    return [dict(t, mined_boxes=m) for t, m in zip(targets, mined)]


def test_bootstrapped_boxes_are_sampled_as_background(monkeypatch) -> None:
    calls = spy(monkeypatch, "roi_losses")
    model = balance_faster_rcnn(
        tiny_faster_rcnn(), roi_sampler=BootstrappedSampler(num_samples=4, positive_fraction=0.25), mined_iou=None,
    )
    seen = Calls(model)
    images, targets = batch()
    model(images, with_mined(targets))
    labels = calls[0][0][2]
    sampled = seen.pool_boxes[0]
    expected = {0: torch.tensor([[40.0, 44.0, 60.0, 62.0], [2.0, 40.0, 20.0, 60.0]]),
                2: torch.tensor([[36.0, 36.0, 60.0, 60.0]])}  # resized with the 32 -> 64 px image
    offsets = torch.tensor([0] + [b.shape[0] for b in sampled]).cumsum(0)
    for i, mined in expected.items():
        # budget 4, at most 1 positive: the mined boxes take the background places first
        hits = (box_iou(mined, sampled[i]) > 0.999).nonzero()
        assert hits.shape[0] == mined.shape[0]
        assert torch.all(labels[offsets[i] + hits[:, 1]] == 0)


def test_bootstrapped_boxes_are_ohem_candidates_and_flagged_mined(monkeypatch) -> None:
    calls = spy(monkeypatch, "select_hard_examples")
    rois_seen: list[RoIBatch] = []
    ohem = OHEMRoISampler(num_samples=8)

    def sampler(rois, *, losses=None, generator=None):
        rois_seen.append(rois)
        return ohem(rois, losses=losses, generator=generator)

    sampler.needs_losses = True  # type: ignore[attr-defined]
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler, mined_iou=0.5)
    images, targets = batch()
    model(images, targets)
    model(images, with_mined(targets))
    (a, _, _), (b, _, _) = calls
    assert b[1].numel() == a[1].numel() + 3  # three mined boxes joined the candidates
    mined_rows = (box_iou(torch.tensor([[36.0, 36.0, 60.0, 60.0]]), b[2]) > 0.999).nonzero()[:, 1]
    assert mined_rows.numel() == 1 and int(b[3][mined_rows]) == 2 and int(b[1][mined_rows]) == 0
    rois = rois_seen[1]
    assert not bool(rois_seen[0].mined.any())
    # flagged: the mined boxes and every proposal at IoU >= 0.5 with a mined box of its image
    mined_resized = {0: torch.tensor([[40.0, 44.0, 60.0, 62.0], [2.0, 40.0, 20.0, 60.0]]),
                     2: torch.tensor([[36.0, 36.0, 60.0, 60.0]])}
    for i in range(3):
        rows = rois.batch_idx == i
        iou = (box_iou(rois.boxes[rows], mined_resized[i]).max(1).values if i in mined_resized
               else torch.zeros(int(rows.sum())))
        assert torch.equal(rois.mined[rows], iou >= 0.5)
    # max IoU with the ground truth, per RoI
    gt = {0: targets[0]["boxes"], 2: targets[2]["boxes"] * 2.0}
    for i in (0, 2):
        rows = rois.batch_idx == i
        torch.testing.assert_close(rois.max_iou[rows], box_iou(rois.boxes[rows], gt[i]).max(1).values)
    assert torch.all(rois.max_iou[rois.batch_idx == 1] == 0)


def test_rejects_bad_mined_boxes() -> None:
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=BootstrappedSampler())
    images, targets = batch()
    targets = with_mined(targets)
    targets[0]["mined_boxes"] = torch.tensor([[1.0, 2.0, float("nan"), 4.0]])
    with pytest.raises(ValueError, match=r"targets\[0\]\['mined_boxes'\]"):
        model(images, targets)


# ------------------------------------------------------------------------------- S-OHEM's loss weights
@pytest.mark.parametrize("progress", [0.0, 0.25, 1.0])
def test_sohem_schedule_weights_the_gradient_of_each_rois_terms(progress: float) -> None:
    """d loss / d L_cls,i = w_cls(t) / N and d loss / d L_loc,i = w_loc(t) / N for every selected RoI."""
    sampler = StratifiedOHEMRoISampler(num_samples=8)
    w_cls, w_loc = sampler.loss_weights(progress)
    torch.testing.assert_close(torch.tensor([w_cls, w_loc]), torch.tensor([1.5 - progress, 0.5 + progress]))
    captured: dict[str, torch.Tensor] = {}
    real = frcnn.roi_losses

    def keep(*args, **kwargs):
        cls, loc = real(*args, **kwargs)
        if torch.is_grad_enabled():
            cls.retain_grad()
            loc.retain_grad()
            captured["cls"], captured["loc"] = cls, loc
        return cls, loc

    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler)
    model.roi_heads.set_progress(progress)
    images, targets = batch()
    try:
        frcnn.roi_losses = keep
        losses = model(images, targets)
    finally:
        frcnn.roi_losses = real
    (losses["loss_classifier"] + losses["loss_box_reg"]).backward()
    n = captured["cls"].numel()
    torch.testing.assert_close(captured["cls"].grad, torch.full((n,), w_cls / n))
    torch.testing.assert_close(captured["loc"].grad, torch.full((n,), w_loc / n))
    # OHEM has no schedule: both terms weighted 1
    assert rs.sampler_loss_weights(OHEMRoISampler(), progress) == (1.0, 1.0)


# ----------------------------------------------------------------------------------- class weights
def test_class_weights_scale_each_rois_cross_entropy() -> None:
    """loss = sum_i w[y_i] CE_i / N (background weight 1 or explicit), N the sampled RoIs."""
    images, targets = batch()
    sampler = FixedRatioRoISampler(num_samples=BIG, positive_fraction=0.5)
    weights = torch.tensor([2.0, 0.5, 3.0])
    for background in (1.0, 0.25):
        base = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler)
        seen = Calls(base)
        ref = base(images, targets)
        model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler, class_weight=weights,
                                    background_weight=background)
        heads = model.roi_heads
        labels = []
        real = frcnn.roi_losses

        def keep(*args, real=real, labels=labels, **kwargs):
            labels.append(args[2])
            return real(*args, **kwargs)

        try:
            frcnn.roi_losses = keep
            out = model(images, targets)
        finally:
            frcnn.roi_losses = real
        lab = labels[0]
        with torch.no_grad():
            feats = {"0": base.backbone(base.transform(images, targets)[0].tensors)}
            logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, seen.pool_boxes[0],
                                                                              [(64, 64)] * 3)))
        ce = F.cross_entropy(logits, lab, reduction="none")
        w = torch.where(lab > 0, weights[(lab - 1).clamp(min=0)], torch.full_like(ce, background))
        torch.testing.assert_close(out["loss_classifier"], (w * ce).sum() / lab.numel(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["loss_box_reg"], ref["loss_box_reg"])
    with pytest.raises(ValueError, match="class_weight"):
        balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler, class_weight=torch.ones(5))


# ---------------------------------------------------------------------------------- a new sampler
def test_a_plain_function_is_a_sampler_and_gets_no_read_only_pass() -> None:
    """Libra R-CNN-style IoU-balanced negatives as one function: the head calls it with the RoIBatch."""
    seen_losses = []

    def iou_balanced(rois, *, losses=None, generator=None):
        seen_losses.append(losses)
        hard = (rois.labels == 0) & (rois.max_iou >= 0.1)
        return SampledIndices(torch.nonzero(rois.labels > 0).flatten(), torch.nonzero(hard).flatten())

    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=iou_balanced)
    seen = Calls(model)
    images, targets = batch()
    out = model(images, targets)
    assert seen_losses == [None] and len(seen.head) == 1 and seen.head[0][0]
    assert bool(torch.isfinite(out["loss_classifier"]))


# ------------------------------------------------------------------------------------ one training step
REMEDIES = {
    "fixed": dict(roi_sampler=FixedRatioRoISampler(), rpn_sampler=FixedRatioRoISampler(256, 0.5)),
    "ohem": dict(roi_sampler=OHEMRoISampler(num_samples=16)),
    "sohem": dict(roi_sampler=StratifiedOHEMRoISampler(num_samples=16)),
    "focal": dict(roi_sampler=FixedRatioRoISampler(), box_cls_loss="focal"),
    "bootstrap": dict(roi_sampler=BootstrappedSampler(num_samples=16), hard_negatives="set"),
}


@pytest.mark.parametrize("remedy", sorted(REMEDIES))
def test_one_training_step_finite_with_gradient_everywhere(remedy: str) -> None:
    kwargs = dict(REMEDIES[remedy])
    if kwargs.get("box_cls_loss") == "focal":
        kwargs["box_cls_loss"] = SoftmaxFocalLoss(gamma=2.0)
    mined = kwargs.pop("hard_negatives", None) == "set"
    model = balance_faster_rcnn(tiny_faster_rcnn(), recorder=BalanceRecorder(), **kwargs)
    images, targets = batch()
    if mined:
        targets = with_mined(targets)
    losses = model(images, targets)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert float(losses["loss_classifier"].detach()) > 0
    sum(losses.values()).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    assert not missing
    assert sum(bool(p.grad.abs().sum() > 0) for _, p in params) == len(params)


# ----------------------------------------------------------------------------------------- bad input
@dataclass(frozen=True)
class SSDMiningConfig:  # stands for "a sampler config meant for another detector"
    negative_ratio: float = 3.0


@pytest.mark.parametrize("bad", ["ohem", SSDMiningConfig(), None, 128])
def test_rejects_wrong_roi_sampler(bad) -> None:
    with pytest.raises(ValueError, match="roi_sampler"):
        balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=bad)


def test_rejects_wrong_rpn_sampler_and_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="rpn_sampler"):
        balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=OHEMRoISampler(), rpn_sampler=OHEMRoISampler())
    with pytest.raises(ValueError, match="num_samples"):
        FixedRatioRoISampler(num_samples=0)
    with pytest.raises(ValueError, match="positive_fraction"):
        FixedRatioRoISampler(positive_fraction=1.5)
    with pytest.raises(ValueError, match="nms_iou"):
        OHEMRoISampler(nms_iou=1.2)
    with pytest.raises(ValueError, match="strata"):
        StratifiedOHEMRoISampler(strata=0)
    with pytest.raises(ValueError, match="model"):
        balance_faster_rcnn(nn.Linear(2, 2), roi_sampler=OHEMRoISampler())


@pytest.mark.parametrize(
    ("box", "label", "match"),
    [
        ([10.0, 5.0, 10.0, 20.0], 1, r"targets\[1\]\['boxes'\]\[0\] = .* \(image_id=11\): expected x2 > x1$"),
        ([10.0, 25.0, 20.0, 20.0], 1, r"targets\[1\]\['boxes'\]\[0\] = .* \(image_id=11\): expected y2 > y1$"),
        ([10.0, 5.0, 70.0, 20.0], 1, r"targets\[1\]\['boxes'\]\[0\] = .* \(image_id=11\): outside the 64x64 image"),
        ([-1.0, 5.0, 10.0, 20.0], 1, r"targets\[1\]\['boxes'\]\[0\] = .* \(image_id=11\): outside the 64x64 image"),
        ([10.0, 5.0, 20.0, 20.0], NUM_CLASSES, r"targets\[1\]\['labels'\]\[0\] = 4 \(image_id=11\): .* 1\.\.3"),
        ([10.0, 5.0, 20.0, 20.0], 0, r"targets\[1\]\['labels'\]\[0\] = 0 \(image_id=11\): .* 1\.\.3"),
    ],
)
def test_rejects_bad_targets(box, label, match) -> None:
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=FixedRatioRoISampler())
    assert isinstance(model.transform, BalancedTransform)
    images, targets = batch()
    targets[1] = {"boxes": torch.tensor([box]), "labels": torch.tensor([label]), "image_id": 11}
    with pytest.raises(ValueError, match=match):
        model(images, targets)


def test_rpn_sampler_gets_the_same_contract_with_anchors_and_their_iou() -> None:
    seen: list[RoIBatch] = []
    fixed = FixedRatioRoISampler(16, 0.5)

    def rpn_sampler(rois, *, losses=None, generator=None):
        seen.append(rois)
        return fixed(rois, losses=losses, generator=generator)

    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=FixedRatioRoISampler(8), rpn_sampler=rpn_sampler)
    images, targets = batch()
    model(images, targets)
    (rois,) = seen
    anchors = model.rpn.anchor_generator(model.transform(images)[0], [torch.zeros(1, 16, 8, 8)])
    assert rois.num_images == 3 and torch.equal(rois.boxes, torch.cat(anchors))
    per_image = rois.boxes.shape[0] // 3
    gt = targets[0]["boxes"]
    torch.testing.assert_close(rois.max_iou[:per_image], box_iou(rois.boxes[:per_image], gt).max(1).values)
    assert torch.all(rois.max_iou[per_image : 2 * per_image] == 0) and not bool(rois.mined.any())
    # torchvision's anchor labels: 1 at IoU >= 0.7 (or best match), 0 below 0.3
    assert bool((rois.labels[rois.max_iou >= 0.7] == 1).all()) and bool((rois.labels[rois.max_iou < 0.3] <= 0).all())
    with pytest.raises(ValueError, match="rpn_sampler"):
        balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=OHEMRoISampler(), rpn_sampler=OHEMRoISampler())


@pytest.mark.parametrize("size", [128, 512])
def test_build_detector_sizes_faster_rcnn_for_small_images_and_keeps_torchvision_from_512(size: int) -> None:
    from detbalance.detectors.build import build_detector

    model = build_detector("faster_rcnn", num_classes=5, image_size=size)
    pre, post = model.rpn._pre_nms_top_n, model.rpn._post_nms_top_n
    out = model.roi_heads.box_roi_pool.output_size
    width = model.roi_heads.box_head.fc7.out_features
    if size >= 512:  # torchvision's fasterrcnn_resnet50_fpn defaults
        assert (pre, post) == ({"training": 2000, "testing": 1000}, {"training": 2000, "testing": 1000})
        assert (out, width) == ((7, 7), 1024)
    else:
        assert (pre, post) == ({"training": 600, "testing": 300}, {"training": 128, "testing": 100})
        assert (out, width) == ((5, 5), 128)
    assert model.roi_heads.box_head.fc6.in_features == model.backbone.out_channels * out[0] * out[1]
