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
