"""What PISA and ATSS do to the balance they target, for ``detbalance profile``.

* ATSS (Zhang et al., CVPR 2020): how many positive anchors each object gets and the IoU threshold ATSS
  computed for it (mean + std of its candidates' IoU), against the object's size: the per-object adaptivity
  that replaces the fixed 0.5 / 0.4 thresholds (:func:`detector_atss_stats`).
* PISA (Cao et al., CVPR 2020): the ISR-P weight of the positives against their IoU hierarchical local rank
  (normalised by the largest class count, as the weight mapping is): how strongly the prime samples are
  favoured over the rest (:func:`isr_weight_stats`, :func:`detector_isr_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detbalance.losses.pisa import aligned_box_iou, iou_hlr_rank, isr_p_weights
from detbalance.sampling.atss import assign_atss
from detbalance.types import DetectionTarget

__all__ = ["ATSSStats", "ISRStats", "atss_stats", "detector_atss_stats", "detector_isr_stats", "isr_weight_stats"]


@dataclass(frozen=True)
class ATSSStats:
    """Per-object outcome of ATSS over a sample of images.

    Attributes:
        num_images: images assigned.
        topk: candidates per level and object.
        positives_per_object: positive anchors of each object.
        thresholds: each object's IoU threshold (mean + std of its candidates' IoU).
        object_sizes: each object's ``sqrt(w h)`` in the anchors' frame (pixels).
        num_without_positive: objects that got no positive anchor.
        mean_positives: mean of ``positives_per_object``.
    """

    num_images: int
    topk: int
    positives_per_object: list[int]
    thresholds: list[float]
    object_sizes: list[float]
    num_without_positive: int
    mean_positives: float


def atss_stats(
    anchors: Sequence[Tensor], num_anchors_per_level: Sequence[int], gt_boxes: Sequence[Tensor], *, topk: int = 9
) -> ATSSStats:
    """:class:`ATSSStats` of ATSS over images given as their anchors ``[A, 4]`` and boxes ``[G, 4]``."""
    pos: list[int] = []
    thr: list[float] = []
    size: list[float] = []
    for a, g in zip(anchors, gt_boxes, strict=True):
        if g.numel() == 0:
            continue
        out = assign_atss(a, g.to(a), num_anchors_per_level, topk=topk)
        pos += out.num_positive.tolist()
        thr += out.threshold.tolist()
        wh = (g[:, 2:] - g[:, :2]).clamp(min=0)
        size += (wh[:, 0] * wh[:, 1]).sqrt().tolist()
    return ATSSStats(
        num_images=len(anchors), topk=topk, positives_per_object=pos, thresholds=thr, object_sizes=size,
        num_without_positive=sum(1 for p in pos if p == 0), mean_positives=(sum(pos) / len(pos)) if pos else 0.0,
    )


@torch.no_grad()
def detector_atss_stats(
    model: torch.nn.Module, targets: Sequence[DetectionTarget], image_sizes: Sequence[tuple[int, int]], *,
    topk: int = 9,
) -> ATSSStats:
    """:func:`atss_stats` with a RetinaNet's own transform and anchors (blank images: nothing is decoded)."""
    if len(targets) != len(image_sizes):
        raise ValueError(f"got {len(targets)} targets but {len(image_sizes)} image sizes")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        anchors, boxes, per_level = [], [], None
        for t, (h, w) in zip(targets, image_sizes):
            image_list, tt = model.transform([torch.zeros(3, int(h), int(w), device=device)],
                                             [{"boxes": t["boxes"].to(device, torch.float32), "labels": t["labels"].to(device)}])
            feats = list(model.backbone(image_list.tensors).values())
            a = model.anchor_generator(image_list, feats)[0]
            n_loc = model.anchor_generator.num_anchors_per_location()
            per_level = [int(f.shape[-2] * f.shape[-1]) * int(k) for f, k in zip(feats, n_loc)]
            anchors.append(a)
            boxes.append(tt[0]["boxes"])
    finally:
        model.train(was_training)
    if per_level is None:
        raise ValueError("targets is empty: no images to assign")
    return atss_stats(anchors, per_level, boxes, topk=topk)


@dataclass(frozen=True)
class ISRStats:
    """ISR-P weights of positives against their normalised IoU-HLR ``r / n_max`` (0 = most prime).

    Attributes:
        num_positives: positives pooled (over batches; each batch is ranked on its own, as in training).
        bin_edges: edges of the normalised-rank bins.
        mean_weight: mean weight of the positives in each bin (``None`` for an empty bin).
        count: positives in each bin.
        top_decile_share: share of the total weight carried by the positives of the first rank bin.
        k: ISR's power; bias: its shift.
    """

    num_positives: int
    bin_edges: list[float]
    mean_weight: list[float | None]
    count: list[int]
    top_decile_share: float
    k: float
    bias: float


def isr_weight_stats(
    batches: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]], *, k: float = 2.0, bias: float = 0.0, bins: int = 10
) -> ISRStats:
    """:class:`ISRStats` over batches of ``(ious, labels, gt_index, positive_loss)``, each ranked on its own."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    total = torch.zeros(bins, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.int64)
    n = 0
    for ious, labels, gt_index, loss in batches:
        if ious.numel() == 0:
            continue
        w = isr_p_weights(ious, labels, gt_index, loss, k=k, bias=bias).double().cpu()
        rank, n_max = iou_hlr_rank(ious, labels, gt_index)
        u = (rank.double() / n_max.double()).cpu()
        b = torch.bucketize(u, edges[1:-1], right=True)
        total.index_add_(0, b, w)
        count.index_add_(0, b, torch.ones_like(b))
        n += ious.numel()
    s = float(total.sum())
    return ISRStats(
        num_positives=n, bin_edges=edges.tolist(),
        mean_weight=[float(t / c) if c else None for t, c in zip(total, count)], count=count.tolist(),
        top_decile_share=float(total[0]) / s if s > 0 else 0.0, k=float(k), bias=float(bias),
    )


@torch.no_grad()
def detector_isr_stats(
    model: torch.nn.Module, dataset: Any, indices: Sequence[int], *, batch_size: int = 8, k: float = 2.0,
    bias: float = 0.0,
) -> ISRStats:
    """:func:`isr_weight_stats` on ``dataset[indices]``, in batches of ``batch_size`` as in training.

    RetinaNet: its positive anchors (its own assignment), decoded predictions and focal loss. Faster R-CNN: the
    positive RoIs among the RPN's proposals (evaluation-mode proposals, all positives rather than the sampled
    ones), their decoded class-specific predictions and cross entropy.
    """
    if hasattr(model, "roi_heads"):
        return _faster_rcnn_isr_stats(model, dataset, indices, batch_size=batch_size, k=k, bias=bias)
    from detbalance.detectors.retinanet import anchor_outputs
    from detbalance.losses import sigmoid_focal_loss
    from detbalance.types import one_hot_targets

    was_training = model.training
    model.eval()
    batches = []
    try:
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start:start + batch_size]]
            images = [im for im, _ in items]
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]
            out = anchor_outputs(model, images, targets)
            b, a, c = out.cls_logits.shape
            labels = out.labels.reshape(-1)
            pos = labels > 0
            if not bool(pos.any()):
                continue
            anchors = out.anchors.reshape(b * a, 4)[pos]
            coder = model.head.regression_head.box_coder
            pred = coder.decode_single(out.bbox_regression.reshape(b * a, 4)[pos], anchors)
            gt = coder.decode_single(out.target_regression.reshape(b * a, 4)[pos], anchors)
            ious = aligned_box_iou(pred, gt)
            # object identity: positives of one image whose decoded targets coincide (IoU > 0.99) share an object
            img = torch.arange(b, device=labels.device).repeat_interleave(a)[pos]
            same = (box_iou(gt, gt) > 0.99) & (img[:, None] == img[None, :])
            gt_index = same.to(torch.int8).argmax(dim=1)
            logits = out.cls_logits.reshape(b * a, c)[pos, 1:]
            loss = sigmoid_focal_loss(logits, one_hot_targets(labels[pos], c - 1, dtype=logits.dtype)).sum(-1)
            batches.append((ious, labels[pos], gt_index, loss))
    finally:
        model.train(was_training)
    return isr_weight_stats(batches, k=k, bias=bias)


def _faster_rcnn_isr_stats(
    model: torch.nn.Module, dataset: Any, indices: Sequence[int], *, batch_size: int, k: float, bias: float
) -> ISRStats:
    import torch.nn.functional as F

    head = model.roi_heads
    was_training = model.training
    model.eval()
    batches = []
    try:
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start:start + batch_size]]
            image_list, targets = model.transform([im for im, _ in items],
                                                  [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items])
            features = model.backbone(image_list.tensors)
            features = features if isinstance(features, dict) else {"0": features}
            proposals, _ = model.rpn(image_list, features, targets)
            rois, reg = head.prepare_training_rois(proposals, image_list.image_sizes, targets)
            pos = torch.nonzero(rois.labels > 0).flatten()
            if pos.numel() == 0:
                continue
            counts = torch.bincount(rois.batch_idx[pos], minlength=rois.num_images).tolist()
            boxes = rois.boxes[pos]
            pooled = head.box_roi_pool(features, list(boxes.split(counts)), image_list.image_sizes)
            logits, deltas = head.box_predictor(head.box_head(pooled))
            labels = rois.labels[pos]
            d = deltas.reshape(pos.numel(), -1, 4)[torch.arange(pos.numel(), device=pos.device), labels]
            ious = aligned_box_iou(head.box_coder.decode_single(d, boxes), head.box_coder.decode_single(reg[pos], boxes))
            gt_index = rois.gt_index[pos] if rois.gt_index is not None else labels
            batches.append((ious, labels, gt_index, F.cross_entropy(logits, labels, reduction="none")))
    finally:
        model.train(was_training)
    return isr_weight_stats(batches, k=k, bias=bias)
