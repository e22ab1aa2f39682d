"""Checkpoints: written atomically, read with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that the restricted
unpickler accepts it; anything else (pickled code or objects) is refused with a :class:`CheckpointError`.
RNG states are converted to that form here: python's ``random`` state (a tuple with 625 ints), numpy's
legacy ``RandomState`` tuple and torch's CPU/CUDA generator states.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detbalance.engine.files import OutputFolder, atomic_replace

__all__ = [
    "CHECKPOINT_FORMAT",
    "REQUIRED_KEYS",
    "CheckpointError",
    "generator_states",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_generator_states",
    "set_rng_state",
    "validate_checkpoint",
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


class _Writer:
    """A file object for ``torch.save`` that keeps the ``OSError`` of a failed write: torch turns it into
    ``[enforce fail at inline_container.cc] unexpected pos``, which names neither the file nor the cause."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | Path, state: dict[str, Any], *, folder: OutputFolder | None = None) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A crash leaves either the previous checkpoint or the new one, never a torn file.

    Args:
        path: The checkpoint file.
        state: Plain dict of tensors, numbers, strings, lists and dicts.
        folder: The :class:`~detbalance.engine.files.OutputFolder` of ``path``'s folder, to write through its
            manifest (refusing a file the project did not write, recording the new one's hash before the
            rename); ``None`` writes the file alone.

    Raises:
        WriteError: (an ``OSError``) the file could not be written, e.g. ``could not write
            'run/checkpoint.pt': no space left on device``; the previous checkpoint is kept.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **state}

    def write(f: Any) -> None:
        w = _Writer(f)
        try:
            torch.save(payload, w)
        except RuntimeError as err:
            if w.error is not None:
                raise w.error from None
            if "inline_container" in str(err) or "file write failed" in str(err):
                raise OSError(_probe_errno(path.parent), "write failed") from None
            raise

    if folder is not None:
        return folder.write_with(str(path.relative_to(folder.root)), write)
    return atomic_replace(path, write)


def _probe_errno(folder: Path) -> int:
    """The likely cause of a write that failed inside torch: a full disk, else an I/O error."""
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return errno.ENOSPC
    except OSError:
        pass
    return errno.EIO


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF8", "GIF image"),
    (b"%PDF", "PDF document"),
    (b"\x1f\x8b", "gzip file"),
    (b"BZh", "bzip2 file"),
    (b"\xfd7zXZ", "xz file"),
    (b"SQLite format 3", "SQLite database"),
)


def _sniff(path: Path) -> str | None:
    """Why ``path`` is plainly not a checkpoint (folder, empty, an image, text, ...), or ``None``."""
    if path.is_dir():
        return "is a folder"
    if not path.exists():
        return "not found"
    if not path.is_file():
        return "is not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head:
        return "is an empty file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return f"is not a checkpoint ({kind})"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # torch's zip format, or a legacy pickle: torch.load decides
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "is not a checkpoint (JSON text)"
    try:
        head.decode("utf-8")
        return "is not a checkpoint (a text file)"
    except UnicodeDecodeError:
        return "is not a checkpoint (unknown format)"


#: What each use of a checkpoint needs in it: ``eval`` / ``profile`` rebuild the model, ``--resume`` also
#: restores the optimiser, schedule, data position and random streams.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("config", "model", "num_classes", "label_names", "image_size", "step", "version"),
    "resume": (
        "config", "model", "num_classes", "label_names", "image_size", "step", "version", "optimizer",
        "scheduler", "scaler", "epoch", "batch", "hooks", "recorder", "rng", "generators", "world_size",
    ),
}

_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "config": (str,), "model": (dict,), "num_classes": (int,), "label_names": (list,), "image_size": (int,),
    "step": (int,), "version": (str,), "optimizer": (dict,), "scheduler": (dict,), "scaler": (dict, type(None)),
    "epoch": (int,), "batch": (int,), "hooks": (list,), "recorder": (dict, type(None)), "rng": (list,),
    "generators": (list,), "world_size": (int,),
}

_KEY_MEANING = {
    "optimizer": "the optimiser state --resume needs",
    "scheduler": "the learning-rate schedule --resume needs",
    "rng": "the random streams --resume needs",
    "model": "the model weights",
    "config": "the run's config",
}


def validate_checkpoint(state: dict[str, Any], path: str | Path, *, purpose: str = "model") -> None:
    """Check that ``state`` holds every key (of the right type) that ``purpose`` needs, before any work.

    Args:
        state: What :func:`load_checkpoint` returned.
        path: The file (named in the message).
        purpose: ``"model"`` (``eval``, ``profile``: rebuild the model) or ``"resume"`` (continue training).

    Raises:
        CheckpointError: naming the file and every missing or mistyped key.
    """
    if purpose not in REQUIRED_KEYS:
        raise ValueError(f"purpose must be one of {sorted(REQUIRED_KEYS)}, got {purpose!r}")
    missing = [k for k in REQUIRED_KEYS[purpose] if k not in state]
    if missing:
        what = "; ".join(f"{k!r}" + (f" ({_KEY_MEANING[k]})" if k in _KEY_MEANING else "") for k in missing)
        extra = " It can still be evaluated (detbalance eval)." if purpose == "resume" and not [
            k for k in missing if k in REQUIRED_KEYS["model"]] else ""
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {what}: it cannot be used to {_PURPOSE[purpose]}.{extra}")
    wrong = [
        f"{k!r} is {type(state[k]).__name__}"
        for k in REQUIRED_KEYS[purpose]
        if not isinstance(state[k], _KEY_TYPES[k]) or (isinstance(state[k], bool) and int in _KEY_TYPES[k])
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {'; '.join(wrong)}")
    if state["num_classes"] < 1 or len(state["label_names"]) != state["num_classes"]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: num_classes {state['num_classes']} but "
            f"{len(state['label_names'])} label names"
        )
    if state["step"] < 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: step {state['step']}")


_PURPOSE = {"model": "rebuild its model", "resume": "resume training (--resume)"}


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", purpose: str | None = None
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Args:
        path: The file.
        map_location: Where tensors go.
        purpose: ``"model"`` or ``"resume"``: also :func:`validate_checkpoint` for that use; ``None``: only
            the format is checked.

    Raises:
        CheckpointError: the file is missing, a folder, empty, plainly another kind of file ("not a
            checkpoint (PNG image)"), unreadable, carries pickled code / objects, is not a detbalance
            checkpoint, or lacks what ``purpose`` needs; the message names the file.
    """
    path = Path(path)
    reason = _sniff(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} {reason}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((ln for ln in first if "Unsupported" in ln or "GLOBAL" in ln), first[0] if first else "")
        raise CheckpointError(
            f"checkpoint {str(path)!r} carries pickled code or objects and is refused (it is loaded with "
            f"weights_only=True; only tensors, numbers, strings, lists and dicts are allowed): {detail}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        detail = _one_line(err) or type(err).__name__
        if "failed finding central directory" in detail or isinstance(err, EOFError):
            detail = f"truncated or damaged ({detail})"
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {detail}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a detbalance checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {state.get('format_version')}, this build reads "
            f"{FORMAT_VERSION}"
        )
    if purpose is not None:
        validate_checkpoint(state, path, purpose=purpose)
    return state


def _one_line(err: BaseException) -> str:
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())
