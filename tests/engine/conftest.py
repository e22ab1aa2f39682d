"""Shared tiny experiment settings for the engine tests (builtin:tiny, 64 px images, CPU, 1 thread)."""

from __future__ import annotations

from collections.abc import Sequence

from detbalance.config import ExperimentConfig, apply_overrides

TINY = (
    "data.train=builtin:tiny",
    "engine.device=cpu",
    "engine.batch_size=4",
    "engine.log_interval=1",
    "engine.eval_batch_size=16",
    "model.norm=gn",
)


def tiny_config(*overrides: str, base: Sequence[str] = TINY) -> ExperimentConfig:
    """The default experiment on builtin:tiny with ``overrides`` applied after the tiny settings."""
    return apply_overrides(ExperimentConfig(), [*base, *overrides])
