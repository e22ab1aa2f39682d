"""torchvision's detection models by name, with weights as torchvision users pass them.

The one place that knows the model zoo. :func:`build_zoo_model` calls torchvision's own builder
(``torchvision.models.get_model``), so backbones, anchors, sizes, normalisation, ``FrozenBatchNorm2d`` and
``trainable_backbone_layers`` are exactly torchvision's; it then fits the class-dependent head layers to
``K`` user classes. The models and their family (which remedies fit them):

====================================== ============= ======================== =======================
name                                   family        backbone weights enum    input (torchvision)
====================================== ============= ======================== =======================
``retinanet_resnet50_fpn``             retinanet     ``ResNet50_Weights``     800 / 1333
``retinanet_resnet50_fpn_v2``          retinanet     ``ResNet50_Weights``     800 / 1333
``fcos_resnet50_fpn``                  fcos          ``ResNet50_Weights``     800 / 1333
``fasterrcnn_resnet50_fpn``            faster_rcnn   ``ResNet50_Weights``     800 / 1333
``fasterrcnn_resnet50_fpn_v2``         faster_rcnn   ``ResNet50_Weights``     800 / 1333
``fasterrcnn_mobilenet_v3_large_fpn``  faster_rcnn   ``MobileNet_V3_Large_…`` 800 / 1333
``fasterrcnn_mobilenet_v3_large_320…`` faster_rcnn   ``MobileNet_V3_Large_…`` 320 / 640
``ssd300_vgg16``                       ssd           ``VGG16_Weights``        300 x 300
``ssdlite320_mobilenet_v3_large``      ssd           ``MobileNet_V3_Large_…`` 320 x 320
====================================== ============= ======================== =======================

RetinaNet and FCOS are dense sigmoid detectors (focal, alpha-CE, GHM-C, class weights, normalisers),
Faster R-CNN is two-stage (RoI/RPN samplers, OHEM, S-OHEM, softmax losses of the box head), SSD is one-stage
softmax (hard negative mining, softmax focal).

**Weights** (``weights`` for the whole detector, ``weights_backbone`` for the backbone):

* a torchvision weights name: ``"DEFAULT"``, a member (``"COCO_V1"``) or the full name
  (``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"``, ``"ResNet50_Weights.IMAGENET1K_V1"``), resolved with
  ``torchvision.models.get_weight`` / ``get_model_weights``. The file is read from the torch hub cache
  (``torch.hub.get_dir()/checkpoints/<file name of the URL>``; ``TORCH_HOME`` moves it); nothing is ever
  downloaded: a missing file is a :class:`FileNotFoundError` naming the path expected and the URL to fetch it
  from. The model is built by torchvision's builder with these weights, so ``FrozenBatchNorm2d`` and
  ``trainable_backbone_layers`` (default 3) are torchvision's;
* a local file (``.pth`` / ``.pt``): a state dict of this model (or a checkpoint holding one under
  ``"model"``, as torchvision's references and ``detbalance train`` write). The model is built as torchvision
  builds it without pretrained weights (``BatchNorm2d``, every layer trainable; with ``weights_backbone``, as
  for backbone weights) and the file's tensors are loaded into it; every key must match, except that
  ``num_batches_tracked`` may be absent (files from ``FrozenBatchNorm2d`` models have none). To fine-tune
  torchvision's own COCO file as torchvision does, give its name and copy the file into the hub cache.

**Head surgery.** When the detector weights have another class count than ``K + 1`` (COCO's 91), the
class-dependent layers are created afresh for ``K + 1`` columns and every other weight is loaded, as
torchvision's fine-tuning tutorial does: RetinaNet and FCOS ``cls_logits`` (normal std 0.01, bias at the
focal prior ``prior_prob``), Faster R-CNN's ``FastRCNNPredictor``, SSD's last classification conv of every
level (torchvision's init: Xavier for SSD300, normal std 0.03 for SSDlite). A loaded classifier keeps its
weights and its bias: only freshly created layers get a prior.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_model, get_weight
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

from detbalance._zoo_names import FAMILIES, ZOO, ZooModel, check_weights_name, is_weights_file, model_family

__all__ = [
    "FAMILIES",
    "ZOO",
    "ZooModel",
    "ZooWeights",
    "build_zoo_model",
    "describe_model",
    "hub_cache_file",
    "load_detector_state",
    "model_family",
    "replace_classifier",
    "resolve_weights",
]

def _zoo(name: str) -> ZooModel:
    if name not in ZOO:
        raise ValueError(f"unknown torchvision detection model {name!r}; accepted: {list(ZOO)}")
    return ZOO[name]


# ------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class ZooWeights:
    """Resolved weights: a torchvision enum member (``enum``) or a local file (``path``)."""

    enum: WeightsEnum | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.enum is not None:
            return f"{type(self.enum).__name__}.{self.enum.name}"
        return str(self.path)


def resolve_weights(
    name: str,
    spec: str | None,
    *,
    part: Literal["weights", "weights_backbone"] = "weights",
    key: str | None = None,
    check_file: bool = True,
) -> ZooWeights | None:
    """Resolve a weights name or file for zoo model ``name``; nothing is read or downloaded.

    Args:
        name: A :data:`ZOO` name.
        spec: ``None``; ``"DEFAULT"``; an enum member (``"COCO_V1"``); a full name
            (``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"``); or a path to a ``.pth`` / ``.pt`` file (detector
            weights only).
        part: ``"weights"`` (the detector) or ``"weights_backbone"`` (the backbone's ImageNet weights).
        key: How errors name the setting (default ``model.<part>``).
        check_file: Require a path to exist (off to validate a saved config on another machine).

    Returns:
        ``None`` for ``spec=None``, else a :class:`ZooWeights`.

    Raises:
        ValueError: an unknown name, weights of another model or family (naming whose they are and the
            accepted names), a file for ``weights_backbone``.
        FileNotFoundError: a path that does not exist.
    """
    key = key or f"model.{part}"
    if spec is None:
        return None
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{key}: expected a torchvision weights name or a .pth path, got {spec!r}")
    _zoo(name)
    if is_weights_file(spec):
        if part != "weights":
            raise ValueError(f"{key}: takes a torchvision weights name, not a file; got {spec!r}")
        path = Path(spec).expanduser()
        if check_file and not path.is_file():
            raise FileNotFoundError(f"{key}: file {str(path)!r} not found")
        return ZooWeights(path=path)
    return ZooWeights(enum=get_weight(check_weights_name(name, spec, part=part, key=key)))


def hub_cache_file(weight: WeightsEnum) -> Path:
    """Where torchvision reads ``weight`` from: ``torch.hub.get_dir()/checkpoints/<file name of its URL>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weight.url).path)


def _require_cached(weight: WeightsEnum, key: str) -> None:
    path = hub_cache_file(weight)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}: {type(weight).__name__}.{weight.name} is not in the torch hub cache (nothing is downloaded): "
            f"expected the file {str(path)!r}; fetch it from {weight.url} (e.g. curl -L -o {str(path)!r} "
            f"{weight.url}) or point TORCH_HOME at a cache that holds it"
        )


# ----------------------------------------------------------------------------------------- head surgery


def _classifier_columns(model: nn.Module) -> int:
    if isinstance(model, FasterRCNN):
        return int(model.roi_heads.box_predictor.cls_score.out_features)
    if isinstance(model, SSD):
        return int(model.head.classification_head.num_columns)
    if isinstance(model, RetinaNet | FCOS):
        return int(model.head.classification_head.num_classes)
    raise ValueError(f"model must be a torchvision RetinaNet, FCOS, FasterRCNN or SSD, got {type(model).__name__}")


def _fresh_conv(old: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(old.in_channels, out_channels, kernel_size=old.kernel_size, stride=old.stride,
                     padding=old.padding, bias=old.bias is not None)


def replace_classifier(model: nn.Module, num_columns: int, *, prior_prob: float = 0.01) -> list[str]:
    """Create the class-dependent head layers of ``model`` afresh for ``num_columns`` outputs (in place).

    As torchvision's fine-tuning tutorial: RetinaNet / FCOS get a new ``cls_logits`` conv (normal std 0.01,
    bias ``-log((1 - prior_prob) / prior_prob)``, torchvision's init), Faster R-CNN a new
    ``FastRCNNPredictor`` (class scores and class-specific boxes), SSD a new last conv in every level's
    classification branch (torchvision's init). Everything else is untouched.

    Args:
        model: A torchvision ``RetinaNet``, ``FCOS``, ``FasterRCNN`` or ``SSD``.
        num_columns: ``K + 1``.
        prior_prob: The focal prior of the fresh sigmoid classifiers (RetinaNet, FCOS).

    Returns:
        The ``state_dict`` keys of the fresh layers.
    """
    if isinstance(num_columns, bool) or not isinstance(num_columns, int) or num_columns < 2:
        raise ValueError(f"num_columns must be an int >= 2 (K + 1), got {num_columns!r}")
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob!r}")
    _classifier_columns(model)  # type check
    if isinstance(model, FasterRCNN):
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_columns)
        return [f"roi_heads.box_predictor.{k}" for k in model.roi_heads.box_predictor.state_dict()]
    if isinstance(model, SSD):
        head = model.head.classification_head
        old_columns = int(head.num_columns)
        keys = []
        for i, block in enumerate(head.module_list):
            seq = isinstance(block, nn.Sequential)
            old = block[-1] if seq else block
            conv = _fresh_conv(old, old.out_channels // old_columns * num_columns)
            if isinstance(head, SSDLiteClassificationHead):
                nn.init.normal_(conv.weight, mean=0.0, std=0.03)
            else:
                nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            if seq:
                block[-1] = conv
                keys += [f"head.classification_head.module_list.{i}.{len(block) - 1}.{p}" for p in ("weight", "bias")]
            else:
                head.module_list[i] = conv
                keys += [f"head.classification_head.module_list.{i}.{p}" for p in ("weight", "bias")]
        head.num_columns = num_columns
        return keys
    head = model.head.classification_head
    conv = _fresh_conv(head.cls_logits, head.num_anchors * num_columns)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, -math.log((1.0 - prior_prob) / prior_prob))
    head.cls_logits = conv
    head.num_classes = num_columns
    return ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]


#: Attribute names under which the adapters keep their losses' and normalisers' state in a ``state_dict``.
_ADAPTER_STATE = frozenset({"cls_loss", "box_loss", "normalizer", "box_normalizer", "box_cls_loss"})


def _class_dependent(key: str) -> bool:
    return key.startswith(("roi_heads.box_predictor.", "head.classification_head.cls_logits.")) or (
        key.startswith("head.classification_head.module_list.")
    )


def load_detector_state(
    model: nn.Module, state: Mapping[str, Tensor], *, prior_prob: float = 0.01, source: str = "the state dict"
) -> list[str]:
    """Load a detector's state dict into ``model``; class-dependent layers of another class count are made afresh.

    When the file's classifier has another number of columns than ``model``'s, :func:`replace_classifier`
    builds the fresh layers (at ``model``'s column count) and they are not loaded; every other tensor is
    loaded and must exist in both with the same shape (``num_batches_tracked`` may be missing from the file). The
    state of an adapted model's losses and normalisers (GHM histograms, EMA normalisers: keys under ``cls_loss``,
    ``box_loss``, ``normalizer``, ``box_normalizer``, ``box_cls_loss``) is left out: the adapter starts it afresh.

    Args:
        model: A torchvision ``RetinaNet``, ``FCOS``, ``FasterRCNN`` or ``SSD``.
        state: The tensors, as ``model.state_dict()`` names them.
        prior_prob: The focal prior of a fresh sigmoid classifier.
        source: How errors name the file.

    Returns:
        The keys of the fresh (not loaded) layers; empty when the classifier was loaded.

    Raises:
        ValueError: keys missing or unexpected, or a shape that differs outside the classifier, naming them.
    """
    own = model.state_dict()
    columns = _classifier_columns(model)
    mismatched = [k for k in state if k in own and _class_dependent(k) and state[k].shape != own[k].shape]
    fresh: list[str] = []
    if mismatched:
        fresh = replace_classifier(model, columns, prior_prob=prior_prob)
        own = model.state_dict()
    # the state of an adapted model's losses and normalisers (GHM histograms, EMA normalisers, Seesaw counts):
    # not part of the torchvision model, set afresh by the adapter
    load = {k: v for k, v in state.items()
            if k not in fresh and not (k not in own and _ADAPTER_STATE.intersection(k.split(".")))}
    missing = [k for k in own if k not in load and k not in fresh and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in load if k not in own]
    bad_shape = [f"{k} {tuple(load[k].shape)} vs {tuple(own[k].shape)}" for k in load
                 if k in own and load[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", bad_shape)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        raise ValueError(f"{source} does not fit a {type(model).__name__} of this build: " + "; ".join(parts))
    model.load_state_dict(load, strict=False)
    return fresh


def _read_state(path: Path) -> dict[str, Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"model.weights: {str(path)!r} holds no state dict (nor one under 'model')")
    return dict(obj)


# --------------------------------------------------------------------------------------------- build


def build_zoo_model(
    name: str,
    *,
    num_classes: int,
    weights: str | None = None,
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    prior_prob: float = 0.01,
) -> nn.Module:
    """Build torchvision's detection model ``name`` for ``K = num_classes`` object classes.

    The model is torchvision's builder's (``torchvision.models.get_model``) with ``K + 1`` outputs, the
    settings given passed through; weights as in the module docstring. Unset sizes and normalisation are
    torchvision's (``None``: the builder's default).

    Args:
        name: A :data:`ZOO` name.
        num_classes: ``K`` (labels ``1..K``); the model gets ``K + 1`` columns, as torchvision's detectors.
        weights: Detector weights (name or ``.pth``); ``None`` trains from scratch.
        weights_backbone: Backbone weights name (``"ResNet50_Weights.IMAGENET1K_V1"``, ``"DEFAULT"``).
        trainable_backbone_layers: torchvision's ``trainable_backbone_layers`` (needs pretrained weights;
            ``None``: the builder's default, 3 for most).
        min_size: Shorter image side of ``GeneralizedRCNNTransform`` (SSD: the side of its fixed square).
        max_size: Longer side cap (SSD: must equal ``min_size`` or be ``None``).
        image_mean: Per-channel mean the transform subtracts.
        image_std: Per-channel std it divides by.
        prior_prob: Focal prior of a freshly created sigmoid classifier.

    Returns:
        The unmodified torchvision model (training mode), ready for ``balance_*``.

    Raises:
        ValueError: bad names, weights of another model, sizes or layer counts (naming the setting).
        FileNotFoundError: named weights missing from the torch hub cache (names the path and URL).
    """
    return _build(
        name, num_classes=num_classes, weights=weights, weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers, min_size=min_size, max_size=max_size,
        image_mean=image_mean, image_std=image_std, prior_prob=prior_prob,
    )[0]


def _build(
    name: str,
    *,
    num_classes: int,
    weights: str | None,
    weights_backbone: str | None,
    trainable_backbone_layers: int | None,
    min_size: int | None,
    max_size: int | None,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
    prior_prob: float,
) -> tuple[nn.Module, list[str]]:
    """:func:`build_zoo_model` and the ``state_dict`` keys of the freshly created (not loaded) layers."""
    model_info = _zoo(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (K object classes), got {num_classes!r}")
    w = resolve_weights(name, weights, part="weights")
    wb = resolve_weights(name, weights_backbone, part="weights_backbone")
    if w is not None and wb is not None:
        raise ValueError("model.weights_backbone: not used when model.weights loads the whole detector; give one of them")
    pretrained = w is not None and w.enum is not None or wb is not None
    if trainable_backbone_layers is not None:
        top = model_info.max_trainable_layers
        if isinstance(trainable_backbone_layers, bool) or not 0 <= trainable_backbone_layers <= top:
            raise ValueError(f"model.trainable_backbone_layers: must be an int in [0, {top}] for {name}, "
                             f"got {trainable_backbone_layers!r}")
        if not pretrained:
            raise ValueError("model.trainable_backbone_layers: needs pretrained weights (a torchvision name in "
                             "model.weights or model.weights_backbone); torchvision trains every layer without them")
    _check_sizes(model_info, min_size, max_size)
    kwargs: dict[str, Any] = {}
    if not model_info.fixed_size:
        if min_size is not None:
            kwargs["min_size"] = min_size
        if max_size is not None:
            kwargs["max_size"] = max_size
    for key, value in (("image_mean", image_mean), ("image_std", image_std)):
        if value is not None:
            if len(value) != 3 or (key == "image_std" and min(value) <= 0):
                raise ValueError(f"model.{key}: expected 3 values (std > 0), got {list(value)!r}")
            kwargs[key] = [float(v) for v in value]
    columns = num_classes + 1
    fresh: list[str] = []
    if w is not None and w.enum is not None:
        _require_cached(w.enum, "model.weights")
        model = get_model(name, weights=w.enum, progress=False,
                          trainable_backbone_layers=trainable_backbone_layers, **kwargs)
        if _classifier_columns(model) != columns:
            fresh = replace_classifier(model, columns, prior_prob=prior_prob)
    else:
        if wb is not None:
            _require_cached(wb.enum, "model.weights_backbone")
        model = get_model(name, weights=None, weights_backbone=None if wb is None else wb.enum, progress=False,
                          num_classes=columns, trainable_backbone_layers=trainable_backbone_layers, **kwargs)
        if w is not None:
            fresh = load_detector_state(model, _read_state(w.path), prior_prob=prior_prob,
                                        source=f"model.weights {str(w.path)!r}")
        else:
            fresh = list(model.state_dict())  # nothing loaded: every layer is fresh
    if model_info.fixed_size and min_size is not None:
        model.transform.min_size = (min_size,)
        model.transform.max_size = min_size
        model.transform.fixed_size = (min_size, min_size)
    model.train()
    return model, fresh


def _check_sizes(model: ZooModel, min_size: int | None, max_size: int | None) -> None:
    for key, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 32):
            raise ValueError(f"model.{key}: must be an int >= 32, got {value!r}")
    if min_size is not None and max_size is not None and min_size > max_size:
        raise ValueError(f"model.min_size ({min_size}) must not exceed model.max_size ({max_size})")
    if model.fixed_size:
        if max_size is not None and max_size != min_size:
            raise ValueError(f"model.max_size: {model.name} takes a fixed square input; set model.min_size "
                             f"(the side) and leave model.max_size unset, got {max_size}")
        if model.name == "ssd300_vgg16" and min_size not in (None, 300):
            raise ValueError(f"model.min_size: ssd300_vgg16's default boxes are laid out for 300 px "
                             f"(torchvision's fixed steps), got {min_size}; use ssdlite320_mobilenet_v3_large "
                             "for another side")


# ------------------------------------------------------------------------------------------ describe


def describe_model(
    model: nn.Module, *, name: str, weights: str | None = None, weights_backbone: str | None = None
) -> dict[str, Any]:
    """What a report and ``result.json`` say about a model: name, family, size, weights and input size.

    Args:
        model: The built (plain or adapted) torchvision detector.
        name: Its name (a preset or a :data:`ZOO` name).
        weights: The detector weights as configured (resolved to the full torchvision name).
        weights_backbone: The backbone weights as configured.

    Returns:
        ``{"name", "family", "parameters", "trainable_parameters", "weights", "weights_backbone",
        "min_size", "max_size", "fixed_size", "image_mean", "image_std"}``; ``weights`` is ``"none"`` when the
        model is trained from scratch, ``fixed_size`` ``[h, w]`` for SSD's fixed square, else ``None``.
    """
    def resolved(spec: str | None, part: Literal["weights", "weights_backbone"]) -> str:
        if spec is None:
            return "none"
        if name in ZOO:
            return str(resolve_weights(name, spec, part=part))
        return spec

    t = getattr(model, "transform", None)
    fixed = getattr(t, "fixed_size", None)
    return {
        "name": name,
        "family": model_family(name),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "weights": resolved(weights, "weights"),
        "weights_backbone": resolved(weights_backbone, "weights_backbone"),
        "min_size": int(t.min_size[-1]) if t is not None else None,
        "max_size": int(t.max_size) if t is not None else None,
        "fixed_size": list(fixed) if fixed is not None else None,
        "image_mean": [float(v) for v in t.image_mean] if t is not None else None,
        "image_std": [float(v) for v in t.image_std] if t is not None else None,
    }
