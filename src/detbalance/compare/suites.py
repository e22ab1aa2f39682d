"""The suites of ``detbalance compare`` and the training recipe they share with ``configs/``.

A suite is a set of arms (methods) compared on one detector. Within a suite every arm trains on the same
data, from the same initial weights for a given seed (the model is built right after seeding, and the
remedies add no parameters), for the same number of iterations with the same recipe, and is evaluated with
the official COCO metric (faster-coco-eval) on the same validation split. Seeds change the initial weights
and the data order.

The recipe (optimiser, learning rate, warm-up, decay, gradient clipping) is defined once, by
:func:`recipe`; the shipped ``configs/*.toml`` use the ``sgd`` recipe at their batch size, so training a
shipped config reproduces its compare arm run with ``--optim sgd`` (``tests/test_compare_recipes.py``
holds them to it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from detbalance.config import (
    ATSSConfig,
    BalancedL1Config,
    BootstrapConfig,
    CEConfig,
    ClassWeightsConfig,
    ConfigError,
    DataConfig,
    EngineConfig,
    EQLv2Config,
    ExperimentConfig,
    FederatedConfig,
    FixedRatioConfig,
    FocalConfig,
    GHMCConfig,
    GHMRConfig,
    IoUBalancedConfig,
    ModelConfig,
    OHEMConfig,
    OptimConfig,
    PISAConfig,
    QFLConfig,
    RemedyConfig,
    RepeatFactorConfig,
    ScheduleConfig,
    ScoreHLRConfig,
    SeesawConfig,
    SSDMiningConfig,
    StratifiedOHEMConfig,
    VFLConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)

__all__ = [
    "COMPARE_OWNS",
    "DEFAULT_ITERS",
    "FAMILIES_OF_ARCH",
    "FULL_ITERS",
    "MIN_CURVE_POINTS",
    "SUITES",
    "Method",
    "Suite",
    "model_of",
    "recipe",
    "suite_configs",
    "suites_for_family",
]

Optimizer = Literal["sgd", "adamw", "finetune"]
Decay = Literal["cosine", "step"]
Budget = Literal["short", "full"]

# Iterations per run of the default `detbalance compare` (RetinaNet, 5 losses, batch 16, one seed): sized
# to finish in about 10 minutes on 2 CPU cores (see README, "What `compare` shows").
DEFAULT_ITERS = 700

FULL_ITERS = 6000
"""``--budget full`` for every suite: the longest budget measured (docs/pilots/optim/), not a plateau."""

FULL_BUDGET_EVIDENCE = (
    "6000 iterations, the longest budget measured on the built-in benchmark, and not a plateau by issue 12's rule (the best arm's AP "
    "changing by < 1 AP over the last quarter): the losses suite's best arm, focal under AdamW (seed 0), moved "
    "+2.5 AP over the last quarter at 3000 iterations (48.1 -> 50.6) and again +2.5 at 6000 (54.2 -> 56.7); "
    "SSD's 3:1 mining arm moved +2.9 at 3000 under SGD. Doubling the budget raised focal's final AP by 6.1, so "
    "these models are still learning; the report's plateau check says so for every suite"
)

_RETINANET_OPTIM_EVIDENCE = (
    "the SGD vs AdamW learning-curve study on the built-in benchmark (docs/pilots/optim/, losses suite, seed 0, "
    "3000 iterations): under "
    "the papers' SGD recipe CE reached 48.2 AP, GHM-C 38.1 and focal 32.6; under AdamW focal 50.6, GHM-C 46.2 "
    "and CE 44.0. Under SGD the arms finish in the order of the gradient norm each sends into the "
    "classification head at initialisation (CE 13.2, GHM-C 1.43, focal 0.27; docs/pilots/optim/grad_scale.py): "
    "from scratch, at a budget 30x shorter than the focal paper's 90k iterations from ImageNet weights, SGD's "
    "single learning rate turns each loss's scale into its step size, which AdamW's per-parameter "
    "normalisation removes. `--optim sgd` runs the papers' recipe"
)

MIN_CURVE_POINTS = 8
"""Every run is evaluated at least this many times (evenly spaced), so each learning curve has >= 8 points."""


def recipe(
    optim: Optimizer, *, batch_size: int, iters: int, decay: Decay = "cosine"
) -> tuple[OptimConfig, ScheduleConfig]:
    """The training recipe shared by every compare suite and the shipped configs.

    * ``sgd``: the papers' recipe (focal paper sec. 5, GHM / mmdetection ``retinanet_r50_fpn_1x``): SGD,
      momentum 0.9, weight decay 1e-4, lr 0.01 x ``batch_size`` / 16 (linear scaling), gradient clipping at
      global norm 35 (mmdetection's GHM config).
    * ``adamw``: AdamW, lr 2e-3 (not scaled with the batch), weight decay 1e-4, clipping at norm 10: trains the
      small CPU detectors quickly, but a constant scale on a loss term largely cancels under Adam, so remedies
      that act through loss scale show less of their effect than under SGD.

    Both warm up linearly from 0.001 x lr over ``min(100, iters // 10)`` steps, then decay: ``cosine`` to 0, or
    ``step`` x 0.1 at 8/12 and 11/12 of the run (mmdetection's 1x schedule).

    * ``finetune``: torchvision's detection reference recipe (``references/detection/train.py``, its 26-epoch
      schedule), the one for models loaded with pretrained weights: SGD, lr 0.02 x ``batch_size`` / 16 (its
      0.02 is for 8 GPUs x 2 images), momentum 0.9, weight decay 1e-4 on every parameter (its
      ``--norm-weight-decay`` unset), no clipping; linear warm-up from lr / 1000 over ``min(1000, iters // 26 - 1)``
      steps (the reference warms up over ``min(1000, one epoch - 1)`` iterations of its first epoch; a budget of
      ``iters`` is read as its 26 epochs, so one epoch is ``iters // 26``: a short budget gets a short warm-up,
      none below 52 iterations);
      then x 0.1 at 16/26 and 22/26 of the run (its ``--lr-steps 16 22``). ``decay`` does not apply. AMP on CUDA
      is set by :func:`suite_configs` (``engine.amp``; bf16 where the GPU has it, else fp16 with a grad scaler).

    Args:
        optim: ``"sgd"``, ``"adamw"`` or ``"finetune"``.
        batch_size: images per optimiser step over all processes (sets SGD's lr).
        iters: optimiser steps of the run (sets the warm-up and the step milestones).
        decay: ``"cosine"`` or ``"step"``.

    Returns:
        ``(OptimConfig, ScheduleConfig)``.
    """
    if optim == "sgd":
        opt = OptimConfig(name="sgd", lr=0.01 * batch_size / 16, momentum=0.9, weight_decay=1e-4, grad_clip=35.0)
    elif optim == "adamw":
        opt = OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4, grad_clip=10.0)
    elif optim == "finetune":
        opt = OptimConfig(name="sgd", lr=0.02 * batch_size / 16, momentum=0.9, weight_decay=1e-4, grad_clip=None,
                          decay_all=True)
        milestones = tuple(sorted({max(1, iters * 16 // 26), max(2, iters * 22 // 26)}))
        return opt, ScheduleConfig(name="step", warmup_iters=max(0, min(1000, iters // 26 - 1)), warmup_factor=0.001,
                                   milestones=milestones, gamma=0.1)
    else:
        raise ValueError(f"--optim must be 'sgd', 'adamw' or 'finetune', got {optim!r}")
    warmup = min(100, max(1, iters // 10))
    if decay == "cosine":
        sched = ScheduleConfig(name="cosine", warmup_iters=warmup)
    elif decay == "step":
        milestones = tuple(sorted({max(1, iters * 8 // 12), max(2, iters * 11 // 12)}))
        sched = ScheduleConfig(name="step", warmup_iters=warmup, milestones=milestones, gamma=0.1)
    else:
        raise ValueError(f"--decay must be 'cosine' or 'step', got {decay!r}")
    return opt, sched


@dataclass(frozen=True)
class Method:
    """One arm of a suite: a key, a label for tables, the remedy it trains with.

    ``train_preset`` trains this arm on another built-in preset than the suite's (the noise suite's clean
    arms); it is evaluated on the suite's validation split like every other arm. ``clean_of`` names the arm
    this one is the clean-label twin of (same remedy, clean annotations): the difference between the two is
    what the noise costs that remedy.
    """

    key: str
    label: str
    remedy: RemedyConfig
    description: str = ""
    train_preset: str | None = None
    clean_of: str | None = None


@dataclass(frozen=True)
class Suite:
    """A set of methods compared on one detector; ``baseline`` is the arm every other is paired against.

    Attributes:
        primary: the metric the suite's findings speak to (``"AP"``, or ``"rare_AP"`` for ``classes``).
        optim: the default optimiser of the suite's recipe (``--optim`` overrides it).
        optim_evidence: why that default (the learning-curve study's evidence).
        budgets: iterations per run for ``--budget short`` and ``--budget full`` (the study's budget).
        budget_evidence: what set ``budgets["full"]`` (and whether it is a plateau).
        builtin_only: the suite needs the built-in benchmark (it controls the label noise), so it does not
            run on a user's ``--data``.
        model_settings: ``ModelConfig`` keys the suite sets beside ``arch`` (the samplers suite's proposal
            pool, ``rpn_pre_nms_top_n_train`` / ``rpn_post_nms_top_n_train``).
        regime_of: this suite is suite ``regime_of`` in an earlier regime, kept so that the study shows both
            (``samplers_pool128``); it runs when named or with ``--suite all``, never by default.
        also_families: model families the suite runs on besides its own (``classes``: Faster R-CNN too).

    ``description`` may name facts of the data actually used, filled in by :meth:`describe`:
    ``{image_size}`` (the model's input side in px), ``{train_classes}`` and ``{val_classes}`` (how the
    instances spread over the classes of each split), so that a report on a user's data never describes the
    built-in benchmark.

    The clean-label twins of arms (``Method.clean_of``, the noise suite) are listed by :attr:`clean`.
    """

    title: str
    arch: str
    preset: str
    baseline: str
    methods: tuple[Method, ...]
    description: str = ""
    primary: str = "AP"
    optim: Optimizer = "adamw"
    optim_evidence: str = _RETINANET_OPTIM_EVIDENCE
    budgets: dict[str, int] = field(default_factory=lambda: {"short": DEFAULT_ITERS, "full": FULL_ITERS})
    budget_evidence: str = FULL_BUDGET_EVIDENCE
    builtin_only: bool = False
    model_settings: dict[str, int] = field(default_factory=dict)
    regime_of: str | None = None
    also_families: tuple[str, ...] = ()

    def describe(self, *, image_size: int, train_classes: str, val_classes: str) -> str:
        """The description with the facts of the data actually used filled in."""
        return self.description.format(image_size=image_size, train_classes=train_classes, val_classes=val_classes)

    @property
    def families(self) -> tuple[str, ...]:
        """The model families the suite runs on (``compare --model``): its own, FCOS beside RetinaNet, and
        ``also_families``."""
        return FAMILIES_OF_ARCH[self.arch] + self.also_families

    @property
    def clean(self) -> dict[str, str]:
        """``{arm: its clean-label twin}`` for the arms that have one."""
        return {m.clean_of: m.key for m in self.methods if m.clean_of is not None}


_SSD_SHORT = 1500
_SSD_OPTIM_EVIDENCE = (
    "the SGD vs AdamW learning-curve study on the built-in benchmark (docs/pilots/optim/, 3:1 mining arm, seed "
    "0, 3000 iterations): "
    "AdamW reached 40.6 AP against 33.0 under SGD and led at every evaluation (e.g. 32.4 vs 23.3 at "
    "iteration 1500). The short budget is 1500 iterations, where the mining arm reached 27.5 AP (700 "
    "gave 16.0)"
)

# RoIs back-propagated per image in the samplers suite: the OHEM paper's B = 128 over N = 2 images. (At
# torchvision's 512 per image, RoIAlign's single-threaded CPU backward takes over half of a training step.)
_ROIS = 64

# The samplers suite's proposal pool in training (issue 21): 2000 per level before NMS, 1000 per image after
# it. In issue 21's pilot (700 iterations, seed 0, AdamW) OHEM - fixed went from -2.2 AP at 128 proposals
# per image to +1.2 at 1000.
_POOL = (("rpn_pre_nms_top_n_train", 2000), ("rpn_post_nms_top_n_train", 1000))

_SAMPLERS_OPTIM_EVIDENCE = (
    "the SGD vs AdamW learning-curve study on the built-in benchmark (docs/pilots/optim/, fixed 1:3 arm, seed 0, "
    "3000 iterations, 128 proposals per image): AdamW reached 58.1 AP against 32.2 under SGD and led at every evaluation (e.g. 48.8 "
    "vs 24.9 at iteration 1500). `--optim sgd` runs the OHEM paper's optimiser"
)

_SAMPLERS_METHODS = (
    "Every method back-propagates 64 RoIs per image, the OHEM paper's budget (B = 128 RoIs over N = 2 "
    "images): 64 sampled at 1:3 (fixed ratio, as Fast R-CNN), the 64 hardest by cls + loc loss after NMS at "
    "0.7 over all RoIs (OHEM), 64 drawn from 4 loss strata (S-OHEM: stage-weighted ranking and loss as in Li "
    "et al.; the schedule w_cls 1.5 -> 0.5, w_loc 0.5 -> 1.5 and the per-stratum distribution are ours, the "
    "paper's full text was not available), or fixed ratio with one round of offline bootstrapping (half the "
    "budget, then mine confident false positives on the un-augmented training set; they follow each image's "
    "flip and fill the background budget first)."
)

_PISA_DESCRIPTION = (
    " PISA is mmdetection's faster-rcnn_r50_fpn_pisa recipe at the suite's budget: the Score-HLR sampler (ISR-N: "
    "64 per image at 0.25, negatives ranked by score hierarchical local rank from the same read-only pass as "
    "OHEM, k 0.5, score_thr 0.05, NMS-match 0.5) with ISR-P (k 2, bias 0) and CARL (k 1, bias 0.2)."
)

_PISA_ARMS = (
    Method(
        "pisa",
        "PISA (ISR-N + ISR-P + CARL)",
        RemedyConfig(roi_sampler=ScoreHLRConfig(num_samples=_ROIS), pisa=PISAConfig()),
    ),
)

_SAMPLER_ARMS = (
    Method("fixed", "fixed 1:3", RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS))),
    Method("ohem", "OHEM", RemedyConfig(roi_sampler=OHEMConfig(num_samples=_ROIS))),
    Method("sohem", "S-OHEM", RemedyConfig(roi_sampler=StratifiedOHEMConfig(num_samples=_ROIS))),
    Method(
        "bootstrap",
        "fixed 1:3 + bootstrapping",
        RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS), bootstrap=BootstrapConfig(rounds=1)),
    ),
)

# Libra R-CNN (Pang et al. 2019) at the suite's budget: IoU-balanced negatives / instance-balanced positives
# (mmdetection's configs/libra_rcnn values, 64 per image at 0.25 instead of 512), balanced L1 (0.5, 1.5, 1.0)
# in the RoI head, and both; the balanced feature pyramid is an architecture change and is not included.
_LIBRA_ARMS = (
    Method("iou_balanced", "IoU-balanced sampling", RemedyConfig(roi_sampler=IoUBalancedConfig(num_samples=_ROIS))),
    Method("balanced_l1", "fixed 1:3 + balanced L1",
           RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS), box_loss=BalancedL1Config())),
    Method("libra", "Libra (IoU-balanced + balanced L1)",
           RemedyConfig(roi_sampler=IoUBalancedConfig(num_samples=_ROIS), box_loss=BalancedL1Config())),
)

_LIBRA_DESCRIPTION = (
    " Libra R-CNN's sampling and loss (Pang et al. 2019; mmdetection 3.3's configs/libra_rcnn, held to a "
    "transcription of its code in tests/reference/mmdet_libra.py): IoU-balanced sampling draws the 48 "
    "negatives of each image evenly from 3 IoU bins over (0, max IoU) (negatives at IoU 0 only fill a "
    "shortfall, as mmdetection's sampler runs after its first call) and the 16 positives evenly over the "
    "ground-truth objects; balanced L1 (alpha 0.5, gamma 1.5, beta 1) replaces the RoI head's smooth L1 "
    "(beta 1/9); Libra is both. Libra's balanced feature pyramid is not included."
)

# The GHM authors' loss weights: GHM-C 1, GHM-R 10 (mmdetection configs/ghm); GHMRConfig defaults to 10.
SUITES: dict[str, Suite] = {
    "losses": Suite(
        title="RetinaNet: loss re-weighting",
        arch="retinanet",
        preset="default",
        baseline="ce",
        description=(
            "Dense one-stage detector, every anchor counts. CE uses the focal paper's prior initialisation "
            "(pi = 0.01) so that it trains at all; alpha-CE uses alpha = 0.75 (focal paper, table 1a); focal "
            "gamma = 2, alpha = 0.25. GHM is the authors' reference, mmdetection's retinanet_ghm config: "
            "GHMC(bins=30, momentum=0.75) and GHMR(mu=0.02, bins=10, momentum=0.7), each called once per FPN "
            "level with the level losses summed, loss weights 1 and 10, normalised by the non-empty bins, "
            "zero-initialised EMA updated only in populated bins, torchvision's background column left out "
            "(held to a transcription of mmdetection's code in tests/reference/mmdet_ghm.py). Our options "
            "(the paper's all-bins normalisation, bias correction, decaying empty bins, one all-level "
            "histogram) are not used here. ATSS + focal: focal loss with ATSS assignment (Zhang et al. 2020, "
            "mmdetection's ATSSAssigner, topk 9 per level, threshold mean + std of the candidates' IoU, centre "
            "inside the object) in place of the IoU matching at 0.5 / 0.4; its control is the focal arm (same "
            "loss, same anchors), so the pair isolates the assignment. The anchors stay torchvision's (several "
            "per location), where mmdetection's ATSS config tiles one. "
            "QFL (GFL, beta 2) and VFL (VarifocalNet, alpha 0.75, gamma 2, "
            "IoU-weighted) are mmdetection 3.3's losses (held to transcriptions in tests/reference/mmdet_quality.py) "
            "with their heads' targets: a positive's target in its class column is the IoU of its decoded, "
            "detached predicted box with its ground truth (VFL: clamped at 1e-6), prior 0.01, normalised by the "
            "positive count; RetinaNet's IoU matching and smooth L1 box loss stay (GFL's ATSS, DFL and "
            "quality-weighted GIoU, VFNet's star-shaped refinement are not part of these arms)."
        ),
        methods=(
            Method("ce", "CE", RemedyConfig(cls_loss=CEConfig())),
            Method("alpha_ce", "alpha-CE (0.75)", RemedyConfig(cls_loss=CEConfig(alpha=0.75))),
            Method("focal", "focal (2, 0.25)", RemedyConfig(cls_loss=FocalConfig(alpha=0.25, gamma=2.0))),
            Method("ghm_c", "GHM-C", RemedyConfig(cls_loss=GHMCConfig())),
            Method("ghm_c_r", "GHM-C + GHM-R", RemedyConfig(cls_loss=GHMCConfig(), box_loss=GHMRConfig())),
            Method(
                "atss_focal",
                "ATSS + focal",
                RemedyConfig(cls_loss=FocalConfig(alpha=0.25, gamma=2.0), assigner=ATSSConfig(topk=9)),
            ),
            Method("qfl", "QFL (beta 2)", RemedyConfig(cls_loss=QFLConfig())),
            Method("vfl", "VFL (0.75, 2)", RemedyConfig(cls_loss=VFLConfig())),
        ),
    ),
    "samplers": Suite(
        title="Faster R-CNN: RoI selection",
        arch="faster_rcnn",
        preset="default",
        baseline="fixed",
        optim_evidence=_SAMPLERS_OPTIM_EVIDENCE,
        model_settings=dict(_POOL),
        description=(
            "Two-stage detector sized for small images (5x5 RoIAlign, 128-unit box head; detectors/build.py), here "
            "at {image_size} px, in OHEM's selection regime: the RPN keeps 2000 proposals per level before NMS and "
            "1000 per image after it in training (model.rpn_pre_nms_top_n_train = 2000, "
            "model.rpn_post_nms_top_n_train = 1000), so each method back-propagates 64 of about 1000 RoIs per "
            "image (B / R ~ 6 %; the OHEM paper: 128 of ~4000 over 2 images, 3 %). " + _SAMPLERS_METHODS
            + _PISA_DESCRIPTION + _LIBRA_DESCRIPTION + " The suite samplers_pool128 keeps the earlier regime (128 proposals per image, "
            "B / R ~ 50 %) for comparison."
        ),
        methods=_SAMPLER_ARMS + _PISA_ARMS + _LIBRA_ARMS,
    ),
    "samplers_pool128": Suite(
        title="Faster R-CNN: RoI selection from 128 proposals (the earlier regime)",
        arch="faster_rcnn",
        preset="default",
        baseline="fixed",
        optim_evidence=_SAMPLERS_OPTIM_EVIDENCE,
        regime_of="samplers",
        description=(
            "The samplers suite's first regime, kept so that the study shows both: the RPN keeps 600 proposals "
            "per level before NMS and 128 per image after it in training (detectors/build.py's sizes for small "
            "images; here {image_size} px), so every method back-propagates 64 of about 130 RoIs per image "
            "(B / R ~ 50 %), where hard-example selection can hardly differ from random sampling. "
            + _SAMPLERS_METHODS
        ),
        methods=_SAMPLER_ARMS,
    ),
    "ssd": Suite(
        title="SSD: negatives",
        arch="ssd",
        preset="default",
        baseline="mining",
        optim_evidence=_SSD_OPTIM_EVIDENCE,
        budgets={"short": _SSD_SHORT, "full": FULL_ITERS},
        description="SSD with 3:1 hard negative mining, with every negative (no mining), and softmax focal loss over all anchors.",
        methods=(
            Method("mining", "3:1 hard negatives", RemedyConfig(ssd_mining=SSDMiningConfig(negative_ratio=3.0))),
            Method("all", "all negatives (CE)", RemedyConfig(ssd_mining=SSDMiningConfig(negative_ratio=None))),
            Method(
                "focal",
                "softmax focal",
                RemedyConfig(cls_loss=FocalConfig(alpha=0.25, gamma=2.0), ssd_mining=SSDMiningConfig(negative_ratio=None)),
            ),
        ),
    ),
    "classes": Suite(
        title="Long-tailed classes",
        arch="retinanet",
        also_families=("faster_rcnn",),
        preset="default",
        baseline="none",
        optim_evidence="the losses suite's evidence (same detector, focal loss as the baseline): " + _RETINANET_OPTIM_EVIDENCE,
        primary="rare_AP",
        description=(
            "RetinaNet with focal loss; training split: {train_classes}; validation split: {val_classes}. "
            "Class-frequency weights: effective number (beta 0.999) on the classification loss; repeat-factor "
            "sampling r(c) = max(1, sqrt(t / f(c))) with t = 0.3, so the rarer classes' images repeat. "
            "The findings speak to rare-class AP."
        ),
        methods=(
            Method("none", "no remedy", RemedyConfig(cls_loss=FocalConfig())),
            Method(
                "weights",
                "class weights",
                RemedyConfig(cls_loss=FocalConfig(), class_weights=ClassWeightsConfig(method="effective_number")),
            ),
            Method("repeat", "repeat factor", RemedyConfig(cls_loss=FocalConfig(), repeat_factor=RepeatFactorConfig(threshold=0.3))),
            Method(
                "both",
                "weights + repeat factor",
                RemedyConfig(
                    cls_loss=FocalConfig(),
                    class_weights=ClassWeightsConfig(method="effective_number"),
                    repeat_factor=RepeatFactorConfig(threshold=0.3),
                ),
            ),
        ),
    ),
    "noise": Suite(
        title="Label noise (outliers)",
        arch="retinanet",
        preset="noisy",
        baseline="focal",
        optim_evidence="the losses suite's evidence (same detector, focal loss as the baseline): " + _RETINANET_OPTIM_EVIDENCE,
        builtin_only=True,
        description=(
            "Trained on the `noisy` preset: balanced classes (so the noise singles out no class), 10 % of "
            "training labels flipped uniformly to another class and 10 % of boxes jittered; the validation "
            "split is clean. These are the outliers GHM-C claims to down-weight. The clean arms train focal "
            "loss and GHM-C on the same images with their clean annotations (`balanced` preset): each loss's "
            "drop from its clean twin is what the noise costs it, and the difference between the two drops "
            "tests GHM-C's claim to be robust to outliers. Each run's gradient-norm density is probed on its own "
            "training images: the noisy ones for the noisy arms, the clean ones for their twins."
        ),
        methods=(
            Method("focal", "focal (2, 0.25)", RemedyConfig(cls_loss=FocalConfig())),
            Method("ghm_c", "GHM-C", RemedyConfig(cls_loss=GHMCConfig())),
            Method("focal_clean", "focal, clean labels", RemedyConfig(cls_loss=FocalConfig()), train_preset="balanced",
                   clean_of="focal"),
            Method("ghm_c_clean", "GHM-C, clean labels", RemedyConfig(cls_loss=GHMCConfig()), train_preset="balanced",
                   clean_of="ghm_c"),
        ),
    ),
    "longtail": Suite(
        title="Faster R-CNN: long-tailed classes",
        arch="faster_rcnn",
        preset="default",
        baseline="ce",
        optim_evidence=(
            "the learning-curve study of the same detector at the same RoI budget (docs/pilots/optim/, fixed 1:3 "
            "arm, seed 0, 3000 iterations, 128 proposals per image): AdamW reached 58.1 AP against 32.2 under SGD. "
            "`--optim sgd` runs the papers' optimiser"
        ),
        primary="rare_AP",
        description=(
            "Faster R-CNN at {image_size} px with the default proposal pool (128 per image in training, as "
            "samplers_pool128) and 64 RoIs per image at 1:3; training split: {train_classes}; validation split: "
            "{val_classes}. On the built-in default preset (data seed 0) the training split holds 8,286 / 2,598 / "
            "806 / 222 / 84 instances of the 5 classes and the balanced validation split 148, 135 and 152 of the "
            "3 rare ones (below 10 % of the most frequent class's training instances): enough for a stable "
            "rare-class AP, so the preset is not made longer-tailed. Only the RoI classifier's loss or the data "
            "sampling changes: softmax CE; CE with effective-number class weights (beta 0.999) per RoI; "
            "repeat-factor sampling with t = 0.3 (as the classes suite); Seesaw (p 0.8, q 2, K + 2 logits; "
            "mmdetection 3.3); EQLv2 (mu 0.8, alpha 4, gamma 12, sigmoid with an objectness column; mmdetection "
            "3.3); the federated loss (detectron2: per batch the classes present plus classes drawn by "
            "(images per class)^0.5; 4 of the 6 label columns kept, as LVIS's 50 of 1,204 cannot be scaled to 5 "
            "classes); and repeat factor + EQLv2, the loss with the largest LVIS AP_r gain among those we could "
            "verify (the EQLv2 authors' README: 0.0 -> 14.9; Seesaw's and the federated loss's AP_r were not "
            "verified). The findings speak to rare-class AP."
        ),
        methods=(
            Method("ce", "CE", RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS))),
            Method(
                "weights",
                "CE + class weights",
                RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS),
                             class_weights=ClassWeightsConfig(method="effective_number")),
            ),
            Method(
                "repeat",
                "CE + repeat factor",
                RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS),
                             repeat_factor=RepeatFactorConfig(threshold=0.3)),
            ),
            Method("seesaw", "Seesaw", RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS), cls_loss=SeesawConfig())),
            Method("eqlv2", "EQLv2", RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS), cls_loss=EQLv2Config())),
            Method(
                "federated",
                "federated loss",
                RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS), cls_loss=FederatedConfig(num_classes_kept=4)),
            ),
            Method(
                "repeat_eqlv2",
                "repeat factor + EQLv2",
                RemedyConfig(roi_sampler=FixedRatioConfig(num_samples=_ROIS), cls_loss=EQLv2Config(),
                             repeat_factor=RepeatFactorConfig(threshold=0.3)),
            ),
        ),
    ),
}


def suite_configs(
    name: str,
    *,
    preset: str | None = None,
    iters: int,
    seed: int,
    batch_size: int = 16,
    device: str = "auto",
    optim: Optimizer | None = None,
    decay: Decay = "cosine",
    data: str | None = None,
    val: str | None = None,
    data_seed: int = 0,
    amp: bool = False,
    workers: int = 0,
    settings: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    unfit: list[tuple[str, str]] | None = None,
) -> list[tuple[Method, ExperimentConfig]]:
    """The experiment of every arm of suite ``name`` for one seed (identical apart from the remedy).

    Args:
        name: a key of :data:`SUITES`.
        preset: built-in benchmark preset (``None``: the suite's own).
        iters: optimiser steps per run.
        seed: the run seed (initial weights, data order).
        batch_size: images per step.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        optim: ``sgd`` | ``adamw`` (``None``: the suite's default).
        decay: ``cosine`` | ``step``.
        data: a COCO json or folder to train on instead of the built-in benchmark (needs ``val``).
        val: the validation COCO json or folder (with ``data``).
        data_seed: the built-in benchmark's generation seed.
        amp: autocast the forward (``engine.amp``); the ``finetune`` recipe turns it on by itself on CUDA.
        workers: data loader worker processes per run (``data.num_workers``).
        settings: a config table (``--config FILE``, read with ``tomllib``) whose keys are set in every arm, after
            the suite's and before ``overrides``; it may not set what the suite or a flag decides
            (:data:`COMPARE_OWNS`).
        overrides: ``--set key=value`` applied to every arm last (never ``remedy.*``: the arms differ there);
            ``--model NAME`` is ``model.name=NAME`` here, and must be of a family the suite runs on
            (:attr:`Suite.families`). A zoo model keeps torchvision's sizes and proposal pools (the suite's
            ``model_settings`` are for its small preset); on Faster R-CNN a RetinaNet suite's focal baseline
            becomes the detector's own cross-entropy.
        unfit: when given, arms whose remedy the model does not take (GHM-R on FCOS, ...) are left out and
            listed here as ``(arm, reason)``; otherwise they raise the ``ConfigError``.

    Returns:
        ``[(method, config), ...]`` in the suite's order.
    """
    suite = SUITES[name]
    if (data is None) != (val is None):
        raise ValueError("--data and --val go together: a validation set is required, never the training images")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if _owned(key) is not None:
            raise ValueError(f"--set {text!r}: {key} is set by compare ({_owned(key)}), not by --set")
    for key in _flat_keys(settings or {}):
        if _owned(key) is not None:
            raise ValueError(f"--config: {key} is set by compare ({_owned(key)}), not by the config file")
    model = model_of(settings=settings, overrides=overrides)
    if model is not None and model.arch not in suite.families:
        raise ValueError(
            f"suite {name} compares remedies of {' / '.join(suite.families)} detectors; model {model.name!r} is a "
            f"{model.arch} model (suites for it: {', '.join(suites_for_family(model.arch))})"
        )
    optim = optim or suite.optim
    opt, sched = recipe(optim, batch_size=batch_size, iters=iters, decay=decay)
    amp = amp or (optim == "finetune" and _on_cuda(device))
    data_preset = preset if preset is not None else suite.preset
    if data is not None:
        data_cfg = DataConfig(train=str(data), val=str(val))
    else:
        data_cfg = DataConfig(train=f"builtin:{data_preset}", val=f"builtin:{data_preset}", seed=data_seed)
    interval = max(1, iters // MIN_CURVE_POINTS)
    base = ExperimentConfig(
        data=data_cfg,
        # a zoo model keeps torchvision's sizes and proposal pools; the suite's settings are for its small preset
        model=ModelConfig(name=suite.arch, **({} if model is not None and model.is_zoo else suite.model_settings)),  # type: ignore[arg-type]
        optim=opt,
        schedule=sched,
        engine=EngineConfig(
            iterations=iters,
            batch_size=batch_size,
            seed=seed,
            device=device,
            log_interval=max(1, min(25, iters // 20)),
            eval_interval=interval,  # >= 8 evenly spaced evaluations: the learning curve
            checkpoint_interval=interval,  # so that an interrupted run resumes near where it stopped
            record=False,
            amp=amp,
        ),
    )
    if workers:
        base = replace(base, data=replace(base.data, num_workers=workers))
    if settings:
        merged = config_to_dict(base)
        _merge(merged, settings)
        base = config_from_dict(merged)
    if overrides:
        base = apply_overrides(base, overrides)
    family = base.model.arch
    out = []
    for m in suite.methods:
        remedy = m.remedy
        if family == "faster_rcnn" and suite.arch != "faster_rcnn" and isinstance(remedy.cls_loss, FocalConfig):
            # a RetinaNet suite's focal baseline is, on the two-stage detector, its own cross-entropy
            remedy = replace(remedy, cls_loss=None)
        try:
            cfg = replace(base, remedy=remedy)
        except ConfigError as err:
            if unfit is None:
                raise
            unfit.append((m.key, str(err)))
            continue
        if m.train_preset is not None:
            if data is not None or preset is not None:
                continue  # a clean arm exists only for the suite's own built-in preset
            cfg = replace(cfg, data=replace(cfg.data, train=f"builtin:{m.train_preset}"))
        out.append((m, cfg))
    return out


FAMILIES_OF_ARCH: dict[str, tuple[str, ...]] = {
    "retinanet": ("retinanet", "fcos"),
    "faster_rcnn": ("faster_rcnn",),
    "ssd": ("ssd",),
}
"""The model families a suite written for ``arch`` runs on (FCOS takes RetinaNet's dense sigmoid losses)."""


def suites_for_family(family: str) -> list[str]:
    """The suites whose remedies fit a model of ``family`` (``compare --model NAME``)."""
    return [n for n, s in SUITES.items() if family in s.families]


def model_of(*, settings: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> ModelConfig | None:
    """The ``ModelConfig`` that a ``--config`` table and ``--set`` overrides (``--model`` and friends) give, or
    ``None`` when they name no model (each suite then uses its own small preset)."""
    named = any(t.split("=", 1)[0].strip() in ("model.name", "model.arch") for t in overrides) or (
        "name" in ((settings or {}).get("model") or {}) or "arch" in ((settings or {}).get("model") or {})
    )
    if not named:
        return None
    cfg = ExperimentConfig()
    if settings:
        merged = config_to_dict(cfg)
        _merge(merged, {k: v for k, v in settings.items() if k == "model"})
        cfg = config_from_dict(merged)
    model_overrides = [t for t in overrides if t.split("=", 1)[0].strip().startswith("model.")]
    return apply_overrides(cfg, model_overrides).model


COMPARE_OWNS: dict[str, str] = {
    "remedy": "each arm's remedy",
    "engine.iterations": "--iters / --budget / --epochs",
    "engine.batch_size": "--batch-size",
    "engine.seed": "--seeds",
    "engine.device": "--device",
    "data.train": "--data",
    "data.val": "--val",
    "data.seed": "--data-seed",
}
"""What a compare run's settings take from compare itself (its flags, the suite's arms), not from ``--config`` or
``--set``."""


def _owned(key: str) -> str | None:
    for prefix, why in COMPARE_OWNS.items():
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


def _flat_keys(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        keys += _flat_keys(v, key) if isinstance(v, Mapping) else [key]
    return keys


def _merge(into: dict[str, Any], table: Mapping[str, Any]) -> None:
    """Set every key of ``table`` in ``into`` (nested tables merged key by key; a table replaces ``None``)."""
    for k, v in table.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = dict(v) if isinstance(v, Mapping) else v


def _on_cuda(device: str) -> bool:
    """Whether runs on ``device`` (``auto`` | ``cpu`` | ``cuda[:N]``) train on a GPU."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available() if device == "auto" else True
