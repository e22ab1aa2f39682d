"""What the command line checks before it imports torch: the names it accepts and the data it is given.

Nothing here imports torch, torchvision or numpy, so that a wrong argument is reported at once (importing
torch takes seconds, on a busy machine tens of seconds). The names below are the catalogue of
:data:`detbalance.data.PRESETS` and :data:`detbalance.compare.SUITES`; ``tests/test_cli_preflight.py``
holds them equal, and holds :func:`check_data_spec` to what :func:`detbalance.data.open_dataset` accepts.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "BENCHMARK_PRESETS",
    "BUILTIN_ONLY_SUITES",
    "EARLIER_REGIME_SUITES",
    "RUN_FILES",
    "SUITE_FAMILIES",
    "SUITE_NAMES",
    "check_data_spec",
    "check_device",
    "check_output_folder",
    "select_suites",
]

BENCHMARK_PRESETS: tuple[str, ...] = ("default", "balanced", "noisy", "crowded", "tiny")
"""The built-in benchmark's presets, in the order of :data:`detbalance.data.PRESETS`."""

SUITE_NAMES: tuple[str, ...] = ("losses", "samplers", "samplers_pool128", "ssd", "classes", "noise", "longtail")
"""The suites of ``detbalance compare``, in the order of :data:`detbalance.compare.SUITES`."""

BUILTIN_ONLY_SUITES: frozenset[str] = frozenset({"noise"})
"""The suites that need the built-in benchmark (``Suite.builtin_only``)."""

SUITE_FAMILIES: dict[str, tuple[str, ...]] = {
    "losses": ("retinanet", "fcos"),
    "samplers": ("faster_rcnn",),
    "samplers_pool128": ("faster_rcnn",),
    "ssd": ("ssd",),
    "classes": ("retinanet", "fcos", "faster_rcnn"),
    "noise": ("retinanet", "fcos"),
    "longtail": ("faster_rcnn",),
}
"""The model families each suite runs on (``Suite.families``; ``compare --model NAME`` picks by them)."""

EARLIER_REGIME_SUITES: frozenset[str] = frozenset({"samplers_pool128"})
"""Suites kept in an earlier regime for the study (``Suite.regime_of``): run when named or with ``all``, never
by default."""


RUN_FILES: tuple[str, ...] = ("config.toml", "metrics.jsonl", "balance.jsonl", "checkpoint.pt")
"""The files :func:`detbalance.engine.fit` writes into its run folder (others there are left alone)."""


def select_suites(suite: str | None, *, user_data: bool, family: str | None = None) -> list[str]:
    """The suites to run: ``suite`` (one name, a comma-separated list run in the order given, or ``all`` for
    every one); with ``--data`` and no ``--suite`` every suite that fits a user's dataset (the noise suite needs
    the built-in benchmark's controlled noise), without the earlier regimes kept for the study
    (:data:`EARLIER_REGIME_SUITES`). With ``family`` (``--model NAME``'s), only the suites for that family
    (:data:`SUITE_FAMILIES`): by default all of them that fit the data; a named suite of another family is an
    error."""
    if family is not None:
        fits = [n for n in SUITE_NAMES if family in SUITE_FAMILIES[n]]
        if suite is None or suite == "all":
            skip = BUILTIN_ONLY_SUITES if user_data else frozenset()
            if suite is None:
                skip = skip | EARLIER_REGIME_SUITES
            return [n for n in fits if n not in skip]
        for name in (n.strip() for n in suite.split(",")):
            if name in SUITE_FAMILIES and family not in SUITE_FAMILIES[name]:
                raise ValueError(f"--suite {name} compares remedies of {' / '.join(SUITE_FAMILIES[name])} detectors; "
                                 f"--model is a {family} model (its suites: {', '.join(fits)})")
    if suite is None:
        default = BUILTIN_ONLY_SUITES | EARLIER_REGIME_SUITES
        return [n for n in SUITE_NAMES if n not in default] if user_data else ["losses"]
    if suite == "all":
        return [n for n in SUITE_NAMES if not (user_data and n in BUILTIN_ONLY_SUITES)]
    names = [n.strip() for n in suite.split(",")]
    for name in names:
        if name not in SUITE_NAMES:
            raise ValueError(f"--suite must be one of {', '.join([*SUITE_NAMES, 'all'])} or a comma-separated list "
                             f"of them; got {name!r}")
        if user_data and name in BUILTIN_ONLY_SUITES:
            raise ValueError(f"--suite {name} needs the built-in benchmark (it controls the label noise); drop --data")
    if len(set(names)) != len(names):
        raise ValueError(f"--suite {suite!r} names a suite twice")
    return names


def check_data_spec(spec: str, *, flag: str, split: str) -> None:
    """Raise a ``ValueError`` naming ``flag`` unless :func:`detbalance.data.open_dataset` can open ``spec``.

    Args:
        spec: ``builtin[:PRESET]``, a COCO ``.json`` file or a folder holding ``<split>.json`` or
            ``annotations.json``.
        flag: the flag or config key that gave ``spec`` (``--data``, ``data.val``, ...).
        split: the split the command reads (a folder's json to look for).
    """
    text = str(spec)
    if text == "builtin" or text.startswith("builtin:"):
        preset = text.partition(":")[2] or "default"
        if preset not in BENCHMARK_PRESETS:
            raise ValueError(
                f"{flag} {text!r}: unknown built-in preset {preset!r}; the presets are {', '.join(BENCHMARK_PRESETS)}"
            )
        return
    path = Path(text)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{flag} {text!r} is not a COCO .json file (nor a folder holding one)")
        return
    if path.is_dir():
        if not any((path / name).is_file() for name in (f"{split}.json", "annotations.json")):
            raise ValueError(f"{flag} {text!r}: the folder holds neither {split}.json nor annotations.json")
        return
    raise ValueError(
        f"{flag} {text!r}: no such file or folder (give a COCO .json, a folder as `detbalance make-data` writes, "
        f"or builtin[:PRESET] with PRESET one of {', '.join(BENCHMARK_PRESETS)})"
    )


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str, *, flag: str = "--device") -> None:
    """Raise a ``ValueError`` naming ``flag`` unless ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"{flag} must be auto, cpu, cuda or cuda:N, got {device!r}")


def check_output_folder(path: Path, *, flag: str = "--output") -> None:
    """Raise a ``ValueError`` naming ``flag`` when ``path`` (or a parent) is an existing file, not a folder."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag} {str(path)!r}: {str(p)!r} is a file, not a folder")
            return
