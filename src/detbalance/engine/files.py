"""The files the project writes: atomic writes, a manifest of its own files, JSON-lines logs, clear write errors.

A crash (``kill -9``, power loss) can happen at any byte, a disk can fill, and a user's own files can sit in
an output folder. What this module guarantees:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`write_json` leave either the old file or
  the new one (a temp file ``.<name>.detbalance-tmp-<pid>`` in the same folder, fsync, rename), never a torn
  one; an ``OSError`` becomes a :class:`WriteError` naming the file and the cause (no space left on device,
  read-only file system, permission denied), and the previous file is kept;
* :class:`OutputFolder` keeps ``.detbalance-manifest.json``, the names and sha256 of the files the project
  wrote there. It replaces or deletes only those: a file it did not write (or one changed since) is never
  touched; :meth:`OutputFolder.check` refuses up front with :class:`ForeignFilesError`, listing them;
* :func:`append_jsonl` appends whole lines and flushes, so only the *last* line of a ``.jsonl`` file can be
  torn; :func:`read_jsonl` (the one JSON-lines reader of the project) drops such a line with a warning naming
  ``file:line`` and raises, naming ``file:line``, on a bad line anywhere else;
* :func:`remove_stale_temp` deletes only the project's own temp files (``*.detbalance-tmp-<pid>`` of a
  process that is gone); a user's ``.notes.tmp`` is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "MANIFEST_NAME",
    "ForeignFilesError",
    "OutputFolder",
    "WriteError",
    "append_jsonl",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_sha256",
    "is_project_file",
    "json_safe",
    "read_jsonl",
    "remove_stale_temp",
    "rewrite_jsonl",
    "temp_path",
    "write_error",
    "write_json",
]

#: The manifest every output folder carries: the files the project wrote there, with their sha256.
MANIFEST_NAME = ".detbalance-manifest.json"
_LOCK_NAME = ".detbalance-manifest.lock"
_TEMP_MARK = ".detbalance-tmp-"
_TEMP_RE = re.compile(r"^\..+\.detbalance-tmp-(\d+)$")
_MANIFEST_FORMAT = "detbalance-manifest"

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a parent is not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large",
}


class WriteError(OSError):
    """A file could not be written. The message names the file and the cause; the previous file is kept."""

    def __str__(self) -> str:
        return str(self.strerror or super().__str__())


class ForeignFilesError(FileExistsError):
    """An output folder holds files the project did not write (or that changed since) where it would write.

    ``files`` lists them (paths relative to the folder). They are never replaced or deleted, with or without
    ``--overwrite``: move them away or choose another output folder.
    """

    def __init__(self, folder: str | Path, files: Iterable[str], *, what: str = "") -> None:
        self.folder = str(folder)
        self.files = sorted(files)
        shown = ", ".join(self.files[:10]) + (f" and {len(self.files) - 10} more" if len(self.files) > 10 else "")
        super().__init__(
            f"{self.folder!r} holds {len(self.files)} file(s) that detbalance did not write (or that changed since "
            f"it wrote them){' and ' + what + ' would replace' if what else ''}: {shown}; they are never replaced or "
            "deleted (--overwrite does not change that): move them away or choose another output folder"
        )


def write_error(path: str | Path, err: OSError) -> WriteError:
    """A :class:`WriteError` for ``err`` raised while writing ``path``: ``could not write NAME: CAUSE``."""
    if isinstance(err, WriteError):
        return err
    cause = _CAUSES.get(err.errno or 0) or (err.strerror or str(err) or type(err).__name__).lower()
    out = WriteError(err.errno or 0, f"could not write {str(path)!r}: {cause}")
    out.filename = str(path)
    return out


def json_safe(x: Any) -> Any:
    """``x`` with non-finite floats replaced by ``None`` (strict JSON has no NaN / inf)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def temp_path(path: str | Path) -> Path:
    """The temp file of an atomic write of ``path``: ``.<name>.detbalance-tmp-<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{_TEMP_MARK}{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def atomic_replace(
    path: str | Path,
    write: Callable[[IO[bytes]], None],
    *,
    durable: bool = True,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``path`` atomically through ``write(file)`` (temp file, fsync, rename, fsync of the folder).

    ``durable=False`` skips the two fsyncs (still atomic: a crash leaves the old file or the new one, but a
    power loss may lose the newest writes): for bulk writes such as ``make-data``'s images.
    ``before_replace(temp_path)`` runs after the temp file is complete and before the rename (the manifest
    learns the new file's hash there, so a ``kill -9`` at any point leaves a file the manifest accepts).

    Raises:
        WriteError: on any ``OSError`` (the file and the cause named; the previous ``path`` is kept).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_replace`)."""
    return atomic_replace(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_replace`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_text(obj: Any, indent: int | None) -> str:
    return json.dumps(json_safe(obj), indent=indent) + "\n"


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as strict JSON (non-finite floats become ``null``), written atomically."""
    return atomic_write_text(path, _json_text(obj, indent))


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append one strict-JSON line per record and flush (a crash can tear only the last line).

    Raises:
        WriteError: naming the file and the cause (a torn last line is what a full disk can leave).
    """
    lines = "".join(json.dumps(json_safe(r)) + "\n" for r in records)
    if not lines:
        return
    try:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
    except OSError as err:
        raise write_error(path, err) from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` file written by :func:`append_jsonl` (the project's one JSON-lines reader).

    Blank lines are skipped. A torn last line (what a crash mid-append leaves: not valid JSON and not
    newline-terminated) is dropped with a :class:`RuntimeWarning` naming ``file:line``.

    Raises:
        FileNotFoundError: ``path`` is missing.
        ValueError: a line other than a torn last one is not a JSON object; the message names ``file:line``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
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


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call of this process that was interrupted
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temp(folder: str | Path) -> list[Path]:
    """Delete the project's temp files (``.<name>.detbalance-tmp-<pid>``) of processes that are gone.

    Only that name pattern is touched: a user's ``.notes.tmp`` or another program's temp file is left alone.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for p in sorted(folder.iterdir()):
        m = _TEMP_RE.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            stale.append(p)
    return stale


def file_sha256(path: str | Path, *, size: int | None = None) -> str:
    """The sha256 (hex) of the file's bytes, or of its first ``size`` bytes."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def is_project_file(name: str) -> bool:
    """The manifest, its lock and the project's temp files: never counted as a user's file."""
    return name in (MANIFEST_NAME, _LOCK_NAME) or _TEMP_RE.match(name) is not None


class OutputFolder:
    """A folder the project writes into, and the manifest (``.detbalance-manifest.json``) of what it wrote.

    Every write goes through :meth:`write_bytes` (or the text / JSON / figure forms, or :meth:`record` for a
    file written by another writer such as ``torch.save``): the file is written atomically and its name and
    sha256 are added to the manifest. A file that exists but is not in the manifest, or whose content no longer
    matches it, belongs to the user: it is never replaced or deleted (:class:`ForeignFilesError`).

    An append-only file (a ``.jsonl`` log) is recorded with ``append=True``: it stays ours while its first
    ``size`` bytes match the recorded hash (a crash may have appended lines since).

    Manifest updates are serialised across processes by an ``flock`` on ``.detbalance-manifest.lock``, so two
    processes (two ``compare`` workers on one output) can write into one folder.

    Args:
        root: The folder (created on the first write).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._txn: dict[str, dict[str, Any]] | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    # --- the manifest ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, dict[str, Any]]:
        """``{relative name: {"sha256", "size", "append"}}`` (empty without a manifest).

        Raises:
            ValueError: the manifest is not one the project wrote (named).
        """
        path = self.manifest_path
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a detbalance manifest ({err})") from None
        if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
            raise ValueError(f"{path}: not a detbalance manifest (no format tag {_MANIFEST_FORMAT!r})")
        return data["files"]

    def _save_manifest(self, files: dict[str, dict[str, Any]]) -> None:
        text = json.dumps({"format": _MANIFEST_FORMAT, "version": 1, "files": dict(sorted(files.items()))}, indent=1)
        atomic_write_text(self.manifest_path, text + "\n")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[OutputFolder]:
        """Many writes under one lock and one manifest update (``make-data``'s thousands of images)."""
        if self._txn is not None:
            yield self
            return
        with self._locked():
            self._txn = self.manifest()
            try:
                yield self
            finally:
                files, self._txn = self._txn, None
                try:
                    self._save_manifest(files)
                except OSError as err:
                    raise write_error(self.manifest_path, err) from None

    def _files(self) -> dict[str, dict[str, Any]]:
        return self._txn if self._txn is not None else self.manifest()

    def _commit(self, files: dict[str, dict[str, Any]]) -> None:
        if self._txn is not None:
            return  # saved when the transaction ends
        try:
            self._save_manifest(files)
        except OSError as err:
            raise write_error(self.manifest_path, err) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._txn is not None:  # the transaction holds the lock
            yield
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(self.root / _LOCK_NAME, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _is_ours(self, name: str, entry: dict[str, Any] | None) -> bool:
        path = self.root / name
        if not path.exists():
            return True
        if entry is None or not path.is_file():
            return False
        size = path.stat().st_size
        # a write in flight (or killed) between the manifest update and the rename: the previous file is ours too
        for sha, n in ((entry["sha256"], entry["size"]), (entry.get("previous"), entry.get("previous_size"))):
            if sha is None:
                continue
            n = int(n)
            if entry.get("append"):
                if size >= n and file_sha256(path, size=n) == sha:
                    return True
            elif size == n and file_sha256(path) == sha:
                return True
        return False

    def foreign(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` (relative paths) that exist and are not the project's (see the class)."""
        files = self._files()
        return sorted(n for n in set(names) if not self._is_ours(n, files.get(n)))

    def owned(self) -> list[str]:
        """The files of the manifest that exist and are still as the project wrote them."""
        files = self._files()
        return sorted(n for n, e in files.items() if (self.root / n).is_file() and self._is_ours(n, e))

    def check(self, names: Iterable[str], *, what: str = "") -> None:
        """Refuse, before any work, to write ``names`` where a file of the user's is.

        Raises:
            ForeignFilesError: listing the files of ``names`` that exist and are not the project's.
        """
        bad = self.foreign(names)
        if bad:
            raise ForeignFilesError(self.root, bad, what=what)

    def check_all(self, *, pattern: str = "*", what: str = "") -> None:
        """:meth:`check` every file directly in the folder (and its subfolders) matching ``pattern``."""
        if not self.root.is_dir():
            return
        names = [
            str(p.relative_to(self.root)) for p in self.root.rglob(pattern)
            if p.is_file() and not is_project_file(p.name)
        ]
        self.check(names, what=what)

    # --- writing ---------------------------------------------------------------------------------
    def _write(self, name: str, write: Callable[[IO[bytes]], None], *, append: bool = False,
               durable: bool = True) -> Path:
        """Check, write atomically, record: the new hash enters the manifest (beside the previous one) before the
        rename, and the previous one leaves after it, so the file on disk always matches the manifest."""
        path = self.root / name
        with self._locked():
            files = self._files()
            old = files.get(name)
            if not self._is_ours(name, old):
                raise ForeignFilesError(self.root, [name], what="this write")

            def before_replace(tmp: Path) -> None:
                entry = {"sha256": file_sha256(tmp), "size": tmp.stat().st_size, "append": append}
                if old is not None and path.exists():
                    entry.update(previous=old["sha256"], previous_size=old["size"])
                files[name] = entry
                self._commit(files)

            atomic_replace(path, write, durable=durable, before_replace=before_replace)
            files[name] = {k: v for k, v in files[name].items() if not k.startswith("previous")}
            self._commit(files)
        return path

    def write_bytes(self, name: str, data: bytes, *, append: bool = False, durable: bool = True) -> Path:
        """Write ``data`` to ``root/name`` atomically and record it (a user's file there is refused)."""
        return self._write(name, lambda f: f.write(data), append=append, durable=durable)

    def write_text(self, name: str, text: str, *, append: bool = False) -> Path:
        """:meth:`write_bytes` of ``text`` in UTF-8."""
        return self.write_bytes(name, text.encode("utf-8"), append=append)

    def write_json(self, name: str, obj: Any, *, indent: int | None = 2) -> Path:
        """:meth:`write_text` of ``obj`` as strict JSON."""
        return self.write_text(name, _json_text(obj, indent))

    def write_with(self, name: str, write: Callable[[IO[bytes]], None]) -> Path:
        """Write ``root/name`` atomically through ``write(file)`` (e.g. ``fig.savefig``, ``torch.save``) and
        record it."""
        return self._write(name, write)

    def write_figure(self, name: str, fig: Any, *, dpi: int = 110) -> Path:
        """Save the matplotlib ``fig`` as PNG to ``root/name`` atomically and record it."""
        return self.write_with(name, lambda f: fig.savefig(f, dpi=dpi, format="png"))

    def record(self, name: str, *, append: bool = False) -> None:
        """Record ``root/name``, just written by the project through another writer, in the manifest."""
        path = self.root / name
        with self._locked():
            files = self._files()
            try:
                files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size, "append": append}
            except OSError as err:
                raise write_error(path, err) from None
            self._commit(files)

    def remove(self, name: str) -> None:
        """Delete ``root/name`` if it is the project's (a user's file is refused, a missing one ignored)."""
        with self._locked():
            files = self._files()
            if not self._is_ours(name, files.get(name)):
                raise ForeignFilesError(self.root, [name], what="this deletion")
            try:
                (self.root / name).unlink(missing_ok=True)
            except OSError as err:
                raise write_error(self.root / name, err) from None
            files.pop(name, None)
            self._commit(files)

    def adopt(self, names: Iterable[str], *, append: Iterable[str] = ()) -> None:
        """Record existing files as the project's without writing them: only for files whose content proves
        they are (a checkpoint that loads, the logs beside it), or in a one-time migration."""
        append = set(append)
        with self._locked():
            files = self._files()
            for name in names:
                path = self.root / name
                if path.is_file() and name not in files:
                    files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size, "append": name in append}
            self._commit(files)
