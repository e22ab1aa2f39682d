"""Imbalance statistics (re-exported from :mod:`~detbalance.analysis.dataset`,
:mod:`~detbalance.analysis.assignment` and :mod:`~detbalance.analysis.gradients`) of a dataset, of an anchor assignment and of a model: pure functions -> dataclasses.

Three levels, following the three places the papers locate the imbalance:

* :func:`dataset_stats`: class imbalance (instances and images per class, the max/min ratio), objects per
  image, empty images, COCO box sizes, and the repeat factors of LVIS repeat-factor sampling
  (Gupta et al., 2019) that :class:`detbalance.sampling.RepeatFactorSampler` would use.
* :func:`assignment_stats`: foreground/background imbalance of a dense detector's anchor assignment:
  positives / negatives / ignored per FPN level and per image, the pos:neg ratio, and the ground-truth boxes
  that no anchor matches (the focal paper's "1:1000" regime and a common hidden failure).
  :func:`detector_assignment_stats` extracts anchors and IoU thresholds from a torchvision detector.
* :func:`gradient_stats` / :class:`GradientAccumulator`: easy/hard imbalance of a model's sigmoid outputs:
  the gradient norm ``g = |sigmoid(x) - y|`` per (anchor, class) element (GHM, Li et al., 2019, eq. 2),
  its density histogram (GHM figure 1), the easy/hard x positive/negative quadrants, the share of the total
  gradient each quadrant contributes under CE, focal and GHM-C, and the loss CDFs of the focal paper's
  figure 4 (Lin et al., 2017). :func:`per_class_ap` gives COCO AP per class from the official evaluator.

Every result is a frozen dataclass holding only JSON-native values (``dataclasses.asdict`` -> ``json``).
Undefined ratios are ``None``, never ``inf``/``nan``.
"""

from detbalance.analysis.assignment import (
    AssignmentStats,
    UnmatchedBox,
    assignment_stats,
    detector_assignment_stats,
    match_anchors,
)
from detbalance.analysis.dataset import (
    COCO_MEDIUM_AREA,
    COCO_SMALL_AREA,
    DatasetStats,
    class_repeat_factors,
    dataset_stats,
)
from detbalance.analysis.gradients import (
    QUADRANTS,
    GradientAccumulator,
    GradientStats,
    focal_gradient_magnitude,
    gradient_stats,
    per_class_ap,
    probe_gradients,
    sigmoid_targets,
)

__all__ = [
    "COCO_MEDIUM_AREA",
    "COCO_SMALL_AREA",
    "QUADRANTS",
    "AssignmentStats",
    "DatasetStats",
    "GradientAccumulator",
    "GradientStats",
    "UnmatchedBox",
    "assignment_stats",
    "class_repeat_factors",
    "dataset_stats",
    "detector_assignment_stats",
    "focal_gradient_magnitude",
    "gradient_stats",
    "match_anchors",
    "per_class_ap",
    "probe_gradients",
    "sigmoid_targets",
]
