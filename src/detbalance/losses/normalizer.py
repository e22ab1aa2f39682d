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

from detbalance.losses._reduction import check_momentum, should_validate

__all__ = ["PositiveNormalizer", "normalize_by_positives"]

MODES = ("per_batch", "per_image", "ema")


def _check_inputs(per_image_loss: Tensor, num_positives: Tensor, validate_args: bool | None = None) -> None:
    if per_image_loss.dim() != 1:
        raise ValueError(f"per_image_loss must be 1-D Tensor[B], got shape {tuple(per_image_loss.shape)}")
    if num_positives.shape != per_image_loss.shape:
        raise ValueError(
            f"num_positives must have shape {tuple(per_image_loss.shape)}, got {tuple(num_positives.shape)}"
        )
    if should_validate(validate_args, num_positives) and num_positives.numel():
        lowest = float(num_positives.min())
        if not lowest >= 0:
            raise ValueError(f"num_positives must be >= 0, got {lowest}")


def _sum_over_ranks(total: Tensor) -> tuple[Tensor, int]:
    """``total`` summed over ranks (all-reduce SUM) and the world size, when a process group is up."""
    if dist.is_available() and dist.is_initialized():
        total = total.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total, dist.get_world_size()
    return total, 1


def normalize_by_positives(
    per_image_loss: Tensor, num_positives: Tensor, *, mode: str = "per_batch", validate_args: bool | None = None
) -> Tensor:
    """Normalise summed per-image losses by the number of positives (no distributed communication).

    Args:
        per_image_loss: ``Tensor[B]`` loss summed over each image's anchors.
        num_positives: ``Tensor[B]`` positive anchors per image (any numeric dtype).
        mode: ``'per_batch'`` -> ``sum(loss) / max(1, sum(npos))``; ``'per_image'`` ->
            ``mean_b(loss_b / max(1, npos_b))``.
        validate_args: raise on a negative count (one host sync); ``None`` checks on the CPU only.

    Returns:
        0-d tensor (0 for an empty batch).

    Raises:
        ValueError: for mismatched shapes, an unknown ``mode`` or (when validated) a negative count.
    """
    if mode not in ("per_batch", "per_image"):
        raise ValueError(f"mode must be 'per_batch' or 'per_image', got {mode!r}")
    _check_inputs(per_image_loss, num_positives, validate_args)
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
        all_reduce: for ``'per_batch'`` in training mode, all-reduce the positive count over DDP ranks (when a
            process group is initialised) *before* clamping: each rank returns ``W sum_local loss / max(1,
            P_global)``, so DDP's gradient average is ``sum_global loss / max(1, P_global)``, the single-process
            loss of the whole batch, even when some rank has no positive. For ``'ema'`` the EMA follows the
            rank-averaged count (detectron2). No collective runs in eval mode.
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
            return normalize_by_positives(per_image_loss, num_positives, mode="per_image", validate_args=False)
        total = num_positives.to(torch.float32).sum()
        world = 1
        if self.all_reduce and self.training:
            total, world = _sum_over_ranks(total)
        if self.mode == "per_batch":
            return per_image_loss.sum() * world / total.clamp(min=1.0).to(per_image_loss.dtype)
        total = (total / world).clamp(min=1.0)
        if self.training:
            with torch.no_grad():
                self.ema.mul_(self.momentum).add_((1.0 - self.momentum) * total.to(self.ema))
        return per_image_loss.sum() / self.ema.to(per_image_loss.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, momentum={self.momentum}, all_reduce={self.all_reduce}"
