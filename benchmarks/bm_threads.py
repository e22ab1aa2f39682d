"""Training throughput at the default thread count against ``--threads 1`` and ``--threads 2``, idle and loaded.

What is measured (issue 24, point 3): images per second of the losses suite's focal arm (RetinaNet, the
compare recipe, batch 16, builtin:default at 128 px, data loading included), trained as :func:`fit` trains
it, at three intra-op thread counts:

* ``default``: what ``detbalance train`` / ``compare`` choose at their start,
  :func:`detbalance.engine.choose_threads` (the cores the 1-minute load average leaves free), evaluated
  once per condition before its timing starts, as the command line evaluates it once at its start;
* ``t1`` and ``t2``: ``--threads 1`` and ``--threads 2``.

Two conditions, one after the other: ``idle`` (no load added by this script; the machine's own load is
recorded) and ``loaded`` (a second ``detbalance compare --threads 2`` process trains beside this one; the
script waits ``--settle`` seconds for the load average to see it before choosing and timing, and stops it
afterwards). Within a condition the three counts are **interleaved** (``common.interleaved_times``): one
chunk of ``--steps`` optimiser steps per count per repetition, in rotating order, ``--reps`` repetitions,
so a change of load hits every count alike. Reported per condition: the median img/s and IQR of each, the
thread count the default chose and why, the ratio of the default's median to the better of ``t1``/``t2``,
and the load average before and after. Target: the default is never slower than the better fixed count by
more than 10 % (ratio >= 0.90).

Output: ``benchmarks/results/<version>/threads--cpu.json`` and a markdown table beside it. ``--smoke`` runs
one chunk of one step per count on the tiny preset, starts and stops the load process at once, and makes no
timing claim.

Usage::

    python benchmarks/bm_threads.py                       # real numbers (several minutes)
    python benchmarks/bm_threads.py --steps 2 --reps 15   # shorter chunks on a shared machine
    python benchmarks/bm_threads.py --smoke               # CI: every path runs once
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, interleaved_times, run_metadata, write_report  # noqa: E402
from detbalance.engine import choose_threads  # noqa: E402


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def make_trainer(args: argparse.Namespace) -> Callable[[int], Callable[[], None]]:
    """``chunk(threads)``: a function that trains ``--steps`` steps of the focal arm at ``threads`` threads."""
    from torch.utils.data import DataLoader

    from detbalance.builders import build_datasets, build_model, build_optimizer, resolve_image_size
    from detbalance.compare import suite_configs
    from detbalance.data import collate_detection
    from detbalance.engine import train_step

    arms = dict((m.key, cfg) for m, cfg in suite_configs(
        "losses", preset="tiny" if args.smoke else None, iters=1000, seed=0, batch_size=args.batch, device="cpu"))
    cfg = arms["focal"]
    cfg = replace(cfg, data=replace(cfg.data, num_workers=0))
    train_set, _ = build_datasets(cfg, seed=0)
    size = resolve_image_size(cfg, train_set)
    loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,
                        collate_fn=collate_detection, generator=torch.Generator().manual_seed(0))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # as fit() does
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=train_set.num_classes, image_size=size).train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    train_step(model, optimizer, [next(batches)], step=1, device="cpu")  # warm-up
    steps = 1 if args.smoke else args.steps

    def chunk(threads: int) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(threads)
            for s in range(steps):
                train_step(model, optimizer, [next(batches)], step=s + 2, device="cpu")

        return run

    return chunk


def start_load(args: argparse.Namespace, folder: Path) -> subprocess.Popen:
    """A second ``detbalance compare`` process (2 threads) as the load; stopped by :func:`stop_load`."""
    iters = "2" if args.smoke else "100000"
    preset = ["--preset", "tiny"] if args.smoke else []
    cmd = [sys.executable, "-m", "detbalance", "compare", "--suite", "losses", "--iters", iters, "--threads", "2",
           "--no-progress", "--output", str(folder), *preset]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_load(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def condition(name: str, chunk: Callable[[int], Callable[[], None]], args: argparse.Namespace) -> dict[str, Any]:
    choice = choose_threads()
    counts = {"default": choice.threads, "t1": 1, "t2": 2}
    load_before = _load()
    timed = interleaved_times({k: chunk(n) for k, n in counts.items()}, reps=args.reps, smoke=args.smoke)
    load_after = _load()
    images = (1 if args.smoke else args.steps) * args.batch
    rows = {}
    for key, t in timed.items():
        rates = [images / (us / 1e6) for us in t["samples_us"]]
        rows[key] = {
            "threads": counts[key],
            "images_per_s_median": statistics.median(rates) if rates else None,
            "images_per_s_iqr": (statistics.quantiles(rates, n=4)[2] - statistics.quantiles(rates, n=4)[0])
            if len(rates) >= 2 else None,
            "images_per_s_reps": rates,
        }
    best = None if args.smoke else max(rows["t1"]["images_per_s_median"], rows["t2"]["images_per_s_median"])
    ratio = None if best is None else rows["default"]["images_per_s_median"] / best
    return {"condition": name, "default_threads": choice.threads, "default_reason": choice.reason,
            "load_average_before": load_before, "load_average_after": load_after, "rows": rows,
            "default_vs_best": ratio}


def run(args: argparse.Namespace) -> dict[str, Any]:
    chunk = make_trainer(args)
    conditions = [condition("idle", chunk, args)]
    print(f"idle: {conditions[0]['default_reason']} -> default {conditions[0]['default_threads']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_load(args, Path(tmp) / "load")
        try:
            time.sleep(0 if args.smoke else args.settle)
            conditions.append(condition("loaded", chunk, args))
        finally:
            stop_load(proc)
    print(f"loaded: {conditions[1]['default_reason']} -> default {conditions[1]['default_threads']}", flush=True)
    ratios = [c["default_vs_best"] for c in conditions]
    return {
        "suite": "threads",
        "smoke": args.smoke,
        "metadata": run_metadata("cpu"),
        "config": {"arm": "losses/focal", "batch": args.batch, "steps_per_chunk": args.steps, "reps": args.reps,
                   "settle_s": args.settle, "load": "detbalance compare --suite losses --threads 2"},
        "conditions": conditions,
        "targets_met": None if args.smoke else {"default_ge_0.90_of_best": all(r >= 0.90 for r in ratios)},
    }


def markdown(report: dict[str, Any]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    cfg = report["config"]
    lines = [
        f"# threads ({report['metadata']['device_name']}, {report['metadata']['cpu_count']} CPUs, {cfg['arm']}, "
        f"batch {cfg['batch']}, {cfg['reps']} interleaved reps of {cfg['steps_per_chunk']} steps"
        f"{', SMOKE: no timing claims' if report['smoke'] else ''})",
        "",
        "| condition | load before -> after | default chose | img/s default | img/s 1 thread | img/s 2 threads "
        "| default / best |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    def cell(row: dict[str, Any]) -> str:
        return f"{f(row['images_per_s_median'], '.1f')} (IQR {f(row['images_per_s_iqr'], '.1f')})"

    for c in report["conditions"]:
        r = c["rows"]
        lines.append(
            f"| {c['condition']} | {f(c['load_average_before'], '.2f')} -> {f(c['load_average_after'], '.2f')} "
            f"| {c['default_threads']} ({c['default_reason']}) | {cell(r['default'])} | {cell(r['t1'])} | {cell(r['t2'])} "
            f"| {f(c['default_vs_best'], '.2f')} |"
        )
    if report["targets_met"] is not None:
        lines += ["", "Targets: " + ", ".join(f"{k}: {v}" for k, v in report["targets_met"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny preset, one step per count, no timing")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (threads are a CPU matter)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per count per repetition")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per condition")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds between starting the load process and timing (the load average's window)")
    parser.add_argument("--out", type=Path, default=None, help="results root (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.reps = 2, 1
    report = run(args)
    table = markdown(report)
    path = write_report(report, table, suite="threads", device="cpu", out=args.out, smoke=args.smoke)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
