"""The training loop: one pass over a loader, readable top to bottom.

Per optimiser step (``accumulate`` batches): tell the model how far training has got
(:func:`detbalance.detectors.set_training_progress`, used by S-OHEM), forward, sum the loss dict, stop on a
non-finite loss, backward (through the AMP scaler when given), clip, optimiser step, scheduler step, and
call ``on_step``. Nothing here knows which imbalance remedy the model carries.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from detbalance.detectors.build import set_training_progress
from detbalance.engine.distributed import all_true, unwrap

__all__ = [
    "NonFiniteLossError",
    "StepMetrics",
    "StepOutput",
    "ThreadChoice",
    "choose_threads",
    "configure_cpu",
    "move_targets",
    "train_one_epoch",
    "train_step",
]


def configure_cpu(threads: int | None = None) -> None:
    """Flush denormals to zero and set the intra-op thread count; call before any tensor work.

    Denormal floats (tiny gradients of saturated sigmoids) make BCE-style training 2-5x slower on CPU.

    Args:
        threads: ``torch.set_num_threads`` value; ``None`` keeps torch's default.
    """
    torch.set_flush_denormal(True)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


class ThreadChoice(NamedTuple):
    """What :func:`choose_threads` chose: ``threads`` for ``cores`` usable cores under ``load``, and why."""

    threads: int
    cores: int
    load: float | None
    reason: str


def _usable_cores() -> int:
    """Physical cores among the CPUs this process may run on (Linux topology; else the CPUs themselves)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def choose_threads(*, cores: int | None = None, load: float | None = None) -> ThreadChoice:
    """Intra-op threads for the cores actually free: ``cores`` minus the load, rounded, within ``[1, cores]``.

    On a CPU that other jobs keep busy, every intra-op parallel region (an OpenMP barrier) waits for its
    slowest thread, and a thread that has lost its core to another job holds all the others: measured on 2
    cores under a load of 4-7, a 2-thread training step ran at a third of the speed of a 1-thread one beside
    it (README, "Threads on a busy machine", ``benchmarks/bm_threads.py``). So a thread is only given to a
    core that the load leaves free. ``detbalance train`` and ``compare`` call this at their start when
    neither ``--threads`` nor ``OMP_NUM_THREADS`` is given.

    Args:
        cores: Usable cores; ``None``: the physical cores of the CPUs this process may run on
            (``os.sched_getaffinity``; two hyperthreads of one core count once, as in torch's default).
        load: Runnable processes besides this one; ``None``: the 1-minute load average (``os.getloadavg``),
            and all ``cores`` when the system has none.

    Returns:
        The choice, with a one-line ``reason`` to print.
    """
    if cores is None:
        cores = _usable_cores()
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return ThreadChoice(cores, cores, None, f"{cores} cores, no load average on this system")
    if load < 0:
        raise ValueError(f"load must be >= 0, got {load}")
    free = max(0.0, cores - load)
    threads = min(cores, max(1, math.floor(free + 0.5)))
    reason = f"load average {load:.2f} on {cores} cores: about {free:.1f} free"
    return ThreadChoice(threads, cores, round(load, 2), reason)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN / inf loss; ``losses`` holds each term's value at that step."""

    def __init__(self, step: int, losses: dict[str, float], checkpoint: str | None = None) -> None:
        self.step = step
        self.losses = losses
        self.checkpoint = checkpoint
        terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        where = f"; last good checkpoint: {checkpoint}" if checkpoint else "; no checkpoint was written yet"
        super().__init__(f"non-finite loss at step {step} ({terms}){where}")


@dataclass(frozen=True)
class StepMetrics:
    """What ``on_step`` receives after each optimiser step.

    ``step`` counts optimiser steps done (1 after the first); ``batches`` counts the batches of the current
    pass consumed so far; ``losses`` are this process's loss terms averaged over the accumulated batches;
    ``lr`` is the learning rate of the first parameter group used by this step; ``seconds`` the wall time
    since the previous step ended (data loading included).
    """

    step: int
    epoch: int
    batches: int
    loss: float
    losses: dict[str, float]
    lr: float
    images: int
    seconds: float


def move_targets(targets: Iterable[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Targets with every tensor moved to ``device`` (other values kept)."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


class StepOutput(NamedTuple):
    """What :func:`train_step` returns: ``losses`` (this process's loss terms, detached, averaged over the
    accumulated batches), ``lr`` (the rate the step used) and ``images`` (images in the step, this process)."""

    losses: dict[str, Tensor]
    lr: float
    images: int


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[tuple[Sequence[Tensor], Sequence[dict[str, Any]]]],
    *,
    step: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | str = "cpu",
    grad_clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: float = 0.0,
) -> StepOutput:
    """One optimiser step over ``batches`` (gradient accumulation when there are several).

    Tells the model how far training has got (:func:`detbalance.detectors.set_training_progress`, used by
    S-OHEM), then per batch: forward, stop on a non-finite loss, backward (DDP synchronises on the last
    batch only); then clip, optimiser step, scheduler step.

    Args:
        model: A torchvision detector (possibly DDP-wrapped) returning a loss dict in training mode.
        optimizer: Its optimiser.
        batches: ``accumulate`` batches ``(images list[Tensor[3, H, W]], targets list[dict])``; the loss is
            divided by their number, so the gradient is the mean.
        step: The step being made (1 for the first), for the error message.
        scheduler: Stepped once.
        scaler: AMP ``GradScaler`` (fp16 on CUDA); ``None`` for a plain backward.
        device: Where images and targets are moved.
        grad_clip: Max global L2 norm of the gradients; ``None`` disables clipping.
        amp_dtype: ``torch.float16`` / ``torch.bfloat16`` to autocast the forward; ``None`` disables.
        progress: ``(step - 1) / total_steps``, given to the model.

    Raises:
        NonFiniteLossError: A loss term is NaN or infinite (checked before backward, on every rank).
    """
    if not batches:
        raise ValueError("batches must hold at least one batch")
    device = torch.device(device)
    accumulate = len(batches)
    model.train()
    set_training_progress(unwrap(model), progress)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    sums: dict[str, Tensor] = {}
    images_in_step = 0
    for micro, (images, targets) in enumerate(batches):
        images = [img.to(device, non_blocking=True) for img in images]
        targets = move_targets(targets, device)
        sync = model.no_sync() if is_ddp and micro < accumulate - 1 else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            if not bool(all_true(torch.isfinite(loss.detach()))):
                raise NonFiniteLossError(step, {k: float(v.detach()) for k, v in loss_dict.items()})
            if scaler is not None:
                scaler.scale(loss / accumulate).backward()
            else:
                (loss / accumulate).backward()
        for k, v in loss_dict.items():
            sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float().clone()
        images_in_step += len(images)
    lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses (read before the scheduler moves)
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepOutput({k: v / accumulate for k, v in sums.items()}, lr, images_in_step)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Any]]]],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | str = "cpu",
    accumulate: int = 1,
    grad_clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
    max_steps: int | None = None,
    epoch: int = 0,
    start_batch: int = 0,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> int:
    """Train on every batch of ``loader`` (or until ``max_steps`` optimiser steps) and return the step count.

    A plain loop of :func:`train_step` over groups of ``accumulate`` batches (a trailing incomplete group is
    dropped), for use in your own script; :func:`detbalance.engine.fit` has its own loop.

    Args:
        model: A torchvision detector (possibly DDP-wrapped) returning a loss dict in training mode.
        optimizer: Its optimiser.
        loader: Yields ``(images list[Tensor[3, H, W]], targets list[dict])``.
        scheduler: Stepped once per optimiser step.
        scaler: AMP ``GradScaler`` (fp16 on CUDA); ``None`` for a plain backward.
        device: Where images and targets are moved.
        accumulate: Batches per optimiser step.
        grad_clip: Max global L2 norm of the gradients; ``None`` disables clipping.
        amp_dtype: ``torch.float16`` / ``torch.bfloat16`` to autocast the forward; ``None`` disables.
        start_step: Optimiser steps done before this call.
        total_steps: The run's total, for the progress ``step / total_steps`` given to the model.
        max_steps: Stop after this many optimiser steps in this call; ``None``: the whole loader.
        epoch: The pass number (reported in :class:`StepMetrics`).
        start_batch: Batches of this pass already consumed before ``loader`` (resume), for reporting.
        on_step: Called with :class:`StepMetrics` after each optimiser step.

    Returns:
        The optimiser step count after this call.

    Raises:
        NonFiniteLossError: A loss term is NaN or infinite (checked before backward, on every rank).
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    step, consumed = start_step, start_batch
    group: list[Any] = []
    t0 = time.perf_counter()
    for batch in loader:
        if max_steps is not None and step - start_step >= max_steps:
            break
        group.append(batch)
        consumed += 1
        if len(group) < accumulate:
            continue
        out = train_step(
            model, optimizer, group, step=step + 1, scheduler=scheduler, scaler=scaler, device=device,
            grad_clip=grad_clip, amp_dtype=amp_dtype, progress=step / total_steps if total_steps else 0.0,
        )
        group = []
        step += 1
        if on_step is not None:
            losses = {k: float(v) for k, v in out.losses.items()}
            on_step(StepMetrics(step=step, epoch=epoch, batches=consumed, loss=math.fsum(losses.values()),
                                losses=losses, lr=out.lr, images=out.images, seconds=time.perf_counter() - t0))
            t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    return step
