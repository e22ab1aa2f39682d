"""Checkpoints: written atomically, read with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that the restricted
unpickler accepts it; anything else (pickled code or objects) is refused with a :class:`CheckpointError`.
RNG states are converted to that form here: python's ``random`` state (a tuple with 625 ints), numpy's
legacy ``RandomState`` tuple and torch's CPU/CUDA generator states.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "generator_states",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_generator_states",
    "set_rng_state",
]

#: Format tag stored in every checkpoint (``{"format": ..., "format_version": ...}``).
CHECKPOINT_FORMAT = "detbalance-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, carrying pickled code, or of another run."""


def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states as tensors / lists / numbers."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002  (the global legacy state is what we save)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(np_state[0]),
            "state": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_states(model: nn.Module) -> dict[str, torch.Tensor]:
    """States of the sampling generators owned by adapted parts (modules with ``generator_state()``).

    Keys are module names; parts whose generator has not been used yet are left out.
    """
    out = {}
    for name, module in model.named_modules():
        get = getattr(module, "generator_state", None)
        if callable(get):
            state = get()
            if state is not None:
                out[name] = state
    return out


def set_generator_states(
    model: nn.Module, states: dict[str, torch.Tensor], device: torch.device, *, step: int = 0
) -> list[str]:
    """Restore :func:`generator_states` (the generators are created on ``device``).

    Returns the names of the parts whose state was saved on another device type (a run checkpointed on a
    GPU and resumed on a CPU, or back): their streams cannot continue, so each is seeded afresh from its
    seed and ``step`` (see ``set_generator_state``). The caller says so.
    """
    modules = dict(model.named_modules())
    restarted = []
    for name, state in states.items():
        if name not in modules or not callable(getattr(modules[name], "set_generator_state", None)):
            raise CheckpointError(f"checkpoint has a generator state for {name!r}, which this model lacks")
        if not modules[name].set_generator_state(state, device, step=step):
            restarted.append(name)
    return restarted


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A crash leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return path
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing or unreadable, carries pickled code / objects, or is not a
            detbalance checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((ln for ln in first if "Unsupported" in ln or "GLOBAL" in ln), first[0] if first else "")
        raise CheckpointError(
            f"checkpoint {str(path)!r} carries pickled code or objects and is refused (it is loaded with "
            f"weights_only=True; only tensors, numbers, strings, lists and dicts are allowed): {detail}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a detbalance checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {state.get('format_version')}, this build reads "
            f"{FORMAT_VERSION}"
        )
    return state
