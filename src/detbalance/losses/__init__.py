"""Losses that re-weight examples: focal, GHM-C/GHM-R, QFL/VFL (IoU-quality targets), smooth L1/ASL1/balanced L1/L1/GIoU, class weights, normalisers;
for long-tailed RoI classifiers Seesaw, EQLv2 and the federated loss.

Functions are the core (tensors positional, hyperparameters keyword-only, ``reduction="none"`` by default
except the GHM losses, whose paper form is a normalised mean); each module holds hyperparameters (or, for
GHM, the EMA histogram) and calls its function. Every module is a :class:`DetectionLoss`, which declares the
contract the detector adapters read (:mod:`detbalance.losses.contract`).
"""

from detbalance.losses.contract import (
    AnchorBatch,
    DetectionLoss,
    LossKind,
    ScaledLoss,
    check_slot,
    declare_loss,
)
from detbalance.losses.eqlv2 import EQLv2Loss, eqlv2_gradient_statistics, eqlv2_loss, eqlv2_weights
from detbalance.losses.federated import (
    FederatedLoss,
    federated_class_weights,
    federated_classes,
    federated_loss,
)
from detbalance.losses.focal import (
    SigmoidFocalLoss,
    SoftmaxFocalLoss,
    sigmoid_focal_gradient,
    sigmoid_focal_loss,
    softmax_focal_loss,
)
from detbalance.losses.ghm import GHMCLoss, GHMRLoss, ghm_c_loss, ghm_r_loss, gradient_density
from detbalance.losses.normalizer import PositiveNormalizer, normalize_by_positives
from detbalance.losses.pisa import PrimeSampleAttention, carl_loss, iou_hlr_rank, isr_p_weights
from detbalance.losses.quality import (
    QualityFocalLoss,
    VarifocalLoss,
    aligned_box_iou,
    quality_focal_loss,
    quality_targets,
    varifocal_loss,
)
from detbalance.losses.regression import (
    ASL1Loss,
    BalancedL1Loss,
    GIoULoss,
    L1Loss,
    SmoothL1Loss,
    asl1_loss,
    balanced_l1_loss,
    smooth_l1_loss,
)
from detbalance.losses.seesaw import SeesawLoss, seesaw_factors, seesaw_loss
from detbalance.losses.weighting import ClassWeightedLoss, class_frequency_weights, sample_class_weights

__all__ = [
    "ASL1Loss",
    "AnchorBatch",
    "BalancedL1Loss",
    "ClassWeightedLoss",
    "DetectionLoss",
    "EQLv2Loss",
    "FederatedLoss",
    "GHMCLoss",
    "GHMRLoss",
    "GIoULoss",
    "L1Loss",
    "LossKind",
    "PositiveNormalizer",
    "QualityFocalLoss",
    "PrimeSampleAttention",
    "ScaledLoss",
    "SeesawLoss",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
    "SoftmaxFocalLoss",
    "VarifocalLoss",
    "aligned_box_iou",
    "asl1_loss",
    "balanced_l1_loss",
    "carl_loss",
    "check_slot",
    "class_frequency_weights",
    "declare_loss",
    "eqlv2_gradient_statistics",
    "eqlv2_loss",
    "eqlv2_weights",
    "federated_class_weights",
    "federated_classes",
    "federated_loss",
    "ghm_c_loss",
    "ghm_r_loss",
    "gradient_density",
    "iou_hlr_rank",
    "isr_p_weights",
    "normalize_by_positives",
    "quality_focal_loss",
    "quality_targets",
    "sample_class_weights",
    "seesaw_factors",
    "seesaw_loss",
    "sigmoid_focal_gradient",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "softmax_focal_loss",
    "varifocal_loss",
]
