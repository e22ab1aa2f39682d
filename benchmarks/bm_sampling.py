"""Samplers at the scales detectors use them, side by side with what they replace or accompany.

What is measured (issue 3, point 9):

* ``fixed_ratio``: RPN-style sampling (256 per image at 0.5) for 16 images x 100k anchors; our batched
  sampler (one ``rand`` + two ``topk`` over the padded batch) against torchvision's per-image
  ``BalancedPositiveNegativeSampler`` (a Python loop with two ``randperm`` per image). Target: ours at least
  as fast.
* ``ohem``: OHEM selection (loss-scored NMS 0.7, top 128 per image) at the paper's scale, 2 images x 2000
  RoIs, and at 2 x 10000 = 20k RoIs; S-OHEM (4 strata) at the same sizes; next to one forward of a
  2-layer 1024-wide RoI head (torchvision ``TwoMLPHead`` on 256x7x7 pooled features) over the same RoIs,
  the read-only pass OHEM needs anyway. Target: selection at 2 x 2000 -> 128 cheaper than that forward.
* ``repeat_factors``: ``repeat_factors`` over 1M images (Zipf-distributed categories, 0-5 per image) and one
  epoch of ``RepeatFactorSampler`` (stochastic rounding + shuffle) over them.

Inputs come from ``tests/sampling/inputs.py`` (the tests' builders), generated on CPU with fixed seeds and
moved to the device. Times are the median and IQR of ``torch.utils.benchmark.Timer.blocked_autorange``
(which synchronises CUDA). Output: ``benchmarks/results/<version>/sampling--<device>.json`` and a markdown
table (``.md``) next to it. ``--smoke`` runs every case once at tiny sizes, makes no timing claims and writes
to a temporary directory unless ``--out`` is given.

Usage::

    python benchmarks/bm_sampling.py --device cuda     # real numbers
    python benchmarks/bm_sampling.py --smoke           # CI: every case runs once
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.faster_rcnn import TwoMLPHead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_repo_on_path, ratio, run_metadata, time_us, write_report  # noqa: E402

ensure_repo_on_path()

from tests.sampling.inputs import random_anchor_labels, random_rois  # noqa: E402

from detbalance.sampling import (  # noqa: E402
    RepeatFactorSampler,
    repeat_factors,
    sample_fixed_ratio_batched,
    select_hard_examples,
    select_hard_examples_stratified,
)

# ------------------------------------------------------------------------------------------------ helpers


def measure(fn: Callable[[], object], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """:func:`common.time_us` with this run's options (``None`` timings in smoke mode, where ``fn`` runs once)."""
    return time_us(fn, device=device, num_threads=args.threads, min_run_time=args.min_run_time, smoke=args.smoke)


# -------------------------------------------------------------------------------------------------- cases


def bench_fixed_ratio(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    images, anchors = (2, 1000) if args.smoke else (16, 100_000)
    tv_sampler = BalancedPositiveNegativeSampler(256, 0.5)
    results = []
    # ~100 positives per image (typical RPN, under the cap of 128) and ~1000 (over the cap: our second topk).
    for regime, pos_fraction in (("~0.1% positive", 0.001), ("~1% positive", 0.01)):
        labels = random_anchor_labels(images, anchors, pos_fraction=pos_fraction, ignore_fraction=0.1, seed=0)
        labels = labels.to(device)
        rows = list(labels.unbind(0))
        generator = torch.Generator(device=device).manual_seed(0)
        torch.manual_seed(0)
        ours = measure(lambda: sample_fixed_ratio_batched(labels, 256, 0.5, generator=generator),  # noqa: B023
                       args, device)
        ours_list = measure(lambda: sample_fixed_ratio_batched(rows, 256, 0.5, generator=generator),  # noqa: B023
                            args, device)
        tv = measure(lambda: tv_sampler(rows), args, device)  # noqa: B023
        shape = f"{images}x{anchors} ({regime}) -> 256 @ 0.5"
        results += [
            {"case": "fixed_ratio", "impl": "detbalance batched (padded tensor)", "shape": shape, **ours,
             "vs_torchvision": ratio(ours["median_us"], tv["median_us"])},
            {"case": "fixed_ratio", "impl": "detbalance batched (list input)", "shape": shape, **ours_list,
             "vs_torchvision": ratio(ours_list["median_us"], tv["median_us"])},
            {"case": "fixed_ratio", "impl": "torchvision BalancedPositiveNegativeSampler", "shape": shape, **tv,
             "vs_torchvision": 1.0},
        ]
    return results


def bench_ohem(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    sizes = [(2, 100)] if args.smoke else [(2, 2000), (2, 10_000)]
    head = TwoMLPHead(256 * 7 * 7, 1024).to(device).eval()
    results = []
    for images, per_image in sizes:
        batch = random_rois(images, per_image, seed=0)
        cls, loc, labels, boxes, batch_idx = (t.to(device) for t in batch)
        losses = cls + loc
        shape = f"{images}x{per_image} -> 128/image"
        ohem = measure(lambda: select_hard_examples(losses, labels, boxes, batch_idx, num_samples=128, nms_iou=0.7),  # noqa: B023
                       args, device)
        sohem = measure(
            lambda: select_hard_examples_stratified(cls, loc, labels, boxes, batch_idx, num_samples=128,  # noqa: B023
                                                    progress=0.5, strata=4),
            args, device,
        )
        features = torch.randn(images * per_image, 256, 7, 7, generator=torch.Generator().manual_seed(1)).to(device)

        def forward(x: torch.Tensor = features) -> None:
            with torch.no_grad():
                head(x)

        fwd = measure(forward, args, device)
        results += [
            {"case": "ohem", "impl": "select_hard_examples (NMS 0.7)", "shape": shape, **ohem,
             "vs_head_forward": ratio(ohem["median_us"], fwd["median_us"])},
            {"case": "ohem", "impl": "select_hard_examples_stratified (4 strata)", "shape": shape, **sohem,
             "vs_head_forward": ratio(sohem["median_us"], fwd["median_us"])},
            {"case": "ohem", "impl": "TwoMLPHead(256*7*7, 1024) forward, no grad", "shape": f"{images * per_image} RoIs",
             **fwd, "vs_head_forward": 1.0},
        ]
    return results


def _categories(num_images: int, num_categories: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    per_image = torch.randint(0, 6, (num_images,), generator=g)
    zipf = 1.0 / torch.arange(1, num_categories + 1, dtype=torch.float64)
    flat = torch.multinomial(zipf, int(per_image.sum()), replacement=True, generator=g) + 1
    return [chunk.tolist() for chunk in flat.split(per_image.tolist())]


def bench_repeat_factors(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    num_images = 10_000 if args.smoke else 1_000_000
    cats = _categories(num_images, 1203, seed=0)  # LVIS v1 has 1203 categories
    factors = repeat_factors(cats, threshold=0.001)
    rf = measure(lambda: repeat_factors(cats, threshold=0.001), args, device)
    sampler = RepeatFactorSampler(factors, seed=0)
    epoch = [0]

    def one_epoch() -> None:
        epoch[0] += 1
        sampler.set_epoch(epoch[0])
        sampler.epoch_indices()

    ep = measure(one_epoch, args, device)
    shape = f"{num_images} images"
    return [
        {"case": "repeat_factors", "impl": "repeat_factors (t=0.001)", "shape": shape, **rf,
         "mean_factor": float(factors.mean()), "max_factor": float(factors.max())},
        {"case": "repeat_factors", "impl": "RepeatFactorSampler one epoch (round + shuffle)", "shape": shape, **ep,
         "epoch_length": int(sampler.epoch_indices().numel())},
    ]


# ----------------------------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    results = bench_fixed_ratio(args, device) + bench_ohem(args, device) + bench_repeat_factors(args, device)
    targets = {}
    if not args.smoke:
        for r in results:
            if r["impl"].startswith("detbalance batched (padded"):
                regime = r["shape"].split("(")[1].split(")")[0]
                targets[f"fixed_ratio_batched_not_slower_than_torchvision [{regime}]"] = bool(r["vs_torchvision"] <= 1.0)
        ohem = next(r for r in results if r["case"] == "ohem" and r["shape"].startswith("2x2000 "))
        targets["ohem_2x2000_cheaper_than_head_forward"] = bool(ohem["vs_head_forward"] < 1.0)
    return {"suite": "sampling", "smoke": args.smoke, "metadata": run_metadata(device, num_threads=args.threads), "results": results,
            "targets": targets}


def markdown(report: dict[str, Any]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        f"# sampling ({report['metadata'].get('device')}, torch {report['metadata'].get('torch')})",
        "",
        "| case | implementation | shape | median (us) | IQR (us) | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        rel = r.get("vs_torchvision", r.get("vs_head_forward"))
        lines.append(f"| {r['case']} | {r['impl']} | {r['shape']} | {f(r['median_us'], '.1f')} | "
                     f"{f(r['iqr_us'], '.1f')} | {f(rel, '.3f')} |")
    lines += ["", "ratio: to torchvision's sampler (fixed_ratio) or to the RoI head forward (ohem).", ""]
    for name, ok in report["targets"].items():
        lines.append(f"- {name}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, each case once, no timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (timer and torch)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per case for the timer")
    parser.add_argument("--out", type=Path, default=None, help="results root (default benchmarks/results)")
    args = parser.parse_args(argv)
    report = run(args)
    table = markdown(report)
    path = write_report(report, table, suite="sampling", device=args.device, out=args.out, smoke=args.smoke)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
