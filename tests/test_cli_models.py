"""The command line with models by name, recipes and budgets: train --optim / --epochs, compare's passthrough."""

from __future__ import annotations

from pathlib import Path

import pytest

from detbalance.cli import main
from detbalance.config import load_config


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_finetune_recipe_over_epochs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", "builtin:tiny", "--model", "retinanet", "--optim", "finetune", "--epochs", "1",
            "--set", "engine.batch_size=16", "--set", "engine.device=cpu", "--set", "model.norm=gn",
            "--set", "engine.eval_batch_size=16", "--no-progress", "--threads", "1", "--output", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--epochs 1: 4 iterations (64 images" in out and "recipe: finetune (--optim finetune)" in out
    cfg = load_config(run / "config.toml")
    assert cfg.engine.iterations == 4 and cfg.optim.lr == pytest.approx(0.02) and cfg.optim.decay_all
    assert cfg.schedule.name == "step" and cfg.schedule.milestones == (2, 3) and not cfg.engine.amp


def test_compare_refuses_torchrun_and_names_bad_model_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = ["--output", str(tmp_path / "c")]
    assert main(["compare", "--model", "fasterrcnn_resnet50_fpn_v2", "--suite", "losses", *out]) == 1
    assert "--suite losses compares remedies of retinanet / fcos detectors" in _error_line(capsys)
    assert main(["compare", "--model", "nosuch", *out]) == 1
    assert "model.name: unknown model 'nosuch'" in _error_line(capsys)
    assert main(["compare", "--model", "retinanet_resnet50_fpn_v2", "--min-size", "900", "--max-size", "800",
                 *out]) == 1
    assert "min_size" in _error_line(capsys)
    assert main(["compare", "--iters", "5", "--epochs", "1", *out]) == 1
    assert "--epochs and --iters both set the budget" in _error_line(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare", *out]) == 1
    assert "compare does not run under torchrun" in _error_line(capsys)
    assert not (tmp_path / "c").exists()
