"""`detbalance compare`: a controlled comparison end to end on the tiny preset, and resumable."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from detbalance import compare
from detbalance.builders import build_model
from detbalance.compare import SUITES, run_compare, suite_configs
from detbalance.engine import seed_everything


@pytest.mark.parametrize("suite", list(SUITES))
def test_methods_differ_only_in_the_remedy(suite):
    configs = suite_configs(suite, preset="tiny", iters=10, seed=3)
    assert [m.key for m, _ in configs] == [m.key for m in SUITES[suite].methods]
    def without_remedy(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "remedy"}

    base = without_remedy(configs[0][1])
    for _, cfg in configs:
        assert without_remedy(cfg) == base
        assert cfg.engine.seed == 3 and cfg.engine.iterations == 10 and cfg.schedule.name == "cosine"


@pytest.mark.parametrize("suite", ["losses", "samplers", "ssd"])
def test_same_initial_weights_for_every_method(suite):
    states = []
    for _, cfg in suite_configs(suite, preset="tiny", iters=10, seed=1):
        seed_everything(cfg.engine.seed)
        model = build_model(cfg, num_classes=5, image_size=64)
        states.append({k: v for k, v in model.state_dict().items() if "cls_loss" not in k and "box_loss" not in k
                       and "normalizer" not in k})
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for k in states[0]:
            torch.testing.assert_close(other[k], states[0][k], rtol=0, atol=0, msg=k)


def test_compare_end_to_end_and_reuse(tmp_path, monkeypatch):
    report = run_compare(suite="noise", preset="tiny", iters=4, seeds=2, output=tmp_path, batch_size=4,
                         device="cpu", progress=False, command="detbalance compare --suite noise")
    text = report.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    suite = results["suites"]["noise"]
    assert [m["key"] for m in suite["methods"]] == ["focal", "ghm_c"]
    assert all(len(m["runs"]) == 2 for m in suite["methods"])
    for m in suite["methods"]:
        for run in m["runs"]:
            assert 0.0 <= run["metrics"]["AP"] <= 1.0
            assert run["grad_density"]["bins"] == 30 and sum(run["grad_density"]["counts"]) > 0
            assert any("AP" in p for p in run["curve"]) and any("loss" in p for p in run["curve"])
    assert "| focal (2, 0.25) |" in text and "| GHM-C |" in text and "pos:neg" in text
    for png in ("noise_ap.png", "noise_curves.png", "noise_per_class.png", "noise_grad_density.png"):
        assert (tmp_path / png).stat().st_size > 5000
        assert f"]({png})" in text
    assert (tmp_path / "report.html").exists()

    # A second run reuses every finished run instead of training again.
    def no_training(*args, **kwargs):
        raise AssertionError("fit() called for a finished run")

    monkeypatch.setattr("detbalance.engine.fit", no_training)
    again = run_compare(suite="noise", preset="tiny", iters=4, seeds=2, output=tmp_path, batch_size=4,
                        device="cpu", progress=False, command="detbalance compare --suite noise")
    assert json.loads((tmp_path / "results.json").read_text())["suites"]["noise"]["methods"] == suite["methods"]
    assert again == report


def test_bad_arguments():
    with pytest.raises(ValueError, match="--suite must be one of"):
        run_compare(suite="nope", iters=1, progress=False)
    with pytest.raises(ValueError, match="--iters must be >= 1"):
        run_compare(iters=0, progress=False)


def test_rare_classes_are_below_a_tenth_of_the_most_frequent():
    assert compare._rare_classes({"0": 1000, "1": 120, "2": 99, "3": 5}) == ["2", "3"]
