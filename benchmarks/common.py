"""Shared benchmark helpers: timing, peak memory, run metadata, JSON output (method: benchmarks/README.md)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_repo_on_path() -> None:
    """Make ``tests.reference`` / ``tests.losses.inputs`` importable (benchmarks share the tests' oracles)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_us(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    num_threads: int = 2,
    min_run_time: float = 1.0,
    smoke: bool = False,
) -> dict[str, float | int | None]:
    """Median and IQR (microseconds) of ``fn()`` with ``torch.utils.benchmark.Timer.blocked_autorange``.

    The statement synchronises the device inside the timed region. ``smoke=True`` runs ``fn`` once and
    returns ``None`` timings (the scripts are exercised in CI without timing claims).
    """
    if smoke:
        fn()
        synchronize(device)
        return {"median_us": None, "iqr_us": None, "runs": 1}
    dev = torch.device(device)

    def stmt() -> None:
        fn()
        synchronize(dev)

    stmt()  # warm-up (allocator, lazy init)
    m = tbench.Timer(stmt="stmt()", globals={"stmt": stmt}, num_threads=num_threads).blocked_autorange(
        min_run_time=min_run_time
    )
    return {"median_us": m.median * 1e6, "iqr_us": m.iqr * 1e6, "runs": len(m.times) * m.number_per_run}


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    *,
    reps: int = 15,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    smoke: bool = False,
) -> dict[str, dict[str, Any]]:
    """Time every function once per repetition, in rotating order, in this process; median and IQR per function.

    Repetition ``r`` runs the functions starting at the ``r mod m``-th, so each method is measured at every
    position of the cycle, and a change of machine load (other jobs, page faults, frequency) during the run
    hits all methods alike instead of whichever ran in that window. One call per sample, device synchronised
    inside the timed region, ``time.perf_counter``. ``warmup`` untimed rounds first (allocator, first-touch
    page faults). ``smoke=True`` runs each function once and returns ``None`` timings.

    Returns:
        ``name -> {"median_us", "iqr_us", "runs", "samples_us"}``.
    """
    import time

    names = list(fns)
    if smoke:
        for name in names:
            fns[name]()
        synchronize(device)
        return {n: {"median_us": None, "iqr_us": None, "runs": 1, "samples_us": []} for n in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
            synchronize(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    m = len(names)
    for r in range(reps):
        for name in names[r % m :] + names[: r % m]:
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e6)
    out: dict[str, dict[str, Any]] = {}
    for name, xs in samples.items():
        t = torch.tensor(xs, dtype=torch.float64)
        q25, q50, q75 = (float(v) for v in torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
        out[name] = {"median_us": q50, "iqr_us": q75 - q25, "runs": len(xs), "samples_us": xs}
    return out


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by ``fn()`` above what was live before it (tensors alive before are not counted).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocation at the
    start. CPU: ``torch.profiler`` with ``profile_memory=True`` records every CPU allocator allocation and free
    (``[memory]`` events with signed sizes); the peak of their running sum in time order is the peak of live
    bytes allocated by ``fn``. (``tracemalloc`` cannot see torch's C++ allocations; RSS is page- and
    allocator-cache-granular.) The profiler itself adds time, so memory and timing are measured separately.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(dev) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(device: torch.device | str, *, num_threads: int | None = None) -> dict[str, Any]:
    """What is needed to reproduce and compare a result: code version, library versions, hardware, threads.

    ``num_threads`` defaults to ``torch.get_num_threads()``.
    """
    import torchvision

    import detbalance

    dev = torch.device(device)
    status = _git("status", "--porcelain")
    return {
        "detbalance": detbalance.__version__,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads() if num_threads is None else num_threads,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_json(path: str | Path, results: dict[str, Any]) -> Path:
    """Write ``results`` as indented JSON (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def device_slug(device: torch.device | str) -> str:
    """File-name part for ``device``: ``"cpu"`` (any non-CUDA device) or the CUDA device name, slugified."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing (smoke runs, unavailable variants) or ``b == 0``."""
    return None if a is None or b is None or b == 0 else a / b


def write_report(
    report: dict[str, Any],
    table: str,
    *,
    suite: str,
    device: torch.device | str,
    out: str | Path | None,
    smoke: bool,
) -> Path:
    """Write ``<root>/<version>/<suite>--<device_slug>.json`` and the markdown ``table`` as ``.md`` beside it.

    ``root`` is ``out`` if given, else a fresh temporary directory for smoke runs (they make no claims and
    must not touch the results tree), else ``benchmarks/results``. Returns the JSON path.
    """
    import detbalance

    if out is not None:
        root = Path(out)
    else:
        root = Path(tempfile.mkdtemp()) if smoke else REPO_ROOT / "benchmarks" / "results"
    path = save_json(root / detbalance.__version__ / f"{suite}--{device_slug(device)}.json", report)
    path.with_suffix(".md").write_text(table)
    return path
