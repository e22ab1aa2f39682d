"""Positive-count normalisers for dense detectors (the denominator of focal / GHM-free losses).

A dense detector sums the per-anchor loss and divides by the number of positive anchors. Where exactly is a
choice that changes results; it is made explicit here:

* ``'per_batch'`` (focal-loss paper, mmdetection): ``sum_b loss_b / max(1, sum_b npos_b)``;
* ``'per_image'`` (torchvision RetinaNet): ``mean_b (loss_b / max(1, npos_b))``;
* ``'ema'`` (detectron2 RetinaNet): ``sum_b loss_b / ema``, ``ema = m ema + (1 - m) max(1, sum_b npos_b)``,
  starting from 100 and updated in training mode only.

Zero positives never divide by zero (the denominator is at least 1) and never drop the negatives' loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from detbalance.losses._reduction import check_momentum

__all__ = ["PositiveNormalizer", "normalize_by_positives"]

MODES = ("per_batch", "per_image", "ema")


def _check_inputs(per_image_loss: Tensor, num_positives: Tensor) -> None:
    if per_image_loss.dim() != 1:
        raise ValueError(f"per_image_loss must be 1-D Tensor[B], got shape {tuple(per_image_loss.shape)}")
    if num_positives.shape != per_image_loss.shape:
        raise ValueError(
            f"num_positives must have shape {tuple(per_image_loss.shape)}, got {tuple(num_positives.shape)}"
        )


def _mean_over_ranks(total: Tensor) -> Tensor:
    """``total`` averaged over ranks (all-reduce SUM / world size) when a process group is up.

    Every rank then divides by the same number, so DDP's gradient averaging gives
    ``sum_all loss / sum_all npos``.
    """
    if dist.is_available() and dist.is_initialized():
        total = total.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total / dist.get_world_size()
    return total


def normalize_by_positives(
    per_image_loss: Tensor, num_positives: Tensor, *, mode: str = "per_batch"
) -> Tensor:
    """Normalise summed per-image losses by the number of positives (no distributed communication).

    Args:
        per_image_loss: ``Tensor[B]`` loss summed over each image's anchors.
        num_positives: ``Tensor[B]`` positive anchors per image (any numeric dtype).
        mode: ``'per_batch'`` -> ``sum(loss) / max(1, sum(npos))``; ``'per_image'`` ->
            ``mean_b(loss_b / max(1, npos_b))``.

    Returns:
        0-d tensor (0 for an empty batch).
    """
    if mode not in ("per_batch", "per_image"):
        raise ValueError(f"mode must be 'per_batch' or 'per_image', got {mode!r}")
    _check_inputs(per_image_loss, num_positives)
    npos = num_positives.to(per_image_loss.dtype if per_image_loss.is_floating_point() else torch.float32)
    if mode == "per_batch":
        return per_image_loss.sum() / npos.sum().clamp(min=1.0)
    if per_image_loss.numel() == 0:
        return per_image_loss.sum()
    return (per_image_loss / npos.clamp(min=1.0)).mean()


class PositiveNormalizer(nn.Module):
    """Stateful positive-count normaliser: ``forward(per_image_loss[B], num_positives[B]) -> scalar``.

    Args:
        mode: ``'per_batch'`` (paper), ``'per_image'`` (torchvision) or ``'ema'`` (detectron2).
        momentum: EMA momentum for ``'ema'`` (detectron2: 0.9).
        all_reduce: for ``'per_batch'`` and ``'ema'`` in training mode, average the positive count over DDP
            ranks (when a process group is initialised) so that every rank divides by the same number. No
            collective runs in eval mode (evaluation may run on a subset of ranks).
        initial: starting value of the EMA (detectron2: 100).
    """

    def __init__(
        self,
        mode: str = "per_batch",
        *,
        momentum: float = 0.9,
        all_reduce: bool = True,
        initial: float = 100.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_momentum("momentum", momentum)
        if not isinstance(initial, int | float) or initial < 1:
            raise ValueError(f"initial must be a number >= 1, got {initial!r}")
        self.mode, self.momentum, self.all_reduce = mode, float(momentum or 0.0), bool(all_reduce)
        self.register_buffer("ema", torch.tensor(float(initial)))

    def forward(self, per_image_loss: Tensor, num_positives: Tensor) -> Tensor:
        _check_inputs(per_image_loss, num_positives)
        if self.mode == "per_image":
            return normalize_by_positives(per_image_loss, num_positives, mode="per_image")
        total = num_positives.to(torch.float32).sum()
        if self.all_reduce and self.training:
            total = _mean_over_ranks(total)
        total = total.clamp(min=1.0)
        if self.mode == "per_batch":
            return per_image_loss.sum() / total.to(per_image_loss.dtype)
        if self.training:
            with torch.no_grad():
                self.ema.mul_(self.momentum).add_((1.0 - self.momentum) * total.to(self.ema))
        return per_image_loss.sum() / self.ema.to(per_image_loss.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, momentum={self.momentum}, all_reduce={self.all_reduce}"
