"""Profile statistics of PISA (ISR-P weight by IoU-HLR rank) and ATSS (positives and threshold per object)."""

from __future__ import annotations

import torch

from detbalance.analysis import plots
from detbalance.analysis.pisa_atss import (
    atss_stats,
    detector_atss_stats,
    detector_isr_stats,
    isr_weight_stats,
)
from detbalance.builders import build_model
from detbalance.config import load_config
from detbalance.data import open_dataset
from detbalance.sampling.atss import assign_atss


def test_isr_weight_stats_hand_case() -> None:
    # one class, one object per positive: ranks 0..3 by IoU, n_max 4, k 1 -> raw weights 1, .75, .5, .25
    ious = torch.tensor([0.9, 0.7, 0.5, 0.3])
    labels = torch.ones(4, dtype=torch.int64)
    gt = torch.arange(4)
    s = isr_weight_stats([(ious, labels, gt, torch.ones(4))], k=1.0, bins=4)
    raw = torch.tensor([1.0, 0.75, 0.5, 0.25])
    w = raw * 4 / raw.sum()
    assert s.count == [1, 1, 1, 1] and s.num_positives == 4
    torch.testing.assert_close(torch.tensor(s.mean_weight), w)
    assert abs(s.top_decile_share - float(w[0] / w.sum())) < 1e-6
    assert s.mean_weight == sorted(s.mean_weight, reverse=True)


def test_atss_stats_equal_the_assignment() -> None:
    anchors = torch.tensor([[x, y, x + 16.0, y + 16.0] for y in range(0, 64, 8) for x in range(0, 64, 8)])
    gt = [torch.tensor([[4.0, 4.0, 30.0, 28.0], [30.0, 30.0, 60.0, 62.0]]), torch.zeros(0, 4)]
    s = atss_stats([anchors, anchors], [64], gt, topk=9)
    ref = assign_atss(anchors, gt[0], [64], topk=9)
    assert s.positives_per_object == ref.num_positive.tolist()
    assert s.thresholds == ref.threshold.tolist()
    assert s.num_images == 2 and len(s.object_sizes) == 2


def test_detector_stats_and_figures(tmp_path) -> None:
    cfg = load_config(overrides=['remedy.assigner={name="atss", topk=9}', "remedy.pisa={}"])
    data = open_dataset("builtin:tiny", split="train")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=data.num_classes, image_size=max(data.image_size(0)))
    idx = [0, 1, 2, 3]
    a = detector_atss_stats(model, [data.target(i) for i in idx], [data.image_size(i) for i in idx])
    assert len(a.positives_per_object) == sum(int(data.target(i)["boxes"].shape[0]) for i in idx)
    assert all(0.0 <= t <= 1.0 for t in a.thresholds)
    s = detector_isr_stats(model, data, idx, batch_size=2)
    assert s.num_positives > 0 and sum(s.count) == s.num_positives
    for fig, name in ((plots.plot_atss(a), "atss"), (plots.plot_isr_weights(s), "isr")):
        assert fig.axes and fig.axes[0].get_title()
        plots.save_figure(fig, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_faster_rcnn_isr_stats() -> None:
    cfg = load_config(overrides=["model.arch=faster_rcnn", "remedy.roi_sampler.name=score_hlr", "remedy.pisa={}"])
    data = open_dataset("builtin:tiny", split="train")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=data.num_classes, image_size=max(data.image_size(0)))
    s = detector_isr_stats(model, data, [0, 1, 2, 3], batch_size=2)
    assert s.num_positives > 0 and sum(s.count) == s.num_positives
    weights = [w for w in s.mean_weight if w is not None]
    assert weights[0] >= weights[-1]  # the most prime positives weigh most (k 2, bias 0)
