"""Every run folder committed under docs/ is a finished run: an unfinished one (config and metrics without a
checkpoint, which is never committed) would make a fresh clone refuse to resume that run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_committed_run_folders_are_finished():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "docs"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tracked = set(files.split())
    folders = {str(Path(f).parent) for f in tracked if "/runs/" in f and Path(f).name in ("config.toml", "metrics.jsonl")}
    unfinished = sorted(d for d in folders if f"{d}/result.json" not in tracked)
    assert not unfinished, f"run folders committed without result.json (still training when committed): {unfinished}"


def test_committed_runs_keep_their_keys():
    """A committed run's folder key is still the key of its config: rerunning the study command finds its runs
    (a config key added later must be listed in compare.runs.KEYS_ADDED_LATER with its default)."""
    import json

    from detbalance.compare.runs import run_key
    from detbalance.config import load_toml

    results = sorted((ROOT / "docs").glob("**/runs/*/*/*/seed*/result.json"))
    if not results:
        pytest.skip("no committed runs")
    moved = []
    for path in results:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if "twin_of" in saved:
            continue
        key = run_key(load_toml(saved["config"]))
        if key != path.parent.parent.name:
            moved.append(f"{path.parent.relative_to(ROOT)} -> {key}")
    assert not moved, f"committed runs whose settings key changed: {moved[:5]} ({len(moved)} in all)"
