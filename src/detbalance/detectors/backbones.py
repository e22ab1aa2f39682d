"""Backbones with a feature pyramid for the torchvision detectors, sized to train from scratch.

Every builder returns an ``nn.Module`` mapping ``Tensor[B, 3, H, W]`` to an ``OrderedDict[str, Tensor]``
of feature maps ``"0", "1", ...`` (finest first), all with ``out_channels`` channels, the layout that
torchvision's ``RetinaNet``/``FasterRCNN`` expect. Each module also carries ``strides`` (the output
stride of every level, e.g. ``(4, 8, 16)``) so anchors can be sized per level.

Presets (``build_backbone(name)``):

====================== ========================================= ============ ======= ======
name                   trunk                                     strides      FPN ch. params
====================== ========================================= ============ ======= ======
``"tiny"``             stem + 3 residual stages, 16/32/64 ch, BN 4, 8, 16     32      0.11 M
``"small"``            stem + 3 residual stages, 24/48/96 ch, BN 4, 8, 16     64      0.30 M
``"resnet18_fpn"``     torchvision ResNet-18 up to layer3, BN    4, 8, 16, 32 128     3.3 M
``"mobilenet_v3_fpn"`` torchvision MobileNetV3-Large to C4, BN   4, 8, 16, 32 128     0.55 M
====================== ========================================= ============ ======= ======

The torchvision trunks end where their last returned stage ends (``returned_layers=[1, 2, 3]``), and
their 32-stride level is torchvision's ``LastLevelMaxPool`` (``"pool"``; Faster R-CNN uses it in the RPN
only, as torchvision does).

The two small trunks are the ones meant for CPU (the built-in benchmark has 7-18 px objects in 128 px
images, so the finest level has stride 4). They use ``BatchNorm2d`` by default, which is well
conditioned at batch 16 even on 32x32 maps; ``norm="gn"`` swaps in ``GroupNorm`` for small or
per-GPU batches. There is no ``FrozenBatchNorm2d``: nothing here is pretrained (torchvision builders
are called with ``weights=None``), so freezing statistics would be pointless.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["BACKBONES", "FPNBackbone", "build_backbone"]

Norm = Literal["bn", "gn"]

#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = ("tiny", "small", "resnet18_fpn", "mobilenet_v3_fpn")

_TV_FPN_CHANNELS = 128

_PRESETS: dict[str, tuple[tuple[int, int, int], int, int]] = {
    # name: (stage channels, blocks per stage, FPN out_channels)
    "tiny": ((16, 32, 64), 1, 32),
    "small": ((24, 48, 96), 1, 64),
}


def _norm_layer(norm: Norm) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        # 8 channels per group (at least one group): works from 16 channels up.
        return lambda c: nn.GroupNorm(max(1, c // 8), c)
    raise ValueError(f"norm must be 'bn' or 'gn', got {norm!r}")


def _conv_norm_act(cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module], act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), norm(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with a strided 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(cin, cout, stride, norm)
        self.conv2 = _conv_norm_act(cout, cout, 1, norm, act=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class FPNBackbone(nn.Module):
    """A small residual trunk with a torchvision :class:`~torchvision.ops.FeaturePyramidNetwork`.

    A stride-2 3x3 stem, then three stages of ``blocks`` residual basic blocks, each halving the
    resolution, give ``C2, C3, C4`` at strides 4, 8, 16; the FPN turns them into ``"0", "1", "2"``
    with ``fpn_channels`` channels each. Convolutions use Kaiming-normal init; the last norm of every
    residual branch starts at zero weight (Goyal et al. 2017, "zero-init residual"), which makes
    from-scratch training of the unnormalised detector heads stable.

    Args:
        channels: Channels of the three stages; the stem has ``channels[0]``.
        blocks: Residual blocks per stage.
        fpn_channels: ``out_channels`` of every pyramid level.
        norm: ``"bn"`` (``BatchNorm2d``) or ``"gn"`` (``GroupNorm`` with 8 channels per group).
        in_channels: Image channels.

    Shape:
        input ``Tensor[B, in_channels, H, W]`` -> ``OrderedDict`` of ``Tensor[B, fpn_channels, H/s, W/s]``
        for ``s`` in :attr:`strides` (rounded up for odd sizes).
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (16, 32, 64),
        *,
        blocks: int = 1,
        fpn_channels: int = 32,
        norm: Norm = "bn",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be three positive ints, got {channels!r}")
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        if fpn_channels < 1:
            raise ValueError(f"fpn_channels must be >= 1, got {fpn_channels}")
        norm_layer = _norm_layer(norm)
        self.stem = _conv_norm_act(in_channels, channels[0], 2, norm_layer)
        stages = []
        cin = channels[0]
        for cout in channels:
            layers = [_BasicBlock(cin, cout, 2, norm_layer)]
            layers += [_BasicBlock(cout, cout, 1, norm_layer) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork(list(channels), fpn_channels)
        self.out_channels = fpn_channels
        self.strides: tuple[int, ...] = (4, 8, 16)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not any(m is c for c in self.fpn.modules()):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, _BasicBlock):
                nn.init.zeros_(m.conv2[1].weight)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(x)
        feats: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[str(i)] = x
        return self.fpn(feats)


def build_backbone(name: str = "tiny", *, norm: Norm = "bn") -> nn.Module:
    """Build a backbone with a feature pyramid by name (see the module docstring for the presets).

    Args:
        name: One of :data:`BACKBONES`.
        norm: ``"bn"`` or ``"gn"`` for the small trunks; the torchvision trunks always use
            ``BatchNorm2d`` (trainable, from scratch) and reject ``"gn"``.

    Returns:
        A module with ``out_channels: int`` and ``strides: tuple[int, ...]`` returning an
        ``OrderedDict[str, Tensor]`` of pyramid levels, finest first.
    """
    if name in _PRESETS:
        channels, blocks, fpn_channels = _PRESETS[name]
        return FPNBackbone(channels, blocks=blocks, fpn_channels=fpn_channels, norm=norm)
    if name in ("resnet18_fpn", "mobilenet_v3_fpn"):
        if norm != "bn":
            raise ValueError(f"norm must be 'bn' for backbone {name!r}, got {norm!r}")
        if name == "resnet18_fpn":
            backbone = resnet_fpn_backbone(
                backbone_name="resnet18",
                weights=None,
                norm_layer=nn.BatchNorm2d,
                trainable_layers=5,
                returned_layers=[1, 2, 3],
                extra_blocks=LastLevelMaxPool(),
            )
        else:
            backbone = mobilenet_backbone(
                backbone_name="mobilenet_v3_large",
                weights=None,
                fpn=True,
                norm_layer=nn.BatchNorm2d,
                trainable_layers=6,
                returned_layers=[1, 2, 3],
            )
        # torchvision's FPN has 256 channels; 128 halves the head cost and is ample from scratch.
        in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
        backbone.fpn = FeaturePyramidNetwork(in_channels, _TV_FPN_CHANNELS, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = _TV_FPN_CHANNELS
        backbone.strides = (4, 8, 16, 32)
        return backbone
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")

