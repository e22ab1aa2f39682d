"""Checkpoints: atomic write, weights_only load, pickled code refused, RNG state round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detbalance.engine.checkpoint import (
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3).tolist()  # noqa: NPY002


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)  # noqa: NPY002
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    path = save_checkpoint(tmp_path / "c.pt", {"rng": get_rng_state(), "step": 7})
    expected = _draws()
    state = load_checkpoint(path)
    set_rng_state(state["rng"])
    assert _draws() == expected
    assert state["step"] == 7 and state["format"] == "detbalance-checkpoint"


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint(path, {"x": torch.arange(3)})
    save_checkpoint(path, {"x": torch.arange(4)})
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644


def test_pickled_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "detbalance-checkpoint", "format_version": 1, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="carries pickled code or objects and is refused"):
        load_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="is not a detbalance checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "detbalance-checkpoint", "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "new.pt")


class _Sampling(torch.nn.Module):
    """A model part with a sampling generator, as the adapted Faster R-CNN heads have."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        from detbalance.detectors.faster_rcnn import _GeneratorMixin

        self.part = type("Part", (torch.nn.Module, _GeneratorMixin), {})()
        self.part._init_generator(seed)


def test_generator_states_continue_on_the_same_device_type_and_restart_from_seed_and_step_on_another() -> None:
    from detbalance.engine.checkpoint import generator_states, set_generator_states

    cpu = torch.device("cpu")
    model = _Sampling(11)
    torch.randperm(50, generator=model.part.generator(cpu))
    states = generator_states(model)
    expected = torch.randperm(50, generator=model.part.generator(cpu))
    other = _Sampling(11)
    assert set_generator_states(other, states, cpu, step=5) == []
    assert torch.equal(torch.randperm(50, generator=other.part.generator(cpu)), expected)

    # a CUDA generator's state (philox seed and offset: 16 bytes) cannot continue on a CPU generator
    cuda_state = torch.zeros(16, dtype=torch.uint8)
    assert set_generator_states(other, {"part": cuda_state}, cpu, step=5) == ["part"]
    reseeded = torch.Generator().manual_seed(11 + 5)
    assert torch.equal(torch.randperm(50, generator=other.part.generator(cpu)), torch.randperm(50, generator=reseeded))
