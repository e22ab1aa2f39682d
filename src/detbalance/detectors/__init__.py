"""torchvision detectors with imbalance remedies injected, small CPU backbones, and a balance recorder.

* :func:`build_detector` builds an unmodified torchvision ``RetinaNet`` / ``FasterRCNN`` / ``SSD`` sized
  for small images (:mod:`~detbalance.detectors.build`, backbones in :mod:`~detbalance.detectors.backbones`);
* :func:`build_zoo_model` builds torchvision's detection models by name with weights by torchvision name or
  ``.pth`` and the classifier fitted to ``K`` classes (:mod:`~detbalance.detectors.zoo`);
* :func:`balance_retinanet`, :func:`balance_fcos`, :func:`balance_faster_rcnn`, :func:`balance_ssd` inject losses and samplers
  through subclasses of torchvision's heads (configured like torchvision, they give its losses exactly);
* :class:`BalanceRecorder` collects what the remedies did per step, without host synchronisation;
* :func:`set_training_progress` feeds the training fraction to scheduled parts (S-OHEM).
"""

from detbalance.detectors._targets import check_detection_targets
from detbalance.detectors.backbones import BACKBONES, FPNBackbone, build_backbone
from detbalance.detectors.build import ARCHS, build_detector, default_anchor_sizes, set_training_progress
from detbalance.detectors.faster_rcnn import balance_faster_rcnn
from detbalance.detectors.fcos import BalancedFCOSHead, balance_fcos
from detbalance.detectors.recorder import BalanceRecorder
from detbalance.detectors.retinanet import (
    AnchorOutputs,
    BalancedRetinaNetHead,
    anchor_outputs,
    balance_retinanet,
    torchvision_box_loss,
)
from detbalance.detectors.ssd import BalancedSSD, balance_ssd, init_background_prior
from detbalance.detectors.zoo import ZOO, build_zoo_model, describe_model, model_family, resolve_weights

__all__ = [
    "ARCHS",
    "BACKBONES",
    "ZOO",
    "AnchorOutputs",
    "BalanceRecorder",
    "BalancedFCOSHead",
    "BalancedRetinaNetHead",
    "BalancedSSD",
    "FPNBackbone",
    "anchor_outputs",
    "balance_faster_rcnn",
    "balance_fcos",
    "balance_retinanet",
    "balance_ssd",
    "build_backbone",
    "build_detector",
    "build_zoo_model",
    "check_detection_targets",
    "default_anchor_sizes",
    "describe_model",
    "init_background_prior",
    "model_family",
    "resolve_weights",
    "set_training_progress",
    "torchvision_box_loss",
]
