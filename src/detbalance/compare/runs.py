"""One compare run on disk: its folder keyed by the settings, never deleted, resumed where it stopped.

A run lives in ``OUTPUT/runs/<suite>/<method>/<key>/seed<k>/`` where ``<key>`` is a short hash of the
run's whole resolved config except the seed. Different settings (``--iters``, ``--optim``, ``--budget``,
another dataset, ...) therefore go to another folder, and a finished run is never deleted: rerunning a
command reuses its finished runs (``result.json``) and resumes the interrupted ones from their checkpoint.
Two suites may hold the same run (the ``classes`` suite's baseline is the ``losses`` suite's focal arm): a
finished twin, with the same key and seed and an identical config, is copied instead of trained again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from detbalance.config import ExperimentConfig, dump_toml, load_toml
from detbalance.engine.files import OutputFolder, read_jsonl

__all__ = ["claimed", "device_name", "find_twin", "load_average", "run_dir", "run_key", "run_one", "write_json_atomic"]


# Config keys added after runs were first keyed, with the value that means "not used": left out of the key
# while they hold it, so that the run folders of earlier versions (docs/study) keep their keys. (Grouping by
# aspect ratio is a no-op on the built-in benchmark's square images, so its default leaves those runs as they were.)
KEYS_ADDED_LATER: dict[str, object] = {
    "data.train_images": None,
    "data.val_images": None,
    "data.aspect_ratio_group_factor": 3,
    "remedy.assigner": None,
    "remedy.pisa": None,
    "model.weights": None,
    "model.weights_backbone": None,
    "model.trainable_backbone_layers": None,
    "model.min_size": None,
    "model.max_size": None,
    "model.image_mean": None,
    "model.image_std": None,
    "remedy.ssd_mining.background_prior": None,
    "model.rpn_pre_nms_top_n_train": None,
    "model.rpn_post_nms_top_n_train": None,
    "optim.decay_all": False,
}
#: Keys renamed since the study's runs were keyed, written under their earlier name in the key's text.
KEYS_RENAMED: dict[str, str] = {"model.name": "arch"}


def run_key(cfg: ExperimentConfig) -> str:
    """A 10-hex-digit key of the resolved config with the run seed set aside (the seed names the folder
    below it; the data seed, which picks the benchmark instance, stays in the key). Keys added later
    (:data:`KEYS_ADDED_LATER`) count only when they differ from their defaults."""
    text = dump_toml(replace(cfg, engine=replace(cfg.engine, seed=0)), leave_out=KEYS_ADDED_LATER, rename=KEYS_RENAMED)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _same_config(saved: object, cfg: ExperimentConfig) -> bool:
    """Whether a run's saved config text is ``cfg`` (parsed, so a text written before a key was added, which
    lacks it, matches a config holding that key's default)."""
    if not isinstance(saved, str):
        return False
    try:
        return load_toml(saved) == cfg
    except ValueError:
        return False


def device_name(device: str) -> str:
    """What a run with ``engine.device = device`` trains on, as the report names it: ``CPU`` or
    ``CUDA <GPU name>``. (``result.json`` names each device that trained a part of a resumed run, in order:
    ``CUDA NVIDIA H200 then CPU``.)"""
    from detbalance.engine.run import resolve_device

    resolved = resolve_device(device)
    return f"CUDA {torch.cuda.get_device_name(resolved)}" if resolved.type == "cuda" else "CPU"


def _devices(folder: Path, current: str) -> str:
    """The devices that trained the run in ``folder``, in order (``current`` when none is named)."""
    try:
        lines = (folder / "devices.txt").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    return " then ".join(device for device, _ in itertools.groupby(line for line in lines if line)) or current


def run_dir(output: Path, suite: str, method: str, cfg: ExperimentConfig) -> Path:
    """``output/runs/<suite>/<method>/<key>/seed<k>``."""
    return Path(output) / "runs" / suite / method / run_key(cfg) / f"seed{cfg.engine.seed}"


def _lock_is_stale(lock: Path) -> bool:
    """A lock of this host whose process is gone (or a lock file left unreadable for over a minute)."""
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        try:
            return time.time() - lock.stat().st_mtime > 60
        except OSError:
            return True  # removed meanwhile
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: only its owner (or the user) may remove it
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


@contextmanager
def claimed(folder: Path) -> Iterator[bool]:
    """Claim a run for this process with a lock file beside its folder (``seed<k>.lock``).

    Yields ``True`` when this process holds the claim (released on exit), ``False`` when another live
    process is training that run, so that several ``compare`` processes can share one output folder (one per
    core or GPU) without training a run twice. A lock left by a dead process of this host is taken over.
    """
    lock = Path(folder).parent / f"{Path(folder).name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = False
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _lock_is_stale(lock):
                break
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        held = True
        break
    try:
        yield held
    finally:
        if held:
            lock.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, rename) through the folder's manifest: a crash never leaves a torn
    file, and a file of the same name that the project did not write is never replaced."""
    OutputFolder(Path(path).parent).write_text(Path(path).name, json.dumps(obj, indent=1, allow_nan=True))


LOAD_SAMPLE_S = 15.0
"""Seconds between two samples of the load average during a run (``result.json``'s ``load_average``)."""


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _hooks(metrics_file: Path) -> list[dict[str, Any]]:
    """What the run's training hooks logged, e.g. ``{"type": "bootstrap", "step", "round", "hard_negatives",
    "images"}`` per bootstrapping round (every record of ``metrics.jsonl`` that is not a train or eval record)."""
    records = (json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip())
    return [r for r in records if r.get("type") not in ("train", "eval")]


def _curve(metrics_file: Path) -> list[dict[str, Any]]:
    """Learning-curve points from a run's ``metrics.jsonl``: the training loss (EMA-smoothed) and any AP."""
    points: list[dict[str, Any]] = []
    smooth = None
    with warnings.catch_warnings():  # a torn last line (a crash mid-write): the run resumed past it
        warnings.simplefilter("ignore", RuntimeWarning)
        records = read_jsonl(metrics_file)
    for rec in records:
        if rec.get("type") == "train" and rec.get("loss") is not None and math.isfinite(rec["loss"]):
            smooth = rec["loss"] if smooth is None else 0.7 * smooth + 0.3 * rec["loss"]
            points.append({"iter": int(rec["step"]), "loss": smooth})
        elif rec.get("type") == "eval" and rec.get("metrics", {}).get("AP") is not None:
            points.append({"iter": int(rec["step"]), "AP": float(rec["metrics"]["AP"])})
    # one AP point per step (a resumed run may have evaluated a step twice): keep the last
    seen: dict[int, int] = {}
    for i, p in enumerate(points):
        if "AP" in p:
            seen[p["iter"]] = i
    return [p for i, p in enumerate(points) if "AP" not in p or seen[p["iter"]] == i]


@torch.no_grad()
def _grad_density(run: Path, *, num_images: int = 64, bins: int = 30) -> dict[str, Any] | None:
    """Gradient-norm density g = |sigmoid(x) - y| of a trained RetinaNet on its own training images
    (without augmentation: for the noise suite, the noisy labels it trained on)."""
    from detbalance.analysis.assignment import sample_indices
    from detbalance.analysis.gradients import probe_gradients
    from detbalance.data import eval_transform, open_dataset
    from detbalance.engine.run import load_trained_model

    model, cfg, _ = load_trained_model(run / "checkpoint.pt")
    if cfg.model.arch != "retinanet":
        return None
    train = open_dataset(
        cfg.data.train, split="train", transforms=eval_transform(), seed=cfg.data.seed, images=cfg.data.train_images
    )
    indices = sample_indices(len(train), num_images, 0)
    stats = probe_gradients(model, train, indices, bins=bins)
    return {"counts": [float(c) for c in stats.density], "bins": bins, "images": len(indices), "split": "train"}


def find_twin(output: Path, folder: Path, cfg: ExperimentConfig) -> Path | None:
    """A finished run of exactly ``cfg`` (same key, seed and config text) in another suite or method folder
    under ``output/runs``, or ``None``."""
    pattern = f"*/*/{run_key(cfg)}/seed{cfg.engine.seed}"
    for other in sorted((Path(output) / "runs").glob(pattern)):
        if other.resolve() == Path(folder).resolve():
            continue
        saved = read_result(other / "result.json")
        if saved is not None and "twin_of" not in saved and _same_config(saved.get("config"), cfg):
            return other
    return None


def _copy_twin(twin: Path, folder: Path, rare: list[str]) -> dict[str, Any]:
    """Copy a finished twin run into ``folder``; the rare-class AP is recomputed for this suite's rare classes."""
    out_folder = OutputFolder(folder)
    names = [name for name in ("config.toml", "metrics.jsonl", "checkpoint.pt") if (twin / name).is_file()]
    out_folder.check([*names, "result.json"], what="copying the twin run")
    for name in names:
        out_folder.write_with(name, lambda f, src=twin / name: _copy_into(src, f))
    out = json.loads((twin / "result.json").read_text(encoding="utf-8"))
    metrics = dict(out["metrics"])
    metrics["rare_AP"] = _rare_ap(metrics.get("per_class", {}), rare)
    out.update(metrics=metrics, folder=str(folder), twin_of=str(twin))
    write_json_atomic(folder / "result.json", out)
    return out


def _copy_into(src: Path, f: Any) -> None:
    with open(src, "rb") as g:
        shutil.copyfileobj(g, f)


def _rare_ap(per_class: dict[str, float], rare: list[str]) -> float:
    aps = [per_class[c] for c in rare if c in per_class and not math.isnan(per_class[c])]
    return sum(aps) / len(aps) if aps else math.nan


def read_result(path: Path) -> dict[str, Any] | None:
    """A run's ``result.json``, or ``None`` when missing; a corrupt one is an error naming the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it to re-evaluate this run") from None


def run_one(
    folder: Path,
    cfg: ExperimentConfig,
    *,
    on_step: Callable[[Any], None],
    rare: list[str],
    twin: Path | None = None,
) -> tuple[dict[str, Any], bool]:
    """Train (or resume, or reuse) one run; returns ``(result, reused)``.

    ``twin`` (from :func:`find_twin`): a finished run of the same config elsewhere, copied into ``folder``
    (``result.json`` names it under ``twin_of``) when ``folder`` holds no run yet.

    Raises:
        ValueError: the folder holds a run of another configuration (a key collision; nothing is deleted).
    """
    from detbalance.engine import fit

    config_text = dump_toml(cfg)
    saved = read_result(folder / "result.json")
    if saved is not None:
        if not _same_config(saved.get("config"), cfg):
            raise ValueError(f"{folder}: holds a run of another configuration; refusing to overwrite it")
        return saved, True
    config_file = folder / "config.toml"
    if twin is not None and not config_file.exists():
        return _copy_twin(twin, folder, rare), True
    started = config_file.exists()
    if started and load_toml(config_file.read_text(), source=str(config_file)) != cfg:
        raise ValueError(f"{folder}: holds a run of another configuration; refusing to overwrite it")
    resume = started and (folder / "checkpoint.pt").exists()
    # Interrupted before its first checkpoint: this run's own config and metrics, nothing to resume from.
    # It starts again from step 0 (the same seed gives the same run); its files are the only ones rewritten.
    restart = started and not resume
    out_folder = OutputFolder(folder)
    devices_file = folder / "devices.txt"
    if started and not out_folder.manifest_path.exists() and devices_file.is_file():
        # a run folder written before manifests: its devices.txt is ours when every line names a device
        from detbalance.engine.run import adopt_legacy_run

        lines = devices_file.read_text(encoding="utf-8", errors="replace").splitlines()
        adopt_legacy_run(folder, also=["devices.txt"] if all(ln.startswith(("CPU", "CUDA")) for ln in lines if ln) else [])
    if restart:
        out_folder.remove("devices.txt")
    # A run may be resumed on another machine: each part of it names its device in devices.txt, written at its
    # first step (fit() creates the folder and refuses a fresh run into a folder that holds files)
    device = device_name(cfg.engine.device)
    named = False

    loads = [load_average()]  # sampled over the run, not only at its start and end
    last_sample = time.perf_counter()

    def step(m: Any) -> None:
        nonlocal named, last_sample
        if not named:
            before = (folder / "devices.txt").read_text(encoding="utf-8") if (folder / "devices.txt").is_file() else ""
            out_folder.write_text("devices.txt", before + device + "\n")
            named = True
        if time.perf_counter() - last_sample >= LOAD_SAMPLE_S:
            loads.append(load_average())
            last_sample = time.perf_counter()
        on_step(m)

    t0, cpu0 = time.perf_counter(), time.process_time()
    res = fit(cfg, output=folder, resume=resume, overwrite=restart, on_step=step, progress=False)
    train_s = time.perf_counter() - t0
    loads.append(load_average())
    metrics = dict(res.metrics)
    metrics["rare_AP"] = _rare_ap(metrics.get("per_class", {}), rare)
    t1 = time.perf_counter()
    density = _grad_density(folder)
    out = {
        "config": config_text,
        "seed": cfg.engine.seed,
        "folder": str(folder),
        "metrics": metrics,
        "images_per_s": res.images_per_s,
        "load_average": loads,
        "threads": torch.get_num_threads(),
        "device": _devices(folder, device),
        "wall_s": train_s + (time.perf_counter() - t1),
        # this process's CPU time (all its threads) over the same span: well below threads x wall_s when the
        # run waited for cores that other jobs held
        "cpu_s": time.process_time() - cpu0,
        "resumed": resume,
        "held_out": None if res.held_out is None else res.held_out.to_dict(),
        "curve": _curve(res.metrics_file),
        "hooks": _hooks(res.metrics_file),
        "grad_density": density,
        "model": res.model,
    }
    write_json_atomic(folder / "result.json", out)
    return out, False
