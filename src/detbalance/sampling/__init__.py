"""Which examples count: IoU assignment, fixed-ratio sampling, OHEM, S-OHEM, Libra R-CNN's IoU-balanced
sampling, SSD hard negative mining, offline bootstrapping and repeat-factor dataset sampling.

Every per-RoI sampler is a pure function of tensors (labels in the convention of :mod:`detbalance.types`:
``-1`` ignore, ``0`` background, ``1..K`` foreground) returning :class:`~detbalance.types.SampledIndices`
or a mask; losses are passed in, models are never called.
"""

from detbalance.sampling.assign import Assignment, assign_by_iou
from detbalance.sampling.atss import ATSSAssigner, ATSSAssignment, assign_atss
from detbalance.sampling.bootstrap import (
    BootstrapHook,
    HardNegativeSet,
    build_bootstrap_hook,
    find_hard_negatives,
)
from detbalance.sampling.fixed_ratio import sample_fixed_ratio, sample_fixed_ratio_batched
from detbalance.sampling.hard_negative import mine_hard_negatives
from detbalance.sampling.iou_balanced import sample_iou_balanced
from detbalance.sampling.ohem import select_hard_examples
from detbalance.sampling.repeat_factor import RepeatFactorSampler, repeat_factors
from detbalance.sampling.roi_sampler import (
    BootstrappedSampler,
    FixedRatioSampler,
    IoUBalancedSampler,
    OHEMSampler,
    RoIBatch,
    RoILosses,
    RoISampler,
    ScoreHLRSampler,
    StratifiedOHEMSampler,
    WeightedSample,
    sampler_loss_weights,
    sampler_needs_losses,
    split_weighted_sample,
)
from detbalance.sampling.score_hlr import sample_score_hlr
from detbalance.sampling.stratified_ohem import (
    default_loss_weights,
    default_stratum_distribution,
    select_hard_examples_stratified,
    stratum_quotas,
)

__all__ = [
    "ATSSAssigner",
    "ATSSAssignment",
    "Assignment",
    "BootstrapHook",
    "BootstrappedSampler",
    "FixedRatioSampler",
    "HardNegativeSet",
    "IoUBalancedSampler",
    "OHEMSampler",
    "RepeatFactorSampler",
    "RoIBatch",
    "RoILosses",
    "RoISampler",
    "ScoreHLRSampler",
    "StratifiedOHEMSampler",
    "WeightedSample",
    "assign_atss",
    "assign_by_iou",
    "build_bootstrap_hook",
    "default_loss_weights",
    "default_stratum_distribution",
    "find_hard_negatives",
    "mine_hard_negatives",
    "repeat_factors",
    "sampler_loss_weights",
    "sampler_needs_losses",
    "sample_fixed_ratio",
    "sample_fixed_ratio_batched",
    "sample_iou_balanced",
    "sample_score_hlr",
    "select_hard_examples",
    "select_hard_examples_stratified",
    "split_weighted_sample",
    "stratum_quotas",
]
