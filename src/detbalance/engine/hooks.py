"""The one extension point of the training loop: a :class:`TrainingHook` runs after chosen steps.

A remedy that needs more than a loss or a sampler, such as offline bootstrapping (mine hard negatives
with the current model, then train on them), implements this protocol next to the remedy
(:mod:`detbalance.sampling.bootstrap`); :func:`detbalance.builders.build_hooks` makes the list from the
config and :func:`detbalance.engine.fit` calls it. The engine never learns which remedy it runs.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["TrainingHook"]


@runtime_checkable
class TrainingHook(Protocol):
    """Work done between optimiser steps, with state that a checkpoint keeps.

    The loop calls ``attach(train_set)`` once, right after it builds the training set (and before a resume
    restores the hook's state), then ``steps(total_steps)``; after each optimiser step ``s`` in that list
    (counting from 1) it calls ``run(s, model=..., train_set=..., device=...)`` on every rank, appends the
    returned record (with ``"step"`` and, unless given, ``"type": "hook"``) to ``metrics.jsonl``, and
    restarts its data loader so that every later batch (and every loader worker) sees what the hook
    changed in the training set. ``state_dict`` is saved in every checkpoint and ``load_state_dict``
    restores it on resume.
    """

    def attach(self, train_set: Dataset) -> None:
        """Called once with the training set, before any :meth:`load_state_dict` or :meth:`run`."""
        ...

    def steps(self, total_steps: int) -> list[int]:
        """Optimiser steps (``1..total_steps``) after which :meth:`run` is called."""
        ...

    def run(self, step: int, *, model: nn.Module, train_set: Dataset, device: torch.device) -> dict[str, Any]:
        """Do the work after step ``step``.

        Args:
            step: Optimiser steps done.
            model: The detector (not DDP-wrapped), in training mode; the hook may switch it to eval mode and
                back.
            train_set: The training set (the one given to :meth:`attach`). Its ``load_image(i)`` and
                ``target(i)`` give image ``i`` and its annotations without augmentation.
            device: Where the model lives.

        Returns:
            A JSON-able log record.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers, strings, lists and dicts only (checkpoints load with ``weights_only=True``)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...
