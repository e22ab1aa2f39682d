"""The hyperparameters of the RoI samplers, as plain frozen dataclasses that need no torch.

Each hyperparameter is declared once, here. :mod:`detbalance.sampling.roi_sampler` extends these classes
with the sampling itself (``__call__``, which needs torch); :mod:`detbalance.config` extends them with the
``name`` that picks one in TOML, so reading and checking a configuration never imports torch (the command
line checks its arguments before it imports torch). :func:`detbalance.builders.build_roi_sampler` maps a
config to its sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FixedRatioParams", "IoUBalancedParams", "OHEMParams", "ScoreHLRParams", "StratifiedOHEMParams"]


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]{' or None' if allow_none else ''}, got {value!r}")


def _check_pair(name: str, value: object) -> None:
    if not (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in value)):
        raise ValueError(f"{name} must be a (start, end) pair of finite numbers >= 0, got {value!r}")


@dataclass(frozen=True)
class FixedRatioParams:
    """Hyperparameters of :class:`~detbalance.sampling.FixedRatioSampler` (the RoI head's 512 at 0.25).

    Args:
        num_samples: Budget per image.
        positive_fraction: Largest share of the budget given to foreground.
    """

    num_samples: int = 512
    positive_fraction: float = 0.25

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_fraction("positive_fraction", self.positive_fraction)


@dataclass(frozen=True)
class OHEMParams:
    """Hyperparameters of :class:`~detbalance.sampling.OHEMSampler`.

    Args:
        num_samples: Hard RoIs kept per image.
        nms_iou: IoU of the NMS over the hard RoIs; ``None`` disables it.
        positive_fraction: Optional cap on the foreground share; ``None`` (the paper) means none.
    """

    num_samples: int = 128
    nms_iou: float | None = 0.7
    positive_fraction: float | None = None

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_fraction("nms_iou", self.nms_iou, allow_none=True)
        _check_fraction("positive_fraction", self.positive_fraction, allow_none=True)


@dataclass(frozen=True)
class StratifiedOHEMParams:
    r"""Hyperparameters of :class:`~detbalance.sampling.StratifiedOHEMSampler`, and its schedule.

    Args:
        num_samples: Hard RoIs kept per image.
        strata: Number of loss strata (the paper: 4).
        nms_iou: IoU of the NMS over the hard RoIs (OHEM's 0.7); ``None`` disables it.
        cls_weight: ``(start, end)`` of :math:`w_{cls}`.
        loc_weight: ``(start, end)`` of :math:`w_{loc}`.
        decay: ``(start, end)`` of :math:`\beta`.
    """

    num_samples: int = 128
    strata: int = 4
    nms_iou: float | None = 0.7
    cls_weight: tuple[float, float] = (1.5, 0.5)
    loc_weight: tuple[float, float] = (0.5, 1.5)
    decay: tuple[float, float] = (1.0, 0.25)

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_int("strata", self.strata, minimum=1)
        _check_fraction("nms_iou", self.nms_iou, allow_none=True)
        _check_pair("cls_weight", self.cls_weight)
        _check_pair("loc_weight", self.loc_weight)
        _check_pair("decay", self.decay)

    def loss_weights(self, progress: float) -> tuple[float, float]:
        """``(w_cls, w_loc)`` at ``progress`` in ``[0, 1]`` (linear between start and end)."""
        _check_fraction("progress", progress)
        t = float(progress)
        return (self.cls_weight[0] + t * (self.cls_weight[1] - self.cls_weight[0]),
                self.loc_weight[0] + t * (self.loc_weight[1] - self.loc_weight[0]))

    def distribution(self, progress: float) -> list[float]:
        r"""Sampling distribution over strata (hardest first) at ``progress``: :math:`\pi_s \propto e^{-\beta s}`."""
        _check_fraction("progress", progress)
        beta = self.decay[0] + float(progress) * (self.decay[1] - self.decay[0])
        weights = [math.exp(-beta * s) for s in range(self.strata)]
        total = sum(weights)
        return [w / total for w in weights]


@dataclass(frozen=True)
class ScoreHLRParams:
    """Hyperparameters of :class:`~detbalance.sampling.ScoreHLRSampler` (PISA's ISR-N; mmdetection's ``configs/pisa``).

    Args:
        num_samples: Budget per image.
        positive_fraction: Largest foreground share.
        k: Power of the weight mapping.
        bias: Shift of the weight mapping, in ``[0, 1]``.
        score_thr: Negatives at or below this score are not ranked.
        iou_thr: IoU of the NMS-match grouping.
    """

    num_samples: int = 512
    positive_fraction: float = 0.25
    k: float = 0.5
    bias: float = 0.0
    score_thr: float = 0.05
    iou_thr: float = 0.5

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_fraction("positive_fraction", self.positive_fraction)
        if isinstance(self.k, bool) or not isinstance(self.k, int | float) or not 0.0 <= float(self.k) < math.inf:
            raise ValueError(f"k must be a finite number >= 0, got {self.k!r}")
        _check_fraction("bias", self.bias)
        _check_fraction("score_thr", self.score_thr)
        _check_fraction("iou_thr", self.iou_thr)


@dataclass(frozen=True)
class IoUBalancedParams:
    """Hyperparameters of :class:`~detbalance.sampling.IoUBalancedSampler` (Libra R-CNN; mmdetection 3.3's
    ``configs/libra_rcnn``: 512 at 0.25, ``num_bins=3``, ``floor_fraction=0``, ``floor_thr=-1``, which its
    sampler turns into 0 after the first call: our ``0.0``; ``None`` bins every negative).

    Args:
        num_samples: Budget per image.
        positive_fraction: Largest share of the budget given to foreground.
        floor_thr: IoU below which negatives form the floor set (``0.0``: IoU == 0); ``None``: no floor set.
        floor_fraction: Share of the negative budget left to the floor set.
        num_bins: IoU bins of the negatives above the floor.
    """

    num_samples: int = 512
    positive_fraction: float = 0.25
    floor_thr: float | None = 0.0
    floor_fraction: float = 0.0
    num_bins: int = 3

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=1)
        _check_fraction("positive_fraction", self.positive_fraction)
        _check_fraction("floor_thr", self.floor_thr, allow_none=True)
        _check_fraction("floor_fraction", self.floor_fraction)
        _check_int("num_bins", self.num_bins, minimum=1)
