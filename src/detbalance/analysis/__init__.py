"""Diagnostics of sample imbalance: statistics (dataclasses), figures, the ``profile`` report.

* :mod:`~detbalance.analysis.stats`: pure functions -> frozen dataclasses: :func:`dataset_stats`
  (class frequency, box sizes, repeat factors), :func:`assignment_stats` / :func:`detector_assignment_stats`
  (positives / negatives / ignored anchors per level, boxes no anchor matches), :func:`gradient_stats` /
  :class:`GradientAccumulator` (gradient-norm density, easy/hard quadrants, gradient shares under CE /
  focal / GHM-C, loss CDFs) and :func:`per_class_ap`;
* :mod:`~detbalance.analysis.plots`: one matplotlib ``Figure`` per diagnostic, and :func:`plot_run` for a
  training run folder (``detbalance plot RUN_DIR``);
* :mod:`~detbalance.analysis.profile`: :func:`run_profile` (``detbalance profile``).
"""

from detbalance.analysis.plots import (
    plot_assignment,
    plot_box_sizes,
    plot_class_ap,
    plot_class_frequency,
    plot_ghm_histogram,
    plot_gradient_density,
    plot_loss_cdfs,
    plot_loss_curves,
    plot_ohem_losses,
    plot_quadrant_shares,
    plot_run,
    plot_sampled_counts,
    save_figure,
)
from detbalance.analysis.profile import run_profile
from detbalance.analysis.stats import (
    AssignmentStats,
    DatasetStats,
    GradientAccumulator,
    GradientStats,
    UnmatchedBox,
    assignment_stats,
    dataset_stats,
    detector_assignment_stats,
    focal_gradient_magnitude,
    gradient_stats,
    match_anchors,
    per_class_ap,
    sigmoid_targets,
)

__all__ = [
    "AssignmentStats",
    "DatasetStats",
    "GradientAccumulator",
    "GradientStats",
    "UnmatchedBox",
    "assignment_stats",
    "dataset_stats",
    "detector_assignment_stats",
    "focal_gradient_magnitude",
    "gradient_stats",
    "match_anchors",
    "per_class_ap",
    "plot_assignment",
    "plot_box_sizes",
    "plot_class_ap",
    "plot_class_frequency",
    "plot_ghm_histogram",
    "plot_gradient_density",
    "plot_loss_cdfs",
    "plot_loss_curves",
    "plot_ohem_losses",
    "plot_quadrant_shares",
    "plot_run",
    "plot_sampled_counts",
    "run_profile",
    "save_figure",
    "sigmoid_targets",
]
