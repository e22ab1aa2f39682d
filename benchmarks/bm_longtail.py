"""Long-tail RoI classification losses: forward+backward time at N RoIs x 80 classes, beside their references.

Seesaw (``K + 2`` logits) beside mmdetection's ``SeesawLoss`` (transcribed in ``tests/reference/mmdet_seesaw.py``)
and softmax cross entropy over ``K + 1`` columns; EQLv2 beside mmdetection's ``EQLV2Loss`` and BCE-with-logits
over the same ``K + 1`` columns (the floor, ``bce_prebuilt_targets``, gets its one-hot targets built outside the
timed region, so it is the stricter floor; ``bce`` builds them from the labels, as a RoI classifier would);
the federated loss (50 classes, detectron2's default) beside detectron2's
``sigmoid_cross_entropy_loss`` and the same BCE. The RoIs are a Faster R-CNN batch: 25 % foreground (the RoI
sampler's fraction) with a long tail over the classes (class ``c`` drawn with weight ``1 / c``), the rest
background. The modules run in training mode, so their statistics are updated in every call (as in training).
Every method runs once per repetition, in rotating order, in one process (``common.interleaved_times``); the
table gives the median and IQR over ``--reps`` (>= 15); the machine load before and after is recorded.
Method: benchmarks/README.md.

    python benchmarks/bm_longtail.py               # writes benchmarks/results/<version>/longtail_losses--cpu.json
    python benchmarks/bm_longtail.py --smoke       # tiny sizes, one repetition, no timing claims, no file
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, ensure_repo_on_path, interleaved_times, run_metadata, save_json  # noqa: E402

ensure_repo_on_path()

from tests.reference.detectron2_fed_loss import sigmoid_cross_entropy_loss  # noqa: E402
from tests.reference.mmdet_eqlv2 import RefEQLV2Loss  # noqa: E402
from tests.reference.mmdet_seesaw import RefSeesawLoss  # noqa: E402

import detbalance  # noqa: E402
from detbalance.losses import EQLv2Loss, FederatedLoss, SeesawLoss  # noqa: E402

NUM_CLASSES = 80
FG_FRACTION = 0.25
SIZES = (100_000,)
SMOKE_SIZES = (512,)
SEESAW_TIME_X_CE = 1.5
EQLV2_TIME_X_BCE = 1.5


def roi_batch(n: int, k: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [n, k + 2], labels [n])``: 25 % foreground with class weights ``1 / c``, the rest background."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.multinomial(1.0 / torch.arange(1, k + 1, dtype=torch.float64), n, replacement=True, generator=g) + 1
    labels = torch.where(torch.rand(n, generator=g) < FG_FRACTION, cls, torch.zeros_like(cls))
    return torch.randn(n, k + 2, generator=g) * 2, labels


def methods(z: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, Callable[[], None]]:
    """name -> one forward + backward (sum of the per-RoI losses, as the RoI head sums them)."""
    device = z.device
    ref_labels = torch.where(labels > 0, labels - 1, torch.full_like(labels, k))
    x81 = z[:, : k + 1].detach().clone().requires_grad_(True)  # [bg, classes] (ours) / any K + 1 columns
    x82 = z.detach().clone().requires_grad_(True)
    onehot = F.one_hot(labels, k + 1).to(x81.dtype)
    ours_seesaw = SeesawLoss(num_classes=k, sync=False).to(device).train()
    ref_seesaw = RefSeesawLoss(num_classes=k, reduction="sum").to(device)
    ours_eql = EQLv2Loss(num_classes=k, sync=False).to(device).train()
    ref_eql = RefEQLV2Loss(num_classes=k).to(device)
    counts = torch.bincount(labels, minlength=k + 1)[1:].float() + 1
    ours_fed = FederatedLoss(class_weights=counts.sqrt(), num_classes_kept=50, seed=0).to(device)

    def step(x: torch.Tensor, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            fn().backward()

        return run

    def ref_seesaw_total() -> torch.Tensor:
        out = ref_seesaw(x82, ref_labels)
        return out["loss_cls_objectness"] + out["loss_cls_classes"]

    return {
        "ce": step(x81, lambda: F.cross_entropy(x81, labels, reduction="sum")),
        "bce": step(x81, lambda: F.binary_cross_entropy_with_logits(
            x81, F.one_hot(labels, k + 1).to(x81.dtype), reduction="sum")),
        "bce_prebuilt_targets": step(x81, lambda: F.binary_cross_entropy_with_logits(x81, onehot, reduction="sum")),
        "seesaw_ours": step(x82, lambda: ours_seesaw(x82, labels).sum()),
        "seesaw_mmdet": step(x82, ref_seesaw_total),
        "eqlv2_ours": step(x81, lambda: ours_eql(x81, labels).sum()),
        "eqlv2_mmdet": step(x81, lambda: ref_eql(x81, ref_labels) * x81.shape[0]),
        "federated_ours": step(x81, lambda: ours_fed(x81, labels).sum()),
        "federated_detectron2": step(x81, lambda: sigmoid_cross_entropy_loss(
            x81, ref_labels, fed_loss_num_classes=50, fed_loss_cls_weights=counts.sqrt()) * x81.shape[0]),
    }


FLOORS = {"seesaw_ours": "ce", "seesaw_mmdet": "ce", "eqlv2_ours": "bce_prebuilt_targets",
          "eqlv2_mmdet": "bce_prebuilt_targets", "federated_ours": "bce_prebuilt_targets",
          "federated_detectron2": "bce_prebuilt_targets", "ce": "ce", "bce": "bce_prebuilt_targets",
          "bce_prebuilt_targets": "bce_prebuilt_targets"}
REFERENCES = {"seesaw_ours": "seesaw_mmdet", "eqlv2_ours": "eqlv2_mmdet", "federated_ours": "federated_detectron2"}


def run(sizes, device: str, threads: int, reps: int, smoke: bool) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for n in sizes:
        z, labels = roi_batch(n, NUM_CLASSES)
        fns = methods(z.to(device), labels.to(device), NUM_CLASSES)
        timings = interleaved_times(fns, reps=reps, device=device, smoke=smoke)
        for name, t in timings.items():
            rows.append({"n": n, "num_classes": NUM_CLASSES, "fg_fraction": FG_FRACTION, "method": name, **t})
    for row in rows:
        same = [r for r in rows if r["n"] == row["n"]]
        floor = next(r for r in same if r["method"] == FLOORS[row["method"]])
        ref = next((r for r in same if r["method"] == REFERENCES.get(row["method"])), None)
        row["floor"] = FLOORS[row["method"]]
        row["time_x_floor"] = None if floor["median_us"] is None else row["median_us"] / floor["median_us"]
        row["reference"] = REFERENCES.get(row["method"])
        row["time_x_reference"] = (
            None if ref is None or ref["median_us"] is None else row["median_us"] / ref["median_us"]
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | N | ms median (IQR) | x floor | x reference |", "|---|---|---|---|---|"]
    for r in rows:
        if r["median_us"] is None:
            lines.append(f"| {r['method']} | {r['n']:,} | n/a | n/a | n/a |")
            continue
        ref = "–" if r["time_x_reference"] is None else f"{r['time_x_reference']:.2f}x {r['reference']}"
        lines.append(f"| {r['method']} | {r['n']:,} | {r['median_us'] / 1000:.1f} ({r['iqr_us'] / 1000:.1f}) | "
                     f"{r['time_x_floor']:.2f}x {r['floor']} | {ref} |")
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["median_us"] is None:
            continue
        bound = {"seesaw_ours": SEESAW_TIME_X_CE, "eqlv2_ours": EQLV2_TIME_X_BCE}.get(r["method"])
        if bound is not None:
            verdict = "MET" if r["time_x_floor"] <= bound else "MISSED"
            out.append(f"N={r['n']:,}: {r['method']} <= {bound}x {r['floor']}: measured {r['time_x_floor']:.3f} -> "
                       f"{verdict}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition, no timing, no file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (>= 15 for a claim)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/<version>/...)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sizes = args.sizes or (SMOKE_SIZES if args.smoke else SIZES)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = run(sizes, args.device, args.threads, args.reps, args.smoke)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(markdown(rows))
    for line in target_checks(rows):
        print(line)
    print(f"load average before {load_before}, after {load_after}")
    if args.out is not None or not args.smoke:
        dev = torch.device(args.device).type
        path = args.out or REPO_ROOT / "benchmarks" / "results" / detbalance.__version__ / f"longtail_losses--{dev}.json"
        meta = run_metadata(args.device, num_threads=args.threads)
        meta.update(load_average_before=load_before, load_average_after=load_after, reps=args.reps,
                    order="rotating, interleaved", fg_fraction=FG_FRACTION)
        save_json(path, {"suite": "longtail_losses", "metadata": meta, "smoke": args.smoke, "results": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
