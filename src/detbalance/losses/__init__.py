"""Losses that re-weight examples: focal, GHM-C/GHM-R, smooth L1/ASL1/L1/GIoU, class weights, normalisers.

Functions are the core (tensors positional, hyperparameters keyword-only, ``reduction="none"`` by default
except the GHM losses, whose paper form is a normalised mean); each module holds hyperparameters (or, for
GHM, the EMA histogram) and calls its function. Every module class has ``self_normalizing``: ``True`` when
its forward already returns the paper's normalised scalar (GHM), ``False`` when it returns per-element
losses for the adapter to sum and divide by the positive count.
"""

from detbalance.losses.focal import SigmoidFocalLoss, SoftmaxFocalLoss, sigmoid_focal_loss, softmax_focal_loss
from detbalance.losses.ghm import GHMCLoss, GHMRLoss, ghm_c_loss, ghm_r_loss, gradient_density
from detbalance.losses.normalizer import PositiveNormalizer, normalize_by_positives
from detbalance.losses.regression import ASL1Loss, GIoULoss, L1Loss, SmoothL1Loss, asl1_loss, smooth_l1_loss
from detbalance.losses.weighting import class_frequency_weights

__all__ = [
    "ASL1Loss",
    "GHMCLoss",
    "GHMRLoss",
    "GIoULoss",
    "L1Loss",
    "PositiveNormalizer",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
    "SoftmaxFocalLoss",
    "asl1_loss",
    "class_frequency_weights",
    "ghm_c_loss",
    "ghm_r_loss",
    "gradient_density",
    "normalize_by_positives",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "softmax_focal_loss",
]
