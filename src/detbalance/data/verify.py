"""Every image of a dataset checked once before work starts, and held-out checked by image content.

:func:`verify_images` decodes every image of a dataset (in parallel threads; Pillow and hashlib release the
GIL), checks it against the size its annotation file declares, and returns a *fingerprint* per image: the
sha256 of its decoded pixels (a gray image, whose three channels are equal, is hashed as one channel, so a
built-in benchmark image and the PNG ``make-data`` wrote of it have the same fingerprint). A bad file fails
the command before its first training step, naming the file and its image id; every bad file is listed.
Results are cached, in memory and in ``$DETBALANCE_CACHE_DIR`` (default ``~/.cache/detbalance``), keyed by
the file's path, size and modification time, so the next command on the same files decodes nothing.

:func:`check_held_out` compares the images an AP is computed on with the training images *by content*
(the fingerprints), never by annotation-file path: the same images under another name, a copied folder or
the exported training split of a built-in run are all found.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detbalance.data.base import DatasetError, DetectionDataset

__all__ = ["HeldOutCheck", "check_held_out", "verify_images"]

_CACHE_VERSION = 1
_memory: dict[str, tuple[str, str | None]] = {}  # file key -> (fingerprint or "", error or None)
_builtin: dict[tuple[Any, ...], list[str]] = {}
_lock = threading.Lock()
_disk_loaded: set[Path] = set()


def _fingerprint(pixels: np.ndarray) -> str:
    """sha256 of ``uint8[3, H, W]`` pixels (one channel when all three are equal), with the shape."""
    if pixels.ndim == 3 and pixels.shape[0] == 3 and (pixels[0] == pixels[1]).all() and (pixels[0] == pixels[2]).all():
        pixels = pixels[0]
    h = hashlib.sha256(f"{'x'.join(map(str, pixels.shape))}|".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def _cache_file() -> Path:
    root = os.environ.get("DETBALANCE_CACHE_DIR")
    if root:
        return Path(root) / f"images-v{_CACHE_VERSION}.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "detbalance" / f"images-v{_CACHE_VERSION}.json"


def _load_disk_cache() -> None:
    path = _cache_file()
    if path in _disk_loaded:
        return
    _disk_loaded.add(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict):
        for key, fp in data.items():
            if isinstance(key, str) and isinstance(fp, str):
                _memory.setdefault(key, (fp, None))


def _save_disk_cache() -> None:
    from detbalance.engine.files import WriteError, atomic_write_text

    path = _cache_file()
    good = {k: fp for k, (fp, err) in _memory.items() if err is None and fp}
    try:
        atomic_write_text(path, json.dumps(good))
    except WriteError as err:  # a cache: the work is done, the next command decodes again
        warnings.warn(f"image check cache not saved: {err}", RuntimeWarning, stacklevel=3)


def _file_key(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _where(dataset: DetectionDataset, index: int) -> str:
    image_id = dataset.target(index)["image_id"]
    path = getattr(dataset, "image_path", None)
    if callable(path):
        return f"image id={image_id}: {str(path(index))!r}"
    return f"image id={image_id} (index {index})"


def verify_images(dataset: DetectionDataset, *, workers: int | None = None) -> list[str]:
    """Decode and check every image of ``dataset`` once; return one fingerprint per image (dataset order).

    A built-in benchmark (held in memory) is fingerprinted from its arrays. Other datasets are decoded with
    :meth:`~detbalance.data.DetectionDataset.load_image` (which checks the declared size) in ``workers``
    threads (default: the CPU count, at most 16); files are cached by path, size and mtime.

    Raises:
        DatasetError: listing every image that cannot be decoded or does not match its annotation, each with
            its image id and file.
    """
    from detbalance.data.benchmark import BenchmarkDataset

    if isinstance(dataset, BenchmarkDataset):
        key = (repr(dataset.spec), dataset.split, dataset.seed, len(dataset))
        with _lock:
            if key not in _builtin:
                _builtin[key] = [_fingerprint(img) for img in dataset.images]
            return list(_builtin[key])
    n = len(dataset)
    image_path = getattr(dataset, "image_path", None)
    keys: list[str | None] = [None] * n
    if callable(image_path):
        with _lock:
            _load_disk_cache()
        keys = [_file_key(Path(image_path(i))) for i in range(n)]
    out: list[str] = [""] * n
    problems: dict[int, str] = {}
    todo = []
    for i, key in enumerate(keys):
        hit = _memory.get(key) if key is not None else None
        if hit is not None and hit[1] is None:
            out[i] = hit[0]
        else:
            todo.append(i)

    def work(i: int) -> None:
        try:
            pixels = dataset.load_image(i).numpy()
            out[i] = _fingerprint(pixels)
            if keys[i] is not None:
                _memory[keys[i]] = (out[i], None)
        except Exception as err:  # noqa: BLE001 - every failure of a file is reported with its name
            text = " ".join(str(err).split()) or type(err).__name__
            # the dataset's own message names the image id and the file already; else say which
            problems[i] = text if "image id=" in text else f"{_where(dataset, i)}: {text}"

    if todo:
        n_workers = max(1, min(workers or min(os.cpu_count() or 1, 16), len(todo)))
        if n_workers == 1:
            for i in todo:
                work(i)
        else:
            with ThreadPoolExecutor(n_workers) as pool:
                list(pool.map(work, todo))
        if callable(image_path) and len(todo) > len(problems):
            with _lock:
                _save_disk_cache()
    if problems:
        source = str(getattr(dataset, "ann_file", type(dataset).__name__))
        raise DatasetError(f"{source} (images checked before training)", [problems[i] for i in sorted(problems)])
    return out


@dataclass(frozen=True)
class HeldOutCheck:
    """Whether the evaluated images are disjoint from the training images, compared by content.

    Attributes:
        checked_by: ``"content"`` (fingerprints of the decoded pixels).
        overlap: Evaluated images whose content is also a training image.
        of: Evaluated images.
        example: One overlapping image (id and file), or ``None``.
    """

    checked_by: str
    overlap: int
    of: int
    example: str | None = None

    @property
    def held_out(self) -> bool:
        """No evaluated image is a training image."""
        return self.overlap == 0

    def to_dict(self) -> dict[str, Any]:
        """``{"checked_by", "overlap", "of"}`` (+ ``"example"``), as ``result.json`` and ``metrics.jsonl`` record it."""
        out: dict[str, Any] = {"checked_by": self.checked_by, "overlap": self.overlap, "of": self.of}
        if self.example is not None:
            out["example"] = self.example
        return out

    def describe(self) -> str:
        """``"held out (0 of M images overlap training, checked by content)"`` or the overlap with an example."""
        if self.held_out:
            return f"held out: none of its {self.of} images is a training image (checked by content)"
        return f"overlaps training: {self.overlap} of {self.of} images (e.g. {self.example})"


def check_held_out(
    train: DetectionDataset,
    evaluated: DetectionDataset,
    *,
    train_fingerprints: list[str] | None = None,
    evaluated_fingerprints: list[str] | None = None,
) -> HeldOutCheck:
    """Compare the images of ``evaluated`` with those of ``train`` by content (see :func:`verify_images`).

    Args:
        train: The training data.
        evaluated: The data an AP is computed on.
        train_fingerprints / evaluated_fingerprints: Already computed :func:`verify_images` results.

    Raises:
        DatasetError: an image of either cannot be decoded (named).
    """
    tr = set(train_fingerprints if train_fingerprints is not None else verify_images(train))
    ev = evaluated_fingerprints if evaluated_fingerprints is not None else verify_images(evaluated)
    hits = [i for i, fp in enumerate(ev) if fp in tr]
    example = _where(evaluated, hits[0]) if hits else None
    return HeldOutCheck(checked_by="content", overlap=len(hits), of=len(ev), example=example)
