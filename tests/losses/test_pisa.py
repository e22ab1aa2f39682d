"""PISA's ISR-P and CARL: equal to mmdetection's ``isr_p`` / ``carl_loss`` (literal transcriptions) in value and
gradient, gradcheck in float64, invariants and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder

from detbalance.losses.pisa import aligned_box_iou, carl_loss, iou_hlr_rank, isr_p_weights
from tests.reference import mmdet_pisa

CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def _decode(rois: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    return CODER.decode_single(deltas, rois)


def _batch(seed: int, images: int = 2, per_image: int = 40, k: int = 3, dtype=torch.float32):
    """RoIs of ``images`` images (image-major), mmdetection's layout: labels 0..K-1, background K (last column)."""
    gen = torch.Generator().manual_seed(seed)
    n = images * per_image
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * 60
    rois = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=gen, dtype=dtype) * 30], 1)
    img = torch.arange(images).repeat_interleave(per_image)
    num_gt = [2 + (i % 3) for i in range(images)]
    gt_local = torch.cat([torch.randint(0, g, (per_image,), generator=gen) for g in num_gt])
    gt_label = [torch.randint(0, k, (g,), generator=gen) for g in num_gt]
    is_pos = torch.rand(n, generator=gen) < 0.6
    labels = torch.full((n,), k, dtype=torch.int64)
    for i in range(images):
        sl = slice(i * per_image, (i + 1) * per_image)
        labels[sl] = torch.where(is_pos[sl], gt_label[i][gt_local[sl]], torch.full_like(labels[sl], k))
    targets = torch.randn(n, 4, generator=gen, dtype=dtype) * 0.5
    cls_score = torch.randn(n, k + 1, generator=gen, dtype=dtype)
    bbox_pred = torch.randn(n, 4 * k, generator=gen, dtype=dtype) * 0.5
    offsets = torch.tensor([0] + num_gt[:-1]).cumsum(0)
    pos_gt = [gt_local[img == i][labels[img == i] < k] for i in range(images)]
    flat_gt = gt_local + offsets[img]
    return rois, labels, targets, cls_score, bbox_pred, pos_gt, flat_gt


def _ce(cls_score, labels, reduction_override="none"):
    return F.cross_entropy(cls_score, labels, reduction=reduction_override)


def _ours_isr(rois, labels, targets, cls_score, bbox_pred, flat_gt, k_cls, **hp):
    pos = labels < k_cls
    deltas = bbox_pred.reshape(len(labels), -1, 4)[pos, labels[pos]]
    ious = aligned_box_iou(_decode(rois[pos], deltas), _decode(rois[pos], targets[pos]))
    loss = _ce(cls_score[pos], labels[pos])
    return isr_p_weights(ious, labels[pos], flat_gt[pos], loss, **hp)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("k", "bias"), [(2.0, 0.0), (1.0, 0.3)])
def test_isr_p_matches_mmdet_two_images(seed: int, k: float, bias: float) -> None:
    rois, labels, targets, cls_score, bbox_pred, pos_gt, flat_gt = _batch(seed)
    weights = torch.ones(len(labels))
    _, ref_w, _, _ = mmdet_pisa.isr_p(cls_score, bbox_pred, (labels, weights, targets, torch.zeros(len(labels), 4)),
                                      rois, pos_gt, _ce, _decode, k=k, bias=bias, num_class=3)
    ours = _ours_isr(rois, labels, targets, cls_score, bbox_pred, flat_gt, 3, k=k, bias=bias)
    torch.testing.assert_close(ours, ref_w[labels < 3])


def test_isr_p_three_images_groups_by_object() -> None:
    """mmdetection's offset (previous image's max + 1) can merge objects of different images from the third
    image on; ours equals mmdetection given indices already unique over the batch."""
    rois, labels, targets, cls_score, bbox_pred, pos_gt, flat_gt = _batch(7, images=3)
    weights = torch.ones(len(labels))
    unique = [flat_gt[labels < 3]]  # one "image" holding batch-unique indices
    _, ref_w, _, _ = mmdet_pisa.isr_p(cls_score, bbox_pred, (labels, weights, targets, torch.zeros(len(labels), 4)),
                                      rois, unique, _ce, _decode, num_class=3)
    ours = _ours_isr(rois, labels, targets, cls_score, bbox_pred, flat_gt, 3)
    torch.testing.assert_close(ours, ref_w[labels < 3])


def test_isr_p_sigmoid_matches_mmdet() -> None:
    """RetinaNet's use: class-agnostic deltas, anchors [N, 4], a per-element sigmoid loss [P, K]."""
    rois, labels, targets, cls_score, bbox_pred, pos_gt, flat_gt = _batch(11)
    logits = cls_score[:, :3]
    deltas = bbox_pred[:, :4]

    def focal(x, y, reduction_override="none"):
        t = F.one_hot(y, 3).to(x.dtype)
        p = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        pt = (1 - p) * t + p * (1 - t)
        return ce * (0.25 * t + 0.75 * (1 - t)) * pt.pow(2)

    _, ref_w, _, _ = mmdet_pisa.isr_p(logits, deltas, (labels, torch.ones(len(labels)), targets, torch.zeros(len(labels), 4)),
                                      rois, pos_gt, focal, _decode, num_class=3)
    pos = labels < 3
    ious = aligned_box_iou(_decode(rois[pos], deltas[pos]), _decode(rois[pos], targets[pos]))
    ours = isr_p_weights(ious, labels[pos], flat_gt[pos], focal(logits[pos], labels[pos]).sum(-1))
    torch.testing.assert_close(ours, ref_w[pos])


def test_iou_hlr_rank_hand_case() -> None:
    # class 1: object A has IoUs 0.9, 0.5; object B has 0.8. Local ranks: A 0,1; B 0.
    # class-level order: (rank 0, 0.9) A0, (rank 0, 0.8) B0, (rank 1, 0.5) A1 -> HLR 0, 2, 1.
    ious = torch.tensor([0.9, 0.5, 0.8, 0.3])
    labels = torch.tensor([1, 1, 1, 2])
    gt = torch.tensor([0, 0, 1, 2])
    rank, n_max = iou_hlr_rank(ious, labels, gt)
    assert rank.tolist() == [0, 2, 1, 0]
    assert int(n_max) == 3
    w = isr_p_weights(ious, labels, gt, torch.ones(4), k=1.0)
    raw = torch.tensor([3 / 3, 1 / 3, 2 / 3, 3 / 3])
    torch.testing.assert_close(w, raw * 4 / raw.sum())


def test_isr_p_invariants_and_detached() -> None:
    rois, labels, targets, cls_score, bbox_pred, pos_gt, flat_gt = _batch(2)
    cls_score.requires_grad_(True)
    pos = labels < 3
    loss = _ce(cls_score[pos], labels[pos])
    ious = torch.rand(int(pos.sum()), generator=torch.Generator().manual_seed(0))
    w = isr_p_weights(ious, labels[pos], flat_gt[pos], loss)
    assert not w.requires_grad
    torch.testing.assert_close((w * loss.detach()).sum(), loss.detach().sum())  # loss-preserving normalisation
    rank, _ = iou_hlr_rank(ious, labels[pos], flat_gt[pos])
    order = rank.argsort()
    for lab in labels[pos].unique():  # within a class the weight falls with the rank
        sel = order[labels[pos][order] == lab]
        assert bool((w[sel][1:] <= w[sel][:-1] + 1e-7).all())


def test_isr_p_empty_and_bad_args() -> None:
    empty = torch.zeros(0)
    assert isr_p_weights(empty, empty.long(), empty.long(), empty).shape == (0,)
    with pytest.raises(ValueError, match="bias"):
        isr_p_weights(torch.ones(2), torch.ones(2).long(), torch.zeros(2).long(), torch.ones(2), bias=1.5)
    with pytest.raises(ValueError, match="positive_loss"):
        isr_p_weights(torch.ones(2), torch.ones(2).long(), torch.zeros(2).long(), torch.ones(3))
    with pytest.raises(ValueError, match="k must"):
        carl_loss(torch.ones(2), torch.ones(2), k=-1.0)


def _smooth_l1(pred, target, reduction_override="none", beta=1.0):
    return F.smooth_l1_loss(pred, target, beta=beta, reduction=reduction_override)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_carl_matches_mmdet_value_and_gradient(sigmoid: bool) -> None:
    rois, labels, targets, cls_score, bbox_pred, _, _ = _batch(4, dtype=torch.float64)
    if sigmoid:
        cls_score = cls_score[:, :3].contiguous()
    a = cls_score.clone().requires_grad_(True)
    b = bbox_pred.clone().requires_grad_(True)
    ref = mmdet_pisa.carl_loss(a, labels, b, targets, _smooth_l1, k=1, bias=0.2, sigmoid=sigmoid,
                               num_class=3)["loss_carl"].sum()
    ref.backward()
    a2 = cls_score.clone().requires_grad_(True)
    b2 = bbox_pred.clone().requires_grad_(True)
    pos = labels < 3
    probs = a2.sigmoid() if sigmoid else a2.softmax(-1)
    p = probs[pos, labels[pos]]
    box = _smooth_l1(b2.reshape(len(labels), -1, 4)[pos, labels[pos]], targets[pos]).sum(-1)
    ours = carl_loss(p, box, k=1.0, bias=0.2, avg_factor=len(labels))
    ours.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(a2.grad, a.grad)
    torch.testing.assert_close(b2.grad, b.grad)


def test_carl_gradcheck_and_empty() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(6, generator=gen, dtype=torch.float64).requires_grad_(True)
    box = torch.rand(6, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: carl_loss(x, y, k=2.0, bias=0.2, avg_factor=10.0), (p, box))
    z = carl_loss(torch.zeros(0, requires_grad=True), torch.zeros(0, requires_grad=True))
    assert float(z.detach()) == 0.0
    z.backward()


def test_aligned_iou() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]])
    torch.testing.assert_close(aligned_box_iou(a, b), torch.tensor([1 / 7, 0.0]))
    torch.testing.assert_close(aligned_box_iou(a, b), mmdet_pisa.bbox_overlaps_aligned(a, b))
