"""The names of torchvision's detection models and of their weights, as plain data that needs no torch.

:mod:`detbalance.config` checks ``model.name``, ``model.weights`` and ``model.weights_backbone`` with these
tables before torch is imported (the command line checks its arguments first); :mod:`detbalance.detectors.zoo`
builds the models and resolves the same names through torchvision's weights API. A test holds the tables to
torchvision's registry (``torchvision.models.get_model_weights``), so they cannot drift from the installed
torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FAMILIES", "PRESETS", "ZOO", "ZooModel", "check_weights_name", "is_weights_file", "model_family"]

Family = Literal["retinanet", "fcos", "faster_rcnn", "ssd"]

#: Model families: which adapter (and so which remedies) a model takes.
FAMILIES: tuple[str, ...] = ("retinanet", "fcos", "faster_rcnn", "ssd")

#: The small presets of ``detectors.build_detector``, named by their family.
PRESETS: tuple[str, ...] = ("retinanet", "faster_rcnn", "ssd")


@dataclass(frozen=True)
class ZooModel:
    """One torchvision detection builder: its ``family``, its weights enum and their members, the weights enum
    of its backbone and its members, the most ``trainable_backbone_layers`` it accepts, torchvision's input
    sizes (``min_size`` / ``max_size`` of its ``GeneralizedRCNNTransform``; SSD: the side of its fixed square)
    and whether its input is a fixed square (SSD)."""

    name: str
    family: Family
    weights: str
    weights_members: tuple[str, ...]
    backbone_weights: str
    backbone_members: tuple[str, ...]
    max_trainable_layers: int
    min_size: int = 800
    max_size: int = 1333
    fixed_size: bool = False


_RESNET50 = ("ResNet50_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2"))
_MOBILENET = ("MobileNet_V3_Large_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2"))
_VGG16 = ("VGG16_Weights", ("IMAGENET1K_V1", "IMAGENET1K_FEATURES"))
_COCO = ("COCO_V1",)

#: torchvision's detection builders (box detectors), by name.
ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("retinanet_resnet50_fpn", "retinanet", "RetinaNet_ResNet50_FPN_Weights", _COCO, *_RESNET50, 5),
        ZooModel("retinanet_resnet50_fpn_v2", "retinanet", "RetinaNet_ResNet50_FPN_V2_Weights", _COCO, *_RESNET50, 5),
        ZooModel("fcos_resnet50_fpn", "fcos", "FCOS_ResNet50_FPN_Weights", _COCO, *_RESNET50, 5),
        ZooModel("fasterrcnn_resnet50_fpn", "faster_rcnn", "FasterRCNN_ResNet50_FPN_Weights", _COCO, *_RESNET50, 5),
        ZooModel("fasterrcnn_resnet50_fpn_v2", "faster_rcnn", "FasterRCNN_ResNet50_FPN_V2_Weights", _COCO,
                 *_RESNET50, 5),
        ZooModel("fasterrcnn_mobilenet_v3_large_fpn", "faster_rcnn", "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
                 _COCO, *_MOBILENET, 6),
        ZooModel("fasterrcnn_mobilenet_v3_large_320_fpn", "faster_rcnn",
                 "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights", _COCO, *_MOBILENET, 6, min_size=320, max_size=640),
        ZooModel("ssd300_vgg16", "ssd", "SSD300_VGG16_Weights", _COCO, *_VGG16, 5, 300, 300, fixed_size=True),
        ZooModel("ssdlite320_mobilenet_v3_large", "ssd", "SSDLite320_MobileNet_V3_Large_Weights", _COCO,
                 *_MOBILENET, 6, 320, 320, fixed_size=True),
    )
}

_BACKBONE_ENUMS: dict[str, tuple[str, ...]] = {e: members for e, members in (_RESNET50, _MOBILENET, _VGG16)}


def model_family(name: str) -> Family:
    """The family of a model name: a small preset (``"retinanet"``, ``"faster_rcnn"``, ``"ssd"``) or a zoo name.

    Raises:
        ValueError: for an unknown name, listing the accepted ones.
    """
    if name in PRESETS:
        return name  # type: ignore[return-value]
    if name in ZOO:
        return ZOO[name].family
    raise ValueError(f"unknown model {name!r}; accepted: the small presets {list(PRESETS)} or {list(ZOO)}")


def is_weights_file(spec: str) -> bool:
    """Whether a weights setting names a file (``.pth`` / ``.pt`` or a path) rather than torchvision weights."""
    return spec.endswith((".pth", ".pt")) or "/" in spec or "\\" in spec


def check_weights_name(
    name: str, spec: str, *, part: Literal["weights", "weights_backbone"] = "weights", key: str | None = None
) -> str:
    """The full torchvision name (``"Enum.MEMBER"``) of a weights setting of zoo model ``name``.

    Args:
        name: A :data:`ZOO` name.
        spec: ``"DEFAULT"``, a member (``"COCO_V1"``) or a full name (``"ResNet50_Weights.IMAGENET1K_V1"``).
        part: ``"weights"`` (the detector's) or ``"weights_backbone"``.
        key: How errors name the setting (default ``model.<part>``).

    Returns:
        ``"Enum.DEFAULT"`` for ``"DEFAULT"`` (torchvision resolves it), else ``"Enum.MEMBER"``.

    Raises:
        ValueError: an unknown name, or weights of another model or family, naming whose they are and the
            accepted names.
    """
    key = f"model.{part}" if key is None else key
    model = ZOO[name]
    enum, members = (
        (model.weights, model.weights_members) if part == "weights" else (model.backbone_weights, model.backbone_members)
    )
    accepted = ["DEFAULT"] + [f"{enum}.{m}" for m in members]
    if spec == "DEFAULT" or spec in members:
        return f"{enum}.{spec}"
    if "." not in spec:
        raise ValueError(f"{key}: {spec!r} is not a weights name of {name}; accepted: {accepted}")
    owner_enum, member = spec.split(".", 1)
    if owner_enum == enum:
        if member in members or member == "DEFAULT":
            return spec
        raise ValueError(f"{key}: {enum} has no member {member!r}; accepted for {name}: {accepted}")
    owners = [m for m in ZOO.values() if m.weights == owner_enum]
    if owners:
        whose = f"the weights of {owners[0].name} ({owners[0].family} family)"
    elif owner_enum in _BACKBONE_ENUMS:
        whose = f"{owner_enum} (backbone weights)" if part == "weights" else owner_enum
    else:
        raise ValueError(f"{key}: unknown torchvision weights {spec!r}; accepted for {name}: {accepted}")
    raise ValueError(f"{key}: {spec!r} are {whose}, not of {name} ({model.family} family); accepted: {accepted}")
