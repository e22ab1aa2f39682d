"""train_one_epoch: parity with a hand-written loop, accumulation, clipping, non-finite losses, CPU setup."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from detbalance.data import collate_detection, make_benchmark
from detbalance.detectors.build import build_detector
from detbalance.engine import NonFiniteLossError, StepMetrics, choose_threads, configure_cpu, train_one_epoch


def _setup(seed: int = 0, *, lr: float = 0.01) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = build_detector("retinanet", num_classes=5, image_size=64, norm="gn")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _batches(batch_size: int, count: int) -> list:
    ds = make_benchmark("tiny", split="train")
    return list(DataLoader(ds, batch_size=batch_size, collate_fn=collate_detection))[:count]


def _assert_same_state(a: nn.Module, b: nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if tol:
            torch.testing.assert_close(sa[k], sb[k], **tol, msg=k)
        else:
            assert torch.equal(sa[k], sb[k]), k


def test_parity_with_a_hand_written_loop() -> None:
    batches = _batches(4, 3)
    model, opt, sched = _setup()
    seen: list[StepMetrics] = []
    steps = train_one_epoch(model, opt, batches, scheduler=sched, grad_clip=5.0, total_steps=3, on_step=seen.append)

    ref, ref_opt, ref_sched = _setup()
    ref.train()
    losses = []
    for images, targets in batches:  # the ten-line loop
        loss_dict = ref(images, targets)
        loss = sum(loss_dict.values())
        losses.append({k: float(v.detach()) for k, v in loss_dict.items()})
        ref_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 5.0)
        ref_opt.step()
        ref_sched.step()

    assert steps == 3
    _assert_same_state(model, ref)
    assert [m.step for m in seen] == [1, 2, 3]
    assert [m.lr for m in seen] == pytest.approx([0.01, 0.005, 0.01 / 3])
    assert [m.losses for m in seen] == losses
    assert [m.batches for m in seen] == [1, 2, 3] and all(m.images == 4 for m in seen)


def test_accumulation_equals_the_large_batch() -> None:
    """RetinaNet's torchvision loss is a mean over images, so 2 x 4 accumulated == one batch of 8."""
    big, small = _batches(8, 2), _batches(4, 4)
    model, opt, _ = _setup()
    train_one_epoch(model, opt, big)
    acc, acc_opt, _ = _setup()
    steps = train_one_epoch(acc, acc_opt, small, accumulate=2)
    assert steps == 2
    _assert_same_state(model, acc, rtol=1e-4, atol=1e-6)


def test_max_steps_and_start_step() -> None:
    model, opt, _ = _setup()
    seen: list[int] = []
    steps = train_one_epoch(model, opt, _batches(4, 3), start_step=10, max_steps=2, on_step=lambda m: seen.append(m.step))
    assert steps == 12 and seen == [11, 12]


def test_non_finite_loss_stops_before_backward() -> None:
    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, images, targets):
            return {"classification": self.w * float("nan"), "bbox_regression": self.w * 2.0}

    model = Exploding()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 6 \(classification=nan, bbox_regression=2\)"):
        train_one_epoch(model, opt, [([torch.zeros(3, 4, 4)], [{}])], start_step=5)
    assert model.w.grad is None and float(model.w.detach()) == 1.0


def test_bad_arguments() -> None:
    model, opt, _ = _setup()
    with pytest.raises(ValueError, match="accumulate must be >= 1, got 0"):
        train_one_epoch(model, opt, [], accumulate=0)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        configure_cpu(0)


def test_configure_cpu_flushes_denormals() -> None:
    threads = torch.get_num_threads()
    configure_cpu(threads)
    assert torch.get_num_threads() == threads
    x = torch.tensor([1e-39], dtype=torch.float32)  # a float32 denormal
    assert float(x * 1.0) == 0.0


@pytest.mark.parametrize(
    ("cores", "load", "threads"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 7.0, 1), (8, 2.6, 5), (8, 0.0, 8), (1, 0.0, 1)],
)
def test_choose_threads_takes_the_cores_the_load_leaves_free(cores, load, threads) -> None:
    """round(cores - load) within [1, cores]: one busy job on 2 cores leaves 1 thread, an idle machine all."""
    choice = choose_threads(cores=cores, load=load)
    assert choice.threads == threads and choice.cores == cores and choice.load == load
    assert choice.reason == f"load average {load:.2f} on {cores} cores: about {max(0.0, cores - load):.1f} free"


def test_choose_threads_measures_and_falls_back(monkeypatch) -> None:
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    choice = choose_threads()
    assert choice.threads == choice.cores >= 1 and choice.cores <= len(os.sched_getaffinity(0))

    def no_load():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load)
    choice = choose_threads(cores=3)
    assert choice == (3, 3, None, "3 cores, no load average on this system")
    with pytest.raises(ValueError, match="cores must be >= 1, got 0"):
        choose_threads(cores=0, load=0.0)
    with pytest.raises(ValueError, match="load must be >= 0"):
        choose_threads(cores=2, load=-1.0)
