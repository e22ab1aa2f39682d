"""Unmodified torchvision detectors sized for small images and CPU training.

:func:`build_detector` returns a plain torchvision ``RetinaNet``, ``FasterRCNN`` or ``SSD``; nothing in
it is specific to this library, so the adapters (``balance_retinanet`` ...) can be tested for equality
with the vanilla model. The defaults, chosen for the built-in benchmark (7-18 px objects in 128 px
images) and for CPU speed:

* backbone ``"tiny"`` (see :mod:`detbalance.detectors.backbones`), pyramid strides 4, 8, 16;
* the transform keeps the image size: ``min_size = max_size = image_size`` (a 128 px image is not
  resized) and normalises with ``image_mean = 0.5``, ``image_std = 0.25`` per channel, suited to
  images in ``[0, 1]`` with mid-grey backgrounds (pass ImageNet's values for natural images);
* anchors: on a level of stride ``s``, sizes ``b, b 2^(1/3), b 2^(2/3)`` with ``b = 2 s * image_size / 128``
  and aspect ratios 0.5, 1, 2: 9 anchors per location, 8-13 px on stride 4 and 16-25 px on stride 8
  at 128 px (RetinaNet and the Faster R-CNN RPN; SSD uses the equivalent default boxes, see below);
* the class count follows torchvision: ``num_classes = K`` object classes gives the models ``K + 1``
  outputs. For RetinaNet, column ``k`` of the sigmoid classifier is class ``k`` and column 0 is never
  a positive (torchvision's convention with COCO), so labels ``1..K`` index the columns directly;
* RetinaNet: torchvision's ``RetinaNetHead`` with ``head_convs`` (default 1, torchvision: 4) 3x3 conv
  layers per branch, no normalisation, the classifier bias at the focal-loss prior ``pi = 0.01``;
* Faster R-CNN: torchvision's ``RPNHead``, ``MultiScaleRoIAlign`` (sampling ratio 2) on the pyramid
  levels and a ``TwoMLPHead``, sized by :func:`faster_rcnn_sizes` (small images: 5x5 RoIAlign, 128
  units, RPN 600 -> 128 proposals per image in training, 300 -> 100 at test; 512 px and more:
  torchvision's 7x7, 1024 units, 2000 -> 2000 and 1000 -> 1000);
* SSD: torchvision's ``SSDHead`` on the pyramid levels, each level's predictors behind ``head_convs``
  3x3 conv + ReLU layers (default 1; torchvision predicts straight from its deep VGG/MobileNet features,
  ``head_convs = 0``: with the small backbones that gave 12.1 AP against 16.0 with one layer, 700
  iterations of the ssd suite's 3:1 mining arm, AdamW, seed 0), and a ``DefaultBoxGenerator`` with scales ``2 s / 128``
  per level (ratios 2 and 1/2 plus the two squares: 4 boxes per location), 3:1 mining.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import Conv2dNormActivation

from detbalance.detectors.backbones import BACKBONES, Norm, build_backbone

__all__ = ["ARCHS", "LARGE_IMAGE_SIDE", "build_detector", "default_anchor_sizes", "faster_rcnn_sizes",
           "set_training_progress"]

Arch = Literal["retinanet", "faster_rcnn", "ssd"]

#: Architectures accepted by :func:`build_detector`.
ARCHS: tuple[str, ...] = ("retinanet", "faster_rcnn", "ssd")


#: Side from which :func:`faster_rcnn_sizes` returns torchvision's own (COCO, 800 px) sizes.
LARGE_IMAGE_SIDE = 512


def faster_rcnn_sizes(image_size: int) -> dict[str, int]:
    """RPN proposal counts and RoI-head sizes of :func:`build_detector`'s Faster R-CNN.

    For ``image_size >= 512`` these are torchvision's defaults (``fasterrcnn_resnet50_fpn``: RPN
    2000/2000 pre/post-NMS proposals in training, 1000/1000 at test, 7x7 RoIAlign, 1024-unit
    ``TwoMLPHead``). Below, they are sized for the built-in benchmark (128 px images, 1-2 objects of
    7-18 px, anchors 8-51 px on strides 4/8/16, about 12 000 anchors per image):

    * ``rpn_pre_nms_top_n_train = 600`` per level, ``rpn_post_nms_top_n_train = 128`` per image: after
      NMS at 0.7 a 128 px image holds only a few hundred distinct boxes of object size, and with 1-2
      objects 128 proposals still give every object several foreground RoIs (IoU >= 0.5) next to ~100
      background ones. It is twice the 64 RoIs per image that the samplers suite back-propagates, so
      OHEM still chooses (its paper: ~2000 candidates for 64 per image at 800 px), while the read-only
      pass of OHEM/S-OHEM covers ~130 RoIs per image instead of the ~1000 of the previous sizing. With
      64 of ~130 chosen (B / R ~ 50 %) hard-example selection hardly differs from random sampling, so
      the samplers suite overrides this pool with ``build_detector(rpn_pre_nms_top_n_train=2000,
      rpn_post_nms_top_n_train=1000)`` (``model.*`` config keys of the same names).
    * test: 300 pre-NMS per level, 100 post-NMS per image: COCO AP counts at most 100 detections.
    * ``roi_output_size = 5``: an object of 7-18 px covers 2-5 cells of the stride-4 level; a 7x7 grid
      samples the same few cells more finely at twice the cost of the box head's first layer.
    * ``representation = 128`` units in ``TwoMLPHead`` (torchvision 1024 for 91 COCO classes on ResNet
      features; 5 classes on 32-channel features need far less).

    Args:
        image_size: The training side.

    Returns:
        ``{"rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
        "rpn_post_nms_top_n_test", "roi_output_size", "representation"}``.
    """
    if image_size >= LARGE_IMAGE_SIDE:
        return {"rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000, "rpn_pre_nms_top_n_test": 1000,
                "rpn_post_nms_top_n_test": 1000, "roi_output_size": 7, "representation": 1024}
    return {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 128, "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 100, "roi_output_size": 5, "representation": 128}


def default_anchor_sizes(strides: Sequence[int], image_size: int) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes per level: ``b, b 2^(1/3), b 2^(2/3)`` with ``b = 2 s * image_size / 128``.

    Args:
        strides: Output stride of every pyramid level, finest first.
        image_size: The side the images are trained at.

    Returns:
        One tuple of three sizes (pixels) per level, e.g. ``((8, 10.08, 12.7), (16, ...), ...)`` at 128.
    """
    scale = image_size / 128.0
    return tuple(tuple(2.0 * s * scale * 2.0 ** (i / 3.0) for i in range(3)) for s in strides)


class _SSDFeatures(nn.Module):
    """The pyramid of a backbone, with ``out_channels`` as the per-level list torchvision's SSD wants."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = backbone
        self.strides = tuple(backbone.strides)
        self.out_channels = [backbone.out_channels] * len(self.strides)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.body(x)


def _light_retinanet_head(in_channels: int, num_anchors: int, num_columns: int, head_convs: int) -> RetinaNetHead:
    head = RetinaNetHead(in_channels, num_anchors, num_columns)
    if head_convs != 4:
        for branch in (head.classification_head, head.regression_head):
            convs = [Conv2dNormActivation(in_channels, in_channels, norm_layer=None) for _ in range(head_convs)]
            for m in convs:
                nn.init.normal_(m[0].weight, std=0.01)
                nn.init.zeros_(m[0].bias)
            branch.conv = nn.Sequential(*convs)
    return head


def _ssd_head(in_channels: int, num_anchors: Sequence[int], num_columns: int, head_convs: int) -> SSDHead:
    """torchvision's ``SSDHead`` with ``head_convs`` 3x3 conv + ReLU layers before each level's predictor.

    torchvision's SSD predicts from the backbone's features with one 3x3 conv per level (``head_convs = 0``);
    its VGG/MobileNet trunks have the depth for that, the small CPU backbones do not, so the default gives
    each level and branch the same conv stack as the RetinaNet head (``head_convs`` layers, not shared
    across levels as in SSD). Predictors keep torchvision's Xavier initialisation.
    """
    head = SSDHead([in_channels] * len(num_anchors), list(num_anchors), num_columns)
    if head_convs == 0:
        return head
    for branch in (head.classification_head, head.regression_head):
        for i, predictor in enumerate(branch.module_list):
            convs = [Conv2dNormActivation(in_channels, in_channels, norm_layer=None) for _ in range(head_convs)]
            branch.module_list[i] = nn.Sequential(*convs, predictor)
    return head


def build_detector(
    arch: Arch,
    *,
    num_classes: int,
    backbone: str = "tiny",
    image_size: int = 128,
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    norm: Norm = "bn",
    head_convs: int = 1,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.25, 0.25, 0.25),
    rpn_pre_nms_top_n_train: int | None = None,
    rpn_post_nms_top_n_train: int | None = None,
) -> nn.Module:
    """Build an unmodified torchvision detector for ``K = num_classes`` object classes.

    Args:
        arch: ``"retinanet"``, ``"faster_rcnn"`` or ``"ssd"``.
        num_classes: ``K``, the number of object classes (labels ``1..K``); the model gets ``K + 1``
            outputs as torchvision's detectors do.
        backbone: A name from :data:`detbalance.detectors.backbones.BACKBONES`.
        image_size: Training and test side; the transform neither up- nor down-scales such images.
        anchor_sizes: Anchor sizes (pixels) per pyramid level, finest first; ``None`` uses
            :func:`default_anchor_sizes`. For SSD, the first size of each level sets its scale.
        aspect_ratios: Height/width ratios of the anchors on every level (RetinaNet, RPN).
        norm: ``"bn"`` or ``"gn"`` in the small backbones.
        head_convs: 3x3 conv layers per head branch: RetinaNet (shared over levels; torchvision's default
            is 4) and SSD (per level, before each predictor; torchvision's is 0).
        image_mean: Per-channel mean the transform subtracts.
        image_std: Per-channel std the transform divides by.
        rpn_pre_nms_top_n_train: Faster R-CNN only: RPN proposals kept per pyramid level before NMS in
            training; ``None`` takes :func:`faster_rcnn_sizes` (600 below 512 px).
        rpn_post_nms_top_n_train: Faster R-CNN only: RPN proposals kept per image after NMS in training,
            the candidate pool the RoI sampler draws from; ``None`` takes :func:`faster_rcnn_sizes` (128
            below 512 px). The samplers suite sets 2000 / 1000, the OHEM paper's order (64 of ~1000 RoIs
            per image back-propagated, B / R ~ 6 %).

    Returns:
        ``torchvision.models.detection.RetinaNet``, ``FasterRCNN`` or ``SSD`` in training mode.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (K object classes), got {num_classes!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if isinstance(head_convs, bool) or not isinstance(head_convs, int) or head_convs < 0:
        raise ValueError(f"head_convs must be an int >= 0, got {head_convs!r}")
    if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
        raise ValueError(f"image_mean/image_std must have 3 entries, std > 0; got {image_mean!r}, {image_std!r}")
    if not aspect_ratios or min(aspect_ratios) <= 0:
        raise ValueError(f"aspect_ratios must be positive, got {aspect_ratios!r}")
    for name, value in (("rpn_pre_nms_top_n_train", rpn_pre_nms_top_n_train),
                        ("rpn_post_nms_top_n_train", rpn_post_nms_top_n_train)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if value is not None and arch != "faster_rcnn":
            raise ValueError(f"{name} sets the Faster R-CNN RPN's proposal pool; arch {arch!r} has none")

    body = build_backbone(backbone, norm=norm)
    strides = tuple(body.strides)
    if anchor_sizes is None:
        sizes = default_anchor_sizes(strides, image_size)
    else:
        sizes = tuple(tuple(float(s) for s in level) for level in anchor_sizes)
        if len(sizes) != len(strides) or any(not lvl or min(lvl) <= 0 for lvl in sizes):
            raise ValueError(
                f"anchor_sizes must give positive sizes for each of the {len(strides)} levels of backbone "
                f"{backbone!r} (strides {strides}), got {anchor_sizes!r}"
            )
    ratios = tuple(float(r) for r in aspect_ratios)
    mean, std = [float(m) for m in image_mean], [float(s) for s in image_std]
    columns = num_classes + 1

    if arch == "retinanet":
        anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
        head = _light_retinanet_head(body.out_channels, anchors.num_anchors_per_location()[0], columns, head_convs)
        return RetinaNet(
            body,
            columns,
            min_size=image_size,
            max_size=image_size,
            image_mean=mean,
            image_std=std,
            anchor_generator=anchors,
            head=head,
        )
    if arch == "faster_rcnn":
        anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
        names = [str(i) for i in range(len(strides))]
        if backbone in ("resnet18_fpn", "mobilenet_v3_fpn"):
            names[-1] = "pool"  # torchvision's LastLevelMaxPool level
        size = faster_rcnn_sizes(image_size)
        if rpn_pre_nms_top_n_train is not None:
            size["rpn_pre_nms_top_n_train"] = rpn_pre_nms_top_n_train
        if rpn_post_nms_top_n_train is not None:
            size["rpn_post_nms_top_n_train"] = rpn_post_nms_top_n_train
        out = size["roi_output_size"]
        return FasterRCNN(
            body,
            None,  # the class count is set by box_predictor
            min_size=image_size,
            max_size=image_size,
            image_mean=mean,
            image_std=std,
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=size["rpn_pre_nms_top_n_train"],
            rpn_post_nms_top_n_train=size["rpn_post_nms_top_n_train"],
            rpn_pre_nms_top_n_test=size["rpn_pre_nms_top_n_test"],
            rpn_post_nms_top_n_test=size["rpn_post_nms_top_n_test"],
            box_roi_pool=MultiScaleRoIAlign(featmap_names=[n for n in names if n != "pool"], output_size=out,
                                            sampling_ratio=2),
            box_head=TwoMLPHead(body.out_channels * out * out, size["representation"]),
            box_predictor=FastRCNNPredictor(size["representation"], columns),
        )
    features = _SSDFeatures(body)
    first = [level[0] for level in sizes]
    scales = [s / image_size for s in first] + [2.0 * first[-1] / image_size]
    boxes = DefaultBoxGenerator([[2]] * len(first), scales=scales)
    head = _ssd_head(body.out_channels, boxes.num_anchors_per_location(), columns, head_convs)
    return SSD(
        features,
        boxes,
        (image_size, image_size),
        columns,
        image_mean=mean,
        image_std=std,
        head=head,
    )


def set_training_progress(model: nn.Module, progress: float) -> None:
    """Tell every adapted part of ``model`` the fraction of training done (S-OHEM's schedule).

    Calls ``set_progress(progress)`` on each module in ``model.modules()`` that defines it; parts
    without a schedule are left alone.

    Args:
        model: Any module, typically an adapted detector.
        progress: Fraction of training done, in ``[0, 1]``.
    """
    progress = float(progress)
    if not (0.0 <= progress <= 1.0) or math.isnan(progress):
        raise ValueError(f"progress must lie in [0, 1], got {progress!r}")
    for module in model.modules():
        fn = getattr(module, "set_progress", None)
        if callable(fn):
            fn(progress)

