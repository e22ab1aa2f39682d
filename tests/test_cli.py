"""The command line, called in-process: train / eval / make-data on builtin:tiny, wiring, one-line errors."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from detbalance import __version__
from detbalance.cli import main
from detbalance.config import load_config

TINY = ["--set", "engine.iterations=2", "--set", "engine.batch_size=4", "--set", "engine.device=cpu",
        "--set", "model.norm=gn", "--no-progress", "--threads", "1"]


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("detbalance: error: ")
    return err


def test_version_and_help(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"detbalance {__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "make-data", "compare", "profile", "plot"):
        assert command in out
    assert main(["frobnicate"]) == 2


def test_train_then_eval_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", "builtin:tiny", *TINY, "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "AP " in out and f"run folder: {run}" in out
    cfg = load_config(run / "config.toml")
    assert cfg.data.train == "builtin:tiny" and cfg.engine.iterations == 2 and cfg.model.norm == "gn"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in lines] == [("train", 2), ("eval", 2)]  # log_interval 10: the last step
    assert (run / "plots" / "loss_curves.png").is_file()  # plot_run ran at the end

    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["per_class"] == lines[-1]["metrics"]["per_class"]  # same model, same test split
    assert metrics["AP"] == lines[-1]["metrics"]["AP"]

    # resuming a finished run does nothing and says so (no duplicate eval record, no "nan images/s")
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--output", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"the run in '{run}' had already finished (step 2); nothing was done" in out and "nan train images/s" not in out
    assert (run / "metrics.jsonl").read_text() == before


def test_train_on_one_coco_file_reports_no_held_out_ap_and_eval_needs_data(
    tmp_path: Path, coco_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    ann = coco_dir / "annotations.json"
    run = tmp_path / "run"
    assert main(["train", "--data", str(ann), *TINY, "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "AP50" not in out and "note: no held-out data" in out
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt")]) == 1
    assert "--data is needed: the run has no held-out data" in _error_line(capsys)
    # on request, the training images: labelled as such
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(ann),
                 "--output", str(tmp_path / "m.json")]) == 0
    assert "TRAINING-SET AP" in capsys.readouterr().out
    held = json.loads((tmp_path / "m.json").read_text())["held_out"]  # the check, by content
    assert (held["checked_by"], held["overlap"], held["of"]) == ("content", 16, 16)
    # a test set whose category ids are in another order is refused, naming the first mismatch
    data = json.loads(ann.read_text())
    first, second = data["categories"][0]["name"], data["categories"][1]["name"]
    data["categories"][0]["name"], data["categories"][1]["name"] = second, first
    swapped = coco_dir / "swapped.json"
    swapped.write_text(json.dumps(data))
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(swapped)]) == 1
    line = _error_line(capsys)
    assert f"label 1 is '{second}' (category id 1) in --data '{swapped}' but '{first}' (category id 1)" in line


def test_train_output_never_replaces_user_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "config.toml"
    mine.write_text("# my notes\n[engine]\niterations = 2\n")
    args = ["train", "--config", str(mine), *TINY, "--output", str(out)]
    assert main(args) == 1
    assert "would replace" in _error_line(capsys)
    assert main([*args, "--overwrite"]) == 1  # not even with --overwrite: it is the file passed in
    assert "would replace" in _error_line(capsys)
    assert mine.read_text() == "# my notes\n[engine]\niterations = 2\n"
    (tmp_path / "metrics.jsonl").write_text("x")
    assert main(["train", *TINY, "--output", str(tmp_path)]) == 1
    assert "holds files but no run: metrics.jsonl, out" in _error_line(capsys)
    assert (tmp_path / "metrics.jsonl").read_text() == "x"


def test_make_data_then_train_on_the_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["make-data", "--preset", "tiny", "--output", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert f"train: {tmp_path / 'd' / 'train' / 'annotations.json'}" in out
    ann = json.loads((tmp_path / "d" / "test" / "annotations.json").read_text())
    assert len(ann["images"]) == 16 and len(list((tmp_path / "d" / "test" / "images").iterdir())) == 16
    args = ["train", "--data", str(tmp_path / "d" / "train"), "--set", f'data.val="{tmp_path / "d" / "test"}"']
    assert main([*args, *TINY, "--set", "engine.iterations=1", "--output", str(tmp_path / "r")]) == 0


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detbalance.data import make_benchmark, write_coco

    root = tmp_path_factory.mktemp("coco")
    write_coco(make_benchmark("tiny", split="test"), root)
    return root


def test_corrupt_json(tmp_path: Path, coco_dir: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text((coco_dir / "annotations.json").read_text()[:-40])
    assert main(["train", "--data", str(bad), *TINY, "--output", str(tmp_path / "r")]) == 1
    line = _error_line(capsys)
    assert str(bad) in line and "invalid JSON at line 1" in line
    assert not (tmp_path / "r").exists()  # the failed command removed the (empty) run folder it created


def test_box_with_x2_before_x1(tmp_path: Path, coco_dir: Path, capsys: pytest.CaptureFixture) -> None:
    data = json.loads((coco_dir / "annotations.json").read_text())
    x, y, w, h = data["annotations"][0]["bbox"]
    data["annotations"][0]["bbox"] = [x, y, -3.0, h]  # x2 = x - 3 < x1
    bad = coco_dir / "bad_box.json"
    bad.write_text(json.dumps(data))
    assert main(["train", "--data", str(bad), *TINY, "--output", str(tmp_path / "r")]) == 1
    line = _error_line(capsys)
    assert "annotation id=1 (annotations[0])" in line and "non-positive width or height (w=-3.0" in line


def test_missing_image(tmp_path: Path, coco_dir: Path, capsys: pytest.CaptureFixture) -> None:
    data = json.loads((coco_dir / "annotations.json").read_text())
    data["images"][3]["file_name"] = "gone.png"
    bad = coco_dir / "missing_image.json"
    bad.write_text(json.dumps(data))
    assert main(["train", "--data", str(bad), *TINY, "--output", str(tmp_path / "r")]) == 1
    line = _error_line(capsys)
    assert "image file not found" in line and "gone.png" in line


def test_unknown_set_key_and_debug(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", "--set", "engine.iterationz=3", "--output", str(tmp_path / "r")]
    assert main(args) == 1
    assert "engine.iterationz: unknown key; valid keys here: ['accumulate'," in _error_line(capsys)
    assert main(["--debug", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert main(["train", "--resume"]) == 1
    assert "--resume needs --output" in _error_line(capsys)
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "none.pt': not found" in _error_line(capsys)


def test_compare_profile_plot_wiring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls: dict[str, dict] = {}
    compare = types.ModuleType("detbalance.compare")
    compare.run_compare = lambda **kw: calls.setdefault("compare", kw) and tmp_path / "report.md"
    compare.DEFAULT_ITERS = 700
    profile = types.ModuleType("detbalance.analysis.profile")
    profile.run_profile = lambda **kw: calls.setdefault("profile", kw) and tmp_path / "profile.md"
    plots = types.ModuleType("detbalance.analysis.plots")
    plots.plot_run = lambda run_dir: calls.setdefault("plot", {"run_dir": run_dir}) and [Path(run_dir) / "a.png"]
    monkeypatch.setitem(sys.modules, "detbalance.compare", compare)
    monkeypatch.setitem(sys.modules, "detbalance.analysis.profile", profile)
    monkeypatch.setitem(sys.modules, "detbalance.analysis.plots", plots)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["compare", "--suite", "samplers", "--iters", "5", "--seeds", "2", "--output", str(tmp_path)]) == 0
    # no --threads: the cores the load leaves free, said with the reason
    assert re.search(r"^threads: \d+ \(load average [\d.]+ on \d+ cores: about [\d.]+ free; --threads N sets it\)$",
                     capsys.readouterr().out, flags=re.M)
    assert calls["compare"] == {
        "suite": "samplers", "preset": None, "iters": 5, "budget": "short", "seeds": 2, "output": tmp_path,
        "batch_size": 16, "device": "auto", "progress": True,
        "command": f"detbalance compare --suite samplers --iters 5 --seeds 2 --output {tmp_path}",
        "optim": None, "decay": "cosine", "data": None, "val": None, "data_seed": 0, "study": False,
        "finished_only": False, "amp": False, "workers": 0, "settings": None, "overrides": [], "epochs": None,
    }
    calls.clear()
    for split in ("train", "test"):
        (tmp_path / "d" / split).mkdir(parents=True)
        (tmp_path / "d" / split / "annotations.json").write_text("{}")
    train, test = str(tmp_path / "d" / "train"), str(tmp_path / "d" / "test")
    assert main(["compare", "--data", train, "--val", test, "--optim", "sgd", "--budget", "full",
                 "--data-seed", "3", "--study", "--finished-only", "--output", str(tmp_path)]) == 0
    kw = calls["compare"]
    assert (kw["suite"], kw["data"], kw["val"], kw["optim"], kw["budget"], kw["data_seed"], kw["study"],
            kw["finished_only"]) == (None, train, test, "sgd", "full", 3, True, True)
    assert main(["profile", "--data", "builtin:tiny", "--output", str(tmp_path), "--num-images", "3"]) == 0
    assert calls["profile"] == {"data": "builtin:tiny", "config": None, "checkpoint": None, "output": tmp_path,
                                "num_images": 3, "progress": True}
    assert main(["plot", str(tmp_path)]) == 0
    assert calls["plot"] == {"run_dir": tmp_path}
    assert f"plot: {tmp_path / 'a.png'}" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nope")]) == 1
    assert "not found" in _error_line(capsys)


def test_sigterm_and_sigint_end_with_the_command_that_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    import os
    import signal
    import time

    import detbalance.engine

    def terminate(**_: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the handler raises before this returns

    compare = types.ModuleType("detbalance.compare")
    compare.run_compare = terminate
    monkeypatch.setitem(sys.modules, "detbalance.compare", compare)
    out = tmp_path / "cmp dir"
    assert main(["compare", "--suite", "losses", "--iters", "5", "--output", str(out), "--threads", "1"]) == 143
    err = capsys.readouterr().err.strip()
    assert err == ("detbalance: interrupted by SIGTERM; finished runs are kept and the interrupted one resumes from "
                   f"its last checkpoint; resume with: detbalance compare --suite losses --iters 5 --output "
                   f"'{out}' --threads 1")
    assert signal.getsignal(signal.SIGTERM) is not None  # restored

    def train_then_stop(cfg, *, output, **_: object) -> None:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt  # Ctrl-C

    monkeypatch.setattr(detbalance.engine, "fit", train_then_stop)
    run = tmp_path / "run"
    assert main(["train", "--data", "builtin:tiny", "--output", str(run), "--threads", "1", "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == (
        f"detbalance: interrupted by SIGINT; resume with: detbalance train --output {run} --resume")
