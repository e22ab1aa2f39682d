"""fit's run folder and reporting: held-out evaluation only, category checks, refusing to clobber files,
torn JSON lines, stale temp files, resuming a finished run, plain progress lines, one throughput figure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from detbalance.data import make_benchmark, write_coco
from detbalance.engine import CheckpointError, fit
from detbalance.engine.files import append_jsonl, read_jsonl, write_json

from .conftest import tiny_config


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def coco_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny's training split written as one COCO file (no test split beside it)."""
    return write_coco(make_benchmark("tiny", split="train"), tmp_path_factory.mktemp("coco") / "train")


def test_a_single_coco_file_is_not_evaluated_as_if_held_out(tmp_path: Path, coco_train: Path) -> None:
    cfg = tiny_config(f"data.train={coco_train}", "engine.iterations=2")
    with pytest.warns(UserWarning, match="no held-out data"):
        result = fit(cfg, output=tmp_path / "a", progress=False)
    assert result.metrics == {} and result.train_metrics is None
    assert "data.val is unset" in result.note
    assert {r["type"] for r in _records(result.metrics_file)} == {"train"}

    # asked for, the training-set AP is computed and labelled as such
    cfg = tiny_config(f"data.train={coco_train}", "engine.iterations=2", "engine.eval_train=true")
    with pytest.warns(UserWarning, match="no held-out data"):
        result = fit(cfg, output=tmp_path / "b", progress=False)
    evals = [r for r in _records(result.metrics_file) if r["type"] == "eval"]
    assert [(r["split"], r["step"]) for r in evals] == [("train", 2)]
    assert result.metrics == {} and json.dumps(result.train_metrics) == json.dumps(evals[0]["metrics"]).replace("null", "NaN")


def test_validation_categories_must_match_training(tmp_path: Path, coco_train: Path) -> None:
    data = json.loads(coco_train.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    a, b = sorted(names)[:2]
    for c in data["categories"]:  # swap the ids of the first two categories
        c["id"] = {a: b, b: a}.get(c["id"], c["id"])
    for ann in data["annotations"]:
        ann["category_id"] = {a: b, b: a}.get(ann["category_id"], ann["category_id"])
    val = tmp_path / "val.json"
    val.write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(coco_train.parent / "images")
    cfg = tiny_config("engine.iterations=1", f"data.val={val}")
    with pytest.raises(ValueError, match=rf"label 1 is '{names[b]}' \(category id {a}\) in data.val .* but "
                                         rf"'{names[a]}' \(category id {a}\) in data.train"):
        fit(cfg, output=tmp_path / "run", progress=False)


def test_output_with_files_but_no_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.toml").write_text("# my commented config\n")
    cfg = tiny_config("engine.iterations=1")
    with pytest.raises(ValueError, match=r"holds files but no run: config.toml, notes.txt; .*overwrite"):
        fit(cfg, output=out, progress=False)
    assert (out / "config.toml").read_text() == "# my commented config\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "notes.txt"]
    fit(cfg, output=out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint.pt").is_file()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        fit(cfg, output=out, progress=False)


def test_resume_recovers_a_torn_last_line_and_removes_stale_temp_files(tmp_path: Path) -> None:
    cfg = tiny_config("engine.iterations=4", "engine.checkpoint_interval=2")
    full = fit(cfg, output=tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    with pytest.raises(_Stop):
        fit(cfg, output=cut, progress=False, on_step=_stop_at(3))
    # what a crash leaves: the records up to step 3, the last one torn; a checkpoint temp file
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3
    (cut / "metrics.jsonl").write_text("".join(x + "\n" for x in lines[:-1]) + lines[-1][:20])
    stale = cut / ".checkpoint.pt.detbalance-tmp-999999999"  # of a process that is gone
    stale.write_bytes(b"partial")
    with pytest.warns(RuntimeWarning) as caught:
        resumed = fit(cfg, output=cut, resume=True, progress=False)
    messages = [str(w.message) for w in caught]
    assert any(f"{cut / 'metrics.jsonl'}:{len(lines)}: dropped a torn last line" in m for m in messages), messages
    assert any(f"removed {stale}" in m for m in messages), messages
    assert not stale.exists()
    steps = [(r["type"], r["step"], r.get("losses")) for r in _records(resumed.metrics_file)]
    assert steps == [(r["type"], r["step"], r.get("losses")) for r in _records(full.metrics_file)]


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def stop(m) -> None:
        if m.step == step:
            raise _Stop

    return stop


def test_read_jsonl_names_a_bad_line_and_writes_are_atomic(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": float("nan")}])
    assert read_jsonl(path) == [{"a": 1}, {"a": None}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not a JSON line"):
        read_jsonl(path)
    out = write_json(tmp_path / "r.json", {"x": [1.5, float("inf")]})
    assert json.loads(out.read_text()) == {"x": [1.5, None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "r.json"]  # no temp file left


def test_resuming_a_finished_run_does_nothing(tmp_path: Path) -> None:
    cfg = tiny_config("engine.iterations=2")
    first = fit(cfg, output=tmp_path, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    again = fit(cfg, output=tmp_path, resume=True, progress=False)
    assert again.already_finished and again.history == [] and again.steps == 2
    assert "had already finished (step 2)" in again.note
    assert json.dumps(again.metrics) == json.dumps(first.metrics)  # NaN (no object of that size) included
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_without_a_terminal_progress_is_plain_lines_with_the_summary_throughput(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config("engine.iterations=4", "engine.log_interval=2")
    result = fit(cfg, output=tmp_path, progress=True)
    lines = capsys.readouterr().out.splitlines()
    pattern = r"step (\d+)/4  loss \d+\.\d{4}  (\d+\.\d) img/s  ETA \d\d:\d\d:\d\d"
    matches = [re.fullmatch(pattern, ln) for ln in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [2, 4]
    assert matches[-1].group(2) == f"{result.images_per_s:.1f}"  # the last progress figure is the summary's
    train = [r for r in result.history if r["type"] == "train"]
    assert train[-1]["images_per_s"] == pytest.approx(result.images_per_s)


def test_resume_refuses_training_data_whose_categories_changed(tmp_path: Path, coco_train: Path) -> None:
    data = json.loads(coco_train.read_text())
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(coco_train.parent / "images")
    cfg = tiny_config(f"data.train={ann}", "engine.iterations=3", "engine.checkpoint_interval=1")
    with pytest.warns(UserWarning, match="no held-out data"), pytest.raises(_Stop):
        fit(cfg, output=tmp_path / "run", progress=False, on_step=_stop_at(2))
    data["categories"][0]["name"] = "renamed"
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"label 1 is 'renamed' \(category id 1\) in data.train"):
        fit(cfg, output=tmp_path / "run", resume=True, progress=False)
