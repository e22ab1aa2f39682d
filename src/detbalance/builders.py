"""Config -> objects. The only module that maps names in a config to classes (one ``match`` per choice).

Each builder takes one section of :class:`~detbalance.config.ExperimentConfig` (plus what only the data
can tell, such as the class count) and returns a plain library object, so every object built here can
also be built by hand in a user's own script.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from detbalance.config import (
    ASL1Config,
    ATSSConfig,
    BalancedL1Config,
    CEConfig,
    ClassWeightsConfig,
    DataConfig,
    EQLv2Config,
    ExperimentConfig,
    FederatedConfig,
    FixedRatioConfig,
    FocalConfig,
    GHMCConfig,
    GHMRConfig,
    GIoUConfig,
    IoUBalancedConfig,
    L1Config,
    ModelConfig,
    NormalizerConfig,
    OHEMConfig,
    OptimConfig,
    QFLConfig,
    RemedyConfig,
    ScheduleConfig,
    ScoreHLRConfig,
    SeesawConfig,
    SmoothL1Config,
    SSDMiningConfig,
    StratifiedOHEMConfig,
    VFLConfig,
)
from detbalance.data import (
    DetectionDataset,
    check_categories,
    eval_transform,
    held_out_spec,
    open_dataset,
    train_basic,
    train_ssd,
)
from detbalance.detectors import BalanceRecorder

if TYPE_CHECKING:
    from detbalance.engine.hooks import TrainingHook

__all__ = [
    "WarmupSchedule",
    "build_aspect_ratio_groups",
    "build_box_loss",
    "build_class_weights",
    "build_cls_loss",
    "build_datasets",
    "build_detector_of",
    "model_description",
    "build_hooks",
    "build_model",
    "build_optimizer",
    "build_repeat_factors",
    "build_scheduler",
    "build_train_eval_set",
    "class_counts",
    "class_image_counts",
    "needs_image_counts",
    "resolve_image_size",
]


# ----------------------------------------------------------------------------------------------- data


def build_datasets(cfg: ExperimentConfig, *, seed: int = 0) -> tuple[DetectionDataset, DetectionDataset | None]:
    """``(train, val)`` datasets with the architecture's transforms; ``val`` is ``None`` without held-out data.

    Training: horizontal flips (SSD: the SSD augmentation at ``model.image_size``) when ``data.augment``,
    else none. Validation: no transform (boxes stay in the ground truth's coordinates; the detectors resize
    internally): ``data.val``, or when it is unset :func:`~detbalance.data.held_out_spec` of ``data.train``
    (``None`` for a single COCO file: its images are the training images).

    Raises:
        ValueError: ``data.val`` labels its categories differently from ``data.train`` (names the first).
    """
    d: DataConfig = cfg.data
    plain = open_dataset(d.train, split="train", seed=seed, images=d.train_images)
    size = resolve_image_size(cfg, plain)
    if not d.augment:
        train_tf = None
    elif cfg.model.arch == "ssd":
        train_tf = train_ssd(size=size)
    else:
        train_tf = train_basic(flip=0.5)
    train = (
        open_dataset(d.train, split="train", transforms=train_tf, seed=seed, images=d.train_images)
        if train_tf is not None
        else plain
    )
    val_spec = d.val if d.val is not None else held_out_spec(d.train)
    if val_spec is None:
        return train, None
    val_images = d.val_images if d.val is not None else (d.val_images or d.train_images)
    val = open_dataset(val_spec, split="test", transforms=eval_transform(), seed=seed, images=val_images)
    check_categories(
        train.label_names, train.category_ids(), val.label_names, val.category_ids(),
        expected=f"data.train {d.train!r}", got=f"data.val {val_spec!r}",
    )
    return train, val


def build_train_eval_set(cfg: ExperimentConfig, *, seed: int = 0) -> DetectionDataset:
    """The training images without augmentation (``eval_transform``): for ``engine.eval_train`` and hooks."""
    return open_dataset(
        cfg.data.train, split="train", transforms=eval_transform(), seed=seed, images=cfg.data.train_images
    )


def build_aspect_ratio_groups(cfg: ExperimentConfig, dataset: DetectionDataset) -> Tensor | None:
    """``Tensor[N]`` aspect-ratio group of each training image for ``data.aspect_ratio_group_factor``
    (:func:`detbalance.data.aspect_ratio_groups`, no image decoded), or ``None`` when grouping is off."""
    factor = cfg.data.aspect_ratio_group_factor
    if factor is None:
        return None
    from detbalance.data import aspect_ratio_groups

    return aspect_ratio_groups(dataset, factor=factor)


def build_hooks(cfg: ExperimentConfig) -> list[TrainingHook]:
    """The :class:`~detbalance.engine.hooks.TrainingHook` list of ``cfg.remedy`` (empty for most remedies).

    ``remedy.bootstrap``: offline bootstrapping's mining rounds
    (:func:`detbalance.sampling.bootstrap.build_bootstrap_hook`).
    """
    hooks: list[TrainingHook] = []
    if cfg.remedy.bootstrap is not None:
        from detbalance.sampling.bootstrap import build_bootstrap_hook

        hooks.append(build_bootstrap_hook(cfg.remedy.bootstrap))
    return hooks


def resolve_image_size(cfg: ExperimentConfig, dataset: DetectionDataset) -> int:
    """The training side: for a small preset ``model.image_size``, or (``None``) the larger side of the first
    training image; for a zoo model its shorter side, ``model.min_size`` or torchvision's (800; SSD: its fixed
    square's side, 300 / 320), which SSD's augmentation crops and resizes to."""
    if cfg.model.is_zoo:
        from detbalance._zoo_names import ZOO

        return cfg.model.min_size if cfg.model.min_size is not None else ZOO[cfg.model.name].min_size
    if cfg.model.image_size is not None:
        return cfg.model.image_size
    if len(dataset) == 0:
        raise ValueError(f"data.train {cfg.data.train!r} has no images")
    return int(max(dataset.image_size(0)))


def class_counts(dataset: DetectionDataset) -> Tensor:
    """``Tensor[K]`` (int64): annotated instances of each class ``1..K`` (no image is decoded)."""
    labels = [dataset.target(i)["labels"] for i in range(len(dataset))]
    flat = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    return torch.bincount(flat, minlength=dataset.num_classes + 1)[1:]


def class_image_counts(dataset: DetectionDataset) -> Tensor:
    """``Tensor[K]`` (int64): training images holding each class ``1..K`` (LVIS's ``image_count``; the
    federated loss's frequencies). No image is decoded."""
    counts = torch.zeros(dataset.num_classes + 1, dtype=torch.int64)
    for cats in dataset.categories_per_image():
        if len(cats):
            counts[torch.tensor(sorted(set(cats)), dtype=torch.int64)] += 1
    return counts[1:]


def needs_image_counts(cfg: ExperimentConfig) -> bool:
    """Whether :func:`build_model` needs the training set's :func:`class_image_counts` (federated loss)."""
    return isinstance(cfg.remedy.cls_loss, FederatedConfig)


def build_repeat_factors(cfg: ExperimentConfig, dataset: DetectionDataset) -> Tensor | None:
    """Per-image repeat factors ``Tensor[N]`` for ``remedy.repeat_factor``, or ``None`` when it is off."""
    rf = cfg.remedy.repeat_factor
    if rf is None:
        return None
    from detbalance.sampling import repeat_factors

    return repeat_factors(dataset.categories_per_image(), threshold=rf.threshold, sqrt=rf.sqrt)


def build_class_weights(cfg: ClassWeightsConfig | None, counts: Tensor) -> Tensor | None:
    """``Tensor[K]`` class-frequency weights (normalised to sum to ``K``), or ``None`` when off."""
    if cfg is None:
        return None
    from detbalance.losses import class_frequency_weights

    return class_frequency_weights(counts, method=cfg.method, beta=cfg.beta)


# --------------------------------------------------------------------------------------------- losses


def build_cls_loss(
    remedy: RemedyConfig,
    arch: str,
    *,
    class_weight: Tensor | None = None,
    num_classes: int | None = None,
    image_counts: Tensor | None = None,
) -> nn.Module | None:
    """The classification loss module for ``arch`` (``None``: the detector's own cross-entropy).

    Sigmoid forms for RetinaNet (one-vs-all over the ``K`` classes), softmax forms (``K + 1`` classes, column 0
    background) for the Faster R-CNN box head and SSD. Class-frequency weights weight every sample by its
    ground-truth class, background 1 (Cui et al., CVPR 2019): a :class:`~detbalance.losses.ClassWeightedLoss`
    (sigmoid) or a per-class ``alpha`` (softmax, ``alpha_t = alpha[label]``, the same per-sample weight). The
    loss weight is applied by :func:`_weighted`, the one place that does.
    """
    from detbalance.losses import (
        ClassWeightedLoss,
        GHMCLoss,
        QualityFocalLoss,
        SigmoidFocalLoss,
        SoftmaxFocalLoss,
        VarifocalLoss,
    )

    c = remedy.cls_loss
    if arch in ("retinanet", "fcos"):  # dense sigmoid heads
        match c:
            case None:
                loss: nn.Module = SigmoidFocalLoss(alpha=0.25, gamma=2.0)
            case FocalConfig(alpha=alpha, gamma=gamma):
                loss = SigmoidFocalLoss(alpha=alpha, gamma=gamma)
            case CEConfig(alpha=alpha):
                loss = SigmoidFocalLoss(alpha=alpha, gamma=0.0)
            case GHMCConfig():
                loss = GHMCLoss(**_loss_options(c))
            case QFLConfig():
                loss = QualityFocalLoss(**_loss_options(c))
            case VFLConfig():
                loss = VarifocalLoss(**_loss_options(c))
            case _:
                raise ValueError(f"remedy.cls_loss: unsupported {c!r} for {arch}")
        return loss if class_weight is None else ClassWeightedLoss(loss, class_weight)
    # the long-tail RoI classifiers of Faster R-CNN (class weights, if any, are the head's per-RoI weights)
    if isinstance(c, SeesawConfig | EQLv2Config | FederatedConfig):
        from detbalance.losses import EQLv2Loss, FederatedLoss, SeesawLoss, federated_class_weights

        if num_classes is None:
            raise ValueError(f"remedy.cls_loss: {c.name} needs the number of classes")
        match c:
            case SeesawConfig():
                return SeesawLoss(num_classes=num_classes, p=c.p, q=c.q, eps=c.eps, sync=c.sync)
            case EQLv2Config():
                return EQLv2Loss(num_classes=num_classes, mu=c.mu, alpha=c.alpha, gamma=c.gamma, sync=c.sync)
            case _:
                if image_counts is None:
                    raise ValueError("remedy.cls_loss: federated needs the training set's per-class image counts")
                weights = federated_class_weights(image_counts, power=c.freq_weight_power)
                return FederatedLoss(class_weights=weights, num_classes_kept=c.num_classes_kept)
    # softmax heads (Faster R-CNN box head, SSD)
    match c:
        case None:
            alpha, gamma = None, 0.0
        case FocalConfig(alpha=alpha, gamma=gamma):
            pass
        case CEConfig(alpha=alpha):
            gamma = 0.0
        case _:
            raise ValueError(f"remedy.cls_loss: {c!r} is not available for {arch}")
    if c is None and class_weight is None:
        return None
    if class_weight is None:
        return SoftmaxFocalLoss(alpha=alpha, gamma=gamma)
    k = class_weight.numel()
    base = torch.ones(k + 1) if alpha is None else torch.tensor([1.0 - alpha] + [alpha] * k)
    per_class = base * torch.cat([torch.ones(1), class_weight.to(torch.float32)])
    return SoftmaxFocalLoss(alpha=per_class, gamma=gamma)


def build_box_loss(remedy: RemedyConfig, arch: str) -> nn.Module | None:
    """The box regression loss module (``None``: the detector's default, see :class:`RemedyConfig`)."""
    from detbalance.losses import ASL1Loss, BalancedL1Loss, GHMRLoss, GIoULoss, L1Loss, SmoothL1Loss

    match remedy.box_loss:
        case None:
            return SmoothL1Loss(beta=1.0 / 9.0) if arch == "retinanet" else None
        case SmoothL1Config(beta=beta):
            return SmoothL1Loss(beta=beta)
        case L1Config():
            return L1Loss()
        case ASL1Config(mu=mu):
            return ASL1Loss(mu=mu)
        case GHMRConfig():
            return GHMRLoss(**_loss_options(remedy.box_loss))
        case GIoUConfig():
            return GIoULoss()
        case BalancedL1Config():
            return BalancedL1Loss(**_loss_options(remedy.box_loss))
        case other:
            raise ValueError(f"remedy.box_loss: unsupported {other!r}")


def _loss_options(cfg: Any) -> dict[str, Any]:
    """A loss config's hyperparameters as keyword arguments of its module (all fields but ``name`` and
    ``loss_weight``, which :func:`_weighted` applies)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("name", "loss_weight")}


def _loss_weight(cfg: object | None) -> float:
    return 1.0 if cfg is None else float(cfg.loss_weight)


def _weighted(loss: nn.Module | None, cfg: object | None) -> nn.Module | None:
    """The one place where a configured loss weight is applied: ``ScaledLoss(loss, weight)``.

    Every architecture gets its losses through here; the adapters then see weight-carrying losses (a
    ``ScaledLoss`` declares ``reference_weight = 1``), so no weight is applied twice or differently.
    """
    from detbalance.losses import ScaledLoss

    if loss is None or _loss_weight(cfg) == 1.0:
        return loss
    return ScaledLoss(loss, _loss_weight(cfg))


# ---------------------------------------------------------------------------------------------- model


def _hyperparameters(cfg: Any) -> dict[str, Any]:
    """A sampler config's hyperparameters: its fields but the ``name`` that picks it in TOML."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"}


def build_roi_sampler(remedy: RemedyConfig) -> Any:
    """The Faster R-CNN RoI sampler of ``remedy``: the configured one (torchvision's 512 @ 0.25 when unset);
    with ``remedy.bootstrap`` a fixed-ratio sampler becomes a
    :class:`~detbalance.sampling.BootstrappedSampler` (mined background first)."""
    from detbalance.sampling import (
        BootstrappedSampler,
        FixedRatioSampler,
        IoUBalancedSampler,
        OHEMSampler,
        ScoreHLRSampler,
        StratifiedOHEMSampler,
    )

    cfg = remedy.roi_sampler
    match cfg:
        case None | FixedRatioConfig():
            sampler_class = BootstrappedSampler if remedy.bootstrap is not None else FixedRatioSampler
            return sampler_class(**(_hyperparameters(cfg) if cfg is not None else {}))
        case OHEMConfig():
            return OHEMSampler(**_hyperparameters(cfg))
        case StratifiedOHEMConfig():
            return StratifiedOHEMSampler(**_hyperparameters(cfg))
        case ScoreHLRConfig():
            return ScoreHLRSampler(**_hyperparameters(cfg))
        case IoUBalancedConfig():
            return IoUBalancedSampler(**_hyperparameters(cfg))
    raise TypeError(f"remedy.roi_sampler: no sampler for {type(cfg).__name__}")


def build_rpn_sampler(remedy: RemedyConfig) -> Any:
    """The Faster R-CNN RPN anchor sampler of ``remedy`` (``None``: torchvision's own, 256 @ 0.5)."""
    from detbalance.sampling import FixedRatioSampler

    return None if remedy.rpn_sampler is None else FixedRatioSampler(**_hyperparameters(remedy.rpn_sampler))


def build_assigner(remedy: RemedyConfig) -> Any:
    """The dense head's anchor assigner of ``remedy`` (``None``: torchvision's IoU matching)."""
    from detbalance.sampling import ATSSAssigner

    match remedy.assigner:
        case None:
            return None
        case ATSSConfig():
            return ATSSAssigner(**_hyperparameters(remedy.assigner))
    raise TypeError(f"remedy.assigner: no assigner for {type(remedy.assigner).__name__}")


def build_pisa(remedy: RemedyConfig) -> Any:
    """PISA's ISR-P + CARL of ``remedy`` (:class:`~detbalance.losses.PrimeSampleAttention`), or ``None``."""
    from detbalance.losses.pisa import PrimeSampleAttention

    return None if remedy.pisa is None else PrimeSampleAttention(**_hyperparameters(remedy.pisa))


def build_model(
    cfg: ExperimentConfig,
    *,
    num_classes: int,
    image_size: int,
    counts: Tensor | None = None,
    recorder: BalanceRecorder | None = None,
    image_counts: Tensor | None = None,
) -> nn.Module:
    """The torchvision detector of ``cfg.model``, adapted to ``cfg.remedy``.

    Args:
        cfg: The experiment.
        num_classes: ``K`` (from the training data).
        image_size: Training side (see :func:`resolve_image_size`).
        counts: ``Tensor[K]`` instances per class, needed for ``remedy.class_weights``.
        recorder: Optional recorder handed to the adapter.
        image_counts: ``Tensor[K]`` training images per class, needed for the federated loss
            (:func:`class_image_counts`).
    """
    from detbalance.detectors.faster_rcnn import balance_faster_rcnn

    m, r = cfg.model, cfg.remedy
    model, fresh_classifier = build_detector_of(m, num_classes=num_classes, image_size=image_size)
    class_weight = None
    if r.class_weights is not None:
        if counts is None:
            raise ValueError("remedy.class_weights needs the training set's class counts")
        class_weight = build_class_weights(r.class_weights, counts)
    cls_loss = _weighted(
        build_cls_loss(r, m.arch, class_weight=class_weight, num_classes=num_classes, image_counts=image_counts),
        r.cls_loss,
    )
    # A zoo model keeps torchvision's box loss (RetinaNet v2: GIoU) unless one is configured.
    box_loss = None if m.is_zoo and r.box_loss is None else _weighted(build_box_loss(r, m.arch), r.box_loss)
    match m.arch:
        case "retinanet":
            from detbalance.detectors.retinanet import balance_retinanet
            from detbalance.losses import PositiveNormalizer

            norm = r.normalizer or NormalizerConfig()
            normalizer = PositiveNormalizer(mode=norm.mode, momentum=norm.momentum)
            return balance_retinanet(
                model,
                cls_loss=cls_loss,
                box_loss=box_loss,
                normalizer=normalizer,
                recorder=recorder,
                cls_loss_weight=1.0,
                box_loss_weight=1.0,
                assigner=build_assigner(r),
                pisa=build_pisa(r),
            )
        case "fcos":
            from detbalance.detectors.fcos import balance_fcos
            from detbalance.losses import PositiveNormalizer

            norm = r.normalizer or NormalizerConfig()
            return balance_fcos(
                model, cls_loss=cls_loss, normalizer=PositiveNormalizer(mode=norm.mode, momentum=norm.momentum),
                recorder=recorder, assigner=build_assigner(r),
            )
        case "faster_rcnn":
            roi_sampler = build_roi_sampler(r)
            rpn_sampler = build_rpn_sampler(r)
            frcnn_class_weight = None
            if class_weight is not None and (
                r.cls_loss is None or isinstance(r.cls_loss, SeesawConfig | EQLv2Config | FederatedConfig)
            ):
                # Plain CE with class weights: the head's per-RoI weighting, sum_i w[y_i] CE_i / N.
                cls_loss, frcnn_class_weight = None, class_weight
            return balance_faster_rcnn(
                model, roi_sampler=roi_sampler, rpn_sampler=rpn_sampler, box_cls_loss=cls_loss,
                class_weight=frcnn_class_weight, recorder=recorder, pisa=build_pisa(r), box_loss=box_loss,
            )
        case "ssd":
            from detbalance.detectors.ssd import balance_ssd

            mining = r.ssd_mining or SSDMiningConfig()
            return balance_ssd(
                model,
                negative_ratio=mining.negative_ratio,
                min_negatives=mining.min_negatives,
                cls_loss=cls_loss,
                box_loss=box_loss,
                recorder=recorder,
                # only a freshly created classifier gets the prior; a loaded one keeps its biases
                background_prior=mining.background_prior if fresh_classifier else None,
            )
        case other:
            raise ValueError(f"model.name: {m.name!r} has an unknown family {other!r}")


def model_description(cfg: ExperimentConfig, model: nn.Module) -> dict[str, Any]:
    """What reports and ``result.json`` say about ``cfg.model`` built as ``model``
    (:func:`detbalance.detectors.describe_model`: name, family, parameters, weights, input size)."""
    from detbalance.detectors.zoo import describe_model

    m = cfg.model
    return describe_model(model, name=m.name, weights=m.weights, weights_backbone=m.weights_backbone)


def build_detector_of(model_cfg: ModelConfig, *, num_classes: int, image_size: int) -> tuple[nn.Module, bool]:
    """The unmodified torchvision detector of ``cfg.model`` and whether its classifier is freshly created.

    A small preset comes from :func:`~detbalance.detectors.build_detector` (``image_size`` is its side); a zoo
    name from :func:`~detbalance.detectors.build_zoo_model` (``image_size`` is not used: ``model.min_size`` /
    ``max_size`` or torchvision's). ``model.weights`` as a ``.pth`` is loaded into a preset too.
    """
    from detbalance.detectors.build import build_detector
    from detbalance.detectors.zoo import _build, _read_state, load_detector_state

    m = model_cfg
    if m.is_zoo:
        model, fresh = _build(
            m.name, num_classes=num_classes, weights=m.weights, weights_backbone=m.weights_backbone,
            trainable_backbone_layers=m.trainable_backbone_layers, min_size=m.min_size, max_size=m.max_size,
            image_mean=m.image_mean, image_std=m.image_std, prior_prob=0.01,
        )
        return model, bool(fresh)
    extra = {} if m.image_mean is None else {"image_mean": m.image_mean}
    if m.image_std is not None:
        extra["image_std"] = m.image_std
    if m.rpn_pre_nms_top_n_train is not None:
        extra["rpn_pre_nms_top_n_train"] = m.rpn_pre_nms_top_n_train
    if m.rpn_post_nms_top_n_train is not None:
        extra["rpn_post_nms_top_n_train"] = m.rpn_post_nms_top_n_train
    model = build_detector(m.arch, num_classes=num_classes, backbone=m.backbone, image_size=image_size,  # type: ignore[arg-type]
                           norm=m.norm, head_convs=m.head_convs, **extra)
    if m.weights is None:
        return model, True
    from pathlib import Path

    fresh = load_detector_state(model, _read_state(Path(m.weights)), source=f"model.weights {m.weights!r}")
    return model, bool(fresh)


# ------------------------------------------------------------------------------------------ optimiser


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters.

    Weight decay applies to weights of rank >= 2 (convolutions, linear layers); biases and normalisation
    parameters are not decayed (timm's and torchvision's classification recipes), unless ``optim.decay_all``
    (torchvision's detection reference: every parameter decayed).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if cfg.decay_all or p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    match cfg.name:
        case "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        case "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        case other:
            raise ValueError(f"optim.name: unknown {other!r}")


class WarmupSchedule:
    """Learning-rate factor of step ``s`` (a picklable ``LambdaLR`` callable).

    Linear warmup ``warmup_factor -> 1`` over ``warmup_iters`` steps, then

    * ``cosine``: ``min + (1 - min) * (1 + cos(pi * t)) / 2`` with ``t = (s - warmup) / (total - warmup)``;
    * ``step``: ``gamma ** (number of milestones <= s)``;
    * ``constant``: 1.
    """

    def __init__(self, cfg: ScheduleConfig, total_steps: int) -> None:
        self.name = cfg.name
        self.warmup = min(cfg.warmup_iters, total_steps)
        self.warmup_factor = cfg.warmup_factor
        self.milestones = list(cfg.milestones)
        self.gamma = cfg.gamma
        self.min_lr_factor = cfg.min_lr_factor
        self.total = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            alpha = step / self.warmup
            warm = self.warmup_factor * (1.0 - alpha) + alpha
        else:
            warm = 1.0
        match self.name:
            case "cosine":
                span = max(1, self.total - self.warmup)
                t = min(1.0, max(0.0, (step - self.warmup) / span))
                factor = self.min_lr_factor + (1.0 - self.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
            case "step":
                factor = self.gamma ** sum(1 for m in self.milestones if m <= step)
            case _:
                factor = 1.0
        return warm * factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` with :class:`WarmupSchedule`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(cfg, total_steps))
