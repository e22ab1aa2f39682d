"""The cost of each remedy on torchvision's ResNet-50-FPN detectors, against torchvision's own training step.

What is measured (issue 20, point 7): one training step (forward, backward, SGD step) on a batch of ``--batch``
images of ``--min-size`` x ``4/3 --min-size`` pixels (``min_size = --min-size``, ``max_size`` large enough that
the transform does not rescale), for

* ``retinanet_resnet50_fpn_v2``: ``stock`` (torchvision's model, untouched); ``adapter`` (``balance_retinanet``
  configured as torchvision: sigmoid focal 0.25 / 2, GIoU box loss, per-image normaliser, torchvision's
  never-positive column 0 kept; the same losses, tested in ``tests/detectors/test_retinanet.py``); ``ghm_c``
  (the adapter with ``GHMCLoss()``, mmdetection's defaults, in place of focal);
* ``fasterrcnn_resnet50_fpn_v2``: ``stock``; ``fixed`` (``balance_faster_rcnn`` with torchvision's RoI sampler,
  512 per image at 0.25 positives); ``ohem`` (OHEM choosing the 512 hardest RoIs per image, by cls + loc loss
  after NMS 0.7, out of the 2000 proposals torchvision's RPN keeps in training).

Every variant of a detector starts from the same weights (``weights=None``, seeded; the models are built by
torchvision's builders, the zoo's names) and trains with ``SGD(lr=0, momentum=0.9)``, so the weights, and with
them the work per step, stay the same from one repetition to the next. The variants of both detectors are
**interleaved** (``common.interleaved_times``: every variant once per repetition in rotating order, in one
process, ``--reps`` >= 15 repetitions after one warm-up round); the medians, IQRs, the ratios of the medians
and the load average before and after are reported. Targets: ``adapter / stock <= 1.05``,
``ghm_c / adapter <= 1.10`` (GHM-C against focal), ``fixed / stock <= 1.05`` and ``ohem / fixed <= 1.3``.

GPU rows (800 px, batch 8, AMP, against torchvision's ``references/detection/train.py``, with images/s and peak
memory) need a CUDA device: ``--device cuda`` runs the same comparison there; they are not measured unless a
GPU was lent.

Output: ``benchmarks/results/<version>/zoo_step--<device>.json`` and ``.md``. ``--smoke`` runs every variant once
at 64 px without timing and writes to a temporary folder unless ``--out`` is given.

Usage::

    python benchmarks/bm_zoo_step.py --threads 2            # CPU, min_size 320, batch 2, 15 repetitions
    python benchmarks/bm_zoo_step.py --smoke                # CI
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, ratio, run_metadata, write_report  # noqa: E402
from detbalance.detectors.faster_rcnn import balance_faster_rcnn  # noqa: E402
from detbalance.detectors.retinanet import balance_retinanet  # noqa: E402
from detbalance.losses import GHMCLoss, GIoULoss, SigmoidFocalLoss  # noqa: E402
from detbalance.sampling import FixedRatioSampler, OHEMSampler  # noqa: E402

NUM_CLASSES = 5  # K object classes; torchvision's models get K + 1 outputs

TARGETS = (
    ("retinanet_resnet50_fpn_v2", "adapter", "stock", 1.05, "adapter configured as torchvision <= 1.05x stock"),
    ("retinanet_resnet50_fpn_v2", "ghm_c", "adapter", 1.10, "GHM-C <= 1.10x focal"),
    ("fasterrcnn_resnet50_fpn_v2", "fixed", "stock", 1.05, "adapter configured as torchvision <= 1.05x stock"),
    ("fasterrcnn_resnet50_fpn_v2", "ohem", "fixed", 1.30, "OHEM 512 of 2000 RoIs <= 1.3x fixed ratio"),
)


def make_batch(*, batch: int, min_size: int, device: torch.device, seed: int = 0) -> tuple[list, list]:
    """``batch`` images ``Tensor[3, min_size, 4/3 min_size]`` in [0, 1] with 3 boxes each (labels 1..K)."""
    g = torch.Generator().manual_seed(seed)
    h, w = min_size, (min_size * 4) // 3
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (0.15 + 0.25 * torch.rand(3, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, NUM_CLASSES + 1, (3,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def build_variants(min_size: int, device: torch.device, *, rois: int = 512, proposals: int = 2000
                   ) -> dict[str, dict[str, nn.Module]]:
    """``{model name: {variant: model}}``; the variants of a model share its initial weights. ``rois`` RoIs per
    image are trained out of ``proposals`` (torchvision: 512 of 2000; smaller in ``--smoke``)."""
    max_size = (min_size * 4) // 3 + 1  # the transform keeps the images' size
    kw: dict[str, Any] = dict(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1,
                              min_size=min_size, max_size=max_size)
    torch.manual_seed(0)
    retina = torchvision.models.detection.retinanet_resnet50_fpn_v2(**kw)
    torch.manual_seed(0)
    frcnn = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(
        **kw, rpn_post_nms_top_n_train=proposals, box_batch_size_per_image=rois
    )

    def stock_retina_adapter(cls_loss: nn.Module) -> nn.Module:
        return balance_retinanet(copy.deepcopy(retina), cls_loss=cls_loss, box_loss=GIoULoss(),
                                 normalizer="per_image", prior_prob=None, background_column=True)

    variants = {
        "retinanet_resnet50_fpn_v2": {
            "stock": copy.deepcopy(retina),
            "adapter": stock_retina_adapter(SigmoidFocalLoss(alpha=0.25, gamma=2.0)),
            "ghm_c": stock_retina_adapter(GHMCLoss()),
        },
        "fasterrcnn_resnet50_fpn_v2": {
            "stock": copy.deepcopy(frcnn),
            "fixed": balance_faster_rcnn(copy.deepcopy(frcnn), roi_sampler=FixedRatioSampler(num_samples=rois,
                                                                                           positive_fraction=0.25)),
            "ohem": balance_faster_rcnn(copy.deepcopy(frcnn), roi_sampler=OHEMSampler(num_samples=rois)),
        },
    }
    return {name: {k: m.to(device).train() for k, m in vs.items()} for name, vs in variants.items()}


def step_fn(model: nn.Module, images: list, targets: list) -> Callable[[], dict[str, float]]:
    """One training step of ``model`` on the batch (lr 0: the weights, and the work, stay the same)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)

    def step() -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()
        return {k: float(v) for k, v in losses.items()}

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-size", type=int, default=320)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not args.smoke and args.reps < 15:
        p.error("--reps must be >= 15 (benchmarks/README.md)")
    device = torch.device(args.device)
    threads = 1 if args.smoke else args.threads  # smoke: no timing, and no spinning thread pool on a busy CI
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    min_size = 64 if args.smoke else args.min_size
    images, targets = make_batch(batch=args.batch, min_size=min_size, device=device)
    variants = build_variants(min_size, device, rois=16 if args.smoke else 512, proposals=64 if args.smoke else 2000)
    # the adapters configured as torchvision give torchvision's losses (checked on the first step)
    first: dict[str, dict[str, float]] = {}
    fns = {}
    for name, vs in variants.items():
        for key, model in vs.items():
            fns[f"{name}/{key}"] = step_fn(model, images, targets)
    for label in ("retinanet_resnet50_fpn_v2/stock", "retinanet_resnet50_fpn_v2/adapter"):
        torch.manual_seed(0)
        first[label] = fns[label]()
    a, b = first["retinanet_resnet50_fpn_v2/stock"], first["retinanet_resnet50_fpn_v2/adapter"]
    same_losses = a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])) for k in a)
    load_before = os.getloadavg()[0]
    times = interleaved_times(fns, reps=args.reps, device=device, smoke=args.smoke)
    load_after = os.getloadavg()[0]

    rows = []
    for label, t in times.items():
        name, key = label.split("/")
        rows.append({"model": name, "variant": key, "median_us": t["median_us"], "iqr_us": t["iqr_us"],
                     "runs": t["runs"], "samples_us": t["samples_us"],
                     "time_x_stock": ratio(t["median_us"], times[f"{name}/stock"]["median_us"])})
    checks = []
    for name, num, den, limit, what in TARGETS:
        r = ratio(times[f"{name}/{num}"]["median_us"], times[f"{name}/{den}"]["median_us"])
        checks.append({"model": name, "variant": num, "against": den, "ratio": r, "limit": limit, "what": what,
                       "met": None if r is None else r <= limit})
    params = {name: sum(p.numel() for p in vs["stock"].parameters()) for name, vs in variants.items()}
    report = {
        "suite": "zoo_step",
        "smoke": args.smoke,
        "metadata": run_metadata(device, num_threads=threads),
        "settings": {"rois_per_image": 16 if args.smoke else 512, "proposals": 64 if args.smoke else 2000,
                     "min_size": min_size, "image": [min_size, (min_size * 4) // 3], "batch": args.batch,
                     "reps": args.reps, "optimizer": "SGD(lr=0, momentum=0.9)", "num_classes": NUM_CLASSES,
                     "parameters": params},
        "load_average": [load_before, load_after],
        "adapter_equals_stock_losses_at_step_1": {"retinanet_resnet50_fpn_v2": same_losses, "stock": a, "adapter": b},
        "results": rows,
        "targets": checks,
    }

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v / 1e3:,.0f}"

    lines = [
        f"Training step, {args.batch} images of {min_size}x{(min_size * 4) // 3} px, {threads} threads, "
        f"{args.reps} interleaved repetitions, load {load_before:.2f} -> {load_after:.2f}",
        "",
        "| model | variant | median ms | IQR ms | x stock |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        x = "–" if r["time_x_stock"] is None else f"{r['time_x_stock']:.3f}"
        lines.append(f"| {r['model']} | {r['variant']} | {ms(r['median_us'])} | {ms(r['iqr_us'])} | {x} |")
    lines.append("")
    for c in checks:
        verdict = "not timed (smoke)" if c["ratio"] is None else ("MET" if c["met"] else "MISSED")
        value = "–" if c["ratio"] is None else f"{c['ratio']:.3f}"
        lines.append(f"- {c['model']}: {c['what']}: {c['variant']} / {c['against']} = {value} -> **{verdict}**")
    lines.append(f"- adapter's losses at step 1 equal stock's: {same_losses}")
    lines.append("- GPU rows (800 px, batch 8, AMP, against torchvision's references train.py): not measured here"
                 if device.type != "cuda" else "")
    table = "\n".join(lines) + "\n"
    print(table)
    path = write_report(report, table, suite="zoo_step", device=device, out=args.out, smoke=args.smoke)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
