"""``fit(cfg)``: the whole training run, and the only function that reads the whole config.

It reads like detectron2's ``plain_train_net.py``: build everything, restore a checkpoint, then one loop
whose body trains a step and, when due, logs, runs the remedy's hooks, evaluates and checkpoints.

The budget is ``engine.iterations`` optimiser steps over an epoch-free stream of passes through the data:
pass ``e`` is ordered by ``(engine.seed, e)`` (``DistributedSampler`` or, with ``remedy.repeat_factor``,
the repeat-factor sampler, both sharded by rank), cut into batches of ``engine.batch_size`` (a trailing
group smaller than ``batch_size * accumulate`` is dropped). Each sample's augmentation is drawn from its
own seed ``(engine.seed, pass, position in the pass)``, so the data do not depend on ``data.num_workers``
and ``W`` processes of batch ``B`` see the same augmented images as one process of batch ``W B``. A
checkpoint records the pass and the number of its batches consumed, so ``resume=True`` skips exactly
those and continues bit for bit, on the same kind of machine with the same thread count (float sums are
not associative: another ``torch.get_num_threads()`` or CPU model may round differently).

Files in ``output``:

* ``config.toml``: the resolved config (``load_config`` reads it back identically);
* ``metrics.jsonl``: one JSON object per line, ``{"type": "train", "step", "epoch", "lr", "loss",
  "losses": {...}, "images_per_s"}`` every ``engine.log_interval`` steps (losses averaged over the steps
  and, under DDP, over the processes; images per second of training, data loading included, since the
  start of this call: the figure the progress display and :class:`FitResult` show), ``{"type": "eval", "split": "val" | "train", "step",
  "metrics": {...}}`` after each evaluation and one record per hook run (see :mod:`.hooks`);
* ``balance.jsonl`` (``engine.record``): a ``{"loss_bin_edges": [...]}`` line, then the
  :class:`BalanceRecorder` records, one per step (what ``analysis.plots.plot_run`` reads);
* ``checkpoint.pt``: the latest checkpoint (every ``engine.checkpoint_interval`` steps and at the end).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detbalance import __version__
from detbalance._preflight import RUN_FILES  # the files fit writes into its run folder
from detbalance.builders import (
    build_aspect_ratio_groups,
    build_datasets,
    build_hooks,
    build_model,
    build_optimizer,
    build_repeat_factors,
    build_scheduler,
    build_train_eval_set,
    class_counts,
    class_image_counts,
    model_description,
    needs_image_counts,
    resolve_image_size,
)
from detbalance.config import ExperimentConfig, config_to_dict, dump_toml, load_toml
from detbalance.data import (
    DetectionDataset,
    HeldOutCheck,
    check_categories,
    check_held_out,
    collate_detection,
)
from detbalance.data.verify import verify_images
from detbalance.detectors import BalanceRecorder
from detbalance.engine.checkpoint import (
    CheckpointError,
    generator_states,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_generator_states,
    set_rng_state,
)
from detbalance.engine.distributed import DistInfo, all_gather_objects, init_distributed, unwrap
from detbalance.engine.evaluate import evaluate
from detbalance.engine.files import (
    OutputFolder,
    append_jsonl,
    is_project_file,
    json_safe,
    read_jsonl,
    remove_stale_temp,
    write_error,
)
from detbalance.engine.hooks import TrainingHook
from detbalance.engine.train import NonFiniteLossError, StepMetrics, train_step

__all__ = [
    "FitResult",
    "amp_dtype_for",
    "fit",
    "iterations_for_epochs",
    "load_trained_model",
    "pass_batches",
    "resolve_device",
    "seed_everything",
]


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns (on every rank; ``history`` is filled on rank 0 only).

    ``metrics``: the final evaluation on held-out data (see :func:`detbalance.engine.evaluate`), ``{}``
    when there is none (``note`` says why); ``train_metrics``: the final training-set evaluation
    (``engine.eval_train``), else ``None``; ``history``: every record written to ``metrics.jsonl`` by this
    call; ``held_out``: the content check of the evaluated images against the training images (``None``
    without held-out data; an overlap makes ``metrics`` a training-set AP, said in ``note``);
    ``images_per_s``: training images per second over all processes (evaluation, hooks and
    checkpointing excluded; ``nan`` when this call trained no step); ``already_finished``: ``resume`` found
    a finished run and did nothing; ``model``: what :func:`detbalance.builders.model_description` says about
    the model (name, family, parameter count, weights, input size; ``None`` when nothing was built).
    """

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    output: Path
    checkpoint: Path
    config_file: Path
    metrics_file: Path
    recorder_file: Path | None
    images_per_s: float
    steps: int
    train_metrics: dict[str, Any] | None = None
    note: str | None = None
    already_finished: bool = False
    model: dict[str, Any] | None = None
    held_out: HeldOutCheck | None = None


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as given (CUDA must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"engine.device = {name!r} but CUDA is not available")
    return device


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """The autocast dtype of ``engine.amp`` on ``device``: bfloat16 on a GPU that supports it (Ampere and
    later; no loss scaling needed) and on CPU, else float16 (trained with a ``GradScaler``)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def iterations_for_epochs(
    epochs: int, *, num_images: int, batch_size: int, accumulate: int = 1, world_size: int = 1
) -> int:
    """Optimiser steps of ``epochs`` passes over ``num_images`` training images (``--epochs N``).

    One pass is ``num_images // (batch_size * accumulate * world_size)`` steps (:func:`pass_batches` drops the
    trailing incomplete batch, as torchvision's reference ``drop_last`` batch sampler does).

    Raises:
        ValueError: ``epochs < 1``, or a pass shorter than one step (naming the numbers).
    """
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    per_step = batch_size * accumulate * world_size
    steps = num_images // per_step
    if steps == 0:
        raise ValueError(
            f"one epoch of {num_images} training images is less than one step of {per_step} images "
            f"(batch {batch_size} x accumulate {accumulate} x {world_size} processes); lower --batch-size"
        )
    return epochs * steps


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (code outside detbalance may use the global state)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ data order


def pass_batches(
    num_images: int,
    *,
    batch_size: int,
    accumulate: int = 1,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    repeat_factors: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
) -> list[list[int]]:
    """This rank's batches of dataset indices for pass ``epoch``: a pure function of its arguments.

    The order is ``DistributedSampler``'s (shuffled with ``seed + epoch``, padded to a multiple of
    ``world_size``, rank ``r`` taking positions ``r, r + W, ...``) or, with ``repeat_factors``, the
    :class:`~detbalance.sampling.RepeatFactorSampler`'s. It is cut into batches of ``batch_size`` (with
    ``group_ids``, batches of one aspect-ratio group each, as torchvision's ``GroupedBatchSampler`` cuts it:
    :func:`detbalance.data.group_batches`) and the trailing batches that do not fill a group of ``accumulate``
    are dropped. Without grouping, or with one group (square images), ``W`` ranks of batch ``B`` see at step
    ``s`` the same images as one process of batch ``W B`` (when no padding is needed); grouping is done per
    rank, as torchvision's reference does it.

    Raises:
        ValueError: when a pass has fewer than ``batch_size * accumulate`` images per rank.
    """
    samples = _pass_samples(
        num_images, batch_size=batch_size, accumulate=accumulate, seed=seed, epoch=epoch, rank=rank,
        world_size=world_size, repeat_factors=repeat_factors, group_ids=group_ids,
    )
    return [[index for index, _ in batch] for batch in samples]


def _pass_samples(
    num_images: int,
    *,
    batch_size: int,
    accumulate: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    repeat_factors: torch.Tensor | None,
    group_ids: torch.Tensor | None = None,
) -> list[list[tuple[int, int]]]:
    """:func:`pass_batches` with each index paired with its sample's augmentation seed."""
    sampler: Any
    if repeat_factors is not None:
        from detbalance.sampling import RepeatFactorSampler

        sampler = RepeatFactorSampler(repeat_factors, seed=seed, num_replicas=world_size, rank=rank)
    else:
        sampler = DistributedSampler(range(num_images), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    n = len(idx) // batch_size
    n -= n % accumulate
    if n == 0:
        raise ValueError(
            f"data.train gives {len(idx)} images per process per pass, fewer than engine.batch_size * "
            f"engine.accumulate = {batch_size * accumulate}"
        )
    # the position in the whole pass (over all ranks) names the sample: the same seed under any world size
    keyed = [(i, _sample_seed(seed, epoch, rank + world_size * j)) for j, i in enumerate(idx)]
    if group_ids is None:
        return [keyed[i * batch_size : (i + 1) * batch_size] for i in range(n)]
    from detbalance.data.grouping import group_batches

    out, seen, extra = [], set(), len(idx)
    for positions in group_batches(idx, group_ids, batch_size=batch_size)[:n]:
        batch = []
        for p in positions:
            if p in seen:  # a repeat that completes a leftover batch: its own augmentation seed
                batch.append((idx[p], _sample_seed(seed, epoch, rank + world_size * extra)))
                extra += 1
            else:
                seen.add(p)
                batch.append(keyed[p])
        out.append(batch)
    return out


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + position) % 2**62


class _SeededSamples(Dataset):
    """``dataset[(index, seed)]``: sample ``index`` with its random augmentation drawn from ``seed``.

    The global torch generator is left as it was, so the augmentation is a function of the key alone,
    whichever process (main or DataLoader worker) draws it.
    """

    def __init__(self, dataset: DetectionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds CUDA (0.6 ms)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


class _BatchPlan:
    """The batches of every pass from ``(epoch, batch)`` on, forever: ``(epoch, batches done, keys)``.

    One object serves as the DataLoader's ``batch_sampler`` (it reads the keys) and as the loop's record
    of where it stands (the same sequence, iterated alongside the loader).
    """

    def __init__(self, plan: Callable[[int], list[list[tuple[int, int]]]], epoch: int, batch: int) -> None:
        self.plan, self.epoch, self.batch = plan, epoch, batch

    def positions(self) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
        epoch, start = self.epoch, self.batch
        while True:
            batches = self.plan(epoch)
            for b in range(start, len(batches)):
                yield epoch, b + 1, batches[b]
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (keys for _, _, keys in self.positions())


def _loader(dataset: Dataset, batch_sampler: Any, *, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_detection,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # its workers' base seed; the global RNG is left alone
    )


# ------------------------------------------------------------------------------------------ run folder


def _check_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds a run (unless ``resume`` or ``overwrite``) or other files
    (unless ``overwrite``), and never over a file the project did not write (not even with ``overwrite``)."""
    ckpt = output / "checkpoint.pt"
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {str(output)!r} is a file, not a folder")
    if resume:
        if not ckpt.is_file():
            raise CheckpointError(f"checkpoint {str(ckpt)!r} not found; nothing to resume")
        return
    if not output.is_dir():
        return
    if ckpt.exists() and not overwrite:
        raise CheckpointError(
            f"{str(output)!r} already holds a checkpoint; pass resume=True (--resume), overwrite=True "
            "(--overwrite) or choose another output"
        )
    present = sorted(p.name for p in output.iterdir() if not is_project_file(p.name))
    if present and not overwrite:
        shown = ", ".join(present[:10]) + (f" and {len(present) - 10} more" if len(present) > 10 else "")
        raise ValueError(
            f"output folder {str(output)!r} holds files but no run: {shown}; choose an empty or new folder, or "
            f"pass overwrite=True (--overwrite) to write {', '.join(RUN_FILES)} into it (a file of yours with one "
            "of those names is never replaced)"
        )


def adopt_legacy_run(output: Path, *, also: list[str] | None = None) -> None:
    """A run folder written before manifests existed: record the run files whose content proves they are the
    project's (a loadable checkpoint, a config that parses, logs of our records; ``also``: files the caller
    has checked). Only in a folder without a manifest (a one-time migration)."""
    folder = OutputFolder(output)
    if not output.is_dir() or folder.manifest_path.exists():
        return
    names, append = list(also or []), []
    if (output / "checkpoint.pt").is_file():
        try:
            load_checkpoint(output / "checkpoint.pt")
            names.append("checkpoint.pt")
        except CheckpointError:
            pass
    if (output / "config.toml").is_file():
        try:
            load_toml((output / "config.toml").read_text(encoding="utf-8"), source=str(output / "config.toml"))
            names.append("config.toml")
        except (ValueError, OSError, UnicodeDecodeError):
            pass
    for name in ("metrics.jsonl", "balance.jsonl"):
        if (output / name).is_file():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    recs = read_jsonl(output / name)
            except (ValueError, OSError):
                continue
            if all("type" in r or "step" in r or "loss_bin_edges" in r for r in recs):
                names.append(name)
                append.append(name)
    if names:
        folder.adopt(names, append=append)


class _RunLock:
    """An exclusive ``flock`` on the run folder for the whole of :func:`fit` (rank 0): a second process
    training into the same folder is refused instead of interleaving its files with the first's."""

    def __init__(self, output: Path) -> None:
        self.output, self.fd = output, None

    def __enter__(self) -> _RunLock:
        import fcntl

        self.fd = os.open(self.output, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise RuntimeError(
                f"output folder {str(self.output)!r} is in use by another detbalance process (a training run is "
                "writing into it); wait for it to finish or choose another --output"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_resume_state(state: dict[str, Any], cfg: ExperimentConfig, ckpt: Path, info: DistInfo) -> None:
    saved = load_toml(state["config"], source=f"{ckpt}:config")
    if saved != cfg:
        a, b = _flatten(config_to_dict(saved)), _flatten(config_to_dict(cfg))
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise CheckpointError(f"checkpoint {str(ckpt)!r} was written with another config; differing keys: {diff}")
    if state["world_size"] != info.world_size:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} was written by {state['world_size']} processes, resuming with "
            f"{info.world_size} would change the data order"
        )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def _truncate_jsonl(folder: OutputFolder, name: str, step: int) -> None:
    """Keep the records of steps ``<= step`` (drops what a crashed run wrote after its last checkpoint, and
    a torn last line, with a warning naming it)."""
    path = folder.root / name
    if path.is_file():
        records = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        folder.write_text(name, "".join(json.dumps(json_safe(r)) + "\n" for r in records), append=True)


# ------------------------------------------------------------------------------------------ reporting


class _Progress:
    """Progress on rank 0: a rich bar on a terminal, else a plain line every ``every`` steps, or nothing.

    Both show the throughput that :class:`FitResult` reports (images per training second since the start
    of this call), so the bar's last figure and the summary agree.
    """

    def __init__(self, mode: str, total: int, done: int, every: int) -> None:
        self.mode, self.total, self.every, self._bar = mode, total, every, None
        if mode != "bar":
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("train", total=total, completed=done, loss="-", ips="-")
        self._bar.start()

    def update(self, step: int, loss: float, images_per_s: float, eta_s: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", ips=f"{images_per_s:.1f}")
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
            print(f"step {step}/{self.total}  loss {loss:.4f}  {images_per_s:.1f} img/s  ETA {eta}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _progress_mode(progress: bool, main: bool) -> str:
    if not (progress and main):
        return "off"
    return "bar" if sys.stdout.isatty() else "lines"


def _mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """``values`` averaged over the processes (all-reduce); unchanged in one process."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.cpu().tolist())}


def _evaluate(
    model: nn.Module, dataset: DetectionDataset, *, batch_size: int, info: DistInfo, device: torch.device,
    num_workers: int,
) -> dict[str, Any]:
    """COCO AP of ``model`` on ``dataset``, each rank predicting every ``world_size``-th image."""
    idx = list(range(info.rank, len(dataset), info.world_size))
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    loader = _loader(dataset, batches, num_workers=num_workers, device=device)
    return evaluate(model, loader, device=device, gt=dataset.to_coco_dict(), label_names=dataset.label_names)


# ------------------------------------------------------------------------------------------ fit


def fit(
    cfg: ExperimentConfig,
    *,
    output: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepMetrics], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train and evaluate the experiment ``cfg``, writing into ``output``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is joined here (gloo on CPU, nccl on CUDA)
    and left at the end; rank 0 writes every file.

    Args:
        cfg: The experiment.
        output: Run folder (created). Refuses a folder holding a checkpoint unless ``resume``, and a folder
            holding other files unless ``overwrite``.
        resume: Continue from ``output/checkpoint.pt``; the config must equal the checkpoint's. A finished
            run is left as it is (``FitResult.already_finished``).
        overwrite: Write the run files (:data:`RUN_FILES`) into ``output`` although it holds files or a run
            (a run there is replaced); other files are left alone.
        on_step: Called with :class:`StepMetrics` (this process's losses) after every optimiser step, after
            logging, hooks, evaluation and checkpointing of that step.
        progress: Show progress on rank 0: a bar on a terminal, else a plain line every
            ``engine.log_interval`` steps.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: On a NaN/inf loss; the message names the last good checkpoint.
        CheckpointError: ``resume`` without a usable checkpoint, or one of another configuration.
        ValueError: ``output`` holds files but no run and ``overwrite`` is off.
    """
    device = resolve_device(cfg.engine.device)
    info, created = init_distributed(device.type)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        return _fit(cfg, Path(output), resume, overwrite, on_step, progress, device, info)
    finally:
        if created:
            dist.destroy_process_group()


def _fit(
    cfg: ExperimentConfig,
    output: Path,
    resume: bool,
    overwrite: bool,
    on_step: Callable[[StepMetrics], None] | None,
    progress: bool,
    device: torch.device,
    info: DistInfo,
) -> FitResult:
    e, main, total = cfg.engine, info.is_main, cfg.engine.iterations
    ckpt_path, config_file = output / "checkpoint.pt", output / "config.toml"
    metrics_file, recorder_file = output / "metrics.jsonl", (output / "balance.jsonl" if e.record else None)

    # ------------------------------------------------------------------ the run folder
    _check_output(output, resume=resume, overwrite=overwrite)
    state = load_checkpoint(ckpt_path, map_location="cpu", purpose="resume") if resume else None
    if state is not None:
        _check_resume_state(state, cfg, ckpt_path, info)
        if state["step"] >= total:
            return _finished_run(state, output, ckpt_path, config_file, metrics_file, recorder_file)
    if info.distributed:
        dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
    folder = OutputFolder(output)
    lock = _RunLock(output)
    if main:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(output, err) from None
        lock.__enter__()
    try:
        if main:
            adopt_legacy_run(output)
            folder.check([p.name for p in (config_file, metrics_file, ckpt_path)]
                         + ([recorder_file.name] if recorder_file is not None else []), what="this run")
            for stale in remove_stale_temp(output):
                warnings.warn(f"removed {stale}, left by an interrupted write", RuntimeWarning, stacklevel=3)
        return _fit_in(cfg, output, folder, state, overwrite, on_step, progress, device, info)
    finally:
        lock.__exit__()


def _fit_in(
    cfg: ExperimentConfig,
    output: Path,
    folder: OutputFolder,
    state: dict[str, Any] | None,
    overwrite: bool,
    on_step: Callable[[StepMetrics], None] | None,
    progress: bool,
    device: torch.device,
    info: DistInfo,
) -> FitResult:
    e, main, total = cfg.engine, info.is_main, cfg.engine.iterations
    ckpt_path, config_file = output / "checkpoint.pt", output / "config.toml"
    metrics_file, recorder_file = output / "metrics.jsonl", (output / "balance.jsonl" if e.record else None)

    # ------------------------------------------------------------------ build
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if e.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # that mode also fills every new tensor with NaN to expose reads of uninitialised memory: about 1,500
        # fills per RetinaNet step, 4-5 % of a CPU step, and no part of determinism
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
    seed_everything(e.seed)
    train_set, val_set = build_datasets(cfg, seed=cfg.data.seed)
    # every image decoded (or fingerprinted) once, before the first step; evaluated images compared with the
    # training images by content
    train_prints = verify_images(train_set)
    held_out = None
    if val_set is not None:
        held_out = check_held_out(train_set, val_set, train_fingerprints=train_prints)
    if state is not None:  # the files under data.train may have changed since the checkpoint
        check_categories(state["label_names"], state.get("category_ids"), train_set.label_names,
                         train_set.category_ids(), expected=f"checkpoint {str(ckpt_path)!r}",
                         got=f"data.train {cfg.data.train!r}")
    hooks = build_hooks(cfg)
    for hook in hooks:
        hook.attach(train_set)
    train_eval_set = build_train_eval_set(cfg, seed=cfg.data.seed) if e.eval_train else None
    if train_eval_set is not None:
        verify_images(train_eval_set)
    image_size = resolve_image_size(cfg, train_set)
    counts = class_counts(train_set) if cfg.remedy.class_weights is not None else None
    recorder = BalanceRecorder() if e.record else None
    image_counts = class_image_counts(train_set) if needs_image_counts(cfg) else None
    model: nn.Module = build_model(
        cfg, num_classes=train_set.num_classes, image_size=image_size, counts=counts, recorder=recorder,
        image_counts=image_counts,
    )
    description = model_description(cfg, model)
    model = model.to(device)
    if device.type == "cpu":
        # oneDNN convolutions run faster in NHWC (a RetinaNet step on the tiny backbone, batch 16, 2 threads,
        # was about 20% faster).
        model = model.to(memory_format=torch.channels_last)
    if e.sync_bn and info.distributed:
        if device.type != "cuda":
            raise ValueError("engine.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); use model.norm = 'gn'")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total)
    amp_dtype = amp_dtype_for(device) if e.amp else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    hooks_at: dict[int, list[TrainingHook]] = {}
    for hook in hooks:
        for s in hook.steps(total):
            hooks_at.setdefault(s, []).append(hook)
    note = None
    if val_set is None:
        note = (
            f"no held-out data: data.val is unset and data.train {cfg.data.train!r} has no separate test "
            "split, so the run is not evaluated; set data.val (or engine.eval_train = true for a training-set "
            "AP, labelled as such)"
        )
        warnings.warn(note, UserWarning, stacklevel=3)
    elif held_out is not None and not held_out.held_out:
        note = (
            f"data.val {cfg.data.val!r} is not held out: {held_out.describe()}; its AP is a TRAINING-SET AP "
            "(metrics.jsonl records the overlap under held_out)"
        )
        warnings.warn(note, UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ restore, or start the files
    step, epoch, batch = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        if len(state.get("hooks", [])) != len(hooks):
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} holds no state for this run's training hooks")
        for hook, hook_state in zip(hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        if recorder is not None and state["recorder"] is not None:
            recorder.load_state_dict(state["recorder"])
        set_rng_state(state["rng"][info.rank])
        restarted = set_generator_states(model, state["generators"][info.rank], device, step=state["step"])
        if restarted:
            warnings.warn(
                f"{ckpt_path}: the sampling generators of {', '.join(restarted)} were saved on another device "
                f"type than {device.type}; they are seeded afresh from their seeds + step {state['step']}, so "
                "this run samples RoIs reproducibly but not as it would have on its first device",
                RuntimeWarning,
                stacklevel=3,
            )
        step, epoch, batch = state["step"], state["epoch"], state["batch"]
        if main:
            _truncate_jsonl(folder, metrics_file.name, step)
            if recorder_file is not None:
                _truncate_jsonl(folder, recorder_file.name, step)
    else:
        if info.distributed:
            torch.manual_seed(e.seed + 1 + info.rank)  # per-rank model randomness; the model is already built
        if main:
            folder.write_text(config_file.name, dump_toml(cfg))
            folder.write_text(metrics_file.name, "", append=True)
            if recorder_file is not None and recorder is not None:
                folder.write_text(recorder_file.name, json.dumps({"loss_bin_edges": recorder.loss_bin_edges}) + "\n",
                                  append=True)
            if overwrite and ckpt_path.exists():
                folder.remove(ckpt_path.name)

    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    pass_plan = functools.partial(
        _pass_samples, len(train_set), batch_size=e.batch_size, accumulate=e.accumulate, seed=e.seed,
        rank=info.rank, world_size=info.world_size, repeat_factors=build_repeat_factors(cfg, train_set),
        group_ids=build_aspect_ratio_groups(cfg, train_set),
    )
    passes = functools.lru_cache(maxsize=2)(lambda ep: pass_plan(epoch=ep))
    plan = _BatchPlan(passes, epoch, batch)
    loader = _loader(_SeededSamples(train_set), plan, num_workers=cfg.data.num_workers, device=device)
    eval_bs = e.eval_batch_size or e.batch_size

    # ------------------------------------------------------------------ the loop
    history: list[dict[str, Any]] = []
    bar = _Progress(_progress_mode(progress, main), total, step, e.log_interval)
    window: dict[str, float] = {}
    window_steps = 0
    images, seconds = 0, 0.0
    recent_seconds: collections.deque[float] = collections.deque(maxlen=20)  # the ETA's rate: the last 20 steps
    last_ckpt = ckpt_path if state is not None else None
    metrics: dict[str, Any] = {}
    train_metrics: dict[str, Any] | None = None
    if recorder is not None:
        recorder.start_step(step + 1)
    batches = zip(plan.positions(), loader)
    t0 = time.perf_counter()
    try:
        while step < total:
            group = [next(batches) for _ in range(e.accumulate)]
            (epoch, batch, _), _ = group[-1]
            out = train_step(
                train_model, optimizer, [b for _, b in group], step=step + 1, scheduler=scheduler, scaler=scaler,
                device=device, grad_clip=cfg.optim.grad_clip, amp_dtype=amp_dtype, progress=step / total,
            )
            step += 1
            losses = {k: float(v) for k, v in out.losses.items()}
            step_seconds = time.perf_counter() - t0  # data loading included
            images += out.images * info.world_size
            seconds += step_seconds
            recent_seconds.append(step_seconds)
            images_per_s = images / seconds
            window_steps += 1
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + v
            eta_s = (total - step) * math.fsum(recent_seconds) / len(recent_seconds)
            bar.update(step, math.fsum(losses.values()), images_per_s, eta_s)

            if step % e.log_interval == 0 or step == total:
                mean = _mean_over_ranks({k: v / window_steps for k, v in window.items()}, info)
                record = {"type": "train", "step": step, "epoch": epoch, "lr": out.lr,
                          "loss": math.fsum(mean.values()), "losses": mean, "images_per_s": images_per_s}
                _log(history, metrics_file, [record], main)
                _flush_recorder(recorder, recorder_file, main)
                window, window_steps = {}, 0
            if step in hooks_at:
                for hook in hooks_at[step]:
                    record = hook.run(step, model=unwrap(model), train_set=train_set, device=device)
                    _log(history, metrics_file, [{"type": "hook", "step": step, **record}], main)
                # A hook may change the training set: restart the loader (and its workers, which hold a copy of
                # the dataset) at the same position, so no prefetched batch predates the change.
                del batches, loader
                plan = _BatchPlan(passes, epoch, batch)
                loader = _loader(_SeededSamples(train_set), plan, num_workers=cfg.data.num_workers, device=device)
                batches = zip(plan.positions(), loader)
            if (e.eval_interval is not None and step % e.eval_interval == 0) or step == total:
                if val_set is not None:
                    metrics = _evaluate(model, val_set, batch_size=eval_bs, info=info, device=device,
                                        num_workers=cfg.data.num_workers)
                    _log(history, metrics_file, [{"type": "eval", "split": "val", "step": step, "metrics": metrics,
                                                  "held_out": None if held_out is None else held_out.to_dict()}], main)
                if train_eval_set is not None and e.eval_train:
                    train_metrics = _evaluate(model, train_eval_set, batch_size=eval_bs, info=info, device=device,
                                              num_workers=cfg.data.num_workers)
                    _log(history, metrics_file,
                         [{"type": "eval", "split": "train", "step": step, "metrics": train_metrics}], main)
            if (e.checkpoint_interval is not None and step % e.checkpoint_interval == 0) or step == total:
                _flush_recorder(recorder, recorder_file, main)
                _save(ckpt_path, cfg, model, optimizer, scheduler, scaler, hooks, recorder, info,
                      step=step, epoch=epoch, batch=batch, train_set=train_set, image_size=image_size, folder=folder)
                if main:
                    folder.record(metrics_file.name, append=True)
                    if recorder_file is not None:
                        folder.record(recorder_file.name, append=True)
                last_ckpt = ckpt_path
            if on_step is not None:
                on_step(StepMetrics(step=step, epoch=epoch, batches=batch, loss=math.fsum(losses.values()),
                                    losses=losses, lr=out.lr, images=out.images, seconds=step_seconds))
            if recorder is not None:
                recorder.start_step(step + 1)
            t0 = time.perf_counter()
    except NonFiniteLossError as err:
        raise NonFiniteLossError(err.step, err.losses, None if last_ckpt is None else str(last_ckpt)) from None
    finally:
        bar.close()
        del batches, loader  # stops DataLoader workers

    return FitResult(
        metrics=metrics,
        history=history,
        output=output,
        checkpoint=ckpt_path,
        config_file=config_file,
        metrics_file=metrics_file,
        recorder_file=recorder_file,
        images_per_s=images / seconds if seconds > 0 else math.nan,
        steps=step,
        train_metrics=train_metrics,
        note=note,
        model=description,
        held_out=held_out,
    )


def _log(history: list[dict[str, Any]], path: Path, records: list[dict[str, Any]], main: bool) -> None:
    if main:
        history.extend(records)
        append_jsonl(path, records)


def _flush_recorder(recorder: BalanceRecorder | None, path: Path | None, main: bool) -> None:
    if recorder is not None:
        records = recorder.to_records()
        recorder.clear()
        if main and path is not None:
            append_jsonl(path, records)


def _save(
    path: Path,
    cfg: ExperimentConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    hooks: list[TrainingHook],
    recorder: BalanceRecorder | None,
    info: DistInfo,
    *,
    step: int,
    epoch: int,
    batch: int,
    train_set: DetectionDataset,
    image_size: int,
    folder: OutputFolder | None = None,
) -> None:
    """Write the checkpoint (rank 0; every rank contributes its RNG and sampler-generator states)."""
    rng = all_gather_objects(get_rng_state())
    generators = all_gather_objects(generator_states(model))
    if not info.is_main:
        return
    save_checkpoint(
        path,
        {
            "version": __version__,
            "config": dump_toml(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "hooks": [hook.state_dict() for hook in hooks],
            "recorder": None if recorder is None else recorder.state_dict(),
            "rng": rng,
            "generators": generators,
            "world_size": info.world_size,
            "num_classes": train_set.num_classes,
            "label_names": list(train_set.label_names),
            "category_ids": train_set.category_ids(),
            "image_size": image_size,
        },
        folder=folder,
    )


def _finished_run(
    state: dict[str, Any], output: Path, ckpt: Path, config_file: Path, metrics_file: Path, recorder_file: Path | None
) -> FitResult:
    """The :class:`FitResult` of a run that had already finished: its last evaluations, nothing new."""
    records = read_jsonl(metrics_file) if metrics_file.is_file() else []
    evals = [r for r in records if r.get("type") == "eval"]
    val = [_nan_for_none(r["metrics"]) for r in evals if r.get("split", "val") == "val"]
    train = [_nan_for_none(r["metrics"]) for r in evals if r.get("split") == "train"]
    return FitResult(
        metrics=val[-1] if val else {},
        history=[],
        output=output,
        checkpoint=ckpt,
        config_file=config_file,
        metrics_file=metrics_file,
        recorder_file=recorder_file,
        images_per_s=math.nan,
        steps=int(state["step"]),
        train_metrics=train[-1] if train else None,
        note=f"the run in {str(output)!r} had already finished (step {state['step']}); nothing was done",
        already_finished=True,
    )


def _nan_for_none(x: Any) -> Any:
    """Undo :func:`~detbalance.engine.files.json_safe` for metrics (``null`` was a NaN)."""
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _nan_for_none(v) for k, v in x.items()}
    return x


def load_trained_model(
    checkpoint: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """Rebuild the model of a :func:`fit` checkpoint, with its weights, in eval mode.

    Returns:
        ``(model, cfg, info)`` where ``info`` holds ``num_classes``, ``label_names``, ``category_ids``
        (``None`` in checkpoints that predate it), ``image_size``, ``step`` and ``version`` of the checkpoint.
    """
    state = load_checkpoint(checkpoint, map_location="cpu", purpose="model")
    cfg = load_toml(state["config"], source=f"{checkpoint}:config")
    k = int(state["num_classes"])
    counts = torch.ones(k, dtype=torch.int64) if cfg.remedy.class_weights is not None else None
    image_counts = torch.ones(k, dtype=torch.int64) if needs_image_counts(cfg) else None  # the buffer is loaded
    model = build_model(cfg, num_classes=k, image_size=int(state["image_size"]), counts=counts,
                        image_counts=image_counts)
    model.load_state_dict(state["model"])
    info = {key: state[key] for key in ("num_classes", "label_names", "image_size", "step", "version")}
    info["category_ids"] = state.get("category_ids")
    return model.to(device).eval(), cfg, info
