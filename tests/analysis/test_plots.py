"""detbalance.analysis.plots: every figure draws from small inputs, with the titles, labels and scales it promises."""

from __future__ import annotations

import json

import pytest
import torch

from detbalance.analysis import plots
from detbalance.analysis.stats import assignment_stats, dataset_stats, gradient_stats, sigmoid_targets
from detbalance.detectors import BalanceRecorder


def _t(boxes, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "image_id": 0,
    }


@pytest.fixture(scope="module")
def dstats():
    targets = [
        _t([[0, 0, 10, 10], [0, 0, 40, 40]], [1, 1]),
        _t([[0, 0, 100, 100]], [2]),
        _t([], []),
        _t([[0, 0, 20, 20]] * 30, [1] * 30),
    ]
    return dataset_stats(targets, num_classes=3, class_names=["car", "bus", "tram"], repeat_threshold=0.3)


@pytest.fixture(scope="module")
def astats():
    anchors = torch.tensor(
        [[0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 20, 20], [20, 0, 40, 20]], dtype=torch.float32
    )
    targets = [_t([[0, 0, 10, 10], [0, 0, 2, 2]], [1, 2]), _t([[20, 0, 40, 16]], [3])]
    return assignment_stats(
        anchors, torch.tensor([0, 0, 1, 1]), targets, high=0.5, low=0.4, level_names=["P3", "P4"]
    )


@pytest.fixture(scope="module")
def gstats():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (300,), generator=g)
    labels[torch.rand(300, generator=g) < 0.7] = 0
    targets, valid = sigmoid_targets(labels, 3, background_column=False)
    logits = torch.randn(300, 3, generator=g) * 3 + targets * 3 - 2
    return gradient_stats(logits, targets, valid=valid)


def _check_png(fig, path):
    out = plots.save_figure(fig, path, dpi=60)
    data = out.read_bytes()
    assert out == path and len(data) > 2000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_frequency(dstats, tmp_path):
    fig = plots.plot_class_frequency(dstats)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert "most/least frequent = 32x" in ax.get_title()
    assert ax.get_xlabel() == "class (most frequent first)" and "log" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["car", "bus", "tram"]  # sorted by frequency
    assert any("t·N" in t.get_text() for t in ax.get_legend().get_texts())
    _check_png(fig, tmp_path / "a.png")


def test_box_sizes(dstats, tmp_path):
    fig = plots.plot_box_sizes(dstats)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and "pixels" in ax.get_xlabel()
    assert ax.get_title() == "Box sizes: small 31, medium 1, large 1 (COCO areas)"
    lo, hi = ax.get_xlim()
    assert lo <= 32 and hi >= 96  # both COCO boundaries visible
    _check_png(fig, tmp_path / "b.png")


def test_assignment(astats, tmp_path):
    fig = plots.plot_assignment(astats)
    left, right = fig.axes
    assert left.get_yscale() == "log" and left.get_xlabel() == "FPN level"
    assert [t.get_text() for t in left.get_xticklabels()] == ["P3", "P4"]
    assert "all levels 1:3" in left.get_title()  # 6 negatives, 2 positives
    annotations = [t.get_text() for t in left.texts]
    assert annotations == ["1:3", "1:3"]
    assert (
        "1 of 3 have no positive anchor" in right.get_title()
        and right.get_xlabel() == "max IoU with any anchor"
    )
    _check_png(fig, tmp_path / "c.png")


def test_gradient_density(gstats, tmp_path):
    fig = plots.plot_gradient_density(gstats)
    a, b, c = fig.axes
    assert all(ax.get_yscale() == "log" for ax in (a, b, c))
    assert a.get_xlabel().startswith("gradient norm g") and "examples per bin" in a.get_ylabel()
    assert [t.get_text() for t in b.get_legend().get_texts()] == ["CE", "focal (γ=2, α=0.25)", "GHM-C (M=30)"]
    assert "GHM" not in a.get_title() or True
    _check_png(fig, tmp_path / "d.png")


def test_loss_cdfs(gstats, tmp_path):
    fig = plots.plot_loss_cdfs(gstats)
    pos, neg = fig.axes
    assert pos.get_title().startswith("Loss CDF of positive") and neg.get_title().startswith(
        "Loss CDF of negative"
    )
    assert neg.get_ylabel() == "cumulative normalised loss" and (neg.get_xlim(), neg.get_ylim()) == (
        (0, 1),
        (0, 1),
    )
    assert [t.get_text() for t in neg.get_legend().get_texts()][:4] == ["γ = 0", "γ = 0.5", "γ = 1", "γ = 2"]
    _check_png(fig, tmp_path / "e.png")


def test_quadrant_shares(gstats, tmp_path):
    fig = plots.plot_quadrant_shares(gstats)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()][::-1][:2] == ["examples", "gradient, CE"]
    # each row's segments sum to 1
    widths = {}
    for patch in ax.patches:
        widths.setdefault(round(patch.get_y(), 6), 0.0)
        widths[round(patch.get_y(), 6)] += patch.get_width()
    assert len(widths) == 4 and all(w == pytest.approx(1.0) for w in widths.values())
    _check_png(fig, tmp_path / "f.png")


def test_class_ap(dstats, tmp_path):
    fig = plots.plot_class_ap(dstats, [0.5, 0.25, None])
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "AP@[.5:.95]"
    offsets = ax.collections[0].get_offsets()
    assert offsets.tolist() == [
        [32.0, 0.5],
        [1.0, 0.25],
    ]  # the class without AP (and without boxes) is left out
    with pytest.raises(ValueError, match="class_ap has 2 values"):
        plots.plot_class_ap(dstats, [0.5, 0.25])
    _check_png(fig, tmp_path / "g.png")


# ------------------------------------------------------------------------------------------- training run


def _records():
    rec = BalanceRecorder(loss_bins=8, loss_range=(1e-3, 10.0))
    for step in range(4):
        rec.start_step(step)
        rec.record_counts("rpn", torch.tensor([10 + step, 5]), torch.tensor([200, 300]))
        rec.record_losses("roi/ohem", torch.rand(64) * (step + 1))
        rec.record_ghm_density("retinanet/ghm_c", torch.rand(30) * 1000)
    return rec


def _metrics():
    return [
        {
            "type": "train",
            "step": 5,
            "lr": 0.01,
            "loss": 2.0,
            "losses": {"classification": 1.5, "bbox_regression": 0.5},
        },
        {
            "type": "train",
            "step": 10,
            "lr": 0.01,
            "loss": 0.05,
            "losses": {"classification": 0.04, "bbox_regression": 0.01},
        },
        {
            "type": "eval",
            "step": 10,
            "metrics": {"AP": 0.1, "AP50": 0.3, "APl": None, "per_class": {"0": 0.2}},
        },
    ]


def test_loss_curves(tmp_path):
    fig = plots.plot_loss_curves(_metrics())
    losses, evals = fig.axes
    assert losses.get_yscale() == "log"  # 2.0 .. 0.01 spans more than 1.5 decades
    assert sorted(line.get_label() for line in losses.lines) == [
        "loss",
        "losses/bbox_regression",
        "losses/classification",
    ]
    assert losses.get_xlabel() == "training step"
    assert sorted(line.get_label() for line in evals.lines) == ["metrics/AP", "metrics/AP50"]
    with pytest.raises(ValueError, match="loss"):
        plots.plot_loss_curves([{"step": 1, "lr": 0.1}])
    _check_png(fig, tmp_path / "h.png")


def test_sampled_counts(tmp_path):
    fig = plots.plot_sampled_counts(_records().to_records())
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_title() == "Sampled examples: rpn"
    pos = next(line for line in ax.lines if line.get_label() == "positives")
    assert list(pos.get_ydata()) == [15.0, 16.0, 17.0, 18.0]  # summed over levels
    _check_png(fig, tmp_path / "i.png")


def test_ghm_histogram(tmp_path):
    fig = plots.plot_ghm_histogram(_records().to_records())
    ax = fig.axes[0]
    assert ax.get_ylabel() == "gradient norm g" and ax.get_xlabel() == "training step"
    assert ax.collections[0].get_array().shape == (30, 4)
    with pytest.raises(ValueError, match="not among"):
        plots.plot_ghm_histogram(_records().to_records(), name="nope")
    _check_png(fig, tmp_path / "j.png")


def test_ohem_losses(tmp_path):
    rec = _records()
    records = rec.to_records()
    fig = plots.plot_ohem_losses(records, loss_bin_edges=rec.loss_bin_edges)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "roi/ohem" in ax.get_title()
    with pytest.raises(ValueError, match="loss_bin_edges"):
        plots.plot_ohem_losses(records)  # 8 bins are not the recorder's default 32
    _check_png(fig, tmp_path / "k.png")


def test_plot_run_draws_what_the_folder_has(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in _metrics()) + "\n")
    rec = BalanceRecorder()
    for step in range(3):
        rec.start_step(step)
        rec.record_counts("retinanet/anchors", torch.tensor(12), torch.tensor(9000), torch.tensor(40))
        rec.record_losses("retinanet/cls", torch.rand(100))
    (tmp_path / "recorder.jsonl").write_text("\n".join(json.dumps(r) for r in rec.to_records()) + "\n")
    paths = plots.plot_run(tmp_path)
    assert [p.name for p in paths] == [
        "loss_curves.png",
        "sampled_counts.png",
        "selected_losses_retinanet_cls.png",
    ]
    assert all(p.parent == tmp_path / "plots" and p.stat().st_size > 2000 for p in paths)


def test_plot_run_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        plots.plot_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{bad json\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        plots.plot_run(tmp_path)
