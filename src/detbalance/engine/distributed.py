"""Process-group helpers for ``torchrun --nproc_per_node=N -m detbalance train ...``.

gloo on CPU, nccl on CUDA. Rank 0 writes checkpoints and logs; evaluation results are gathered to every
rank. Nothing here is needed for single-process training: every helper degrades to the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_true",
    "broadcast_object",
    "dist_info",
    "init_distributed",
    "unwrap",
]


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and local rank of this process (``0, 1, 0`` without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process group's :class:`DistInfo` (single-process defaults when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def init_distributed(device_type: str) -> tuple[DistInfo, bool]:
    """Join the process group described by torchrun's environment (``WORLD_SIZE > 1``), if any.

    Args:
        device_type: ``"cpu"`` (gloo backend) or ``"cuda"`` (nccl backend).

    Returns:
        ``(info, created)``: ``created`` is True when this call initialised the group (and the caller
        should destroy it at the end).
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info(), False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(), False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist_info(), True


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    info = dist_info()
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist_info().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """Logical AND of a 0-d bool tensor over ranks (so that every rank stops together on a bad loss)."""
    if not dist_info().distributed:
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()
