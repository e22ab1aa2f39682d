"""profile's view of Libra R-CNN: negatives per IoU bin, available, randomly sampled and IoU-balanced."""

from __future__ import annotations

import pytest
import torch

from detbalance.analysis.libra import libra_negative_stats
from detbalance.analysis.plots import plot_libra_bins
from detbalance.sampling import IoUBalancedSampler, RoIBatch


def _rois() -> RoIBatch:
    """One image: 1 positive (the object), 90 negatives at IoU 0, 9 in (0, 1/6), 6 in [1/6, 1/3), 3 in [1/3, 0.5)."""
    iou = torch.tensor([1.0] + [0.0] * 90 + [0.1] * 9 + [0.2] * 6 + [0.4] * 3)
    labels = (iou >= 0.5).long()
    n = iou.numel()
    return RoIBatch(labels, torch.zeros(n, 4), torch.zeros(n, dtype=torch.long), iou,
                    torch.zeros(n, dtype=torch.bool), 0.0, 1, torch.where(labels > 0, 0, -1))


def test_counts_per_bin_by_hand():
    """Budget 16 at 0.25: 1 positive, 15 negatives. IoU-balanced (floor 0, bins of (0, 1) of width 1/3, quota 5):
    bin [0, 1/3) gives 5 of its 15 non-zero negatives, bin [1/3, 2/3) its 3, then 7 more at random from the 10
    non-zero ones left: 15, none at IoU 0. Random sampling takes about 15 x 90 / 108 at IoU 0."""
    stats = libra_negative_stats([_rois()], IoUBalancedSampler(num_samples=16))
    assert stats.available == [90, 9, 6, 3]
    assert sum(stats.balanced) == 15 and stats.balanced[0] == 0 and stats.balanced[3] == 3
    assert sum(stats.random) == 15
    assert stats.bin_labels[0] == "IoU 0" and len(stats.bin_labels) == 4
    # averaged over seeds, random sampling takes the IoU-0 negatives in proportion (90 / 108)
    zeros = [libra_negative_stats([_rois()], IoUBalancedSampler(num_samples=16), seed=s).random[0] for s in range(40)]
    assert sum(zeros) / 40 == pytest.approx(15 * 90 / 108, abs=0.8)


def test_bad_edges_are_refused():
    with pytest.raises(ValueError, match="edges must start"):
        libra_negative_stats([_rois()], IoUBalancedSampler(), edges=(0.1, 0.2, 0.3))


def test_plot_shows_the_three_distributions():
    stats = libra_negative_stats([_rois()], IoUBalancedSampler(num_samples=16))
    fig = plot_libra_bins(stats)
    ax = fig.axes[0]
    assert len(ax.containers) == 3 and [t.get_text() for t in ax.get_xticklabels()] == stats.bin_labels
    heights = [b.get_height() for b in ax.containers[0]]
    assert heights == pytest.approx(stats.share(stats.available))
    assert stats.bin_labels[1] == "(0.00, 0.17)"
