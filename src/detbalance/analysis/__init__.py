"""Diagnostics of sample imbalance: statistics (dataclasses), figures, the ``profile`` report.

* pure functions -> frozen dataclasses, by topic: :mod:`~detbalance.analysis.dataset` (:func:`dataset_stats`:
  class frequency, box sizes, repeat factors), :mod:`~detbalance.analysis.assignment`
  (:func:`assignment_stats` / :func:`detector_assignment_stats` / :func:`dataset_assignment_stats`:
  positives / negatives / ignored anchors per level, boxes no anchor matches, with torchvision's matchers)
  and :mod:`~detbalance.analysis.gradients` (:func:`gradient_stats` / :class:`GradientAccumulator` /
  :func:`probe_gradients`: gradient-norm density, easy/hard quadrants, gradient shares under CE / focal /
  GHM-C, loss CDFs; :func:`per_class_ap`); :mod:`~detbalance.analysis.stats` re-exports them all;
* :mod:`~detbalance.analysis.pisa_atss`: what PISA (ISR-P weight by IoU-HLR rank, :func:`isr_weight_stats`)
  and ATSS (positives and IoU threshold per object, :func:`atss_stats`) do to the balance they target;
  :mod:`~detbalance.analysis.libra`: Libra R-CNN's negatives per IoU bin (:func:`libra_negative_stats`);
* :mod:`~detbalance.analysis.progress`: the one progress display (rich bar or plain log lines);
* :mod:`~detbalance.analysis.plots`: one matplotlib ``Figure`` per diagnostic, and :func:`plot_run` for a
  training run folder (``detbalance plot RUN_DIR``);
* :mod:`~detbalance.analysis.profile`: :func:`run_profile` (``detbalance profile``).
"""

from detbalance.analysis.libra import LibraStats, detector_libra_stats, libra_negative_stats
from detbalance.analysis.pisa_atss import (
    ATSSStats,
    ISRStats,
    atss_stats,
    detector_atss_stats,
    detector_isr_stats,
    isr_weight_stats,
)
from detbalance.analysis.plots import (
    plot_assignment,
    plot_atss,
    plot_box_sizes,
    plot_class_ap,
    plot_class_frequency,
    plot_class_values,
    plot_ghm_histogram,
    plot_gradient_density,
    plot_isr_weights,
    plot_libra_bins,
    plot_loss_cdfs,
    plot_loss_curves,
    plot_ohem_losses,
    plot_quadrant_shares,
    plot_run,
    plot_sampled_counts,
    save_figure,
)
from detbalance.analysis.profile import class_values_over_training, run_profile
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
    probe_gradients,
    sigmoid_targets,
)

__all__ = [
    "ATSSStats",
    "AssignmentStats",
    "DatasetStats",
    "GradientAccumulator",
    "GradientStats",
    "ISRStats",
    "LibraStats",
    "UnmatchedBox",
    "assignment_stats",
    "atss_stats",
    "class_values_over_training",
    "dataset_stats",
    "detector_assignment_stats",
    "detector_atss_stats",
    "detector_isr_stats",
    "detector_libra_stats",
    "focal_gradient_magnitude",
    "gradient_stats",
    "isr_weight_stats",
    "libra_negative_stats",
    "match_anchors",
    "per_class_ap",
    "plot_assignment",
    "plot_atss",
    "plot_box_sizes",
    "plot_class_ap",
    "plot_class_frequency",
    "plot_class_values",
    "plot_ghm_histogram",
    "plot_gradient_density",
    "plot_isr_weights",
    "plot_libra_bins",
    "plot_loss_cdfs",
    "plot_loss_curves",
    "plot_ohem_losses",
    "plot_quadrant_shares",
    "plot_run",
    "plot_sampled_counts",
    "probe_gradients",
    "run_profile",
    "save_figure",
    "sigmoid_targets",
]
