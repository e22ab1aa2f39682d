"""fit(cfg): the run folder, bit-exact resume, errors, pass ordering and offline bootstrapping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

import detbalance.engine.run as run_module
from detbalance.config import load_toml
from detbalance.engine import CheckpointError, NonFiniteLossError, StepMetrics, fit, load_checkpoint
from detbalance.engine.run import pass_batches
from detbalance.sampling import RepeatFactorSampler

from .conftest import tiny_config


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Interrupt(Exception):
    pass


def test_fit_writes_the_run_folder(tmp_path: Path) -> None:
    cfg = tiny_config("engine.iterations=3", "engine.record=true", "engine.eval_interval=2")
    result = fit(cfg, output=tmp_path, progress=False)
    assert load_toml((tmp_path / "config.toml").read_text()) == cfg
    records = _records(tmp_path / "metrics.jsonl")
    assert [(r["type"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    for r in records[:2]:
        assert r["loss"] == pytest.approx(sum(r["losses"].values()))
        assert set(r["losses"]) == {"classification", "bbox_regression"}
    assert records[0]["lr"] == pytest.approx(0.01)  # cosine, no warmup: step 1 used lr0
    assert records[1]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert [r for r in result.history if r["type"] == "train"] == [r for r in records if r["type"] == "train"]
    assert result.metrics["per_class"] == records[-1]["metrics"]["per_class"]
    assert set(result.metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert len(result.metrics["per_class"]) == 5
    balance = _records(tmp_path / "balance.jsonl")
    assert len(balance[0]["loss_bin_edges"]) == 33
    assert [r["step"] for r in balance[1:]] == [1, 2, 3]
    assert balance[1]["counts"]["retinanet/anchors"]["positives"]
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 3 and state["num_classes"] == 5 and state["image_size"] == 64
    assert result.steps == 3 and result.images_per_s > 0


@pytest.mark.parametrize(
    "extra",
    [
        ("engine.iterations=6", "engine.batch_size=8", "engine.accumulate=2", "engine.checkpoint_interval=3"),
        ("model.arch=faster_rcnn", "engine.iterations=4", "engine.checkpoint_interval=2", "engine.batch_size=2"),
    ],
    ids=["retinanet-accumulate-2-passes", "faster_rcnn-sampler-generators"],
)
def test_resume_is_bit_exact(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """Interrupt after the first checkpoint, resume: the weights equal an uninterrupted run's exactly."""
    cfg = tiny_config(*extra, "engine.record=true")  # flips (data.augment) consume the torch RNG
    full = fit(cfg, output=tmp_path / "full", progress=False)
    interval = cfg.engine.checkpoint_interval

    def stop(m: StepMetrics) -> None:
        if m.step == interval + 1:  # the step after the checkpoint is lost
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(cfg, output=tmp_path / "cut", progress=False, on_step=stop)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == interval
    resumed = fit(cfg, output=tmp_path / "cut", resume=True, progress=False)

    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]

    def train_losses(path: Path) -> list[tuple]:
        return [(r["step"], r["epoch"], r["lr"], r["losses"]) for r in _records(path) if r["type"] == "train"]

    assert train_losses(full.metrics_file) == train_losses(resumed.metrics_file)
    assert len(train_losses(full.metrics_file)) == cfg.engine.iterations
    assert _records(tmp_path / "full" / "balance.jsonl") == _records(tmp_path / "cut" / "balance.jsonl")
    assert resumed.metrics["per_class"] == full.metrics["per_class"]


def test_resume_refuses_other_config_and_existing_run(tmp_path: Path) -> None:
    cfg = tiny_config("engine.iterations=1")
    fit(cfg, output=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        fit(cfg, output=tmp_path, progress=False)
    other = tiny_config("engine.iterations=1", "optim.lr=0.5")
    with pytest.raises(CheckpointError, match=r"differing keys: \['optim.lr'\]"):
        fit(other, output=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        fit(cfg, output=tmp_path / "nothing", resume=True, progress=False)


def test_non_finite_loss_names_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = run_module.train_step

    def poisoned(*args, step, **kwargs):
        if step == 3:
            raise NonFiniteLossError(3, {"classification": float("nan"), "bbox_regression": 0.5})
        return real(*args, step=step, **kwargs)

    monkeypatch.setattr(run_module, "train_step", poisoned)
    cfg = tiny_config("engine.iterations=4", "engine.checkpoint_interval=2")
    with pytest.raises(NonFiniteLossError) as info:
        fit(cfg, output=tmp_path, progress=False)
    msg = str(info.value)
    assert "non-finite loss at step 3 (classification=nan, bbox_regression=0.5)" in msg
    assert f"last good checkpoint: {tmp_path / 'checkpoint.pt'}" in msg
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_pass_batches_orders() -> None:
    b = pass_batches(10, batch_size=3, seed=5, epoch=2)
    expected = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=5)
    expected.set_epoch(2)
    order = list(expected)
    assert b == [order[0:3], order[3:6], order[6:9]]
    assert pass_batches(10, batch_size=3, seed=5, epoch=3) != b
    assert pass_batches(10, batch_size=3, seed=5, epoch=2, accumulate=2) == b[:2]
    # two ranks of batch 2 see, step by step, the images one process of batch 4 sees
    one = pass_batches(8, batch_size=4, seed=1)
    r0 = pass_batches(8, batch_size=2, seed=1, rank=0, world_size=2)
    r1 = pass_batches(8, batch_size=2, seed=1, rank=1, world_size=2)
    assert [sorted(x + y) for x, y in zip(r0, r1)] == [sorted(x) for x in one]
    factors = torch.tensor([1.0, 3.0, 1.0, 2.0])
    sampler = RepeatFactorSampler(factors, seed=0)
    sampler.set_epoch(1)
    rf = pass_batches(4, batch_size=2, seed=0, epoch=1, repeat_factors=factors)
    drawn = list(sampler)
    assert rf == [drawn[i : i + 2] for i in range(0, len(drawn) - len(drawn) % 2, 2)]
    with pytest.raises(ValueError, match="fewer than engine.batch_size"):
        pass_batches(3, batch_size=4)


class _CountingHook:
    """A :class:`~detbalance.engine.hooks.TrainingHook` that counts its runs and checks what it is given."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[tuple[int, int, bool]] = []

    def attach(self, train_set) -> None:
        self.attached = len(train_set)

    def steps(self, total_steps: int) -> list[int]:
        return [total_steps // 2]

    def run(self, step, *, model, train_set, device) -> dict:
        self.calls += 1
        self.seen.append((step, len(train_set), model.training))
        return {"type": "counting", "calls": self.calls}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


def test_hooks_run_after_their_steps_and_resume_with_their_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detbalance.engine.hooks import TrainingHook

    made: list[_CountingHook] = []

    def build_hooks(cfg):
        made.append(_CountingHook())
        return made[-1:]

    monkeypatch.setattr(run_module, "build_hooks", build_hooks)
    cfg = tiny_config("engine.iterations=4", "engine.checkpoint_interval=2")
    result = fit(cfg, output=tmp_path / "full", progress=False)
    assert isinstance(made[0], TrainingHook)
    assert [(r["type"], r["step"]) for r in result.history if r["type"] != "train"] == [("counting", 2), ("eval", 4)]
    assert made[0].seen == [(2, 64, True)] and made[0].attached == 64  # builtin:tiny has 64 training images
    assert load_checkpoint(result.checkpoint)["hooks"] == [{"calls": 1}]

    def stop(m: StepMetrics) -> None:
        if m.step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(cfg, output=tmp_path / "cut", progress=False, on_step=stop)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["hooks"] == [{"calls": 1}]
    fit(cfg, output=tmp_path / "cut", resume=True, progress=False)
    assert made[-1].calls == 1 and made[-1].seen == []  # restored, and not run again


def test_loader_workers_do_not_change_the_data(tmp_path: Path) -> None:
    """Each sample's flip comes from its own seed: 0 or 2 worker processes train the same weights."""
    runs = [
        fit(tiny_config("engine.iterations=2", f"data.num_workers={w}"), output=tmp_path / str(w), progress=False)
        for w in (0, 2)
    ]
    a, b = (load_checkpoint(r.checkpoint)["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_offline_bootstrapping_through_the_hook_and_resume(tmp_path: Path) -> None:
    """Bootstrapping runs as a hook after half the budget; its mined boxes reach the training set, and a
    resumed run (which restores them from the checkpoint) trains the same weights as an uninterrupted one."""
    cfg = tiny_config(
        "model.arch=faster_rcnn",
        "remedy.bootstrap.rounds=1",
        "remedy.bootstrap.score_threshold=0.0",
        "engine.iterations=4",
        "engine.batch_size=2",
        "engine.checkpoint_interval=3",
        "data.num_workers=1",
    )
    full = fit(cfg, output=tmp_path / "full", progress=False)
    mined = [r for r in full.history if r["type"] == "bootstrap"]
    assert [r["step"] for r in mined] == [2] and mined[0]["hard_negatives"] > 0
    saved = load_checkpoint(full.checkpoint)["hooks"][0]
    assert int(saved["rounds_done"]) == 1 and int(saved["counts"].sum()) == mined[0]["hard_negatives"]

    def stop(m: StepMetrics) -> None:
        if m.step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(cfg, output=tmp_path / "cut", progress=False, on_step=stop)
    resumed = fit(cfg, output=tmp_path / "cut", resume=True, progress=False)
    a, b = (load_checkpoint(r.checkpoint)["model"] for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
