"""Every CLI command against bad inputs and faults, in-process through ``detbalance.cli.main``.

A case is ``(id, make(ctx) -> argv, expected)`` where ``expected`` is ``("error", keywords)`` (exit status 1 and
one ``detbalance: error:`` line holding every keyword) or ``("ok", keywords)`` (exit status 0, keywords in the
output). ``ctx`` holds a finished tiny run, the tiny benchmark exported by ``make-data``, and a scratch folder.
The faults (a full disk, a read-only folder, ``kill -9`` then ``--resume``, two processes on one folder) follow
the table.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from detbalance.cli import main

from .conftest import fill
from .test_files import _png_bytes

TINY = ["--set", "engine.iterations=2", "--set", "engine.batch_size=4", "--set", "engine.device=cpu",
        "--set", "model.norm=gn", "--no-progress", "--threads", "1"]


@dataclass
class Ctx:
    run: Path  # a finished run on builtin:tiny (2 steps)
    data: Path  # make-data --preset tiny: data/train, data/test
    tmp: Path  # this case's scratch folder

    def file(self, name: str, content: bytes | str = b"") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def copy_run(self, name: str = "run") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.run, dst)
        return dst

    def copy_data(self, split: str, name: str | None = None) -> Path:
        dst = self.tmp / (name or split)
        shutil.copytree(self.data / split, dst)
        return dst

    def checkpoint_without(self, key: str) -> Path:
        state = torch.load(self.run / "checkpoint.pt", weights_only=True)
        del state[key]
        path = self.tmp / "partial.pt"
        torch.save(state, path)
        return path

    def two_class_data(self) -> Path:
        """The exported test split with only two categories (a checkpoint of five classes does not fit it)."""
        folder = self.copy_data("test", "two")
        ann = json.loads((folder / "annotations.json").read_text())
        ann["categories"] = ann["categories"][:2]
        keep = {c["id"] for c in ann["categories"]}
        ann["annotations"] = [a for a in ann["annotations"] if a["category_id"] in keep]
        (folder / "annotations.json").write_text(json.dumps(ann))
        return folder


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shared")
    assert main(["train", "--data", "builtin:tiny", *TINY, "--output", str(root / "run")]) == 0
    assert main(["make-data", "--preset", "tiny", "--output", str(root / "data")]) == 0
    return root / "run", root / "data"


@pytest.fixture
def ctx(shared: tuple[Path, Path], tmp_path: Path) -> Ctx:
    return Ctx(run=shared[0], data=shared[1], tmp=tmp_path)


def _user_file_in(folder: Path, name: str, text: str = "mine\n") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ the table

Case = tuple[str, Callable[[Ctx], list[str]], str, tuple[str, ...]]
ERR, OK = "error", "ok"

CASES: list[Case] = [
    # ---- train: arguments and config
    ("train-config-folder", lambda c: ["train", "--config", str(c.tmp), *TINY], ERR, ("--config", "is a folder")),
    ("train-config-missing", lambda c: ["train", "--config", str(c.tmp / "no.toml"), *TINY], ERR, ("not found",)),
    ("train-config-png", lambda c: ["train", "--config", str(c.file("x.toml", _png_bytes())), *TINY], ERR, ("x.toml",)),
    ("train-unknown-key", lambda c: ["train", "--set", "engine.iterationz=3", *TINY], ERR, ("iterationz",)),
    ("train-bad-type", lambda c: ["train", "--set", "engine.iterations=abc", *TINY], ERR, ("engine.iterations",)),
    ("train-zero-iterations", lambda c: ["train", "--set", "engine.iterations=0", *TINY], ERR, ("engine.iterations",)),
    ("train-data-missing", lambda c: ["train", "--data", str(c.tmp / "nowhere"), *TINY], ERR, ("--data", "nowhere")),
    ("train-data-preset", lambda c: ["train", "--data", "builtin:nope", *TINY], ERR, ("nope",)),
    ("train-data-not-json", lambda c: ["train", "--data", str(c.file("d.csv", "a,b")), *TINY], ERR, ("d.csv",)),
    ("train-val-missing", lambda c: ["train", "--data", "builtin:tiny", "--set", f"data.val={c.tmp / 'v'}", *TINY],
     ERR, ("data.val",)),
    ("train-threads-zero", lambda c: ["train", "--data", "builtin:tiny", *TINY, "--threads", "0"], ERR, ("--threads",)),
    ("train-resume-no-output", lambda c: ["train", "--resume", *TINY], ERR, ("--resume needs --output",)),
    ("train-resume-empty-folder", lambda c: ["train", "--resume", "--output", str(c.tmp), "--no-progress"], ERR,
     ("holds no run",)),
    ("train-output-is-file", lambda c: ["train", "--data", "builtin:tiny", *TINY, "--output", str(c.file("f"))], ERR,
     ("is a file",)),
    ("train-output-user-files", lambda c: ["train", "--data", "builtin:tiny", *TINY, "--output",
                                           str(_user_file_in(c.tmp / "o", "notes.txt").parent)], ERR,
     ("holds files but no run", "notes.txt")),
    # ---- train: checkpoints validated whole before work
    ("train-resume-without-optimizer", lambda c: _resume_with(c, c.checkpoint_without("optimizer")), ERR,
     ("lacks 'optimizer'", "checkpoint.pt")),
    ("train-resume-without-rng", lambda c: _resume_with(c, c.checkpoint_without("rng")), ERR, ("lacks 'rng'",)),
    ("train-resume-png", lambda c: _resume_with(c, c.file("p.pt", _png_bytes())), ERR, ("not a checkpoint (PNG image)",)),
    ("train-resume-empty", lambda c: _resume_with(c, c.file("e.pt")), ERR, ("empty file",)),
    ("train-resume-text", lambda c: _resume_with(c, c.file("t.pt", "hello")), ERR, ("not a checkpoint (a text file)",)),
    # ---- train: only its own files are replaced
    ("train-overwrite-user-plot", lambda c: _overwrite_with_user(c, "plots/loss_curves.png"), ERR,
     ("did not write", "plots/loss_curves.png")),
    ("train-overwrite-user-config", lambda c: _overwrite_with_user(c, "config.toml", fresh=True), ERR,
     ("did not write", "config.toml")),
    ("train-overwrite-edited-metrics", lambda c: _overwrite_with_user(c, "metrics.jsonl"), ERR,
     ("changed since", "metrics.jsonl")),
    ("train-overwrite-own-run", lambda c: ["train", "--data", "builtin:tiny", *TINY, "--overwrite",
                                           "--output", str(c.copy_run())], OK, ("run folder",)),
    # ---- train: held out by content
    ("train-val-is-train", lambda c: ["train", "--data", str(c.data / "train"), "--set",
                                      f"data.val={c.data / 'train'}", *TINY, "--output", str(c.tmp / "r")], OK,
     ("TRAINING-SET AP", "overlaps training: 64 of 64 images")),
    ("train-corrupt-val-image", lambda c: _corrupt_val(c), ERR, ("image id=4", "000003.png", "cannot decode")),
    # ---- eval
    ("eval-png", lambda c: ["eval", "--checkpoint", str(c.file("x.pt", _png_bytes()))], ERR,
     ("not a checkpoint (PNG image)",)),
    ("eval-empty", lambda c: ["eval", "--checkpoint", str(c.file("x.pt"))], ERR, ("empty file",)),
    ("eval-folder", lambda c: ["eval", "--checkpoint", str(c.tmp)], ERR, ("--checkpoint", "is a folder")),
    ("eval-missing", lambda c: ["eval", "--checkpoint", str(c.tmp / "no.pt")], ERR, ("not found",)),
    ("eval-without-model", lambda c: ["eval", "--checkpoint", str(c.checkpoint_without("model"))], ERR,
     ("lacks 'model'",)),
    ("eval-without-label-names", lambda c: ["eval", "--checkpoint", str(c.checkpoint_without("label_names"))], ERR,
     ("lacks 'label_names'",)),
    ("eval-exported-train-split", lambda c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--data",
                                             str(c.data / "train")], OK,
     ("TRAINING-SET AP", "overlaps training: 64 of 64 images")),
    ("eval-renamed-copy-of-train", lambda c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--data",
                                              str(c.copy_data("train", "elsewhere"))], OK, ("TRAINING-SET AP",)),
    ("eval-held-out", lambda c: _eval_json(c, c.data / "test"), OK, ("held_out=content/0/16",)),
    ("eval-held-out-overlap-json", lambda c: _eval_json(c, c.data / "train"), OK, ("held_out=content/64/64",)),
    ("eval-other-categories", lambda c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--data",
                                         str(c.two_class_data())], ERR, ("does not match",)),
    ("eval-output-user-file", lambda c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--output",
                                         str(c.file("m.json", "{}"))], ERR, ("did not write", "m.json")),
    ("eval-output-folder", lambda c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--output", str(c.tmp)],
     ERR, ("is a folder",)),
    ("eval-batch-zero", lambda c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--batch-size", "0"], ERR,
     ("--batch-size",)),
    ("eval-data-missing", lambda c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--data",
                                     str(c.tmp / "x")], ERR, ("--data",)),
    # ---- make-data
    ("make-data-user-annotations", lambda c: ["make-data", "--preset", "tiny", "--output",
                                              str(_user_file_in(c.tmp / "d", "train/annotations.json").parents[1])],
     ERR, ("did not write", "annotations.json")),
    ("make-data-user-image", lambda c: ["make-data", "--preset", "tiny", "--split", "test", "--output",
                                        str(_user_file_in(c.tmp / "d", "test/images/000000.png").parents[2])],
     ERR, ("did not write", "images/000000.png")),
    ("make-data-twice", lambda c: _twice(["make-data", "--preset", "tiny", "--split", "test", "--output",
                                          str(c.tmp / "d")]), OK, ("test:",)),
    ("make-data-preset", lambda c: ["make-data", "--preset", "nope", "--output", str(c.tmp / "d")], ERR, ("nope",)),
    ("make-data-seed", lambda c: ["make-data", "--preset", "tiny", "--seed", "-1", "--output", str(c.tmp / "d")],
     ERR, ("--seed",)),
    ("make-data-output-file", lambda c: ["make-data", "--preset", "tiny", "--output", str(c.file("f"))], ERR,
     ("is a file",)),
    # ---- compare
    ("compare-val-is-data", lambda c: _compare(c, c.data / "train", c.data / "train"), ERR,
     ("not held out", "64 of its 64 images", "e.g. image id=1")),
    ("compare-val-is-renamed-copy", lambda c: _compare(c, c.data / "train", c.copy_data("train", "copy")), ERR,
     ("not held out", "compared by content")),
    ("compare-user-report", lambda c: _compare(c, c.data / "train", c.data / "test",
                                               _user_file_in(c.tmp / "out", "report.md").parent), ERR,
     ("did not write", "report.md")),
    ("compare-user-results", lambda c: _compare(c, c.data / "train", c.data / "test",
                                                _user_file_in(c.tmp / "out", "results.json").parent), ERR,
     ("did not write", "results.json")),
    ("compare-user-png", lambda c: _compare(c, c.data / "train", c.data / "test",
                                            _user_file_in(c.tmp / "out", "losses_ap.png").parent), ERR,
     ("did not write", "losses_ap.png")),
    ("compare-study-user-readme", lambda c: _compare(c, c.data / "train", c.data / "test",
                                                     _user_file_in(c.tmp / "out", "README.md").parent, "--study"),
     ERR, ("did not write", "README.md")),
    ("compare-data-without-val", lambda c: ["compare", "--data", str(c.data / "train")], ERR, ("--val",)),
    ("compare-suite", lambda c: ["compare", "--suite", "nope"], ERR, ("--suite",)),
    ("compare-seeds", lambda c: ["compare", "--seeds", "0"], ERR, ("--seeds",)),
    ("compare-device", lambda c: ["compare", "--device", "tpu"], ERR, ("--device",)),
    ("compare-output-file", lambda c: ["compare", "--output", str(c.file("f"))], ERR, ("is a file",)),
    # ---- profile
    ("profile-other-categories", lambda c: ["profile", "--data", str(c.two_class_data()), "--checkpoint",
                                            str(c.run / "checkpoint.pt"), "--output", str(c.tmp / "p"),
                                            "--num-images", "4", "--no-progress"], ERR, ("does not match",)),
    ("profile-png-checkpoint", lambda c: ["profile", "--data", "builtin:tiny", "--checkpoint",
                                          str(c.file("x.pt", _png_bytes())), "--output", str(c.tmp / "p")], ERR,
     ("not a checkpoint (PNG image)",)),
    ("profile-checkpoint-without-model", lambda c: ["profile", "--data", "builtin:tiny", "--checkpoint",
                                                    str(c.checkpoint_without("model")), "--output", str(c.tmp / "p")],
     ERR, ("lacks 'model'",)),
    ("profile-config-folder", lambda c: ["profile", "--data", "builtin:tiny", "--config", str(c.tmp), "--output",
                                         str(c.tmp / "p")], ERR, ("--config", "is a folder")),
    ("profile-user-report", lambda c: ["profile", "--data", "builtin:tiny", "--no-progress", "--output",
                                       str(_user_file_in(c.tmp / "p", "profile.md").parent)], ERR,
     ("did not write", "profile.md")),
    ("profile-user-png", lambda c: ["profile", "--data", "builtin:tiny", "--no-progress", "--output",
                                    str(_user_file_in(c.tmp / "p", "class_frequency.png").parent)], ERR,
     ("did not write", "class_frequency.png")),
    ("profile-training-images", lambda c: _profile_json(c, c.data / "train"), OK,
     ("held_out=content/64", "TRAINING-SET AP")),
    ("profile-num-images", lambda c: ["profile", "--data", "builtin:tiny", "--num-images", "0", "--output",
                                      str(c.tmp / "p")], ERR, ("--num-images",)),
    # ---- plot
    ("plot-user-png", lambda c: ["plot", str(_with_user_plot(c))], ERR, ("did not write", "plots/loss_curves.png")),
    ("plot-missing", lambda c: ["plot", str(c.tmp / "none")], ERR, ("not found",)),
    ("plot-torn-last-line", lambda c: ["plot", str(_torn(c))], OK, ("plot:",)),
    ("plot-bad-middle-line", lambda c: ["plot", str(_bad_middle(c))], ERR, ("metrics.jsonl:1", "not a JSON line")),
    ("plot-nothing", lambda c: ["plot", str(c.tmp)], ERR, ("nothing to plot",)),
    ("plot-own-run-twice", lambda c: _twice(["plot", str(c.copy_run())]), OK, ("loss_curves.png",)),
]


def _resume_with(c: Ctx, checkpoint: Path) -> list[str]:
    run = c.copy_run()
    shutil.copyfile(checkpoint, run / "checkpoint.pt")
    (run / ".detbalance-manifest.json").unlink()  # as if from before manifests: adopted only if it loads
    cfg = (run / "config.toml").read_text().replace("iterations = 2", "iterations = 4")
    (run / "config.toml").write_text(cfg)
    return ["train", "--resume", "--output", str(run), "--no-progress", "--set", "engine.iterations=4"]


def _overwrite_with_user(c: Ctx, name: str, fresh: bool = False) -> list[str]:
    run = c.copy_run()
    if fresh:  # the run's config.toml was replaced by the user's own since the run wrote it
        (run / name).unlink()
    if name.endswith(".jsonl"):
        with open(run / name, "r+") as f:
            f.write("X")  # an edit inside the recorded part
    else:
        _user_file_in(run, name)
    return ["train", "--data", "builtin:tiny", *TINY, "--overwrite", "--output", str(run)]


def _corrupt_val(c: Ctx) -> list[str]:
    val = c.copy_data("test", "val")
    (val / "images" / "000003.png").write_bytes(b"not a png")
    return ["train", "--data", "builtin:tiny", "--set", f"data.val={val}", *TINY, "--output", str(c.tmp / "r")]


def _eval_json(c: Ctx, data: Path) -> list[str]:
    out = c.tmp / "m.json"
    assert main(["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--data", str(data), "--output", str(out)]) == 0
    h = json.loads(out.read_text())["held_out"]
    print(f"held_out={h['checked_by']}/{h['overlap']}/{h['of']}")
    return ["--version"]


def _profile_json(c: Ctx, data: Path) -> list[str]:
    out = c.tmp / "p"
    assert main(["profile", "--data", str(data), "--checkpoint", str(c.run / "checkpoint.pt"), "--output", str(out),
                 "--num-images", "4", "--no-progress"]) == 0
    result = json.loads((out / "profile.json").read_text())
    h = result["held_out"]
    print(f"held_out={h['checked_by']}/{h['overlap']}/{h['of']}", *result["notes"])
    return ["--version"]


def _compare(c: Ctx, data: Path, val: Path, output: Path | None = None, *extra: str) -> list[str]:
    return ["compare", "--data", str(data), "--val", str(val), "--suite", "losses", "--iters", "100", "--batch-size",
            "4", "--device", "cpu", "--no-progress", "--output", str(output or c.tmp / "out"), *extra]


def _twice(argv: list[str]) -> list[str]:
    assert main(argv) == 0
    return argv


def _with_user_plot(c: Ctx) -> Path:
    run = c.copy_run()
    (run / "plots" / "loss_curves.png").write_bytes(_png_bytes())  # the user's own figure of that name
    return run


def _torn(c: Ctx) -> Path:
    run = c.copy_run()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    return run


def _bad_middle(c: Ctx) -> Path:
    run = c.copy_run()
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("garbage\n" + text)
    return run


@pytest.mark.parametrize(("name", "make", "outcome", "keywords"), CASES, ids=[c[0] for c in CASES])
def test_cli_case(ctx: Ctx, capsys: pytest.CaptureFixture, name: str, make: Callable[[Ctx], list[str]],
                  outcome: str, keywords: tuple[str, ...]) -> None:
    argv = make(ctx)
    before = capsys.readouterr().out  # what the setup printed (kept for the "ok" keywords)
    rc = main(argv)
    captured = capsys.readouterr()
    if outcome == ERR:
        err = captured.err.strip().splitlines()
        assert rc in (1, 2), (rc, captured.out, captured.err)  # 2: a usage error argparse reports
        assert len(err) == 1 and err[0].startswith("detbalance: error: "), captured.err
        for k in keywords:
            assert k in err[0], (k, err[0])
    else:
        assert rc == 0, captured.err
        out = before + captured.out
        for k in keywords:
            assert k in out, (k, out)


def test_a_refused_write_leaves_the_users_files_as_they_were(ctx: Ctx) -> None:
    out = ctx.tmp / "out"
    mine = {n: _user_file_in(out, n, f"my {n}\n") for n in ("report.md", "report.html", "README.md", "results.json")}
    assert main(_compare(ctx, ctx.data / "train", ctx.data / "test", out, "--study")) == 1
    assert all(p.read_text() == f"my {n}\n" for n, p in mine.items())
    assert not (out / "runs").exists()  # refused before training anything


def test_a_user_hidden_temp_file_survives_a_run(ctx: Ctx) -> None:
    """The issue's case: train deleted the user's hidden G/.notes.tmp as "a stale temp file"."""
    run = ctx.copy_run()
    notes = _user_file_in(run, ".notes.tmp", "my notes\n")
    assert main(["train", "--data", "builtin:tiny", *TINY, "--overwrite", "--output", str(run)]) == 0
    assert notes.read_text() == "my notes\n"


def test_train_records_the_held_out_check(ctx: Ctx) -> None:
    out = ctx.tmp / "r"
    assert main(["train", "--data", str(ctx.data / "train"), "--set", f"data.val={ctx.data / 'test'}", *TINY,
                 "--output", str(out)]) == 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["held_out"] == {"checked_by": "content", "overlap": 0, "of": 16}


def test_the_readme_study_command_does_not_refuse_docs_study() -> None:
    """README's study command writes into docs/study: its committed files are the project's (its manifest).

    A file under docs/ rewritten by a compare run updates the manifest itself; one re-rendered or edited by
    other means needs its entry renewed: ``OutputFolder("docs/study").adopt([...])`` after removing the old
    entry (as the migration did), or commit it through ``compare``."""
    from detbalance._preflight import SUITE_NAMES
    from detbalance.analysis.report import report_files
    from detbalance.engine.files import OutputFolder

    root = Path(__file__).resolve().parents[2] / "docs"
    OutputFolder(root / "study").check([*report_files(list(SUITE_NAMES)), "results.json", "README.md"])
    for name in ("example-report", "losses-3-seeds", "samplers-3-seeds"):
        suites = list(json.loads((root / name / "results.json").read_text())["suites"])
        OutputFolder(root / name).check([*report_files(suites), "results.json"])


# ------------------------------------------------------------------------------------------------ faults


def test_a_full_disk_while_training_names_the_checkpoint_and_keeps_no_torn_file(tmp_path: Path, small_disk: Path):
    out = small_disk / "run"
    fill(small_disk, leave=200_000)  # room for the config and the logs, not for a 1.3 MB checkpoint
    rc = main(["train", "--data", "builtin:tiny", *TINY, "--output", str(out)])
    assert rc == 1
    assert not (out / "checkpoint.pt").exists()
    assert not [p for p in out.iterdir() if "detbalance-tmp" in p.name]


def test_full_disk_message(small_disk: Path, capsys: pytest.CaptureFixture) -> None:
    out = small_disk / "run"
    fill(small_disk, leave=200_000)
    assert main(["train", "--data", "builtin:tiny", *TINY, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "checkpoint.pt" in err and "no space left on device" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        lambda ro, c: ["train", "--data", "builtin:tiny", *TINY, "--output", str(ro / "run")],
        lambda ro, c: ["make-data", "--preset", "tiny", "--split", "test", "--output", str(ro / "d")],
        lambda ro, c: ["profile", "--data", "builtin:tiny", "--no-progress", "--output", str(ro / "p")],
        lambda ro, c: ["eval", "--checkpoint", str(c.run / "checkpoint.pt"), "--output", str(ro / "m.json")],
    ],
    ids=["train", "make-data", "profile", "eval"],
)
def test_a_read_only_folder_is_named_with_the_cause(read_only_dir: Path, ctx: Ctx, capsys, argv) -> None:
    assert main(argv(read_only_dir, ctx)) == 1
    err = capsys.readouterr().err
    assert "read-only file system" in err and str(read_only_dir) in err, err
    assert (read_only_dir / "existing.txt").read_text() == "kept\n"


def test_plot_into_a_read_only_run(read_only_dir: Path, capsys) -> None:
    run = read_only_dir  # a read-only mount holding a run's metrics: the plot cannot be written
    subprocess.run(["mount", "-o", "remount,rw", str(run)], check=True)
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n{"type": "train", "step": 2, '
                                       '"loss": 0.5}\n')
    subprocess.run(["mount", "-o", "remount,ro", str(run)], check=True)
    assert main(["plot", str(run)]) == 1
    assert "read-only file system" in capsys.readouterr().err


def _python(code: str, **kwargs: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_two_processes_on_one_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A second training into a folder another process is writing is refused, not interleaved."""
    out = tmp_path / "run"
    out.mkdir()
    holder = _python(
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--data", "builtin:tiny", *TINY, "--overwrite", "--output", str(out)]) == 1
        assert "in use by another detbalance process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--data", "builtin:tiny", *TINY, "--output", str(out)]) == 0  # free again


def test_the_run_lock_is_released_by_kill_9(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = _python(
        "import fcntl, os, time\n"
        f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel released it with the process
    finally:
        os.close(fd)


@pytest.mark.slow
def test_kill_9_then_resume_finishes_the_run(tmp_path: Path) -> None:
    """kill -9 mid-run (after a checkpoint), then --resume: the run finishes; nothing is lost or repeated."""
    out = tmp_path / "run"
    args = ["train", "--data", "builtin:tiny", "--set", "engine.iterations=40", "--set", "engine.checkpoint_interval=2",
            "--set", "engine.batch_size=4", "--set", "engine.device=cpu", "--set", "model.norm=gn",
            "--set", "engine.log_interval=1", "--no-progress", "--threads", "1", "--output", str(out)]
    child = _python(f"import sys; from detbalance.cli import main; sys.exit(main({args!r}))")
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert main(["train", "--resume", "--output", str(out), "--no-progress", "--threads", "1"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert steps == list(range(1, 41))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40
