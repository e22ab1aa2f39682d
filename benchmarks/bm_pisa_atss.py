"""PISA and ATSS (issue 21): their cost against what they replace, and against mmdetection's code (transcribed).

What is measured, every comparison **interleaved** (:func:`common.interleaved_times`: each method once per
repetition, in rotating order, in this process; median and IQR over ``--reps`` >= 15 repetitions; the load
average before and after each comparison recorded):

* ``atss``: assigning the anchors of a batch (``--images`` images, torchvision RetinaNet anchors: 9 per
  location on 5 levels, strides 8..128, ``--size`` px, 1-8 objects per image): today's IoU assignment
  (``box_iou`` + torchvision's ``Matcher(0.5, 0.4, allow_low_quality_matches=True)`` per image, what RetinaNet
  runs), ours (:func:`detbalance.sampling.assign_atss` per image) and the literal transcription of
  mmdetection's ``ATSSAssigner.assign`` (``tests/reference/mmdet_atss.py``). Target: ours <= 2x the IoU
  assignment.
* ``pisa_step``: one training step (forward + backward + SGD) of the samplers suite's Faster R-CNN
  (``build_detector("faster_rcnn")``, 128 px, ``--batch`` images) with 64 RoIs per image: fixed 1:3, OHEM,
  and PISA (Score-HLR sampler + ISR-P + CARL). Target: PISA <= 1.3x OHEM's step.
* ``pisa_parts``: the parts against mmdetection's code: the Score-HLR selection of one image's negatives
  (ours: :func:`detbalance.sampling.sample_score_hlr`; mmdetection: ``_sample_neg`` + mmcv's
  ``nms_match``, transcribed, a Python loop over boxes) and ISR-P over two images' sampled RoIs (ours:
  :func:`detbalance.losses.isr_p_weights` + the IoU; mmdetection: ``isr_p``, loops over classes and objects).

Output: ``benchmarks/results/<version>/pisa_atss--<device>.json`` and ``.md``. ``--smoke`` runs each case once
at tiny sizes, makes no timing claims and writes to a temporary directory unless ``--out`` is given.

Usage::

    nice -n 10 python benchmarks/bm_pisa_atss.py --threads 1      # real numbers
    python benchmarks/bm_pisa_atss.py --smoke                       # CI
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_repo_on_path, interleaved_times, ratio, run_metadata, write_report  # noqa: E402

ensure_repo_on_path()

from tests.reference import mmdet_atss, mmdet_pisa  # noqa: E402

from detbalance.detectors import balance_faster_rcnn, build_detector  # noqa: E402
from detbalance.losses import PrimeSampleAttention, aligned_box_iou, isr_p_weights  # noqa: E402
from detbalance.sampling import (  # noqa: E402
    FixedRatioSampler,
    OHEMSampler,
    ScoreHLRSampler,
    assign_atss,
    sample_score_hlr,
)

NUM_CLASSES = 3


def _boxes(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    wh = (0.06 + 0.34 * torch.rand(n, 2, generator=g)) * size
    xy = torch.rand(n, 2, generator=g) * (size - wh)
    return torch.cat([xy, xy + wh], 1)


def _timed(fns: dict[str, Callable[[], object]], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    before = list(os.getloadavg())
    out = interleaved_times(fns, reps=1 if args.smoke else args.reps, device=device, warmup=1, smoke=args.smoke)
    for v in out.values():
        v.pop("samples_us", None)
    return {"times": out, "load_avg_before": before, "load_avg_after": list(os.getloadavg())}


# ------------------------------------------------------------------------------------------------- ATSS
def bench_atss(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size = 128 if args.smoke else args.size
    images = 2 if args.smoke else args.images
    gen = AnchorGenerator(tuple((32 * 2**i, 32 * 2**i * 2 ** (1 / 3), 32 * 2**i * 2 ** (2 / 3)) for i in range(5)),
                          ((0.5, 1.0, 2.0),) * 5)
    feats = [torch.zeros(images, 1, size // s, size // s) for s in (8, 16, 32, 64, 128)]
    anchors = [a.to(device) for a in gen(ImageList(torch.zeros(images, 3, size, size), [(size, size)] * images), feats)]
    levels = [int(f.shape[-1] * f.shape[-2] * 9) for f in feats]
    g = torch.Generator().manual_seed(0)
    gts = [_boxes(g, int(torch.randint(1, 9, (1,), generator=g)), size).to(device) for _ in range(images)]
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)

    def iou() -> None:
        for a, t in zip(anchors, gts):
            matcher(box_iou(t, a))

    def ours() -> None:
        for a, t in zip(anchors, gts):
            assign_atss(a, t, levels, topk=9)

    def mmdet() -> None:
        for a, t in zip(anchors, gts):
            mmdet_atss.atss_assign(a, levels, t, topk=9)

    r = _timed({"iou_matcher": iou, "atss_ours": ours, "atss_mmdet_transcription": mmdet}, args, device)
    t = r["times"]
    r.update(shape=f"{images} images x {sum(levels)} anchors, 1-8 objects",
             atss_vs_iou=ratio(t["atss_ours"]["median_us"], t["iou_matcher"]["median_us"]),
             atss_vs_mmdet=ratio(t["atss_ours"]["median_us"], t["atss_mmdet_transcription"]["median_us"]))
    return r


# ------------------------------------------------------------------------------------------- PISA step
def _batch(n: int, size: int, device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(n):
        k = int(torch.randint(1, 7, (1,), generator=g))
        targets.append({"boxes": _boxes(g, k, size).to(device),
                        "labels": torch.randint(1, NUM_CLASSES + 1, (k,), generator=g).to(device), "image_id": i})
        images.append(torch.rand(3, size, size, generator=g).to(device))
    return images, targets


def bench_pisa_step(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    images, targets = _batch(2 if args.smoke else args.batch, 128, device)
    samplers = {
        "fixed": (FixedRatioSampler(num_samples=64, positive_fraction=0.25), None),
        "ohem": (OHEMSampler(num_samples=64), None),
        "pisa": (ScoreHLRSampler(num_samples=64), PrimeSampleAttention()),
    }
    steps = {}
    for key, (sampler, pisa) in samplers.items():
        torch.manual_seed(0)
        pool = {} if args.proposals is None else {"rpn_pre_nms_top_n_train": 2000,
                                                  "rpn_post_nms_top_n_train": args.proposals}
        model = balance_faster_rcnn(build_detector("faster_rcnn", num_classes=NUM_CLASSES, **pool), roi_sampler=sampler,
                                    pisa=pisa).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            sum(model(images, targets).values()).backward()
            opt.step()

        steps[key] = step
    r = _timed(steps, args, device)
    t = r["times"]
    pool = "the detector's default pool" if args.proposals is None else f"{args.proposals} proposals per image"
    r.update(shape=f"{len(images)} images x 128 px, 64 RoIs per image from {pool}",
             pisa_vs_ohem=ratio(t["pisa"]["median_us"], t["ohem"]["median_us"]),
             ohem_vs_fixed=ratio(t["ohem"]["median_us"], t["fixed"]["median_us"]))
    return r


# ------------------------------------------------------------------------------------------ PISA parts
def bench_pisa_parts(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    k = NUM_CLASSES
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    g = torch.Generator().manual_seed(0)
    n = 60 if args.smoke else args.rois
    rois = _boxes(g, n, 256).to(device)
    mm_logits = torch.randn(n, k + 1, generator=g).to(device)
    deltas = (torch.randn(n, 4 * k, generator=g) * 0.3).to(device)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    labels[: n // 8] = 1 + torch.randint(0, k, (n // 8,), generator=g).to(device)
    probs = mm_logits.softmax(-1)[:, :-1]
    scores, arg = probs.max(-1)
    pred_boxes = coder.decode_single(deltas.view(n, k, 4)[torch.arange(n), arg], rois)
    neg_loss = F.cross_entropy(mm_logits, torch.full((n,), k, device=device), reduction="none")
    neg = torch.nonzero(labels == 0).flatten()
    budget = max(1, n // 4)
    decode = lambda r, d: coder.decode_single(d, r)  # noqa: E731
    zeros = torch.zeros_like(labels)

    def hlr_ours() -> None:
        sample_score_hlr(labels, zeros, pred_boxes, scores, neg_loss, num_images=1, num_samples=budget + n // 8)

    def hlr_mmdet() -> None:
        mmdet_pisa.score_hlr_sample_neg(neg, budget, mm_logits[neg], deltas[neg], neg_loss[neg], rois[neg], decode)

    # ISR-P over two images of 512 sampled RoIs, a quarter positive
    m = 64 if args.smoke else 1024
    pos_rois = _boxes(g, m, 256).to(device)
    lab = torch.full((m,), k, dtype=torch.int64)
    lab[: m // 4] = torch.randint(0, k, (m // 4,), generator=g)
    lab[m // 2: m // 2 + m // 4] = torch.randint(0, k, (m // 4,), generator=g)
    lab = lab.to(device)
    gt_local = torch.randint(0, 6, (m,), generator=g).to(device)
    img = (torch.arange(m, device=device) >= m // 2).to(torch.int64)
    targets = (torch.randn(m, 4, generator=g) * 0.5).to(device)
    cls_score = torch.randn(m, k + 1, generator=g).to(device)
    bbox_pred = (torch.randn(m, 4 * k, generator=g) * 0.5).to(device)
    pos = lab < k
    pos_gt = [gt_local[(img == i) & pos] for i in range(2)]
    flat_gt = gt_local + 6 * img
    ce = lambda x, y, reduction_override="none": F.cross_entropy(x, y, reduction=reduction_override)  # noqa: E731

    def isr_ours() -> None:
        d = bbox_pred.view(m, -1, 4)[pos, lab[pos]]
        ious = aligned_box_iou(decode(pos_rois[pos], d), decode(pos_rois[pos], targets[pos]))
        isr_p_weights(ious, lab[pos], flat_gt[pos], ce(cls_score[pos], lab[pos]))

    def isr_mmdet() -> None:
        mmdet_pisa.isr_p(cls_score, bbox_pred, (lab, torch.ones(m, device=device), targets, torch.zeros(m, 4, device=device)),
                         pos_rois, pos_gt, ce, decode, num_class=k)

    r = _timed({"score_hlr_ours": hlr_ours, "score_hlr_mmdet_transcription": hlr_mmdet,
                "isr_p_ours": isr_ours, "isr_p_mmdet_transcription": isr_mmdet}, args, device)
    t = r["times"]
    r.update(shape=f"Score-HLR: 1 image x {n} RoIs -> {budget + n // 8}; ISR-P: 2 images x {m // 2} RoIs, 1/4 positive",
             score_hlr_vs_mmdet=ratio(t["score_hlr_ours"]["median_us"], t["score_hlr_mmdet_transcription"]["median_us"]),
             isr_p_vs_mmdet=ratio(t["isr_p_ours"]["median_us"], t["isr_p_mmdet_transcription"]["median_us"]))
    return r


# ----------------------------------------------------------------------------------------------- driver
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    benches = {"atss": bench_atss, "pisa_step": bench_pisa_step, "pisa_parts": bench_pisa_parts}
    # each comparison is interleaved within itself
    cases = {name: benches[name](args, device) for name in args.cases}
    targets = {}
    if not args.smoke and "atss" in cases:
        targets["atss_at_most_2x_iou_assignment"] = bool(cases["atss"]["atss_vs_iou"] <= 2.0)
    if not args.smoke and "pisa_step" in cases:
        targets["pisa_step_at_most_1.3x_ohem_step"] = bool(cases["pisa_step"]["pisa_vs_ohem"] <= 1.3)
    return {"suite": "pisa_atss", "smoke": args.smoke, "reps": args.reps,
            "metadata": run_metadata(device, num_threads=args.threads), "cases": cases, "targets": targets}


def markdown(report: dict[str, Any]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    md = report["metadata"]
    lines = [f"# PISA and ATSS ({md.get('device')} {md.get('device_name')}, {md.get('num_threads')} threads, "
             f"torch {md.get('torch')}, {report['reps']} interleaved repetitions)", "",
             "| case | method | shape | median (ms) | IQR (ms) | load before -> after |", "|---|---|---|---:|---:|---|"]
    for name, case in report["cases"].items():
        load = f"{case['load_avg_before'][0]:.2f} -> {case['load_avg_after'][0]:.2f}"
        for method, t in case["times"].items():
            med = None if t["median_us"] is None else t["median_us"] / 1e3
            iqr = None if t["iqr_us"] is None else t["iqr_us"] / 1e3
            lines.append(f"| {name} | {method} | {case['shape']} | {f(med, '.2f')} | {f(iqr, '.2f')} | {load} |")
    lines.append("")
    c = report["cases"]
    if "atss" in c:
        lines.append(f"- ATSS / IoU assignment: {f(c['atss']['atss_vs_iou'], '.2f')}x; ATSS / mmdetection "
                     f"transcription: {f(c['atss']['atss_vs_mmdet'], '.2f')}x")
    if "pisa_step" in c:
        lines.append(f"- PISA step / OHEM step: {f(c['pisa_step']['pisa_vs_ohem'], '.2f')}x; OHEM / fixed: "
                     f"{f(c['pisa_step']['ohem_vs_fixed'], '.2f')}x")
    if "pisa_parts" in c:
        lines.append(f"- Score-HLR / mmdetection transcription: {f(c['pisa_parts']['score_hlr_vs_mmdet'], '.3f')}x; "
                     f"ISR-P / mmdetection transcription: {f(c['pisa_parts']['isr_p_vs_mmdet'], '.3f')}x")
    lines.append("")
    for name, ok in report["targets"].items():
        lines.append(f"- target {name}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, each case once, no timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (>= 15 for a claim)")
    parser.add_argument("--images", type=int, default=4, help="images per batch for the assignment")
    parser.add_argument("--size", type=int, default=512, help="image side for the assignment (px)")
    parser.add_argument("--batch", type=int, default=4, help="images per training step")
    parser.add_argument("--rois", type=int, default=512, help="RoIs of the Score-HLR comparison")
    parser.add_argument("--proposals", type=int, default=None,
                        help="pisa_step: RPN proposals per image in training (2000 per level before NMS); "
                             "default: the detector's own (the samplers suite uses 1000)")
    parser.add_argument("--cases", default="atss,pisa_step,pisa_parts",
                        help="comma-separated subset of atss, pisa_step, pisa_parts")
    parser.add_argument("--out", type=Path, default=None, help="results root (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(args.cases) - {"atss", "pisa_step", "pisa_parts"})
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)} (choose from atss, pisa_step, pisa_parts)")
    report = run(args)
    table = markdown(report)
    path = write_report(report, table, suite="pisa_atss", device=args.device, out=args.out, smoke=args.smoke)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
