"""DDP on CPU (gloo): 2 processes of batch B train the same weights as 1 process of batch 2B (GHM-C on,
GroupNorm, flips on), and log the same (all-reduced) losses.

DDP averages gradients over ranks, so the losses must be normalised by *global* quantities averaged over
ranks (GHM's all-reduced histogram, the all-reduced positive count) for this equality to hold; each
sample's augmentation is drawn from its position in the pass, so the flips agree too. With BatchNorm each
process normalises with its own B images' statistics: the losses already differ at step 1 (what README says).
Tolerance: float32 sums taken in a different order, over 3 SGD steps: rtol 1e-4, atol 1e-6.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from detbalance.engine import fit, load_checkpoint

from .conftest import tiny_config

SETTINGS = (
    "remedy.cls_loss.name=ghm_c",
    "remedy.normalizer.mode=per_batch",
    "data.augment=true",
    "engine.iterations=3",
    "engine.log_interval=1",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, output: str, extra: tuple[str, ...] = ()) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    fit(tiny_config(*SETTINGS, *extra, "engine.batch_size=2"), output=output, progress=False)


def _train_losses(path: Path) -> list[dict[str, float]]:
    return [r["losses"] for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "train"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_of_double_batch(tmp_path: Path) -> None:
    single = fit(tiny_config(*SETTINGS, "engine.batch_size=4"), output=tmp_path / "one", progress=False)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)

    a = load_checkpoint(single.checkpoint)
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert b["world_size"] == 2 and b["step"] == 3
    ghm = [k for k in a["model"] if k.endswith("ema_density")]
    assert ghm, "GHM-C buffers are in the model state"
    for k in ghm:  # the histogram is averaged over ranks (losses' convention): half the 2B-image counts
        torch.testing.assert_close(b["model"][k] * 2, a["model"][k], rtol=1e-6, atol=1e-6)
    moved = 0
    for k, v in a["model"].items():
        if k not in ghm:
            torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
            moved += int(v.is_floating_point() and k.endswith("weight"))
    assert moved > 10
    # metrics.jsonl logs the loss averaged over the ranks: the one-process loss of the same 2B images
    one, two = _train_losses(single.metrics_file), _train_losses(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    for x, y in zip(one, two):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k
    # evaluation is gathered from both ranks: the same images, the same detections up to float noise
    last = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["type"] == "eval" and set(last["metrics"]["per_class"]) == set(single.metrics["per_class"])


@pytest.mark.slow
def test_with_batchnorm_each_process_uses_its_own_batch_statistics(tmp_path: Path) -> None:
    bn = ("model.norm=bn", "engine.iterations=1")
    single = fit(tiny_config(*SETTINGS, *bn, "engine.batch_size=4"), output=tmp_path / "one", progress=False)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), bn), nprocs=2, join=True)
    one, two = _train_losses(single.metrics_file), _train_losses(tmp_path / "two" / "metrics.jsonl")
    assert abs(two[0]["classification"] - one[0]["classification"]) > 1e-4 * one[0]["classification"]
    a, b = load_checkpoint(single.checkpoint)["model"], load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    var = [k for k in a if k.endswith("running_var")]
    assert var and any(not torch.allclose(a[k], b[k], rtol=1e-3) for k in var)
