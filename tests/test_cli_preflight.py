"""Argument errors come before torch is imported: each is one line naming the flag, raised in a fresh
interpreter in which ``torch`` is still absent from ``sys.modules``; a failed command leaves no folder behind.

No test here measures time: the import-free path is what makes an argument error instant.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detbalance._preflight import (
    BENCHMARK_PRESETS,
    BUILTIN_ONLY_SUITES,
    EARLIER_REGIME_SUITES,
    RUN_FILES,
    SUITE_NAMES,
    check_data_spec,
)
from detbalance.cli import main

# Runs each argv of a JSON list through main() in this fresh interpreter; reports rc, stderr and whether
# torch (or torchvision) has been imported by then.
_PROBE = r"""
import contextlib, io, json, sys
from detbalance.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    out.append({"rc": rc, "err": err.getvalue(), "torch": "torch" in sys.modules or "torchvision" in sys.modules})
print(json.dumps(out))
"""


def _probe(cases: list[list[str]], cwd: Path) -> list[dict]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True, cwd=cwd,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, check=True,
    )
    return json.loads(proc.stdout)


def test_argument_errors_come_before_torch_is_imported(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "cfg.toml").write_text("[engine]\niterationz = 3\n")
    out = tmp_path / "new" / "out"  # no case may create it
    o = ["--output", str(out)]
    cases = {
        # compare
        "--val needs --data": ["compare", "--val", "v", *o],
        "--data needs --val": ["compare", "--data", "d", *o],
        "--seeds must be >= 1, got 0": ["compare", "--seeds", "0", *o],
        "--iters must be >= 1, got 0": ["compare", "--iters", "0", *o],
        "--batch-size must be >= 1, got 0": ["compare", "--batch-size", "0", *o],
        "--data-seed must be >= 0, got -1": ["compare", "--data-seed", "-1", *o],
        "--device must be auto, cpu, cuda or cuda:N, got 'gpu'": ["compare", "--device", "gpu", *o],
        "--suite must be one of losses, samplers, samplers_pool128, ssd, classes, noise, longtail, all": ["compare", "--suite", "lossez", *o],
        "--suite noise needs the built-in benchmark": ["compare", "--suite", "noise", "--data",
                                                       str(tmp_path / "empty"), "--val", "v", *o],
        "--preset picks a built-in benchmark; it cannot go with --data": ["compare", "--data", "d", "--val", "v",
                                                                          "--preset", "tiny", *o],
        f"--data {str(tmp_path / 'nope')!r}: no such file or folder": ["compare", "--data", str(tmp_path / "nope"),
                                                                        "--val", "v", *o],
        f"--val {str(tmp_path / 'empty')!r}: the folder holds neither test.json nor annotations.json": [
            "compare", "--data", "builtin:tiny", "--val", str(tmp_path / "empty"), *o],
        "argument --preset: invalid choice: 'huge'": ["compare", "--preset", "huge", *o],
        "--threads must be >= 1, got 0": ["compare", "--threads", "0", *o],
        f"--output {str(tmp_path / 'notes.txt' / 'x')!r}: {str(tmp_path / 'notes.txt')!r} is a file": [
            "compare", "--output", str(tmp_path / "notes.txt" / "x")],
        # train
        "--data 'builtin:huge': unknown built-in preset 'huge'; the presets are default, balanced, noisy, crowded":
            ["train", "--data", "builtin:huge", *o],
        f"--data {str(tmp_path / 'notes.txt')!r} is not a COCO .json file": ["train", "--data",
                                                                             str(tmp_path / "notes.txt"), *o],
        "data.val 'nowhere': no such file or folder": ["train", "--set", "data.val=nowhere", *o],
        "data.train_images 'nofolder': no such folder": ["train", "--data", str(tmp_path / "notes.json"),
                                                          "--set", "data.train_images=nofolder", *o],
        "engine.iterationz: unknown key": ["train", "--config", str(tmp_path / "cfg.toml"), *o],
        f"--config {str(tmp_path / 'none.toml')!r}: not found": ["train", "--config", str(tmp_path / "none.toml"), *o],
        "--resume needs --output": ["train", "--resume"],
        f"--resume: --output {str(out)!r} holds no run (no config.toml)": ["train", "--resume", *o],
        "engine.iterations: must be >= 1": ["train", "--set", "engine.iterations=0", *o],
        # make-data, eval, profile, plot
        "argument --preset: invalid choice: 'crowdy'": ["make-data", "--preset", "crowdy", *o],
        "--seed must be >= 0, got -2": ["make-data", "--seed", "-2", *o],
        f"--checkpoint {str(tmp_path / 'c.pt')!r}: not found": ["eval", "--checkpoint", str(tmp_path / "c.pt")],
        f"--checkpoint {str(tmp_path / 'empty')!r}: is a folder": ["eval", "--checkpoint", str(tmp_path / "empty")],
        "--num-images must be >= 1, got 0": ["profile", "--data", "builtin:tiny", "--num-images", "0", *o],
        f"run folder {str(tmp_path / 'nope')!r} not found": ["plot", str(tmp_path / "nope")],
    }
    results = _probe(list(cases.values()), tmp_path)
    for (expected, argv), r in zip(cases.items(), results, strict=True):
        lines = r["err"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("detbalance: error: "), (argv, r["err"])
        assert expected in lines[0], (argv, lines[0])
        assert r["rc"] in (1, 2), (argv, r)
        assert not r["torch"], f"torch was imported before the error of {argv}"
    assert not (tmp_path / "new").exists()


def test_help_lists_the_presets_and_suites_that_exist(capsys: pytest.CaptureFixture) -> None:
    from detbalance.compare import SUITES
    from detbalance.data import PRESETS

    for command in ("make-data", "compare"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in PRESETS), text
    assert "--seeds SEEDS number of seeds, >= 1" in text
    assert "6000 for every suite: the longest budget measured, not a plateau" in text
    assert "plateau)" not in text.replace("not a plateau)", "")
    assert all(name in text for name in SUITES)


def test_the_catalogue_matches_the_packages() -> None:
    from detbalance.compare import SUITES
    from detbalance.data import PRESETS
    from detbalance.engine import run

    assert BENCHMARK_PRESETS == tuple(PRESETS)
    assert SUITE_NAMES == tuple(SUITES)
    assert BUILTIN_ONLY_SUITES == {n for n, s in SUITES.items() if s.builtin_only}
    from detbalance._preflight import SUITE_FAMILIES

    assert SUITE_FAMILIES == {n: s.families for n, s in SUITES.items()}
    assert EARLIER_REGIME_SUITES == {n for n, s in SUITES.items() if s.regime_of}
    assert run.RUN_FILES is RUN_FILES


def test_check_data_spec_rejects_what_open_dataset_rejects(tmp_path: Path) -> None:
    from detbalance.data import open_dataset

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for spec in ("builtin:nope", str(tmp_path / "missing"), str(tmp_path / "empty"), str(tmp_path / "notes.txt")):
        with pytest.raises(ValueError):
            open_dataset(spec, split="test")
        with pytest.raises(ValueError, match="--flag"):
            check_data_spec(spec, flag="--flag", split="test")
    for spec in ("builtin", "builtin:tiny"):
        assert len(open_dataset(spec, split="test")) > 0
        check_data_spec(spec, flag="--flag", split="test")


def test_a_failed_compare_removes_the_empty_output_folder_it_created(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "annotations.json").write_text("{not json")
    out = tmp_path / "a" / "b"
    assert main(["compare", "--data", str(data), "--val", str(data), "--iters", "50", "--output", str(out),
                 "--no-progress"]) == 1
    assert "invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # a folder that existed before, or that holds anything, stays
    out.mkdir(parents=True)
    assert main(["compare", "--data", str(data), "--val", str(data), "--iters", "50", "--output", str(out),
                 "--no-progress"]) == 1
    assert out.is_dir()
