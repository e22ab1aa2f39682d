"""Bad files and faults at the library level: checkpoints validated whole, a manifest that protects the user's
files, write errors that name the file and the cause, one JSON-lines reader, images checked before training
and held-out checked by content."""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from detbalance.data import (
    CocoDetection,
    DatasetError,
    check_held_out,
    make_benchmark,
    open_dataset,
    verify_images,
    write_coco,
)
from detbalance.engine.checkpoint import (
    REQUIRED_KEYS,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from detbalance.engine.files import (
    ForeignFilesError,
    OutputFolder,
    WriteError,
    append_jsonl,
    atomic_write_text,
    read_jsonl,
    remove_stale_temp,
    write_error,
)

from .conftest import fill

# ------------------------------------------------------------------------------------------ checkpoints


def _png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\0\0\0\0"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class _Code:  # pickled as a reference to code: refused by weights_only loading
    pass


NOT_CHECKPOINTS: list[tuple[str, Any, str]] = [
    ("folder", "dir", "is a folder"),
    ("empty", b"", "is an empty file"),
    ("png", _png_bytes(), r"not a checkpoint \(PNG image\)"),
    ("jpeg", b"\xff\xd8\xff\xe0" + b"\0" * 20, r"not a checkpoint \(JPEG image\)"),
    ("json", b'{"model": {}}', r"not a checkpoint \(JSON text\)"),
    ("text", b"hello, I am a config\n", r"not a checkpoint \(a text file\)"),
    ("gzip", b"\x1f\x8b\x08\x00" + b"\0" * 20, r"not a checkpoint \(gzip file\)"),
    ("random-binary", bytes(range(200, 256)) * 3, r"not a checkpoint \(unknown format\)"),
    ("missing", None, "not found"),
]


@pytest.mark.parametrize(("kind", "content", "keyword"), NOT_CHECKPOINTS, ids=[c[0] for c in NOT_CHECKPOINTS])
def test_what_is_not_a_checkpoint_is_named(tmp_path: Path, kind: str, content: Any, keyword: str) -> None:
    path = tmp_path / "checkpoint.pt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=keyword) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def _valid_state() -> dict[str, Any]:
    return {
        "config": "", "model": {"w": torch.zeros(2)}, "num_classes": 2, "label_names": ["a", "b"], "image_size": 64,
        "step": 3, "version": "0", "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": None,
        "epoch": 0, "batch": 3, "hooks": [], "recorder": None, "rng": [], "generators": [], "world_size": 1,
    }


def test_a_truncated_checkpoint_is_unreadable_and_named(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "checkpoint.pt", _valid_state())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "detbalance-checkpoint", "obj": _Code()}, path)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_checkpoint(path)


@pytest.mark.parametrize(("purpose", "key"), [(p, k) for p, keys in REQUIRED_KEYS.items() for k in keys])
def test_every_key_a_use_needs_is_checked_before_work(tmp_path: Path, purpose: str, key: str) -> None:
    state = _valid_state()
    del state[key]
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match=f"lacks '{key}'") as err:
        load_checkpoint(path, purpose=purpose)
    assert str(path) in str(err.value)


def test_resuming_without_optimizer_state_says_it_can_still_be_evaluated(tmp_path: Path) -> None:
    state = _valid_state()
    del state["optimizer"]
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    load_checkpoint(path, purpose="model")  # evaluation needs no optimiser
    with pytest.raises(CheckpointError, match="optimiser state --resume needs.*can still be evaluated"):
        load_checkpoint(path, purpose="resume")


@pytest.mark.parametrize(("key", "value"), [("step", "3"), ("model", [1]), ("num_classes", 2.0), ("label_names", "ab"),
                                            ("step", -1), ("num_classes", 5)])
def test_damaged_values_are_named(tmp_path: Path, key: str, value: Any) -> None:
    state = {**_valid_state(), key: value}
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path, purpose="model")


def test_a_write_failure_inside_torch_save_names_the_file_and_the_cause(tmp_path: Path, monkeypatch) -> None:
    """torch.save turns a failed write into 'enforce fail at inline_container.cc'; we name file and cause."""
    path = save_checkpoint(tmp_path / "checkpoint.pt", _valid_state())
    before = path.read_bytes()

    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if "detbalance-tmp" in str(file) and "w" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(WriteError, match=r"could not write '.*checkpoint\.pt': no space left on device"):
        save_checkpoint(path, _valid_state())
    monkeypatch.undo()
    assert path.read_bytes() == before  # the last good checkpoint is kept
    assert not [p for p in tmp_path.iterdir() if "detbalance-tmp" in p.name]  # and no temp file


def test_a_full_disk_keeps_the_last_good_checkpoint(small_disk: Path) -> None:
    state = _valid_state()
    path = save_checkpoint(small_disk / "checkpoint.pt", state)
    before = path.read_bytes()
    fill(small_disk)
    big = {**state, "model": {"w": torch.zeros(200_000)}}
    with pytest.raises(WriteError, match=r"could not write '.*checkpoint\.pt': no space left on device"):
        save_checkpoint(path, big)
    assert path.read_bytes() == before
    assert load_checkpoint(path, purpose="resume")["step"] == 3


def test_a_full_disk_on_a_json_write_and_an_append(small_disk: Path) -> None:
    atomic_write_text(small_disk / "result.json", "{}\n")
    fill(small_disk)
    with pytest.raises(WriteError, match="result.json.*no space left on device"):
        atomic_write_text(small_disk / "result.json", "x" * 300_000)
    assert (small_disk / "result.json").read_text() == "{}\n"
    with pytest.raises(WriteError, match="metrics.jsonl.*no space left on device"):
        append_jsonl(small_disk / "metrics.jsonl", [{"step": i, "pad": "x" * 1000} for i in range(300)])


def test_a_read_only_folder_names_the_file_and_the_cause(read_only_dir: Path) -> None:
    with pytest.raises(WriteError, match="existing.txt.*read-only file system"):
        atomic_write_text(read_only_dir / "existing.txt", "new")
    assert (read_only_dir / "existing.txt").read_text() == "kept\n"
    with pytest.raises(WriteError, match="read-only file system"):
        OutputFolder(read_only_dir / "sub").write_text("a.txt", "x")


@pytest.mark.parametrize(
    ("code", "cause"),
    [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system"),
     (errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"), (errno.EDQUOT, "disk quota exceeded"),
     (errno.EISDIR, "is a folder")],
)
def test_write_errors_name_the_cause(code: int, cause: str) -> None:
    err = write_error("out/report.md", OSError(code, os.strerror(code)))
    assert str(err) == f"could not write 'out/report.md': {cause}" and err.errno == code


# ---------------------------------------------------------------------------------------- the manifest


def test_a_file_the_project_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    (tmp_path / "report.md").write_text("my notes")
    with pytest.raises(ForeignFilesError, match="report.md") as err:
        folder.write_text("report.md", "generated")
    assert err.value.files == ["report.md"]
    assert (tmp_path / "report.md").read_text() == "my notes"
    with pytest.raises(ForeignFilesError):
        folder.remove("report.md")
    assert (tmp_path / "report.md").exists()


def test_the_projects_own_file_is_replaced_and_an_edited_one_is_not(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    folder.write_text("report.md", "v1")
    folder.write_text("report.md", "v2")  # ours: replaced
    assert (tmp_path / "report.md").read_text() == "v2"
    (tmp_path / "report.md").write_text("v2 + my edits")
    with pytest.raises(ForeignFilesError, match="changed since"):
        folder.check(["report.md"])
    assert (tmp_path / "report.md").read_text() == "v2 + my edits"


def test_an_append_only_log_stays_ours_while_its_recorded_prefix_matches(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    folder.write_text("metrics.jsonl", '{"step": 1}\n', append=True)
    append_jsonl(tmp_path / "metrics.jsonl", [{"step": 2}])  # a crash after this: the prefix is unchanged
    folder.check(["metrics.jsonl"])
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n{"step": 2}\n')
    with pytest.raises(ForeignFilesError):
        folder.check(["metrics.jsonl"])


def test_a_damaged_manifest_is_named(tmp_path: Path) -> None:
    (tmp_path / ".detbalance-manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a detbalance manifest"):
        OutputFolder(tmp_path).check(["a"])


def test_only_the_projects_own_temp_files_are_cleaned_up(tmp_path: Path) -> None:
    user = [".notes.tmp", ".report.md.abc.tmp", "x.detbalance-tmp-1.bak"]
    for name in user:
        (tmp_path / name).write_text("mine")
    ours_dead = tmp_path / ".checkpoint.pt.detbalance-tmp-999999999"
    ours_alive = tmp_path / f".result.json.detbalance-tmp-{os.getppid()}"
    ours_dead.write_text("partial")
    ours_alive.write_text("being written")
    assert remove_stale_temp(tmp_path) == [ours_dead]
    assert all((tmp_path / n).exists() for n in user) and ours_alive.exists()


# -------------------------------------------------------------------------------------- the JSONL reader


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ('{"a": 1}\n{"a": 2}\n', [1, 2]),
        ('{"a": 1}\n{"a": 2', [1]),  # torn last line: dropped with a warning
        ('{"a": 1}\n\n{"a": 2}\n', [1, 2]),  # blank line
        ('{"a": 1}\nnot json\n{"a": 2}\n', "metrics.jsonl:2: not a JSON line"),
        ('{"a": 1}\n[1, 2]\n', "metrics.jsonl:2: expected a JSON object"),
        ("", []),
    ],
    ids=["good", "torn-last", "blank", "bad-middle", "not-object", "empty"],
)
def test_one_jsonl_reader(tmp_path: Path, text: str, outcome: Any) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    if isinstance(outcome, str):
        with pytest.raises(ValueError, match=outcome):
            read_jsonl(path)
        return
    with pytest.warns(RuntimeWarning, match="torn last line") if outcome == [1] else _no_warning():
        assert [r["a"] for r in read_jsonl(path)] == outcome


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_coco(make_benchmark("tiny", split="train"), root / "train")
    write_coco(make_benchmark("tiny", split="test"), root / "test")
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / ".detbalance-manifest.json").unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize(
    ("damage", "keyword"),
    [
        (lambda p: p.write_bytes(b"garbage"), "cannot decode"),
        (lambda p: p.write_bytes(p.read_bytes()[:60]), "cannot decode"),
        (lambda p: p.write_bytes(b""), "cannot (decode|read)"),
        (lambda p: p.write_bytes(_png_bytes()), "is 1x1 .HxW. but"),
    ],
    ids=["garbage", "truncated", "empty", "wrong-size"],
)
def test_a_bad_image_is_found_before_training_naming_file_and_id(tiny_export: Path, tmp_path: Path, damage, keyword):
    folder = _copy(tiny_export / "test", tmp_path / "test")
    damage(folder / "images" / "000003.png")
    with pytest.raises(DatasetError, match=keyword) as err:
        verify_images(open_dataset(folder, split="test"))
    assert "image id=4" in str(err.value) and "000003.png" in str(err.value)


def test_every_bad_image_is_listed(tiny_export: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_export / "test", tmp_path / "test")
    for i in (1, 5, 7):
        (folder / "images" / f"{i:06d}.png").write_bytes(b"x")
    with pytest.raises(DatasetError) as err:
        verify_images(open_dataset(folder, split="test"))
    assert len(err.value.problems) == 3


def test_a_coco_file_without_categories_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match="'categories' is empty") as err:
        CocoDetection(path, tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("train", "evaluated", "overlap"),
    [("builtin", "train", 64), ("builtin", "test", 0), ("train", "train", 64), ("train", "test", 0),
     ("builtin", "copy-of-train", 64), ("builtin", "half", 32)],
)
def test_held_out_is_checked_by_content(tiny_export: Path, tmp_path: Path, train: str, evaluated: str, overlap: int):
    """The exported training split of a built-in run, a renamed copy, a half of it: all found by content."""
    train_set = make_benchmark("tiny", split="train") if train == "builtin" else open_dataset(
        tiny_export / "train", split="train")
    if evaluated == "copy-of-train":
        ev = open_dataset(_copy(tiny_export / "train", tmp_path / "renamed"), split="test")
    elif evaluated == "half":
        data = json.loads((tiny_export / "train" / "annotations.json").read_text())
        keep = {im["id"] for im in data["images"][:32]}
        data["images"] = data["images"][:32]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        (tmp_path / "half.json").write_text(json.dumps(data))
        ev = CocoDetection(tmp_path / "half.json", tiny_export / "train" / "images")
    else:
        ev = open_dataset(tiny_export / evaluated, split="test")
    check = check_held_out(train_set, ev)
    assert (check.checked_by, check.overlap, check.of) == ("content", overlap, len(ev))
    assert check.held_out == (overlap == 0)
    assert (check.example is None) == (overlap == 0)


@pytest.mark.parametrize("killed", ["before-rename", "after-rename"])
def test_a_write_killed_at_any_point_leaves_a_file_the_manifest_accepts(tmp_path: Path, monkeypatch, killed: str):
    """The kill -9 race: the new hash enters the manifest before the rename, the old one leaves after it."""
    import detbalance.engine.files as files

    folder = OutputFolder(tmp_path)
    folder.write_text("checkpoint.pt", "v1")
    real = os.replace

    def dying_replace(src, dst):
        if Path(dst).name != "checkpoint.pt":
            return real(src, dst)  # the manifest's own update goes through
        if killed == "after-rename":
            real(src, dst)
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        folder.write_text("checkpoint.pt", "v2")
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_text() == ("v2" if killed == "after-rename" else "v1")
    folder.check(["checkpoint.pt"])  # still the project's: a resume is not refused
    folder.write_text("checkpoint.pt", "v3")
    assert (tmp_path / "checkpoint.pt").read_text() == "v3"
