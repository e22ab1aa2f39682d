"""One training step per detector and remedy, side by side with the vanilla torchvision model.

What is measured (issue 4, point 8): forward + backward + SGD step on one synthetic batch (default 8
images), for every detector built by :func:`detbalance.detectors.build.build_detector` on the same backbone
and weights, vanilla and adapted:

* Faster R-CNN: vanilla; ``fixed`` (the adapter configured as torchvision: RoI 512 @ 0.25, RPN 256 @ 0.5);
  ``ohem`` (128 per image, NMS 0.7); ``sohem`` (4 strata); ``focal`` (softmax focal box classifier);
  ``ohem_naive``: a baseline defined *only here* that runs the box head with gradients over every RoI and
  zeroes the losses of the RoIs OHEM did not select (what OHEM avoids with its read-only pass);
  and, interleaved (``--reps`` rounds, each one step of each, alternating which goes first), OHEM against
  the fixed ratio at the same B = 64 RoIs per image (the samplers suite's budget): median and IQR of
  each, the ratio of the medians and the machine's load average before and after;
* RetinaNet: vanilla; ``focal`` (the adapter with torchvision's focal loss, L1 box loss, per-image
  normaliser); ``ghm`` (GHM-C + GHM-R);
* SSD: vanilla; ``mining`` (3:1 hard negative mining through the adapter).

Time per step is the median (and IQR) of ``torch.utils.benchmark.Timer.blocked_autorange`` (which
synchronises CUDA); peak memory is ``torch.cuda.max_memory_allocated`` during one step, above what was
allocated before it (CUDA only; ``null`` on CPU). Both are also given as ratios to the vanilla model of the
same detector. Targets checked (on a real run, never in ``--smoke``): each adapter configured as
torchvision adds at most 10 % to a vanilla step; OHEM's step is at most 1.3x the fixed-ratio step and
faster than the naive zeroed-loss OHEM; the interleaved OHEM/fixed ratio at B = 64 is at most 1.3.

RetinaNet, the losses suite (``--losses-suite``, issue 13): every arm of ``detbalance compare --suite
losses`` (CE, alpha-CE, focal, GHM-C, GHM-C + GHM-R; the compare recipe: AdamW, batch 16, 128 px,
builtin:default) and the vanilla torchvision RetinaNet on the same backbone, each trained as :func:`fit`
trains it (channels-last, flush-denormal, deterministic algorithms, flips) with the data loading
included: images per second over ``--steps`` optimiser steps per round, the arms **interleaved** round
by round (``--rounds``) so that a change in machine load hits every arm alike; the median over rounds and
the ratio to vanilla (the adapter's overhead) are reported, with the load average before and after.
Targets: every arm >= 150 img/s on 2 threads and <= 1.10x vanilla's time per image.

Output: ``benchmarks/results/<version>/train_step--<device>.json`` and a markdown table next to it
(``.md``). ``--smoke`` runs every variant once at a tiny size without timing claims and writes to a
temporary directory unless ``--out`` is given.

Usage::

    python benchmarks/bm_train_step.py --device cuda            # real numbers
    python benchmarks/bm_train_step.py --smoke                  # CI: every variant runs once
    python benchmarks/bm_train_step.py --device cpu --detectors retinanet --losses-suite --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    interleaved_times,
    peak_memory_bytes,
    ratio,
    run_metadata,
    time_us,
    write_report,
)
from detbalance.detectors.build import build_detector  # noqa: E402
from detbalance.detectors.faster_rcnn import BalancedRoIHeads, balance_faster_rcnn, roi_losses  # noqa: E402
from detbalance.sampling import FixedRatioSampler as FixedRatioRoISampler  # noqa: E402
from detbalance.sampling import OHEMSampler as OHEMRoISampler  # noqa: E402
from detbalance.sampling import StratifiedOHEMSampler as StratifiedOHEMRoISampler  # noqa: E402
from detbalance.sampling import select_hard_examples  # noqa: E402

NUM_CLASSES = 5  # K object classes


# ------------------------------------------------------------------------------------------ baseline
class NaiveOHEMRoIHeads(BalancedRoIHeads):
    """OHEM done the expensive way (a baseline for this benchmark only, not part of the library).

    The box head runs *with* gradients over every RoI; the same RoIs as :class:`OHEMRoISampler` are
    selected from the detached losses, and the others get a zero weight, so the backward pass still goes
    through all ``R`` RoIs. The loss value equals the library's OHEM; the cost does not.
    """

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        rois, regression_targets = self.prepare_training_rois(proposals, image_shapes, targets)
        pooled = self.box_roi_pool(features, list(rois.boxes.split(rois.counts())), image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        cls, loc = roi_losses(class_logits, box_regression, rois.labels, regression_targets)
        sampler = self.sampler
        sampled = select_hard_examples(
            (cls + loc).detach(), rois.labels, rois.boxes, rois.batch_idx, num_samples=sampler.num_samples,
            nms_iou=sampler.nms_iou, positive_fraction=sampler.positive_fraction,
        )
        selected = sampled.all()
        weight = torch.zeros_like(cls).index_fill_(0, selected, 1.0)
        num = max(1, selected.numel())
        return [], {"loss_classifier": (cls * weight).sum() / num, "loss_box_reg": (loc * weight).sum() / num}


def naive_ohem(model: nn.Module, sampler: OHEMRoISampler) -> nn.Module:
    balance_faster_rcnn(model, roi_sampler=sampler)
    model.roi_heads = NaiveOHEMRoIHeads.from_roi_heads(model.roi_heads, sampler=sampler)
    return model


# ------------------------------------------------------------------------------------------ variants
def faster_rcnn_variants() -> dict[str, Callable[[nn.Module], nn.Module]]:
    def focal(m: nn.Module) -> nn.Module:
        from detbalance.losses.focal import SoftmaxFocalLoss

        return balance_faster_rcnn(m, roi_sampler=FixedRatioRoISampler(),
                                   rpn_sampler=FixedRatioRoISampler(256, 0.5),
                                   box_cls_loss=SoftmaxFocalLoss(gamma=2.0))

    return {
        "vanilla": lambda m: m,
        "fixed": lambda m: balance_faster_rcnn(m, roi_sampler=FixedRatioRoISampler(512, 0.25),
                                               rpn_sampler=FixedRatioRoISampler(256, 0.5)),
        "ohem": lambda m: balance_faster_rcnn(m, roi_sampler=OHEMRoISampler(num_samples=128)),
        "sohem": lambda m: balance_faster_rcnn(m, roi_sampler=StratifiedOHEMRoISampler(num_samples=128)),
        "ohem_naive": lambda m: naive_ohem(m, OHEMRoISampler(num_samples=128)),
        "focal": focal,
    }


def retinanet_variants() -> dict[str, Callable[[nn.Module], nn.Module]]:
    def focal(m: nn.Module) -> nn.Module:
        from detbalance.detectors.retinanet import balance_retinanet
        from detbalance.losses import L1Loss, SigmoidFocalLoss

        return balance_retinanet(m, cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_image")

    def ghm(m: nn.Module) -> nn.Module:
        from detbalance.detectors.retinanet import balance_retinanet
        from detbalance.losses import GHMCLoss, GHMRLoss

        return balance_retinanet(m, cls_loss=GHMCLoss(), box_loss=GHMRLoss(), normalizer="per_batch")

    return {"vanilla": lambda m: m, "focal": focal, "ghm": ghm}


def ssd_variants() -> dict[str, Callable[[nn.Module], nn.Module]]:
    def mining(m: nn.Module) -> nn.Module:
        from detbalance.detectors.ssd import balance_ssd

        return balance_ssd(m, negative_ratio=3.0)

    return {"vanilla": lambda m: m, "mining": mining}


VARIANTS = {"faster_rcnn": faster_rcnn_variants, "retinanet": retinanet_variants, "ssd": ssd_variants}


# ------------------------------------------------------------------------------------------ inputs
def make_batch(
    batch_size: int, image_size: int, device: torch.device, *, seed: int = 0
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``batch_size`` images ``[3, S, S]`` in ``[0, 1]`` with 1-6 boxes of 6-40 % of the side each."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(batch_size):
        n = int(torch.randint(1, 7, (1,), generator=g))
        wh = (0.06 + 0.34 * torch.rand(n, 2, generator=g)) * image_size
        xy = torch.rand(n, 2, generator=g) * (image_size - wh)
        boxes = torch.cat([xy, xy + wh], dim=1).clamp(0, image_size)
        labels = torch.randint(1, NUM_CLASSES + 1, (n,), generator=g)
        images.append(torch.rand(3, image_size, image_size, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "image_id": i})
    return images, targets


# ------------------------------------------------------------------------------------------ measuring
def make_step(model: nn.Module, images: list[Tensor], targets: list[dict[str, Any]]) -> Callable[[], None]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def measure(step: Callable[[], None], device: torch.device, *, smoke: bool, min_run_time: float,
            num_threads: int) -> dict[str, Any]:
    """Median/IQR ms per step (:func:`common.time_us`; ``None`` in smoke mode) and peak MiB (CUDA only)."""
    step()  # warm-up (lazy init, cuDNN autotune, optimizer state); time_us adds one more untimed call
    t = time_us(step, device=device, num_threads=num_threads, min_run_time=min_run_time, smoke=smoke)
    peak = peak_memory_bytes(step, device=device) / 2**20 if device.type == "cuda" else None
    return {
        "median_ms": None if t["median_us"] is None else t["median_us"] / 1e3,
        "iqr_ms": None if t["iqr_us"] is None else t["iqr_us"] / 1e3,
        "runs": t["runs"],
        "peak_mem_mb": peak,
    }


def build(arch: str, adapt: Callable[[nn.Module], nn.Module], args: argparse.Namespace,
          device: torch.device) -> nn.Module:
    """The detector of ``arch`` with the same weights for every variant (seed 0), adapted, on ``device``."""
    torch.manual_seed(0)
    pool = {}
    if arch == "faster_rcnn" and args.proposals is not None:
        pool = {"rpn_pre_nms_top_n_train": args.pre_nms_proposals or args.proposals,
                "rpn_post_nms_top_n_train": args.proposals}
    model = build_detector(arch, num_classes=NUM_CLASSES, backbone=args.backbone, image_size=args.image_size, **pool)
    return adapt(model).to(device).train()


def check_naive_ohem_matches_ohem(images: list[Tensor], targets: list[dict[str, Any]],
                                  args: argparse.Namespace, device: torch.device) -> None:
    """The baseline must compute the library's OHEM loss (only its cost differs); raise if not."""
    variants = faster_rcnn_variants()
    losses = []
    for key in ("ohem", "ohem_naive"):
        model = build("faster_rcnn", variants[key], args, device)
        torch.manual_seed(1)  # the same RPN sample (torchvision's RPN draws from the global generator)
        losses.append(model(images, targets))
    ohem, naive = losses
    for key in ohem:
        torch.testing.assert_close(naive[key], ohem[key], rtol=1e-4, atol=1e-6, msg=f"naive OHEM {key}")


def interleaved_ohem_vs_fixed(images: list[Tensor], targets: list[dict[str, Any]], args: argparse.Namespace,
                              device: torch.device, *, num_samples: int = 64) -> dict[str, Any]:
    """OHEM vs fixed ratio at the same ``num_samples`` RoIs per image, one step of each per round.

    Interleaving (:func:`common.interleaved_times`) puts both under the same (shared, varying) machine load;
    the order rotates per round.
    """
    steps = {
        "fixed": make_step(build("faster_rcnn", lambda m: balance_faster_rcnn(
            m, roi_sampler=FixedRatioRoISampler(num_samples, 0.25), rpn_sampler=FixedRatioRoISampler(256, 0.5)),
            args, device), images, targets),
        "ohem": make_step(build("faster_rcnn", lambda m: balance_faster_rcnn(
            m, roi_sampler=OHEMRoISampler(num_samples=num_samples), rpn_sampler=FixedRatioRoISampler(256, 0.5)),
            args, device), images, targets),
    }
    load_before = os.getloadavg()
    reps = 1 if args.smoke else args.reps
    timed = interleaved_times(steps, reps=reps, device=device, warmup=2)
    times = {key: [us / 1e3 for us in timed[key]["samples_us"]] for key in steps}

    def stats(xs: list[float]) -> dict[str, float]:
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return {"median_ms": statistics.median(xs), "iqr_ms": q[2] - q[0]}

    fixed, ohem = stats(times["fixed"]), stats(times["ohem"])
    return {
        "rois_per_image": num_samples,
        "reps": reps,
        "fixed": fixed,
        "ohem": ohem,
        "ratio_of_medians": ohem["median_ms"] / fixed["median_ms"],
        "median_of_paired_ratios": statistics.median(o / f for o, f in zip(times["ohem"], times["fixed"])),
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "times_ms": times,
    }


# ------------------------------------------------------------------------------------------ losses suite
def losses_suite_throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Images/s of every losses-suite arm and of vanilla torchvision, data loading included, interleaved."""
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from detbalance.builders import build_datasets, build_model, build_optimizer, resolve_image_size
    from detbalance.compare import suite_configs
    from detbalance.data import collate_detection
    from detbalance.engine import train_step

    steps, rounds = (1, 1) if args.smoke else (args.steps, args.rounds)
    arms = suite_configs("losses", preset="tiny" if args.smoke else None, iters=1000, seed=0,
                         batch_size=args.suite_batch, device=str(device))
    cfg0 = replace(arms[0][1], model=replace(arms[0][1].model, image_size=args.image_size),
                   data=replace(arms[0][1].data, num_workers=args.workers))
    train_set, _ = build_datasets(cfg0, seed=0)
    size = resolve_image_size(cfg0, train_set)
    loader = DataLoader(train_set, batch_size=args.suite_batch, shuffle=True, drop_last=True,
                        collate_fn=collate_detection, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=args.workers > 0)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # an endless stream of passes
    torch.set_flush_denormal(device.type == "cpu")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # as fit() does

    def vanilla(cfg):
        torch.manual_seed(0)
        m = cfg.model
        return build_detector(m.arch, num_classes=train_set.num_classes, backbone=m.backbone, image_size=size,
                              norm=m.norm, head_convs=m.head_convs)

    def adapted(cfg):
        torch.manual_seed(0)
        return build_model(replace(cfg, model=cfg0.model), num_classes=train_set.num_classes, image_size=size)

    setups = {"vanilla": (vanilla(cfg0), cfg0)}
    for method, cfg in arms:
        setups[method.key] = (adapted(cfg), cfg)
    trainers = {}
    for key, (model, cfg) in setups.items():
        model = model.to(device).train()
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        trainers[key] = (model, build_optimizer(model, cfg.optim))
        train_step(model, trainers[key][1], [next(batches)], step=1, device=device)  # warm-up
    def chunk(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            for s in range(steps):
                train_step(model, optimizer, [next(batches)], step=s + 1, device=device)

        return run

    # every arm once per round, in rotating order; drop_last makes every batch args.suite_batch images
    load_before = os.getloadavg()
    timed = interleaved_times({k: chunk(*mo) for k, mo in trainers.items()}, reps=rounds, device=device, warmup=0)
    load_after = os.getloadavg()
    images = steps * args.suite_batch
    per_round = {k: [images / (us / 1e6) for us in t["samples_us"]] for k, t in timed.items()}
    med = {k: statistics.median(v) for k, v in per_round.items()}
    rows = [{"arm": k, "images_per_s_median": None if args.smoke else med[k],
             "images_per_s_rounds": None if args.smoke else per_round[k],
             "time_vs_vanilla": None if args.smoke else med["vanilla"] / med[k]} for k in per_round]
    arms_only = [r for r in rows if r["arm"] != "vanilla"]
    return {
        "batch": args.suite_batch, "image_size": size, "workers": args.workers, "steps_per_round": steps,
        "rounds": rounds, "load_average_before": list(load_before), "load_average_after": list(load_after),
        "rows": rows,
        "targets_met": None if args.smoke else {
            "every_arm_ge_150_img_s": all(r["images_per_s_median"] >= 150 for r in arms_only),
            "adapter_overhead_le_1.10": all(r["time_vs_vanilla"] <= 1.10 for r in arms_only),
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    images, targets = make_batch(args.batch, args.image_size, device)
    interleaved = None
    if "faster_rcnn" in args.detectors:
        check_naive_ohem_matches_ohem(images, targets, args, device)
        interleaved = interleaved_ohem_vs_fixed(images, targets, args, device)
        print(f"interleaved B=64: fixed {interleaved['fixed']} ohem {interleaved['ohem']} "
              f"ratio {interleaved['ratio_of_medians']:.3f}", flush=True)
    rows: list[dict[str, Any]] = []
    for arch in [] if args.interleaved_only else args.detectors:
        for remedy, adapt in VARIANTS[arch]().items():
            row: dict[str, Any] = {"detector": arch, "remedy": remedy}
            try:
                model = build(arch, adapt, args, device)
                row.update(measure(make_step(model, images, targets), device, smoke=args.smoke,
                                   min_run_time=args.min_run_time, num_threads=args.threads))
                row["status"] = "ok"
            except ImportError as err:  # an optional part (another detector's adapter) is not installed
                row.update({"status": "unavailable", "error": f"{type(err).__name__}: {err}"})
            rows.append(row)
            print(f"{arch:12s} {remedy:11s} {row['status']:11s} median_ms={row.get('median_ms')} "
                  f"peak_mem_mb={row.get('peak_mem_mb')}", flush=True)

    vanilla = {r["detector"]: r for r in rows if r["remedy"] == "vanilla" and r["status"] == "ok"}
    for r in rows:
        v = vanilla.get(r["detector"], {})
        r["time_vs_vanilla"] = ratio(r.get("median_ms"), v.get("median_ms"))
        r["mem_vs_vanilla"] = ratio(r.get("peak_mem_mb"), v.get("peak_mem_mb"))
    by = {(r["detector"], r["remedy"]): r for r in rows}
    losses_suite = None
    if args.losses_suite:
        losses_suite = losses_suite_throughput(args, device)

    def t(remedy: str) -> float | None:
        return by.get(("faster_rcnn", remedy), {}).get("median_ms")

    comparisons = {
        "ohem_vs_fixed": ratio(t("ohem"), t("fixed")),
        "ohem_vs_naive": ratio(t("ohem"), t("ohem_naive")),
        "sohem_vs_fixed": ratio(t("sohem"), t("fixed")),
        "ohem_vs_fixed_b64_interleaved": None if interleaved is None else interleaved["ratio_of_medians"],
    }
    adapter_overheads = [r["time_vs_vanilla"] for r in rows if r["remedy"] in ("fixed", "focal")
                         and r["detector"] in ("faster_rcnn", "retinanet") and r["time_vs_vanilla"] is not None]
    targets_met = None if args.smoke else {
        "adapter_overhead_le_1.10": all(x <= 1.10 for x in adapter_overheads) if adapter_overheads else None,
        "ohem_le_1.3x_fixed": None if comparisons["ohem_vs_fixed_b64_interleaved"] is None
        else comparisons["ohem_vs_fixed_b64_interleaved"] <= 1.3,
        "ohem_lt_naive": None if comparisons["ohem_vs_naive"] is None else comparisons["ohem_vs_naive"] < 1.0,
    }
    return {
        "suite": "train_step",
        "smoke": args.smoke,
        "metadata": run_metadata(device, num_threads=args.threads),
        "config": {"batch": args.batch, "image_size": args.image_size, "backbone": args.backbone,
                   "num_classes": NUM_CLASSES, "proposals": args.proposals,
                   "pre_nms_proposals": args.pre_nms_proposals or args.proposals, "min_run_time_s": args.min_run_time,
                   "threads": args.threads},
        "results": rows,
        "interleaved_faster_rcnn": interleaved,
        "comparisons": comparisons,
        "targets_met": targets_met,
        "losses_suite": losses_suite,
    }


def markdown(report: dict[str, Any]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    cfg = report["config"]
    lines = [
        f"# train_step ({report['metadata']['device_name']}, batch {cfg['batch']}, {cfg['image_size']} px, "
        f"backbone {cfg['backbone']}{', SMOKE: no timing claims' if report['smoke'] else ''})",
        "",
        "| detector | remedy | ms/step (median) | IQR ms | peak MiB | time / vanilla | memory / vanilla | status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['detector']} | {r['remedy']} | {f(r.get('median_ms'), '.1f')} | {f(r.get('iqr_ms'), '.1f')} "
            f"| {f(r.get('peak_mem_mb'), '.0f')} | {f(r.get('time_vs_vanilla'), '.2f')} "
            f"| {f(r.get('mem_vs_vanilla'), '.2f')} | {r['status']} |"
        )
    inter = report.get("interleaved_faster_rcnn")
    if inter is not None:
        lines += ["", f"Interleaved, B = {inter['rois_per_image']} RoIs/image, {inter['reps']} rounds: fixed "
                  f"{inter['fixed']['median_ms']:.1f} ms (IQR {inter['fixed']['iqr_ms']:.1f}), OHEM "
                  f"{inter['ohem']['median_ms']:.1f} ms (IQR {inter['ohem']['iqr_ms']:.1f}), ratio "
                  f"{inter['ratio_of_medians']:.2f}; load average {inter['load_avg_before'][0]:.2f} -> "
                  f"{inter['load_avg_after'][0]:.2f}"]
    lines += ["", "| comparison | ratio |", "|---|---:|"]
    lines += [f"| {k} | {f(v, '.2f')} |" for k, v in report["comparisons"].items()]
    if report["targets_met"] is not None:
        lines += ["", "Targets: " + ", ".join(f"{k}: {v}" for k, v in report["targets_met"].items())]
    suite = report.get("losses_suite")
    if suite is not None:
        load = f"load average {suite['load_average_before'][0]:.2f} -> {suite['load_average_after'][0]:.2f}"
        lines += ["", f"RetinaNet, losses suite, data loading included (batch {suite['batch']}, {suite['image_size']} px, "
                  f"{suite['workers']} loader workers, {suite['rounds']} interleaved rounds of "
                  f"{suite['steps_per_round']} steps, {load})", "",
                  "| arm | img/s (median) | time / vanilla |", "|---|---:|---:|"]
        lines += [f"| {r['arm']} | {f(r['images_per_s_median'], '.1f')} | {f(r['time_vs_vanilla'], '.2f')} |"
                  for r in suite["rows"]]
        if suite["targets_met"] is not None:
            lines += ["", "Targets: " + ", ".join(f"{k}: {v}" for k, v in suite["targets_met"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, each variant once, no timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--proposals", type=int, default=None,
                        help="RPN proposals per image after NMS in training (OHEM paper: ~2000); default: the builder's")
    parser.add_argument("--pre-nms-proposals", type=int, default=None,
                        help="RPN proposals per level before NMS in training (default: --proposals)")
    parser.add_argument("--interleaved-only", action="store_true",
                        help="only the interleaved OHEM / fixed timing (and the naive-OHEM check), no per-variant table")
    parser.add_argument("--detectors", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (timer and torch)")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per variant for the timer")
    parser.add_argument("--reps", type=int, default=15, help="rounds of the interleaved OHEM / fixed timing")
    parser.add_argument("--losses-suite", action="store_true",
                        help="also: every RetinaNet losses-suite arm vs vanilla, data loading included, interleaved")
    parser.add_argument("--suite-batch", type=int, default=16, help="batch of the losses-suite measurement")
    parser.add_argument("--steps", type=int, default=1, help="optimiser steps per arm per round (losses suite)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (losses suite)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (losses suite)")
    parser.add_argument("--out", type=Path, default=None, help="results root (default benchmarks/results)")
    parser.add_argument("--name", default="train_step", help="results file name: <name>--<device>.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.image_size = min(args.batch, 2), min(args.image_size, 64)
        args.proposals = min(args.proposals or 64, 64)
        args.pre_nms_proposals = None
    report = run(args)
    table = markdown(report)
    path = write_report(report, table, suite=args.name, device=args.device, out=args.out, smoke=args.smoke)
    print(table)
    print(f"wrote {path}")
    failed = [r for r in report["results"] if r["status"] != "ok" and r["detector"] == "faster_rcnn"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
