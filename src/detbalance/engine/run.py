"""``fit(cfg)``: the whole training run, and the only function that reads the whole config.

The budget is ``engine.iterations`` optimiser steps over an epoch-free stream of passes through the data:
pass ``e`` is ordered by ``(engine.seed, e)`` (``DistributedSampler`` or, with ``remedy.repeat_factor``,
the repeat-factor sampler, both sharded by rank), cut into batches of ``engine.batch_size`` (a trailing
group smaller than ``batch_size * accumulate`` is dropped). A checkpoint records the pass and the
number of its batches consumed, so ``resume=True`` skips exactly those and continues bit for bit (CPU,
``data.num_workers = 0``).

Files in ``output``:

* ``config.toml``: the resolved config (``load_config`` reads it back identically);
* ``metrics.jsonl``: one JSON object per line, ``{"type": "train", "step", "epoch", "lr", "loss",
  "losses": {...}, "images_per_s"}`` every ``engine.log_interval`` steps and ``{"type": "eval", "step",
  "round"?, "metrics": {...}}`` after each evaluation;
* ``balance.jsonl`` (``engine.record``): a ``{"loss_bin_edges": [...]}`` line, then the
  :class:`BalanceRecorder` records, one per step (what ``analysis.plots.plot_run`` reads);
* ``checkpoint.pt``: the latest checkpoint (every ``engine.checkpoint_interval`` steps and at the end).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from detbalance import __version__
from detbalance.builders import (
    build_datasets,
    build_model,
    build_optimizer,
    build_repeat_factors,
    build_scheduler,
    class_counts,
    resolve_image_size,
)
from detbalance.config import ExperimentConfig, config_to_dict, dump_toml, load_toml
from detbalance.data import collate_detection, eval_transform, open_dataset
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
from detbalance.engine.train import NonFiniteLossError, StepMetrics, move_targets, train_one_epoch

__all__ = ["FitResult", "fit", "load_trained_model", "pass_batches", "resolve_device", "seed_everything"]


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns (on every rank; ``history`` is filled on rank 0 only).

    ``metrics``: the final evaluation (see :func:`detbalance.engine.evaluate`); ``history``: every record
    written to ``metrics.jsonl`` by this call; ``images_per_s``: training images per second over all
    processes (evaluation and checkpointing excluded).
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
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as given (CUDA must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"engine.device = {name!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (code outside detbalance may use the global state)
    torch.manual_seed(seed)


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
) -> list[list[int]]:
    """This rank's batches of dataset indices for pass ``epoch``: a pure function of its arguments.

    The order is ``DistributedSampler``'s (shuffled with ``seed + epoch``, padded to a multiple of
    ``world_size``, rank ``r`` taking positions ``r, r + W, ...``) or, with ``repeat_factors``, the
    :class:`~detbalance.sampling.RepeatFactorSampler`'s. It is cut into batches of ``batch_size`` and the
    trailing batches that do not fill a group of ``accumulate`` are dropped. With ``W`` ranks of batch
    ``B``, step ``s`` sees the same images as one process of batch ``W B`` (when no padding is needed).

    Raises:
        ValueError: when a pass has fewer than ``batch_size * accumulate`` images per rank.
    """
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
    return [idx[i * batch_size : (i + 1) * batch_size] for i in range(n)]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_json_safe(r)) + "\n")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps ``<= step`` (drops what a crashed run wrote after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


class _Progress:
    """A rich progress bar (loss, images/s, ETA) on rank 0, or nothing."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self._bar = None
        if not enabled:
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

    def update(self, step: int, loss: float, ips: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", ips=f"{ips:.1f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def fit(
    cfg: ExperimentConfig,
    *,
    output: str | Path,
    resume: bool = False,
    on_step: Callable[[StepMetrics], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train and evaluate the experiment ``cfg``, writing into ``output``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is joined here (gloo on CPU, nccl on CUDA)
    and left at the end; rank 0 writes every file.

    Args:
        cfg: The experiment.
        output: Run folder (created). Refuses a folder holding a checkpoint unless ``resume``.
        resume: Continue from ``output/checkpoint.pt``; the config must equal the checkpoint's.
        on_step: Called with :class:`StepMetrics` after every optimiser step (after logging, evaluation
            and checkpointing of that step).
        progress: Show a progress bar (rank 0).

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: On a NaN/inf loss; the message names the last good checkpoint.
        CheckpointError: ``resume`` without a usable checkpoint, or one of another configuration.
    """
    device = resolve_device(cfg.engine.device)
    info, created = init_distributed(device.type)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        return _fit(cfg, Path(output), resume, on_step, progress, device, info)
    finally:
        if created:
            dist.destroy_process_group()


def _fit(
    cfg: ExperimentConfig,
    output: Path,
    resume: bool,
    on_step: Callable[[StepMetrics], None] | None,
    progress: bool,
    device: torch.device,
    info: DistInfo,
) -> FitResult:
    e = cfg.engine
    main = info.is_main
    ckpt_path = output / "checkpoint.pt"
    config_file, metrics_file = output / "config.toml", output / "metrics.jsonl"
    recorder_file = output / "balance.jsonl" if e.record else None
    if not resume and ckpt_path.exists():
        raise CheckpointError(
            f"{str(output)!r} already holds a checkpoint; pass resume=True (--resume) or choose another output"
        )
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if e.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(e.seed)

    # ------------------------------------------------------------------ data, model, optimiser
    train_ds, val_ds = build_datasets(cfg, seed=cfg.data.seed)
    image_size = resolve_image_size(cfg, train_ds)
    counts = class_counts(train_ds) if cfg.remedy.class_weights is not None else None
    recorder = BalanceRecorder() if e.record else None
    model: nn.Module = build_model(
        cfg, num_classes=train_ds.num_classes, image_size=image_size, counts=counts, recorder=recorder
    ).to(device)
    if device.type == "cpu":
        # oneDNN convolutions run faster in NHWC (a RetinaNet step on the tiny backbone, batch 16, 2 threads,
        # was about 20% faster).
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    total = e.iterations
    scheduler = build_scheduler(optimizer, cfg.schedule, total)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if e.amp else None
    scaler = torch.amp.GradScaler("cuda") if e.amp and device.type == "cuda" else None
    factors = build_repeat_factors(cfg, train_ds)
    boot = cfg.remedy.bootstrap
    boundaries = [] if boot is None else [round(r * total / (boot.rounds + 1)) for r in range(1, boot.rounds + 1)]

    step, epoch, batch, boot_round = 0, 0, 0, 0
    if resume:
        state = load_checkpoint(ckpt_path, map_location="cpu")
        saved = load_toml(state["config"], source=f"{ckpt_path}:config")
        if saved != cfg:
            a, b = _flatten(config_to_dict(saved)), _flatten(config_to_dict(cfg))
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise CheckpointError(f"checkpoint {str(ckpt_path)!r} was written with another config; differing keys: {diff}")
        if state["world_size"] != info.world_size:
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} was written by {state['world_size']} processes, resuming with "
                f"{info.world_size} would change the data order"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        step, epoch, batch, boot_round = state["step"], state["epoch"], state["batch"], state["bootstrap_round"]
        if state["hard_negatives"] is not None:
            from detbalance.sampling import HardNegativeSet

            hn = HardNegativeSet()
            hn.load_state_dict(state["hard_negatives"])
            model.roi_heads.set_hard_negatives(hn)
        if recorder is not None and state["recorder"] is not None:
            recorder.load_state_dict(state["recorder"])
        set_rng_state(state["rng"][info.rank])
        set_generator_states(model, state["generators"][info.rank], device)
        if main:
            _truncate_jsonl(metrics_file, step)
            if recorder_file is not None:
                _truncate_jsonl(recorder_file, step)
    else:
        if info.distributed:
            torch.manual_seed(e.seed + 1 + info.rank)  # per-rank augmentation; the model is already built
        if main:
            output.mkdir(parents=True, exist_ok=True)
            metrics_file.write_text("", encoding="utf-8")
            if recorder_file is not None and recorder is not None:
                recorder_file.write_text(json.dumps({"loss_bin_edges": recorder.loss_bin_edges}) + "\n", encoding="utf-8")
    if main:
        output.mkdir(parents=True, exist_ok=True)
        config_file.write_text(dump_toml(cfg), encoding="utf-8")

    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # ------------------------------------------------------------------ data order
    def epoch_batches(ep: int) -> list[list[int]]:
        return pass_batches(
            len(train_ds),
            batch_size=e.batch_size,
            accumulate=e.accumulate,
            seed=e.seed,
            epoch=ep,
            rank=info.rank,
            world_size=info.world_size,
            repeat_factors=factors,
        )

    def loader_for(batches: list[list[int]], ds: Any, seed: int) -> DataLoader:
        return DataLoader(
            ds,
            batch_sampler=batches,
            collate_fn=collate_detection,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=device.type == "cuda",
        )

    gt = val_ds.to_coco_dict()
    eval_bs = e.eval_batch_size or e.batch_size
    val_idx = list(range(info.rank, len(val_ds), info.world_size))
    val_batches = [val_idx[i : i + eval_bs] for i in range(0, len(val_idx), eval_bs)]

    history: list[dict[str, Any]] = []

    def log(records: list[dict[str, Any]]) -> None:
        if main:
            history.extend(records)
            _append_jsonl(metrics_file, records)

    def flush_recorder() -> None:
        if recorder is not None:
            records = recorder.to_records()
            recorder.clear()
            if main and recorder_file is not None:
                _append_jsonl(recorder_file, records)

    def run_eval(at_step: int, round_: int | None = None) -> dict[str, Any]:
        metrics = evaluate(model, loader_for(val_batches, val_ds, 0), device=device, gt=gt, label_names=val_ds.label_names)
        rec: dict[str, Any] = {"type": "eval", "step": at_step, "metrics": metrics}
        if round_ is not None:
            rec["round"] = round_
        log([rec])
        return metrics

    position = {"epoch": epoch, "batch": batch}
    last_ckpt: list[Path | None] = [ckpt_path if resume else None]
    hard_negatives: list[Any] = [getattr(getattr(model, "roi_heads", None), "hard_negatives", None)]

    def save(at_step: int) -> None:
        flush_recorder()
        rng = all_gather_objects(get_rng_state())
        gens = all_gather_objects(generator_states(model))
        if main:
            hn = hard_negatives[0]
            save_checkpoint(
                ckpt_path,
                {
                    "version": __version__,
                    "config": dump_toml(cfg),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": None if scaler is None else scaler.state_dict(),
                    "step": at_step,
                    "epoch": position["epoch"],
                    "batch": position["batch"],
                    "bootstrap_round": boot_round_box[0],
                    "hard_negatives": None if hn is None else hn.state_dict(),
                    "recorder": None if recorder is None else recorder.state_dict(),
                    "rng": rng,
                    "generators": gens,
                    "world_size": info.world_size,
                    "num_classes": train_ds.num_classes,
                    "label_names": list(train_ds.label_names),
                    "image_size": image_size,
                },
            )
        last_ckpt[0] = ckpt_path

    boot_round_box = [boot_round]

    def mine() -> None:
        from detbalance.sampling import find_hard_negatives

        if boot is None:
            return
        plain = open_dataset(cfg.data.train, split="train", transforms=eval_transform(), seed=cfg.data.seed)
        idx = list(range(info.rank, len(plain), info.world_size))
        dets, tgts = [], []
        net = unwrap(model)
        net.eval()
        with torch.no_grad():
            for images, targets in loader_for([idx[i : i + eval_bs] for i in range(0, len(idx), eval_bs)], plain, 0):
                outs = net([img.to(device) for img in images])
                dets += [{k: v.cpu() for k, v in o.items()} for o in outs]
                tgts += move_targets(targets, torch.device("cpu"))
        net.train()
        parts = all_gather_objects((dets, tgts))
        all_dets = [d for p in parts for d in p[0]]
        all_tgts = [t for p in parts for t in p[1]]
        hn = find_hard_negatives(
            all_dets, all_tgts, iou=boot.iou, score_threshold=boot.score_threshold, max_per_image=boot.max_per_image
        )
        net.roi_heads.set_hard_negatives(hn)
        hard_negatives[0] = hn
        log([{"type": "bootstrap", "step": step_box[0], "round": boot_round_box[0], "hard_negatives": hn.num_boxes}])

    # ------------------------------------------------------------------ the loop
    bar = _Progress(progress and main, total, step)
    window: dict[str, Any] = {"n": 0, "losses": {}, "images": 0, "seconds": 0.0}
    totals = {"images": 0, "seconds": 0.0}
    step_box = [step]

    def after_step(m: StepMetrics) -> None:
        step_box[0] = m.step
        position["epoch"], position["batch"] = m.epoch, m.batches
        window["n"] += 1
        for k, v in m.losses.items():
            window["losses"][k] = window["losses"].get(k, 0.0) + v
        window["images"] += m.images * info.world_size
        window["seconds"] += m.seconds
        totals["images"] += m.images * info.world_size
        totals["seconds"] += m.seconds
        ips = window["images"] / max(window["seconds"], 1e-9)
        bar.update(m.step, m.loss, ips)
        if m.step % e.log_interval == 0 or m.step == total:
            losses = {k: v / window["n"] for k, v in window["losses"].items()}
            log(
                [
                    {
                        "type": "train",
                        "step": m.step,
                        "epoch": m.epoch,
                        "lr": m.lr,
                        "loss": math.fsum(losses.values()),
                        "losses": losses,
                        "images_per_s": ips,
                    }
                ]
            )
            flush_recorder()
            window.update(n=0, losses={}, images=0, seconds=0.0)
        if m.step in boundaries:
            run_eval(m.step, boot_round_box[0])
            boot_round_box[0] += 1
            mine()
        elif e.eval_interval is not None and m.step % e.eval_interval == 0 and m.step != total:
            run_eval(m.step)
        if (e.checkpoint_interval is not None and m.step % e.checkpoint_interval == 0) or m.step == total:
            save(m.step)
        if on_step is not None:
            on_step(m)
        if recorder is not None:
            recorder.start_step(m.step + 1)

    if recorder is not None:
        recorder.start_step(step + 1)
    try:
        while step < total:
            batches = epoch_batches(epoch)
            if batch >= len(batches):
                epoch, batch = epoch + 1, 0
                continue
            step = train_one_epoch(
                train_model,
                optimizer,
                loader_for(batches[batch:], train_ds, e.seed * 100_003 + epoch),
                scheduler=scheduler,
                scaler=scaler,
                device=device,
                accumulate=e.accumulate,
                grad_clip=cfg.optim.grad_clip,
                amp_dtype=amp_dtype,
                start_step=step,
                total_steps=total,
                max_steps=total - step,
                epoch=epoch,
                start_batch=batch,
                on_step=after_step,
            )
            epoch, batch = position["epoch"], position["batch"]
    except NonFiniteLossError as err:
        raise NonFiniteLossError(err.step, err.losses, None if last_ckpt[0] is None else str(last_ckpt[0])) from None
    finally:
        bar.close()
    final = run_eval(total, boot_round_box[0] if boot is not None else None)
    images_per_s = totals["images"] / totals["seconds"] if totals["seconds"] > 0 else math.nan
    return FitResult(
        metrics=final,
        history=history,
        output=output,
        checkpoint=ckpt_path,
        config_file=config_file,
        metrics_file=metrics_file,
        recorder_file=recorder_file,
        images_per_s=images_per_s,
        steps=step,
    )


def load_trained_model(
    checkpoint: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """Rebuild the model of a :func:`fit` checkpoint, with its weights, in eval mode.

    Returns:
        ``(model, cfg, info)`` where ``info`` holds ``num_classes``, ``label_names``, ``image_size``,
        ``step`` and ``version`` of the checkpoint.
    """
    state = load_checkpoint(checkpoint, map_location="cpu")
    cfg = load_toml(state["config"], source=f"{checkpoint}:config")
    k = int(state["num_classes"])
    counts = torch.ones(k, dtype=torch.int64) if cfg.remedy.class_weights is not None else None
    model = build_model(cfg, num_classes=k, image_size=int(state["image_size"]), counts=counts)
    model.load_state_dict(state["model"])
    info = {key: state[key] for key in ("num_classes", "label_names", "image_size", "step", "version")}
    return model.to(device).eval(), cfg, info
