"""Experiment configuration: frozen dataclasses, TOML in and out, ``--set a.b=value`` overrides.

This is the only place that knows the shape of an experiment; :mod:`detbalance.builders` turns it into
objects and :func:`detbalance.engine.fit` is the only function that reads the whole of it.

An :class:`ExperimentConfig` has six sections::

    [data]      what to train and evaluate on (``builtin[:preset]`` or a COCO json path)
    [model]     the torchvision detector: a small preset or a zoo model by ``name``, weights, sizes
    [remedy]    the imbalance remedy: classification / box loss, normaliser, RoI/RPN sampler, SSD mining,
                class-frequency weights, repeat-factor sampling, offline bootstrapping
    [optim]     SGD or AdamW, gradient clipping
    [schedule]  linear warmup, then cosine / step / constant learning rate
    [engine]    iteration budget, batch size, gradient accumulation, evaluation / checkpoint intervals,
                seed, device, AMP

Rules (every violation is a :class:`ConfigError` naming the key):

* unknown keys and wrong types are errors; an ``int`` is accepted where a ``float`` is expected;
* a field typed ``X | None`` is set to ``None`` by the string ``"none"`` (TOML has no null); the TOML
  writer writes ``None`` that way, so :func:`dump_toml` / :func:`load_toml` round-trip exactly;
* a field holding one of several configs (``remedy.cls_loss``, ``remedy.box_loss``, ``remedy.roi_sampler``)
  picks the class by its ``name`` key; setting ``name`` to a new value starts from that class's defaults;
* options that do not exist for the chosen detector (OHEM on RetinaNet, GHM-R on SSD, ...) are errors.

Example::

    cfg = load_config("configs/ghm.toml", overrides=["engine.iterations=200", "remedy.cls_loss.bins=10"])
    (run_dir / "config.toml").write_text(dump_toml(cfg))
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from detbalance._sampler_params import (
    FixedRatioParams,
    IoUBalancedParams,
    OHEMParams,
    ScoreHLRParams,
    StratifiedOHEMParams,
)
from detbalance._zoo_names import ZOO, check_weights_name, is_weights_file, model_family

__all__ = [
    "ASL1Config",
    "ATSSConfig",
    "BalancedL1Config",
    "BootstrapConfig",
    "CEConfig",
    "ClassWeightsConfig",
    "ConfigError",
    "DataConfig",
    "EQLv2Config",
    "EngineConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "FixedRatioConfig",
    "FocalConfig",
    "GHMCConfig",
    "GHMRConfig",
    "GIoUConfig",
    "IoUBalancedConfig",
    "L1Config",
    "ModelConfig",
    "NormalizerConfig",
    "OHEMConfig",
    "OptimConfig",
    "QFLConfig",
    "PISAConfig",
    "RPNSamplerConfig",
    "RemedyConfig",
    "RepeatFactorConfig",
    "SSDMiningConfig",
    "ScheduleConfig",
    "ScoreHLRConfig",
    "SeesawConfig",
    "SmoothL1Config",
    "StratifiedOHEMConfig",
    "VFLConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_toml",
    "load_config",
    "load_toml",
    "parse_override",
]

class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key (``remedy.cls_loss.gamma: ...``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class FocalConfig:
    """Focal loss (Lin et al., 2017, eq. 5): ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``.

    Sigmoid form on RetinaNet, softmax form on the Faster R-CNN box head and SSD. ``gamma = 0`` gives
    alpha-balanced cross-entropy (the paper's best alpha-CE uses ``alpha = 0.75``, table 1a).
    """

    name: Literal["focal"] = "focal"
    alpha: float | None = 0.25
    gamma: float = 2.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.alpha is None or 0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        _require(self.gamma >= 0.0, "gamma", f"must be >= 0, got {self.gamma}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class CEConfig:
    """Cross-entropy (sigmoid BCE on RetinaNet, softmax CE elsewhere); ``alpha`` weights the foreground."""

    name: Literal["ce"] = "ce"
    alpha: float | None = None
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.alpha is None or 0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class GHMCConfig:
    """GHM-C (Li et al., 2019, eq. 9): BCE reweighted by ``beta_i = N / GD(g_i)``; M bins, EMA momentum.

    The defaults are the authors' reference (mmdetection ``GHMC`` in ``retinanet_ghm``: non-empty-bin
    normalisation, zero-initialised EMA, only populated bins updated, one call per FPN level). The other values
    of ``normalization`` / ``bias_correction`` / ``empty_bins`` / ``per_level`` are our options, documented in
    :class:`detbalance.losses.GHMCLoss`.
    """

    name: Literal["ghm_c"] = "ghm_c"
    bins: int = 30
    momentum: float = 0.75
    normalization: Literal["valid_bins", "paper"] = "valid_bins"
    bias_correction: bool = False
    empty_bins: Literal["keep", "decay"] = "keep"
    per_level: bool = True
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.bins >= 1, "bins", f"must be >= 1, got {self.bins}")
        _require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class SmoothL1Config:
    """Smooth L1 (Girshick, 2015) with transition ``beta`` (1/9 as in torchvision's R-CNN heads)."""

    name: Literal["smooth_l1"] = "smooth_l1"
    beta: float = 1.0 / 9.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.beta >= 0.0, "beta", f"must be >= 0, got {self.beta}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class L1Config:
    """Plain L1 on box deltas (torchvision RetinaNet's default)."""

    name: Literal["l1"] = "l1"
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class ASL1Config:
    """Authentic smooth L1 (Li et al., 2019, eq. 11): ``sqrt(d^2 + mu^2) - mu``."""

    name: Literal["asl1"] = "asl1"
    mu: float = 0.02
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.mu > 0.0, "mu", f"must be > 0, got {self.mu}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class GHMRConfig:
    """GHM-R (Li et al., 2019, eq. 12): ASL1 reweighted by gradient density; the paper's loss weight is 10.

    Defaults: the authors' reference (mmdetection ``GHMR`` in ``retinanet_ghm``); the options are those of
    :class:`GHMCConfig`, documented in :class:`detbalance.losses.GHMRLoss`.
    """

    name: Literal["ghm_r"] = "ghm_r"
    mu: float = 0.02
    bins: int = 10
    momentum: float = 0.7
    normalization: Literal["valid_bins", "paper"] = "valid_bins"
    bias_correction: bool = False
    empty_bins: Literal["keep", "decay"] = "keep"
    per_level: bool = True
    loss_weight: float = 10.0

    def __post_init__(self) -> None:
        _require(self.mu > 0.0, "mu", f"must be > 0, got {self.mu}")
        _require(self.bins >= 1, "bins", f"must be >= 1, got {self.bins}")
        _require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class GIoUConfig:
    """Generalised IoU loss (Rezatofighi et al., 2019) on decoded boxes."""

    name: Literal["giou"] = "giou"
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class QFLConfig:
    """Quality Focal Loss (Li et al., NeurIPS 2020, GFL, eq. 5): ``|y - sigma|^beta * BCE`` with a soft IoU target.

    Dense heads (RetinaNet, FCOS). A positive's target is the IoU of its decoded, detached predicted box with its matched
    ground truth (mmdetection's ``GFLHead``); defaults: ``configs/gfl/gfl_r50_fpn_1x_coco.py`` (beta 2).
    """

    name: Literal["qfl"] = "qfl"
    beta: float = 2.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.beta >= 0.0, "beta", f"must be >= 0, got {self.beta}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class VFLConfig:
    """Varifocal Loss (Zhang et al., CVPR 2021, eq. 2): ``q * BCE`` on positives, ``alpha p^gamma * BCE`` on negatives.

    Dense heads (RetinaNet, FCOS). ``q`` is the IoU of the decoded, detached predicted box with its matched ground truth,
    clamped below at ``iou_floor`` (mmdetection's ``VFNetHead``: 1e-6); defaults:
    ``configs/vfnet/vfnet_r50_fpn_1x_coco.py`` (alpha 0.75, gamma 2, iou_weighted).
    """

    name: Literal["vfl"] = "vfl"
    alpha: float = 0.75
    gamma: float = 2.0
    iou_weighted: bool = True
    iou_floor: float | None = 1e-6
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.alpha >= 0.0, "alpha", f"must be >= 0, got {self.alpha}")
        _require(self.gamma >= 0.0, "gamma", f"must be >= 0, got {self.gamma}")
        _require(
            self.iou_floor is None or 0.0 <= self.iou_floor <= 1.0, "iou_floor",
            f"must be in [0, 1] or none, got {self.iou_floor}",
        )
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class SeesawConfig:
    """Seesaw loss (Wang et al., CVPR 2021) on the Faster R-CNN RoI classifier, which gets ``K + 2`` logits.

    Defaults are mmdetection 3.3's ``SeesawLoss``. ``sync`` all-reduces each step's class counts across DDP
    ranks (ours; mmdetection does not synchronise them, ``sync = false``).
    """

    name: Literal["seesaw"] = "seesaw"
    p: float = 0.8
    q: float = 2.0
    eps: float = 1e-2
    sync: bool = True
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.p >= 0.0, "p", f"must be >= 0, got {self.p}")
        _require(self.q >= 0.0, "q", f"must be >= 0, got {self.q}")
        _require(self.eps > 0.0, "eps", f"must be > 0, got {self.eps}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class EQLv2Config:
    """EQLv2 (Tan et al., CVPR 2021) on the Faster R-CNN RoI classifier (sigmoid, column 0 objectness).

    Defaults are mmdetection 3.3's ``EQLV2Loss``; ``sync`` all-reduces each step's gradient statistics
    (mmdetection's ``use_distributed``, which defaults to ``false`` there).
    """

    name: Literal["eqlv2"] = "eqlv2"
    mu: float = 0.8
    alpha: float = 4.0
    gamma: float = 12.0
    sync: bool = True
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.mu >= 0.0, "mu", f"must be >= 0, got {self.mu}")
        _require(self.alpha >= 0.0, "alpha", f"must be >= 0, got {self.alpha}")
        _require(self.gamma >= 0.0, "gamma", f"must be >= 0, got {self.gamma}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class FederatedConfig:
    """Federated loss (Zhou et al. 2021; detectron2 ``use_fed_loss``) on the Faster R-CNN RoI classifier.

    Per batch, the sigmoid loss over the classes present plus negatives drawn with probability
    ``(training images with the class) ** freq_weight_power`` up to ``num_classes_kept`` (background counted).
    detectron2's defaults: 50 classes, power 0.5 (for LVIS's 1203 classes).
    """

    name: Literal["federated"] = "federated"
    num_classes_kept: int = 50
    freq_weight_power: float = 0.5
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.num_classes_kept >= 1, "num_classes_kept", f"must be >= 1, got {self.num_classes_kept}")
        _require(self.freq_weight_power >= 0.0, "freq_weight_power", f"must be >= 0, got {self.freq_weight_power}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


ClsLossConfig = FocalConfig | CEConfig | GHMCConfig | QFLConfig | VFLConfig | SeesawConfig | EQLv2Config | FederatedConfig
@dataclass(frozen=True)
class BalancedL1Config:
    """Balanced L1 (Pang et al., CVPR 2019, Libra R-CNN, eq. 8); defaults: mmdetection's ``configs/libra_rcnn``
    (alpha 0.5, gamma 1.5, beta 1.0, loss weight 1). See :func:`detbalance.losses.balanced_l1_loss`."""

    name: Literal["balanced_l1"] = "balanced_l1"
    alpha: float = 0.5
    gamma: float = 1.5
    beta: float = 1.0
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("alpha", "gamma", "beta"):
            _require(getattr(self, key) > 0.0, key, f"must be > 0, got {getattr(self, key)}")
        _require(self.loss_weight >= 0.0, "loss_weight", f"must be >= 0, got {self.loss_weight}")


BoxLossConfig = SmoothL1Config | L1Config | ASL1Config | GHMRConfig | GIoUConfig | BalancedL1Config


@dataclass(frozen=True)
class NormalizerConfig:
    """How a dense detector divides its summed losses by the number of positives (RetinaNet only).

    ``per_batch``: ``sum / max(1, sum npos)`` (the focal paper); ``per_image``: mean over images of
    ``loss_b / max(1, npos_b)`` (torchvision); ``ema``: an EMA of the positive count (detectron2).
    """

    mode: Literal["per_batch", "per_image", "ema"] = "per_batch"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")


# ------------------------------------------------------------------------------------------- samplers


def _as_config_error(check: Any) -> None:
    """Run a library class's own validation, re-raising its ``ValueError`` as a :class:`ConfigError`.

    The samplers' messages start with the argument's name (``"num_samples must be ..."``), which becomes
    the key.
    """
    try:
        check()
    except ConfigError:
        raise
    except ValueError as err:
        key, _, rest = str(err).partition(" ")
        raise ConfigError(key, rest) from None


# The RoI samplers' hyperparameters are declared once, in the torch-free detbalance._sampler_params, which
# the sampler classes of detbalance.sampling.roi_sampler extend with the sampling; a config class adds only
# the ``name`` that picks it in TOML (builders.build_roi_sampler maps it to its sampler).


@dataclass(frozen=True)
class FixedRatioConfig(FixedRatioParams):
    """Random RoI sampling at a fixed foreground fraction (Fast R-CNN: 512 per image at 0.25);
    see :class:`~detbalance.sampling.FixedRatioSampler`."""

    name: Literal["fixed_ratio"] = "fixed_ratio"

    def __post_init__(self) -> None:
        _as_config_error(super().__post_init__)


@dataclass(frozen=True)
class OHEMConfig(OHEMParams):
    """Online hard example mining (Shrivastava et al., 2016); see :class:`~detbalance.sampling.OHEMSampler`."""

    name: Literal["ohem"] = "ohem"

    def __post_init__(self) -> None:
        _as_config_error(super().__post_init__)


@dataclass(frozen=True)
class StratifiedOHEMConfig(StratifiedOHEMParams):
    """Stratified OHEM (Li et al., 2017); the engine passes the training progress each step. See
    :class:`~detbalance.sampling.StratifiedOHEMSampler` for which parts are the paper's and which ours."""

    name: Literal["sohem"] = "sohem"

    def __post_init__(self) -> None:
        _as_config_error(super().__post_init__)


@dataclass(frozen=True)
class ScoreHLRConfig(ScoreHLRParams):
    """PISA's ISR-N: Score-HLR sampling with importance weights on the kept negatives (Cao et al., 2020);
    see :class:`~detbalance.sampling.ScoreHLRSampler` (defaults: mmdetection's ``configs/pisa``)."""

    name: Literal["score_hlr"] = "score_hlr"

    def __post_init__(self) -> None:
        _as_config_error(super().__post_init__)


@dataclass(frozen=True)
class IoUBalancedConfig(IoUBalancedParams):
    """Libra R-CNN's IoU-balanced negatives and instance-balanced positives (Pang et al., 2019); see
    :class:`~detbalance.sampling.IoUBalancedSampler` (defaults: mmdetection's ``configs/libra_rcnn``)."""

    name: Literal["iou_balanced"] = "iou_balanced"

    def __post_init__(self) -> None:
        _as_config_error(super().__post_init__)


RoISamplerConfig = FixedRatioConfig | OHEMConfig | StratifiedOHEMConfig | ScoreHLRConfig | IoUBalancedConfig


@dataclass(frozen=True)
class ATSSConfig:
    """ATSS anchor assignment (Zhang et al., CVPR 2020) in place of the dense head's IoU matching;
    see :class:`~detbalance.sampling.ATSSAssigner` (``topk`` candidates per level, mmdetection: 9)."""

    topk: int = 9
    name: Literal["atss"] = "atss"

    def __post_init__(self) -> None:
        _require(self.topk >= 1, "topk", f"must be an int >= 1, got {self.topk}")


AssignerConfig = ATSSConfig


@dataclass(frozen=True)
class PISAConfig:
    """PISA's ISR-P (``isr_k``, ``isr_bias``) and CARL (``carl_k``, ``carl_bias``) on the positives
    (Cao et al., CVPR 2020; mmdetection's ``isr=dict(k=2, bias=0)``, ``carl=dict(k=1, bias=0.2)``);
    ``isr_k = "none"`` or ``carl_k = "none"`` switches that part off. See
    :class:`~detbalance.losses.PrimeSampleAttention`."""

    isr_k: float | None = 2.0
    isr_bias: float = 0.0
    carl_k: float | None = 1.0
    carl_bias: float = 0.2

    def __post_init__(self) -> None:
        for key in ("isr_k", "carl_k"):
            v = getattr(self, key)
            _require(v is None or (math.isfinite(v) and v >= 0), key, f"must be a finite number >= 0 or none, got {v}")
        for key in ("isr_bias", "carl_bias"):
            v = getattr(self, key)
            _require(0.0 <= v <= 1.0, key, f"must be in [0, 1], got {v}")


@dataclass(frozen=True)
class RPNSamplerConfig(FixedRatioParams):
    """The RPN's fixed-ratio anchor sampler (Faster R-CNN: 256 per image at 0.5)."""

    num_samples: int = 256
    positive_fraction: float = 0.5

    def __post_init__(self) -> None:
        _as_config_error(super().__post_init__)


@dataclass(frozen=True)
class SSDMiningConfig:
    """SSD hard negative mining (Liu et al., 2016): keep the highest-loss negatives at ``ratio : 1``.

    ``negative_ratio = None`` (``"none"`` in TOML) turns mining off: every negative counts, which is what
    a softmax focal loss over all boxes wants. ``min_negatives``: negatives kept in an image without
    objects; 0 (the default) is torchvision's SSD, where such an image contributes no classification loss.
    ``background_prior``: initialise a freshly created classifier so that every box starts at foreground
    probability ``pi`` (:func:`detbalance.detectors.init_background_prior`, the softmax counterpart of focal's
    prior; 0.01 as the focal paper); ``None`` (default) keeps torchvision's zero biases. A loaded
    (pretrained) classifier is never re-initialised.
    """

    negative_ratio: float | None = 3.0
    min_negatives: int = 0
    background_prior: float | None = None

    def __post_init__(self) -> None:
        _require(
            self.negative_ratio is None or self.negative_ratio > 0.0,
            "negative_ratio",
            f"must be > 0 or none, got {self.negative_ratio}",
        )
        _require(
            self.min_negatives >= 0,
            "min_negatives",
            f"must be >= 0, got {self.min_negatives}",
        )
        _require(
            self.background_prior is None or 0.0 < self.background_prior < 1.0,
            "background_prior",
            f"must be in (0, 1) or none, got {self.background_prior}",
        )


@dataclass(frozen=True)
class ClassWeightsConfig:
    """Class-frequency weights on the classification loss's ``weight`` (computed from the training set)."""

    method: Literal["inverse", "sqrt_inverse", "effective_number"] = "inverse"
    beta: float = 0.999

    def __post_init__(self) -> None:
        _require(0.0 <= self.beta < 1.0, "beta", f"must be in [0, 1), got {self.beta}")


@dataclass(frozen=True)
class RepeatFactorConfig:
    """Repeat-factor sampling (Gupta et al., LVIS 2019): ``r(c) = max(1, sqrt(t / f(c)))``."""

    threshold: float = 0.001
    sqrt: bool = True

    def __post_init__(self) -> None:
        _require(0.0 < self.threshold <= 1.0, "threshold", f"must be in (0, 1], got {self.threshold}")


@dataclass(frozen=True)
class BootstrapConfig:
    """Offline bootstrapping (Sung & Poggio, 1998): ``rounds`` times, train, mine the training set's
    confident false positives and continue training with them as extra negatives.

    The iteration budget ``engine.iterations`` is split into ``rounds + 1`` equal segments; mining happens
    at the end of each of the first ``rounds`` segments and every segment ends with an evaluation.
    """

    rounds: int = 1
    iou: float = 0.5
    score_threshold: float = 0.5
    max_per_image: int | None = None

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        _require(0.0 < self.iou <= 1.0, "iou", f"must be in (0, 1], got {self.iou}")
        _require(0.0 <= self.score_threshold <= 1.0, "score_threshold", f"must be in [0, 1], got {self.score_threshold}")
        _require(
            self.max_per_image is None or self.max_per_image >= 1,
            "max_per_image",
            f"must be >= 1, got {self.max_per_image}",
        )


# ------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Datasets: ``builtin[:preset]`` (the synthetic benchmark) or a COCO json path.

    ``val = None`` evaluates on the held-out data that goes with ``train`` (:func:`detbalance.data.held_out_spec`:
    a built-in benchmark's ``test`` split, a folder's ``test.json``); a single COCO file has none, so the
    run is not evaluated (``engine.eval_train`` adds a training-set AP, labelled as such). ``augment`` picks
    the architecture's training transforms (flips / SSD augmentation) or none; ``seed`` is the built-in
    benchmark's generation seed. ``num_workers > 0`` loads and augments in worker processes; each sample's
    augmentation is drawn from its own seed ``(engine.seed, pass, position)``, so the data do not depend on
    the number of workers and a resume is bit-exact with any value.

    ``train_images`` / ``val_images`` name the image folder of ``train`` / ``val`` (a COCO json); ``None``
    finds it among the standard layouts (``images/`` beside the json, ``annotations/instances_<split>.json``
    beside ``<split>/``, the json's own folder: :func:`detbalance.data.image_root_candidates`).
    ``aspect_ratio_group_factor`` groups each batch's images by aspect ratio as torchvision's detection
    reference does (``--aspect-ratio-group-factor``, default 3: 8 bins of width / height; ``None`` turns it
    off); on square images (the built-in benchmark) there is one group and the batches are the ungrouped ones.
    """

    train: str = "builtin:tiny"
    val: str | None = None
    augment: bool = True
    num_workers: int = 0
    seed: int = 0
    train_images: str | None = None
    val_images: str | None = None
    aspect_ratio_group_factor: int | None = 3

    def __post_init__(self) -> None:
        _require(bool(self.train), "train", "must not be empty")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        for key in ("train_images", "val_images"):
            _require(getattr(self, key) != "", key, "must name a folder or be none")
        for key, spec in (("train_images", self.train), ("val_images", self.val)):
            if getattr(self, key) is not None and spec is not None and spec.startswith("builtin"):
                raise ConfigError(key, f"an image folder goes with a COCO json, not the built-in benchmark {spec!r}")
        _require(
            self.aspect_ratio_group_factor is None or self.aspect_ratio_group_factor >= 0,
            "aspect_ratio_group_factor",
            f"must be >= 0 or none (torchvision's default is 3), got {self.aspect_ratio_group_factor}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """The torchvision detector: a small preset trained from scratch, or torchvision's model zoo by name.

    ``name``: a small preset, ``"retinanet"``, ``"faster_rcnn"`` or ``"ssd"`` (built by
    ``detectors.build_detector`` with ``backbone``, ``norm``, ``head_convs`` and ``image_size``; ``image_size =
    None`` takes the larger side of the first training image), or one of torchvision's detection builders
    (:data:`detbalance.detectors.zoo.ZOO`: ``retinanet_resnet50_fpn_v2``, ``fcos_resnet50_fpn``,
    ``fasterrcnn_resnet50_fpn_v2``, ``ssdlite320_mobilenet_v3_large``, ...), built by torchvision with
    ``weights``, ``weights_backbone``, ``trainable_backbone_layers``, ``min_size``, ``max_size``,
    ``image_mean`` and ``image_std`` (``None``: torchvision's default; weights ``None``: from scratch). The
    model's family (``arch``: retinanet, fcos, faster_rcnn, ssd) decides which remedies fit.

    ``arch`` is the key of earlier versions: in TOML and ``--set`` it is read as ``name``.
    """

    name: str = "retinanet"
    backbone: str = "tiny"
    image_size: int | None = None
    norm: Literal["bn", "gn"] = "bn"
    head_convs: int = 1
    weights: str | None = None
    weights_backbone: str | None = None
    trainable_backbone_layers: int | None = None
    min_size: int | None = None
    max_size: int | None = None
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    # The Faster R-CNN RPN's training proposal pool (issue 21), the candidates a RoI sampler draws from:
    # proposals kept per level before NMS and per image after it. ``None``: ``detectors.faster_rcnn_sizes``
    # (600 / 128 below 512 px). The samplers suite sets 2000 / 1000 (OHEM's regime, B / R of a few %). Small
    # presets only: torchvision's zoo models keep their own pool (fasterrcnn_*: 2000 / 2000 in training).
    rpn_pre_nms_top_n_train: int | None = None
    rpn_post_nms_top_n_train: int | None = None

    def __post_init__(self) -> None:
        try:
            model_family(self.name)
        except ValueError as err:
            raise ConfigError("name", str(err)) from None
        _require(self.image_size is None or self.image_size >= 32, "image_size", f"must be >= 32, got {self.image_size}")
        _require(self.head_convs >= 0, "head_convs", f"must be >= 0, got {self.head_convs}")
        for key in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, f"must be >= 1 or \"none\", got {value}")
        for key in ("min_size", "max_size"):
            v = getattr(self, key)
            _require(v is None or v >= 32, key, f"must be >= 32, got {v}")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ConfigError("min_size", f"{self.min_size} must not exceed model.max_size = {self.max_size}")
        _require(self.image_std is None or min(self.image_std) > 0, "image_std", f"must be > 0, got {self.image_std}")
        if self.name not in ZOO:
            zoo_only = ("weights_backbone", "trainable_backbone_layers", "min_size", "max_size")
            for key in zoo_only:
                _require(
                    getattr(self, key) is None, key,
                    f"applies to torchvision's zoo models ({list(ZOO)}), not to the small preset {self.name!r} "
                    "(it uses model.image_size and trains from scratch)",
                )
            _require(
                self.weights is None or is_weights_file(self.weights), "weights",
                f"the small preset {self.name!r} takes only a local .pth state dict, got {self.weights!r}",
            )
            return
        for key, default in (("backbone", "tiny"), ("norm", "bn"), ("head_convs", 1), ("image_size", None),
                             ("rpn_pre_nms_top_n_train", None), ("rpn_post_nms_top_n_train", None)):
            _require(
                getattr(self, key) == default, key,
                f"applies to the small presets only; {self.name!r} is torchvision's"
                + (" (set model.min_size / model.max_size)" if key == "image_size" else ""),
            )
        for key in ("weights", "weights_backbone"):
            spec = getattr(self, key)
            if spec is None or (key == "weights" and is_weights_file(spec)):
                continue  # a file is read (and checked) when the model is built
            try:
                check_weights_name(self.name, spec, part=key, key="")  # type: ignore[arg-type]
            except ValueError as err:
                raise ConfigError(key, str(err).removeprefix(": ")) from None
        if self.weights is not None and self.weights_backbone is not None:
            raise ConfigError("weights_backbone", "not used when model.weights loads the whole detector; give one")
        if self.trainable_backbone_layers is not None:
            top = ZOO[self.name].max_trainable_layers
            _require(0 <= self.trainable_backbone_layers <= top, "trainable_backbone_layers",
                     f"must be in [0, {top}] for {self.name}, got {self.trainable_backbone_layers}")
            pretrained = (self.weights is not None and not is_weights_file(self.weights)) or (
                self.weights_backbone is not None
            )
            _require(pretrained, "trainable_backbone_layers",
                     "needs torchvision pretrained weights (model.weights or model.weights_backbone by name); "
                     "without them torchvision trains every layer")
        if ZOO[self.name].fixed_size:
            _require(self.max_size is None, "max_size",
                     f"{self.name} takes a fixed square input: set model.min_size (its side) only")
            _require(self.name != "ssd300_vgg16" or self.min_size in (None, 300), "min_size",
                     f"ssd300_vgg16's default boxes are laid out for 300 px, got {self.min_size}")

    @property
    def arch(self) -> str:
        """The model's family: ``"retinanet"``, ``"fcos"``, ``"faster_rcnn"`` or ``"ssd"`` (which remedies fit)."""
        return model_family(self.name)

    @property
    def is_zoo(self) -> bool:
        """Whether ``name`` is one of torchvision's detection builders (not a small preset)."""
        return self.name in ZOO


@dataclass(frozen=True)
class RemedyConfig:
    """The imbalance remedy. ``None`` everywhere means the detector's standard (torchvision) behaviour:

    * ``cls_loss``: RetinaNet sigmoid focal (alpha 0.25, gamma 2); Faster R-CNN / SSD softmax CE;
    * ``box_loss``: RetinaNet smooth L1 (beta 1/9); SSD smooth L1; Faster R-CNN's RoI head torchvision's
      smooth L1 (beta 1/9; a configured box loss replaces it in the RoI head, the RPN keeps its own);
    * ``normalizer``: RetinaNet ``per_batch`` (the focal paper);
    * ``roi_sampler`` / ``rpn_sampler``: Faster R-CNN fixed ratio 512 @ 0.25 / 256 @ 0.5;
    * ``ssd_mining``: SSD 3:1 hard negatives;
    * ``class_weights``, ``repeat_factor``, ``bootstrap``: off;
    * ``assigner``: RetinaNet's IoU matching (0.5 / 0.4); ``{name = "atss", topk = 9}`` is ATSS;
    * ``pisa``: off; ``{}`` is PISA's ISR-P + CARL (RetinaNet, Faster R-CNN).
    """

    cls_loss: ClsLossConfig | None = None
    box_loss: BoxLossConfig | None = None
    normalizer: NormalizerConfig | None = None
    roi_sampler: RoISamplerConfig | None = None
    rpn_sampler: RPNSamplerConfig | None = None
    ssd_mining: SSDMiningConfig | None = None
    class_weights: ClassWeightsConfig | None = None
    repeat_factor: RepeatFactorConfig | None = None
    bootstrap: BootstrapConfig | None = None
    assigner: AssignerConfig | None = None
    pisa: PISAConfig | None = None


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser. ``momentum`` is SGD's; ``betas`` AdamW's; ``grad_clip`` a max global L2 norm.

    ``decay_all``: weight decay on every parameter, biases and normalisation layers included, as torchvision's
    detection reference does (its ``--norm-weight-decay`` unset; the ``finetune`` recipe); ``false`` (default)
    decays only weights of rank >= 2.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    grad_clip: float | None = None
    decay_all: bool = False

    def __post_init__(self) -> None:
        _require(self.lr > 0.0, "lr", f"must be > 0, got {self.lr}")
        _require(self.momentum >= 0.0, "momentum", f"must be >= 0, got {self.momentum}")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "betas", f"must lie in [0, 1), got {self.betas}")
        _require(self.weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", f"must be > 0, got {self.grad_clip}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule over optimiser steps: linear warmup from ``warmup_factor * lr`` over
    ``warmup_iters`` steps, then ``cosine`` (down to ``min_lr_factor * lr``), ``step`` (multiply by
    ``gamma`` at each step in ``milestones``) or ``constant``."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_factor: float = 0.0

    def __post_init__(self) -> None:
        _require(self.warmup_iters >= 0, "warmup_iters", f"must be >= 0, got {self.warmup_iters}")
        _require(0.0 < self.warmup_factor <= 1.0, "warmup_factor", f"must be in (0, 1], got {self.warmup_factor}")
        _require(
            all(m > 0 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
            "milestones",
            f"must be increasing positive step numbers, got {list(self.milestones)}",
        )
        _require(0.0 < self.gamma <= 1.0, "gamma", f"must be in (0, 1], got {self.gamma}")
        _require(0.0 <= self.min_lr_factor <= 1.0, "min_lr_factor", f"must be in [0, 1], got {self.min_lr_factor}")


@dataclass(frozen=True)
class EngineConfig:
    """The training run. The budget is ``iterations`` optimiser steps (an epoch-free loop over the data:
    each pass is reshuffled from ``(seed, pass)``); one step consumes ``accumulate`` batches of
    ``batch_size`` images per process. ``eval_interval`` / ``checkpoint_interval`` ``None``: only at the end.
    ``device = "auto"`` takes CUDA when available. ``amp`` autocasts (bf16 on a GPU that supports
    it, else fp16 with a grad scaler; bf16 on CPU). ``record`` attaches a ``BalanceRecorder`` and writes ``recorder.jsonl``.
    ``eval_train`` also evaluates on the training images (no augmentation), logged with ``"split":
    "train"``: a measure of fit, not of generalisation. ``sync_bn`` converts BatchNorm layers to
    ``SyncBatchNorm`` under DDP (CUDA only), so that batch statistics are taken over all processes."""

    iterations: int = 1000
    batch_size: int = 8
    accumulate: int = 1
    eval_interval: int | None = None
    checkpoint_interval: int | None = None
    log_interval: int = 10
    eval_batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    deterministic: bool = True
    record: bool = False
    eval_train: bool = False
    sync_bn: bool = False

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.accumulate >= 1, "accumulate", f"must be >= 1, got {self.accumulate}")
        for name in ("eval_interval", "checkpoint_interval", "eval_batch_size"):
            v = getattr(self, name)
            _require(v is None or v >= 1, name, f"must be >= 1, got {v}")
        _require(self.log_interval >= 1, "log_interval", f"must be >= 1, got {self.log_interval}")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. Cross-section rules (which remedies exist for which detector) are checked here."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    remedy: RemedyConfig = field(default_factory=RemedyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not _DEFER_COMBINATIONS.get():
            _check_combinations(self)


# Set while apply_overrides applies a list of overrides: the rules that tie sections together are checked
# once, on the result, so that ``--set engine.iterations=50 --set schedule.warmup_iters=5`` works in any order.
_DEFER_COMBINATIONS: contextvars.ContextVar[bool] = contextvars.ContextVar("defer_combinations", default=False)


def _models_of(families: Sequence[str]) -> str:
    names = [n for n in ("retinanet", "faster_rcnn", "ssd") if n in families]
    names += [n for n in ZOO if model_family(n) in families]
    return ", ".join(repr(n) for n in names)


def _check_combinations(cfg: ExperimentConfig) -> None:
    arch = cfg.model.arch
    name = cfg.model.name
    r = cfg.remedy
    only = {
        "roi_sampler": ("faster_rcnn",),
        "rpn_sampler": ("faster_rcnn",),
        "bootstrap": ("faster_rcnn",),
        "normalizer": ("retinanet", "fcos"),
        "ssd_mining": ("ssd",),
        "box_loss": ("retinanet", "ssd", "faster_rcnn"),
        "assigner": ("retinanet", "fcos"),
        "pisa": ("retinanet", "faster_rcnn"),
    }
    why = {
        "roi_sampler": "RoI sampling (fixed ratio, OHEM, S-OHEM) exists only in the two-stage Faster R-CNN",
        "rpn_sampler": "only Faster R-CNN has an RPN",
        "bootstrap": "offline bootstrapping feeds mined negatives to the RoI head of Faster R-CNN",
        "normalizer": "the positive-count normaliser is RetinaNet's and FCOS's (SSD divides by its positives itself)",
        "ssd_mining": "hard negative mining at 3:1 is SSD's sampler",
        "box_loss": "FCOS keeps its GIoU and centerness",
        "assigner": "the anchor assigner (ATSS) is an option of the dense sigmoid heads (RetinaNet, FCOS)",
        "pisa": "ISR-P and CARL are wired for RetinaNet's and Faster R-CNN's heads",
    }
    for key, archs in only.items():
        value = getattr(r, key)
        if value is not None and arch not in archs:
            raise ConfigError(
                f"remedy.{key}",
                f"not available with model.name = {name!r}, a {arch} model ({why[key]}); remove it or set "
                f"model.name to one of {_models_of(archs)}",
            )
    for key in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train"):
        if getattr(cfg.model, key) is not None and arch != "faster_rcnn":
            raise ConfigError(f"model.{key}", f"sets the RPN's proposal pool; model.arch = {arch!r} has no RPN")
    if isinstance(r.cls_loss, GHMCConfig) and arch not in ("retinanet", "fcos"):
        raise ConfigError(
            "remedy.cls_loss",
            f"GHM-C is a sigmoid (one-vs-all) loss and needs a retinanet or fcos model (model.name one of "
            f"{_models_of(('retinanet', 'fcos'))}), got {name!r}, a {arch} model",
        )
    if isinstance(r.cls_loss, QFLConfig | VFLConfig) and arch not in ("retinanet", "fcos"):
        raise ConfigError(
            "remedy.cls_loss",
            f"{r.cls_loss.name.upper()} is a sigmoid loss on IoU-quality targets of a dense head and needs a "
            f"retinanet or fcos model (model.name one of {_models_of(('retinanet', 'fcos'))}), got {name!r}, "
            f"a {arch} model",
        )
    if isinstance(r.cls_loss, SeesawConfig | EQLv2Config | FederatedConfig) and arch != "faster_rcnn":
        raise ConfigError(
            "remedy.cls_loss",
            f"{r.cls_loss.name} is a loss for a two-stage RoI classifier and needs model.arch = 'faster_rcnn', "
            f"got {arch!r}",
        )
    if isinstance(r.box_loss, GHMRConfig) and arch != "retinanet":
        raise ConfigError("remedy.box_loss", f"GHM-R is only wired for retinanet models, got {name!r}, a {arch} model")
    if isinstance(r.box_loss, GIoUConfig) and arch != "retinanet":
        raise ConfigError(
            "remedy.box_loss", f"GIoU needs decoded boxes; only retinanet models provide them, got {name!r}, a {arch} model"
        )
    if r.pisa is not None and arch == "retinanet" and (isinstance(r.cls_loss, GHMCConfig)
                                                       or isinstance(r.box_loss, GHMRConfig)):
        raise ConfigError(
            "remedy.pisa",
            "ISR-P and CARL weight each positive's loss; GHM-C / GHM-R normalise themselves and cannot take them",
        )
    e = cfg.engine
    if cfg.schedule.warmup_iters >= e.iterations:
        raise ConfigError(
            "schedule.warmup_iters",
            f"{cfg.schedule.warmup_iters} warm-up steps would cover the whole run of engine.iterations = "
            f"{e.iterations} (the learning rate would never reach optim.lr); set schedule.warmup_iters below "
            f"{e.iterations}, e.g. --set schedule.warmup_iters={e.iterations // 10}",
        )
    if cfg.remedy.bootstrap is not None and e.iterations < cfg.remedy.bootstrap.rounds + 1:
        raise ConfigError(
            "remedy.bootstrap.rounds",
            f"{cfg.remedy.bootstrap.rounds} rounds need engine.iterations >= {cfg.remedy.bootstrap.rounds + 1}",
        )


# ------------------------------------------------------------------------------- dict <-> dataclass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` (from TOML or an override) against the annotation ``tp``; return the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or value == "none"):
            return None
        options = [a for a in args if a is not type(None)]
        classes = [a for a in options if _is_dataclass_type(a)]
        if classes:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                if isinstance(value, tuple(classes)):
                    return value
                raise ConfigError(key, f"expected one of {[c.__name__ for c in classes]}, got {type(value).__name__}")
            if not isinstance(value, Mapping):
                raise ConfigError(key, f"expected a table (or \"none\"), got {value!r}")
            return _from_dict(_pick_variant(classes, value, key), value, key)
        errors = []
        for a in options:
            try:
                return _convert(value, a, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(key, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected an array, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"expected an array of {len(args)} values, got {list(value)!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a bug in this module, not user input


def _pick_variant(classes: list[type], value: Mapping[str, Any], key: str) -> type:
    if len(classes) == 1:
        return classes[0]
    names = {_hints(c)["name"].__args__[0]: c for c in classes}
    if "name" not in value:
        raise ConfigError(f"{key}.name", f"is required, one of {list(names)}")
    if value["name"] not in names:
        raise ConfigError(f"{key}.name", f"must be one of {list(names)}, got {value['name']!r}")
    return names[value["name"]]


# Keys of earlier versions, read as their new name: {class: {old: new}}.
_ALIASES: dict[type, dict[str, str]] = {ModelConfig: {"arch": "name"}}


def _resolve_aliases(cls: type, data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    aliases = _ALIASES.get(cls, {})
    if not any(k in data for k in aliases):
        return data
    out = dict(data)
    for old, new in aliases.items():
        if old in out:
            where = f"{prefix}.{old}" if prefix else old
            value = out.pop(old)
            if new in out and out[new] != value:
                raise ConfigError(where, f"is the earlier name of {new!r}; give one of them, got {value!r} and {out[new]!r}")
            out[new] = value
    return out


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    data = _resolve_aliases(cls, data, prefix)
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(where, f"unknown key; valid keys here: {sorted(fields)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if cls is ExperimentConfig or not prefix:
            raise
        raise ConfigError(f"{prefix}.{err.key}", str(err).split(": ", 1)[-1]) from None


def config_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from nested dicts (missing keys take defaults)."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a configuration must be a table, got {type(data).__name__}")
    return _from_dict(ExperimentConfig, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dicts of a config dataclass (tuples become lists, ``None`` stays ``None``)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


# ------------------------------------------------------------------------------------------------ TOML


def _toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return _toml_value(k)


def _toml_value(v: Any) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write the non-finite float {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        out = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{out}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(
    cfg: ExperimentConfig, *, leave_out: Mapping[str, Any] | None = None, rename: Mapping[str, str] | None = None
) -> str:
    """The whole resolved config as TOML (every key written; ``None`` as ``"none"``).

    ``load_toml(dump_toml(cfg)) == cfg`` for every valid config (floats use ``repr``, which round-trips).

    Args:
        cfg: The config.
        leave_out: ``{dotted key: value}``: a key is not written while it holds that value (its default), so
            that the text of a config that does not use a newer key is the text earlier versions wrote (what
            ``detbalance compare`` keys its run folders by). ``load_toml`` restores the default.
        rename: ``{dotted key: earlier name}``: write a key under the name earlier versions gave it (an alias
            :func:`load_toml` reads), e.g. ``{"model.name": "arch"}``, for the same reason.
    """
    lines: list[str] = []
    data = config_to_dict(cfg)
    for dotted, value in (leave_out or {}).items():
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == value:
            del node[leaf]
    for dotted, earlier in (rename or {}).items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            renamed = {(earlier if k == leaf else k): v for k, v in node.items()}
            node.clear()
            node.update(renamed)

    def table(prefix: str, d: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
        subtables = {k: v for k, v in d.items() if isinstance(v, Mapping)}
        if prefix:
            if lines:
                lines.append("")
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables.items():
            table(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v)

    table("", data)
    return "\n".join(lines) + "\n"


def load_toml(text: str, *, source: str = "<string>") -> ExperimentConfig:
    """Parse TOML text into a validated :class:`ExperimentConfig`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{source}: invalid TOML: {err}") from None
    return config_from_dict(data)


# ------------------------------------------------------------------------------------------ overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], value)``.

    ``value`` is read as a TOML value (``3``, ``0.5``, ``true``, ``[1, 2]``, ``"text"``); anything that
    is not valid TOML is taken as a bare string (``data.train=builtin:tiny``, ``remedy.cls_loss=none``).
    """
    if "=" not in text:
        raise ConfigError("", f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    path = key.split(".")
    if not key or any(not p for p in path):
        raise ConfigError(key, f"--set expects a dotted key like engine.iterations, got {text!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(cfg: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """Apply ``--set`` overrides in order and re-validate; errors name the key.

    ``a.b=none`` sets an optional field or section to ``None``; ``a.b.name=X`` switches a multi-choice
    section to class ``X`` with its defaults; ``a.b.c=v`` on a ``None`` section creates it from defaults
    (for multi-choice sections set ``a.b.name`` first).
    """
    data = config_to_dict(cfg)
    token = _DEFER_COMBINATIONS.set(True)
    try:
        cfg = _apply_each(data, cfg, overrides)
    finally:
        _DEFER_COMBINATIONS.reset(token)
    _check_combinations(cfg)
    return cfg


def _apply_each(data: dict[str, Any], cfg: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    for text in overrides:
        path, value = parse_override(text)
        if path == ["model", "arch"]:
            path = ["model", "name"]  # the earlier name of model.name
        node: Any = data
        cls: Any = ExperimentConfig
        multi_choice = False  # a section whose ``name`` picks its class (not model.name, a plain value)
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if cls is None or not isinstance(node, dict):
                raise ConfigError(where, "is not a section")
            hints = _hints(cls)
            if part not in hints:
                raise ConfigError(where, f"unknown key; valid keys here: {sorted(hints)}")
            classes = _dataclass_options(hints[part])
            if not classes:
                raise ConfigError(where, "is a value, not a section")
            if node[part] is None:
                if len(classes) == 1:
                    node[part] = config_to_dict(classes[0]())
                elif path[i + 1 :] != ["name"]:
                    names = [_hints(c)["name"].__args__[0] for c in classes]
                    raise ConfigError(where, f"is none; choose it first with --set {where}.name=<one of {names}>")
                else:
                    node[part] = {}
            node = node[part]
            multi_choice = len(classes) > 1
            if len(classes) == 1:
                cls = classes[0]
            else:
                cls = next((c for c in classes if _hints(c)["name"].__args__[0] == node.get("name")), None)
        leaf = path[-1]
        if leaf == "name" and cls is None:
            pass  # a multi-choice section being chosen; validated by config_from_dict below
        else:
            hints = _hints(cls)
            if leaf not in hints:
                raise ConfigError(".".join(path), f"unknown key; valid keys here: {sorted(hints)}")
            if isinstance(node.get(leaf), dict) and value != "none":
                raise ConfigError(".".join(path), f"is a section; set one of its keys ({sorted(node[leaf])}) or none")
        if leaf == "name" and multi_choice and node.get("name") != value:
            node.clear()
        node[leaf] = value
        cfg = config_from_dict(data)
        data = config_to_dict(cfg)
    return cfg


def _dataclass_options(tp: Any) -> list[type]:
    if _is_dataclass_type(tp):
        return [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
    return []


def load_config(path: str | Path | None = None, *, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a TOML file (or start from the defaults when ``path`` is ``None``) and apply ``overrides``."""
    if path is None:
        cfg = ExperimentConfig()
    else:
        p = Path(path)
        if p.is_dir():
            raise IsADirectoryError(f"config {str(p)!r} is a folder, not a TOML file")
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"config {str(p)!r} is not a TOML file (not UTF-8 text at byte {err.start})") from None
        cfg = load_toml(text, source=str(p))
    return apply_overrides(cfg, overrides)
