"""PISA in Faster R-CNN's RoI head: the loss equals mmdetection's ``PISARoIHead`` path (``isr_p`` + ``bbox_head.loss``
+ ``carl_loss``, literal transcriptions) in value and gradient; ISR-N's weights reach the loss; a training step
with the whole recipe (Score-HLR sampler + ISR-P + CARL) is finite."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detbalance.detectors.faster_rcnn import balance_faster_rcnn
from detbalance.losses.pisa import PrimeSampleAttention
from detbalance.sampling.roi_sampler import FixedRatioSampler, ScoreHLRSampler, WeightedSample
from tests.detectors.test_faster_rcnn import BIG, NUM_CLASSES, batch, tiny_faster_rcnn
from tests.reference import mmdet_pisa

K = NUM_CLASSES - 1


def _features_and_proposals(model, images, targets):
    images_t, targets_t = model.transform(images, targets)
    features = model.backbone(images_t.tensors)
    features = features if isinstance(features, dict) else {"0": features}
    proposals, _ = model.rpn(images_t, features, targets_t)
    return images_t, targets_t, features, [p.detach() for p in proposals]


def _reference_losses(head, features, proposals, image_sizes, targets_t):
    """mmdetection's PISARoIHead loss on every RoI (the sampler takes all), from the transcriptions."""
    rois, regression_targets = head.prepare_training_rois(proposals, image_sizes, targets_t)
    keep = rois.labels >= 0
    boxes, labels, reg = rois.boxes[keep], rois.labels[keep], regression_targets[keep]
    img = rois.batch_idx[keep]
    counts = torch.bincount(img, minlength=rois.num_images).tolist()
    pooled = head.box_roi_pool(features, list(boxes.split(counts)), image_sizes)
    logits, deltas = head.box_predictor(head.box_head(pooled))
    n = labels.shape[0]
    mm_labels = torch.where(labels > 0, labels - 1, torch.full_like(labels, K))
    mm_score = torch.cat([logits[:, 1:], logits[:, :1]], 1)  # background last
    mm_deltas = deltas.reshape(n, -1, 4)[:, 1:].reshape(n, -1)  # class-specific, no background
    pos_gt = []
    for i, t in enumerate(targets_t):
        m = (img == i) & (labels > 0)
        pos_gt.append(box_iou(boxes[m], t["boxes"]).argmax(1) if m.any() else torch.zeros(0, dtype=torch.int64))
    decode = lambda r, d: head.box_coder.decode_single(d, r)  # noqa: E731
    ce = lambda x, y, reduction_override="none": F.cross_entropy(x, y, reduction=reduction_override)  # noqa: E731
    _, lw, _, _ = mmdet_pisa.isr_p(mm_score, mm_deltas, (mm_labels, torch.ones(n), reg, torch.zeros(n, 4)), boxes,
                                   pos_gt, ce, decode, k=2, bias=0, num_class=K)
    loss_cls = (lw * F.cross_entropy(mm_score, mm_labels, reduction="none")).sum() / n
    sl1 = lambda p, t, reduction_override="none": F.smooth_l1_loss(p, t, beta=1 / 9, reduction="none")  # noqa: E731
    carl = mmdet_pisa.carl_loss(mm_score, mm_labels, mm_deltas, reg, sl1, k=1, bias=0.2, num_class=K)["loss_carl"]
    return loss_cls, carl.sum()


def test_isr_p_and_carl_equal_mmdet_in_value_and_gradient() -> None:
    images, targets = batch()
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=FixedRatioSampler(num_samples=BIG, positive_fraction=1.0),
                                pisa=PrimeSampleAttention())
    head = model.roi_heads
    images_t, targets_t, features, proposals = _features_and_proposals(model, images, targets)
    _, ours = head(features, proposals, images_t.image_sizes, targets_t)
    ref_cls, ref_carl = _reference_losses(head, features, proposals, images_t.image_sizes, targets_t)
    torch.testing.assert_close(ours["loss_classifier"], ref_cls)
    torch.testing.assert_close(ours["loss_carl"], ref_carl)
    params = list(head.box_predictor.parameters())
    g_ours = torch.autograd.grad(ours["loss_classifier"] + ours["loss_carl"], params, retain_graph=True)
    g_ref = torch.autograd.grad(ref_cls + ref_carl, params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_negative_weights_of_a_weighted_sample_reach_the_loss() -> None:
    images, targets = batch()
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=FixedRatioSampler(num_samples=BIG, positive_fraction=1.0))
    head = model.roi_heads
    images_t, targets_t, features, proposals = _features_and_proposals(model, images, targets)
    _, plain = head(features, proposals, images_t.image_sizes, targets_t)
    captured = {}

    def weighted(rois, *, losses=None, generator=None):
        idx = FixedRatioSampler(num_samples=BIG, positive_fraction=1.0)(rois, generator=generator)
        w = torch.linspace(0.5, 1.5, idx.negative.numel())
        captured["labels"], captured["idx"], captured["w"] = rois.labels, idx, w
        return WeightedSample(idx, w)

    head.sampler = weighted
    _, out = head(features, proposals, images_t.image_sizes, targets_t)
    torch.testing.assert_close(out["loss_box_reg"], plain["loss_box_reg"])
    assert not torch.allclose(out["loss_classifier"], plain["loss_classifier"])
    # recompute: CE of each sampled RoI, negatives weighted
    rois, reg = head.prepare_training_rois(proposals, images_t.image_sizes, targets_t)
    sel = captured["idx"].all()
    counts = torch.bincount(rois.batch_idx[sel], minlength=rois.num_images).tolist()
    logits, _ = head.box_predictor(head.box_head(head.box_roi_pool(features, list(rois.boxes[sel].split(counts)),
                                                                   images_t.image_sizes)))
    ce = F.cross_entropy(logits, rois.labels[sel], reduction="none")
    w = torch.ones_like(ce)
    w[torch.searchsorted(sel, captured["idx"].negative)] = captured["w"]
    torch.testing.assert_close(out["loss_classifier"], (w * ce).sum() / sel.numel())


def test_pisa_recipe_trains_three_steps() -> None:
    images, targets = batch()
    model = balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=ScoreHLRSampler(num_samples=32),
                                pisa=PrimeSampleAttention())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        losses = model(images, targets)
        assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_carl"}
        total = sum(losses.values())
        assert bool(torch.isfinite(total))
        opt.zero_grad()
        total.backward()
        grads = [p.grad for p in model.roi_heads.box_predictor.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        opt.step()
