"""DDP on CPU (gloo): RetinaNet losses on 2 ranks of one image each equal one process on both images.

Rank 1's image has no object, so that rank has no positive: the positive count must be all-reduced before it is
clamped (focal, ``PositiveNormalizer('per_batch')``), and GHM's non-empty regions must be counted on the
all-reduced histogram (GHM-C/GHM-R, once per FPN level). GroupNorm backbone (no batch statistics), plain SGD,
10 steps, float64: GHM's weights are discontinuous in the gradient norm, so float32 summation noise can move
an element across a region edge and grow over the steps; in float64 it does not. Tolerance rtol 1e-4. The
spawning follows ``tests/engine/test_distributed.py`` and reuses its free-port helper.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detbalance.detectors import balance_retinanet, build_detector
from detbalance.losses import GHMCLoss, GHMRLoss, L1Loss, PositiveNormalizer, SigmoidFocalLoss
from tests.detectors.inputs import SIZE, make_batch
from tests.engine.test_distributed import _free_port

STEPS = 10


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = build_detector("retinanet", num_classes=3, image_size=SIZE, norm="gn").double()
    if method == "focal":
        return balance_retinanet(base, cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer=PositiveNormalizer())
    return balance_retinanet(base, cls_loss=GHMCLoss(), box_loss=GHMRLoss())


def _train(model: torch.nn.Module, images, targets) -> dict[str, torch.Tensor]:
    images = [i.double() for i in images]
    targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(STEPS):
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _worker(rank: int, world_size: int, port: int, method: str, output: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        images, targets = make_batch()
        mine = [0, 1][rank]  # image 0 has objects, image 1 has none
        model = torch.nn.parallel.DistributedDataParallel(_model(method))
        state = _train(model, [images[mine]], [targets[mine]])
        if rank == 0:
            torch.save(state, output)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["focal", "ghm"])
def test_two_ranks_one_without_positives_match_one_process(tmp_path: Path, method: str) -> None:
    images, targets = make_batch()
    torch.set_num_threads(1)
    single = _train(_model(method), images[:2], targets[:2])
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), method, str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    moved = 0
    for key, value in single.items():
        if key.endswith("ema_density"):  # the histogram is averaged over ranks: half the counts of 2 images
            torch.testing.assert_close(ddp[key] * 2, value, rtol=1e-5, atol=1e-5, msg=key)
        elif key.endswith(("ema_steps", "bin_updates")):
            assert torch.equal(ddp[key], value), key
        elif value.is_floating_point():
            torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-6, msg=key)
            moved += int(key.endswith("weight"))
    assert moved > 5


# --------------------------------------------------------------------------- Seesaw / EQLv2 (issue 22)
def _longtail_loss(method: str, sync: bool = True) -> torch.nn.Module:
    from detbalance.losses import EQLv2Loss, SeesawLoss

    return (SeesawLoss(num_classes=6, sync=sync) if method == "seesaw" else EQLv2Loss(num_classes=6, sync=sync)).train()


def _longtail_batches(method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """3 steps of a 64-RoI batch; rank r takes rows r::2 (its half)."""
    gen = torch.Generator().manual_seed(0)
    cols = 8 if method == "seesaw" else 7
    out = []
    for _ in range(3):
        labels = torch.randint(0, 7, (64,), generator=gen)
        labels[labels == 5] = 6 if method == "seesaw" else 5  # class 5 unseen under Seesaw
        out.append((torch.randn(64, cols, generator=gen, dtype=torch.float64) * 2, labels))
    return out


def _longtail_run(loss: torch.nn.Module, batches, rows: slice) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for step, (logits, labels) in enumerate(batches):
        out[f"loss{step}"] = loss(logits[rows], labels[rows]).detach().clone()
        for name, buf in loss.named_buffers():
            out[f"{name}{step}"] = buf.clone()
    return out


def _longtail_worker(rank: int, world_size: int, port: int, output: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for method in ("seesaw", "eqlv2"):
            for sync in (True, False):
                state = _longtail_run(_longtail_loss(method, sync), _longtail_batches(method), slice(rank, None, 2))
                torch.save(state, f"{output}.{method}.{sync}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_longtail_losses_two_ranks_equal_one_process_at_twice_the_batch(tmp_path: Path) -> None:
    """Seesaw and EQLv2: state after each of 3 steps and each RoI's loss, 2 gloo ranks (half the RoIs each) =
    1 process (all RoIs); with ``sync=False`` (mmdetection's behaviour) the ranks' statistics differ from it."""
    out = tmp_path / "ddp"
    mp.spawn(_longtail_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    for method in ("seesaw", "eqlv2"):
        single = _longtail_run(_longtail_loss(method), _longtail_batches(method), slice(None))
        ranks = [torch.load(f"{out}.{method}.True.{r}", weights_only=True) for r in range(2)]
        for key, value in single.items():
            if key.startswith("loss"):
                got = torch.empty_like(value)
                got[0::2], got[1::2] = ranks[0][key], ranks[1][key]
                torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7, msg=f"{method} {key}")
            else:
                for r in range(2):
                    torch.testing.assert_close(ranks[r][key], value, rtol=1e-6, atol=1e-6, msg=f"{method} {key} {r}")
        unsynced = torch.load(f"{out}.{method}.False.0", weights_only=True)
        key = "cum_samples2" if method == "seesaw" else "pos_grad2"
        assert not torch.allclose(unsynced[key], single[key]), method
