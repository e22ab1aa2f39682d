"""Seesaw, EQLv2 and the federated loss in Faster R-CNN's RoI classifier (``box_cls_loss``).

The head's classification loss equals the transcribed reference on the head's own logits and sampled labels
(mmdetection ``BBoxHead.loss``: ``avg_factor`` = number of sampled RoIs; detectron2: ``sum / N``); Seesaw gets
its ``K + 2``-wide classifier; inference scores come from the loss (mmdetection's ``get_activation``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads

from detbalance.detectors.faster_rcnn import balance_faster_rcnn
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.losses import EQLv2Loss, FederatedLoss, ScaledLoss, SeesawLoss, declare_loss
from detbalance.sampling.roi_sampler import FixedRatioSampler, OHEMSampler
from tests.detectors.test_faster_rcnn import BIG, NUM_CLASSES, batch, spy, tiny_faster_rcnn
from tests.reference.detectron2_fed_loss import sigmoid_cross_entropy_loss
from tests.reference.mmdet_eqlv2 import RefEQLV2Loss
from tests.reference.mmdet_seesaw import RefSeesawLoss

K = NUM_CLASSES - 1


def _capture_logits(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.roi_heads.box_predictor.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    return seen


def _adapt(loss, sampler=None, recorder=None):
    sampler = sampler or FixedRatioSampler(num_samples=BIG, positive_fraction=0.5)
    return balance_faster_rcnn(tiny_faster_rcnn(), roi_sampler=sampler, box_cls_loss=loss, recorder=recorder)


def test_seesaw_head_equals_mmdet_over_three_steps(monkeypatch) -> None:
    images, targets = batch()
    seesaw = SeesawLoss(num_classes=K)
    model = _adapt(seesaw)
    assert model.roi_heads.box_predictor.cls_score.out_features == K + 2  # mmdet get_cls_channels
    assert model.roi_heads.num_classes == K + 1
    logits = _capture_logits(model)
    calls = spy(monkeypatch, "roi_losses")
    ref = RefSeesawLoss(num_classes=K)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        out = model(images, targets)
        labels = calls[-1][0][2]
        z = logits[-1]
        ref_out = ref(torch.cat([z[:, 1:K + 1], z[:, K + 1:], z[:, :1]], 1),
                      torch.where(labels > 0, labels - 1, torch.full_like(labels, K)), avg_factor=labels.numel())
        expected = ref_out["loss_cls_objectness"] + ref_out["loss_cls_classes"]
        torch.testing.assert_close(out["loss_classifier"].detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seesaw.cum_samples.float(), torch.cat([ref.cum_samples[K:], ref.cum_samples[:K]]))
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
    assert float(seesaw.cum_samples[1:].sum()) > 0


def test_eqlv2_and_federated_heads_equal_their_references(monkeypatch) -> None:
    images, targets = batch()
    eql = EQLv2Loss(num_classes=K)
    model = _adapt(eql)
    logits = _capture_logits(model)
    calls = spy(monkeypatch, "roi_losses")
    ref = RefEQLV2Loss(num_classes=K)
    for _ in range(3):
        out = model(images, targets)
        labels, z = calls[-1][0][2], logits[-1]
        expected = ref(torch.cat([z[:, 1:], z[:, :1]], 1), torch.where(labels > 0, labels - 1, torch.full_like(labels, K)))
        torch.testing.assert_close(out["loss_classifier"].detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eql.pos_neg, ref.pos_neg, rtol=1e-5, atol=1e-5)

    weights = torch.tensor([4.0, 1.0, 9.0])
    fed = FederatedLoss(class_weights=weights, num_classes_kept=50, seed=0)  # K = 3: every class in the set
    model = _adapt(fed)
    logits = _capture_logits(model)
    out = model(images, targets)
    labels, z = calls[-1][0][2], logits[-1]
    expected = sigmoid_cross_entropy_loss(torch.cat([z[:, 1:], z[:, :1]], 1), torch.where(
        labels > 0, labels - 1, torch.full_like(labels, K)), use_fed_loss=False)
    torch.testing.assert_close(out["loss_classifier"].detach(), expected, rtol=1e-5, atol=1e-6)


def test_inference_scores_are_the_losses_activation() -> None:
    """Detections: the boxes and scores of thresholding + NMS + top-k on the loss's class probabilities."""
    images, _ = batch()
    for loss in (SeesawLoss(num_classes=K), EQLv2Loss(num_classes=K), FederatedLoss(class_weights=torch.ones(K))):
        model = _adapt(loss).eval()
        model.roi_heads.score_thresh = 0.1
        logits = _capture_logits(model)
        with torch.no_grad():
            dets = model(images)
        probs = loss.class_probabilities(logits[-1])[:, 1:]
        got = torch.sort(torch.cat([d["scores"] for d in dets])).values
        assert got.numel() > 0 and float(got.min()) > 0.1
        # every reported score is one of the class probabilities of a proposal (same value, not renormalised)
        dist = (got[:, None] - probs.reshape(1, -1)).abs().min(dim=1).values
        assert float(dist.max()) < 1e-5


def test_probability_postprocess_equals_torchvision_for_softmax() -> None:
    """A loss whose activation is the softmax gives torchvision's own detections."""
    images, _ = batch()
    ce = declare_loss(lambda z, y: F.cross_entropy(z, y, reduction="none"), kind="softmax")
    ce.class_probabilities = lambda z: z.softmax(dim=1)  # type: ignore[attr-defined]
    ours = _adapt(ce).eval()
    plain = _adapt(None).eval()
    with torch.no_grad():
        a, b = ours(images), plain(images)
    for x, y in zip(a, b):
        assert torch.equal(x["labels"], y["labels"])
        torch.testing.assert_close(x["boxes"], y["boxes"])
        torch.testing.assert_close(x["scores"], y["scores"], rtol=1e-5, atol=1e-6)


def test_scaled_seesaw_still_widens_the_classifier() -> None:
    model = _adapt(ScaledLoss(SeesawLoss(num_classes=K), 2.0))
    assert model.roi_heads.box_predictor.cls_score.out_features == K + 2
    images, targets = batch()
    assert torch.isfinite(model(images, targets)["loss_classifier"])


def test_ohem_read_only_pass_does_not_count_rois_twice() -> None:
    images, targets = batch()
    seesaw = SeesawLoss(num_classes=K)
    model = _adapt(seesaw, sampler=OHEMSampler(num_samples=16, nms_iou=None))
    model(images, targets)
    assert float(seesaw.cum_samples.sum()) == 3 * 16  # the selected RoIs only, not every candidate
    assert seesaw.training


def test_recorder_gets_the_per_class_factors() -> None:
    images, targets = batch()
    for loss, names in ((SeesawLoss(num_classes=K), {"seesaw/mitigation", "seesaw/compensation"}),
                        (EQLv2Loss(num_classes=K), {"eqlv2/pos_neg"}),
                        (FederatedLoss(class_weights=torch.ones(K), num_classes_kept=2),
                         {"federated/in_loss", "federated/sampled"})):
        rec = BalanceRecorder()
        model = _adapt(loss, recorder=rec)
        for step in range(2):
            rec.start_step(step)
            model(images, targets)
        values = rec.to_records()[-1]["class_values"]
        assert set(values) == names
        for v in values.values():
            assert len(v["sum"]) == K and len(v["count"]) == K
    # Seesaw's mitigation factor is <= 1 and its compensation factor >= 1
    rec = BalanceRecorder()
    model = _adapt(SeesawLoss(num_classes=K), recorder=rec)
    model(images, targets)
    v = rec.to_records()[0]["class_values"]
    for name, bound in (("seesaw/mitigation", "le"), ("seesaw/compensation", "ge")):
        s, c = torch.tensor(v[name]["sum"]), torch.tensor(v[name]["count"])
        mean = s[c > 0] / c[c > 0]
        assert bool((mean <= 1 + 1e-6).all()) if bound == "le" else bool((mean >= 1 - 1e-6).all())


def test_wrong_num_classes_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_classes=5"):
        _adapt(SeesawLoss(num_classes=5))
    assert isinstance(_adapt(None).roi_heads, RoIHeads)


# ---------------------------------------------------------------------------------------- config -> model
def test_configs_build_the_losses_into_faster_rcnn(tmp_path) -> None:
    from pathlib import Path

    from detbalance.builders import build_model, class_image_counts
    from detbalance.config import ConfigError, load_config
    from detbalance.data import make_benchmark

    configs = Path(__file__).parents[2] / "configs"
    data = make_benchmark("tiny", split="train", seed=0)
    counts = class_image_counts(data)
    per_image = [set(c) for c in data.categories_per_image()]
    assert counts.tolist() == [sum(k in s for s in per_image) for k in range(1, data.num_classes + 1)]
    kinds = {"seesaw": SeesawLoss, "eqlv2": EQLv2Loss, "federated": FederatedLoss}
    for name, kind in kinds.items():
        cfg = load_config(configs / f"faster_rcnn_{name}.toml")
        model = build_model(cfg, num_classes=data.num_classes, image_size=64, image_counts=counts)
        assert isinstance(model.roi_heads.box_cls_loss, kind)
        width = data.num_classes + (2 if name == "seesaw" else 1)
        assert model.roi_heads.box_predictor.cls_score.out_features == width
    fed = model.roi_heads.box_cls_loss
    torch.testing.assert_close(fed.class_weights, counts.float() ** 0.5)
    assert fed.num_classes_kept == 4
    with pytest.raises(ValueError, match="image counts"):
        build_model(cfg, num_classes=data.num_classes, image_size=64)
    with pytest.raises(ConfigError, match="remedy.cls_loss.*faster_rcnn"):
        load_config(configs / "faster_rcnn_seesaw.toml", overrides=["model.arch=retinanet"])
    with pytest.raises(ConfigError, match="remedy.cls_loss.p"):
        load_config(configs / "faster_rcnn_seesaw.toml", overrides=["remedy.cls_loss.p=-1"])


def test_fit_trains_records_and_reloads_a_federated_faster_rcnn(tmp_path) -> None:
    import json

    from detbalance.engine import fit
    from detbalance.engine.run import load_trained_model
    from tests.engine.conftest import tiny_config

    cfg = tiny_config("model.arch=faster_rcnn", "remedy.cls_loss.name=federated", "remedy.cls_loss.num_classes_kept=3",
                      "engine.iterations=2", "engine.batch_size=2", "engine.record=true")
    result = fit(cfg, output=tmp_path, progress=False)
    steps = [json.loads(line) for line in (tmp_path / "balance.jsonl").read_text().splitlines()][1:]
    assert set(steps[-1]["class_values"]) == {"federated/in_loss", "federated/sampled"}
    model, _, _ = load_trained_model(result.checkpoint)
    trained = torch.load(result.checkpoint, weights_only=True)["model"]["roi_heads.box_cls_loss.class_weights"]
    torch.testing.assert_close(model.roi_heads.box_cls_loss.class_weights, trained)
