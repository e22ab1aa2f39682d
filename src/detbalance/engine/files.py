"""The run folder's files: atomic JSON writes, JSON-lines logs that survive a crash, stale temp files.

A crash (``kill -9``, power loss) can happen at any byte. What this module guarantees:

* :func:`atomic_write_text` / :func:`write_json` leave either the old file or the new one (temp file in the
  same folder, fsync, rename), never a torn one;
* :func:`append_jsonl` appends whole lines and flushes, so only the *last* line of a ``.jsonl`` file can be
  torn; :func:`read_jsonl` drops such a line with a warning naming ``file:line`` and raises, naming
  ``file:line``, on a bad line anywhere else;
* :func:`remove_stale_temp` deletes the ``.<name>.*.tmp`` files an interrupted atomic write left behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "append_jsonl",
    "atomic_write_text",
    "json_safe",
    "read_jsonl",
    "remove_stale_temp",
    "rewrite_jsonl",
    "write_json",
]


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats replaced by ``None`` (strict JSON has no NaN / inf)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file ``.<name>.*.tmp`` in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as strict JSON (non-finite floats become ``null``), written atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent) + "\n")


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append one strict-JSON line per record and flush (a crash can tear only the last line)."""
    lines = "".join(json.dumps(json_safe(r)) + "\n" for r in records)
    if not lines:
        return
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` file written by :func:`append_jsonl`.

    A torn last line (what a crash mid-append leaves: not valid JSON and not newline-terminated) is dropped
    with a :class:`RuntimeWarning` naming ``file:line``.

    Raises:
        ValueError: a line other than a torn last one is not a JSON object; the message names ``file:line``.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1  # no newline after it: the write did not finish
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if last:
                warnings.warn(f"{path}:{i + 1}: dropped a torn last line ({err})", RuntimeWarning, stacklevel=2)
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({err})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def rewrite_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the content of ``path`` with ``records`` atomically."""
    atomic_write_text(path, "".join(json.dumps(json_safe(r)) + "\n" for r in records))


def remove_stale_temp(folder: str | Path) -> list[Path]:
    """Delete the temp files (``.<name>.*.tmp``) that an interrupted atomic write left in ``folder``.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(".*.tmp") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
