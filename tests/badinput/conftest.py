"""Fixtures of the bad-input suite: small tmpfs mounts (a full disk, a read-only folder) when root, a trained
tiny run and an exported tiny dataset shared by the module's cases."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(target: Path, *options: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)],
                          capture_output=True, check=False)
    return done.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only, where ``mount`` works; skipped otherwise): fill it to get ENOSPC."""
    target = tmp_path / "small_disk"
    if not _mount(target, "size=256k"):
        pytest.skip("a tmpfs mount needs root and a mount-capable container")
    try:
        yield target
    finally:
        _umount(target)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs holding ``existing.txt`` (root ignores file modes, so a read-only mount is the test)."""
    target = tmp_path / "read_only"
    if not _mount(target, "size=1m"):
        pytest.skip("a tmpfs mount needs root and a mount-capable container")
    (target / "existing.txt").write_text("kept\n")
    done = subprocess.run(["mount", "-o", "remount,ro", str(target)], capture_output=True, check=False)
    if done.returncode != 0:
        _umount(target)
        pytest.skip("cannot remount read-only")
    try:
        yield target
    finally:
        _umount(target)


def fill(folder: Path, *, leave: int = 0) -> None:
    """Fill the file system of ``folder`` until at most ``leave`` bytes are free."""
    block = b"\0" * 4096
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                st = os.statvfs(folder)
                if st.f_bavail * st.f_frsize <= leave:
                    break
                f.write(block)
                f.flush()
        except OSError:
            pass


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETBALANCE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
