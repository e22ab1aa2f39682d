"""RetinaNet with ATSS assignment and with PISA (ISR-P + CARL): equal to the assignment / mmdetection's
``PISARetinaHead`` path (literal transcriptions) in value and gradient; empty images; bad combinations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, sigmoid_focal_loss

from detbalance.detectors import anchor_outputs, balance_retinanet, build_detector
from detbalance.losses import GHMCLoss, L1Loss, SigmoidFocalLoss
from detbalance.losses.pisa import PrimeSampleAttention
from detbalance.sampling.atss import ATSSAssigner, assign_atss
from tests.detectors.inputs import SIZE, make_batch
from tests.reference import mmdet_pisa

K = 3


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_detector("retinanet", num_classes=K, image_size=SIZE)


def _levels(model) -> list[int]:
    return list(model.head.anchors_per_level)


def test_atss_head_equals_precomputed_assignment(base_model):
    images, targets = make_batch()
    atss = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), assigner=ATSSAssigner())
    out = atss(images, targets)
    # the same head without an assigner, fed ATSS's matches through torchvision's matcher slot
    plain = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss())
    image_list, targets_t = plain.transform(images, [dict(t) for t in targets])
    feats = list(plain.backbone(image_list.tensors).values())
    head_out = plain.head(feats)
    anchors = plain.anchor_generator(image_list, feats)
    matched = [assign_atss(a, t["boxes"], _levels(plain), topk=9).matched_idxs for a, t in zip(anchors, targets_t)]
    ref = plain.head.compute_loss(targets_t, head_out, anchors, matched)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])
    # it differs from the IoU matching, and the empty image has only negatives
    labels = anchor_outputs(atss, images, targets).labels
    assert not torch.equal(labels, anchor_outputs(plain, images, targets).labels)
    assert bool((labels[1] == 0).all())
    assert int((labels > 0).sum()) > 0


def test_atss_gradients_finite_and_empty_batch(base_model):
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), assigner=ATSSAssigner())
    images, _ = make_batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    out = model(images, empty)
    assert float(out["bbox_regression"].detach()) == 0.0 and bool(torch.isfinite(out["classification"]))
    sum(out.values()).backward()


def torchvision_focal(x, t):
    return sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="none")


def _focal(x, y, reduction_override="none"):
    """mmdetection's sigmoid FocalLoss with ``reduction_override='none'``: ``[N, K]``."""
    return torchvision_focal(x, F.one_hot(y, K).to(x.dtype))


def test_pisa_equals_mmdet_pisa_retina_head(base_model):
    images, targets = make_batch()
    model = balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(),
                              normalizer="per_batch", pisa=PrimeSampleAttention())
    out = model(images, targets)
    # the reference, from the same forward's per-anchor outputs
    ao = anchor_outputs(model, images, targets)
    b, a, c = ao.cls_logits.shape
    labels = ao.labels.reshape(-1)
    keep = labels >= 0
    logits = ao.cls_logits.reshape(b * a, c)[:, 1:]
    deltas = ao.bbox_regression.reshape(b * a, 4)
    anchors = ao.anchors.reshape(b * a, 4)
    reg = ao.target_regression.reshape(b * a, 4)
    mm_labels = torch.where(labels > 0, labels - 1, torch.full_like(labels, K))
    image_list, targets_t = model.transform(images, [dict(t) for t in targets])
    pos_gt = []
    for i, t in enumerate(targets_t):
        m = ao.labels[i] > 0
        pos_gt.append(box_iou(ao.anchors[i][m], t["boxes"]).argmax(1) if m.any() else torch.zeros(0, dtype=torch.int64))
    coder = model.head.regression_head.box_coder
    decode = lambda r, d: coder.decode_single(d, r)  # noqa: E731
    lw0 = keep.to(torch.float32)
    with torch.no_grad():
        _, lw, _, _ = mmdet_pisa.isr_p(logits, deltas, (mm_labels, lw0.clone(), reg, torch.zeros(b * a, 4)), anchors,
                                       pos_gt, _focal, decode, k=2, bias=0, num_class=K)
    num_pos = int((labels > 0).sum())
    # one focal loss over all anchors (background rows: all-zero targets), avg_factor = num_total_pos
    t = F.one_hot(mm_labels, K + 1)[:, :K].to(logits.dtype)
    cls_ref = (lw[:, None] * torchvision_focal(logits, t)).sum() / num_pos
    l1 = lambda p, q, reduction_override="none": (p - q).abs()  # noqa: E731
    carl_ref = mmdet_pisa.carl_loss(logits, mm_labels, deltas, reg, l1, k=1, bias=0.2, avg_factor=num_pos,
                                    sigmoid=True, num_class=K)["loss_carl"].sum()
    torch.testing.assert_close(out["classification"], cls_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["carl"], carl_ref, rtol=1e-5, atol=1e-6)
    params = [model.head.classification_head.cls_logits.weight, model.head.regression_head.bbox_reg.weight]
    g_ours = torch.autograd.grad(out["classification"] + out["carl"], params, retain_graph=True)
    g_ref = torch.autograd.grad(cls_ref + carl_ref, params)
    for x, y in zip(g_ours, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_pisa_refuses_self_normalising_losses(base_model):
    with pytest.raises(ValueError, match="pisa needs per-element"):
        balance_retinanet(copy.deepcopy(base_model), cls_loss=GHMCLoss(), pisa=PrimeSampleAttention())
    with pytest.raises(ValueError, match="assigner must be"):
        balance_retinanet(copy.deepcopy(base_model), cls_loss=SigmoidFocalLoss(), assigner=3)
