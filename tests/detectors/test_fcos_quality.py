"""QFL and VFL on FCOS: the head hands the loss its own decoded boxes and matches, and the loss equals mmdetection's."""

from __future__ import annotations

import pytest
import torch

from detbalance.detectors import balance_fcos, build_zoo_model
from detbalance.losses import AnchorBatch, QualityFocalLoss, VarifocalLoss
from tests.detectors.inputs import make_batch
from tests.reference import mmdet_quality as mm

K = 3


class _Spy:
    """Records the AnchorBatch the head hands to ``dense_targets``."""

    def __init__(self, loss):
        self.loss, self.batch = loss, None
        original = loss.dense_targets

        def spy(batch: AnchorBatch):
            self.batch = batch
            return original(batch)

        loss.dense_targets = spy


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qfl", "vfl"])
def test_fcos_quality_loss_equals_the_reference_heads(name):
    torch.manual_seed(0)
    model = build_zoo_model("fcos_resnet50_fpn", num_classes=K, min_size=64, max_size=64)
    loss = QualityFocalLoss() if name == "qfl" else VarifocalLoss()
    spy = _Spy(loss)
    model = balance_fcos(model, cls_loss=loss, normalizer="per_batch")
    images, targets = make_batch()
    out = model(images, targets)
    batch = spy.batch
    labels = batch.labels
    pos = labels > 0
    assert int(pos.sum()) >= 3
    # the head's own boxes: FCOS's box coder on its regression, detached
    assert not batch.pred_boxes.requires_grad
    mm_labels = torch.where(pos, labels - 1, torch.full_like(labels, K))
    logits = batch.logits.detach()
    if name == "qfl":
        _, score = mm.gfl_cls_targets(mm_labels, batch.pred_boxes[pos], batch.matched_boxes[pos], K)
        assert float(score[pos].std()) > 0  # genuinely soft targets from the head's own boxes
        expected = mm.QualityFocalLoss()(logits, (mm_labels, score), weight=(labels >= 0).float(),
                                         avg_factor=float(pos.sum()))
    else:
        t = mm.vfnet_cls_targets(logits, mm_labels, batch.pred_boxes[pos], batch.matched_boxes[pos], K)
        expected = mm.VarifocalLoss()(logits, t, weight=(labels >= 0).float()[:, None].expand_as(logits),
                                      avg_factor=mm.vfnet_avg_factor(int(pos.sum())))
    torch.testing.assert_close(out["classification"].detach(), expected, rtol=1e-4, atol=1e-6)
    sum(out.values()).backward()
    grad = model.head.classification_head.cls_logits.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
