"""run_profile end to end on builtin:tiny (in process), the readings/rules, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from detbalance.analysis.profile import (
    DENSE_RATIO,
    Recommendation,
    readings,
    recommendations,
    run_profile,
)
from detbalance.analysis.stats import assignment_stats, dataset_stats
from detbalance.builders import build_model
from detbalance.config import dump_toml, load_config
from detbalance.engine.checkpoint import save_checkpoint

FIGURES = ["class_frequency.png", "box_sizes.png", "assignment.png"]
TRAINED_FIGURES = [*FIGURES, "gradient_density.png", "quadrant_shares.png", "loss_cdfs.png"]


def _checkpoint(path, arch="retinanet", *, state_arch=None):
    cfg = load_config(None, overrides=["data.train=builtin:tiny", f"model.arch={arch}"])
    torch.manual_seed(0)
    state_cfg = cfg if state_arch is None else load_config(None, overrides=[f"model.arch={state_arch}"])
    model = build_model(state_cfg, num_classes=5, image_size=64)
    save_checkpoint(
        path,
        {
            "config": dump_toml(cfg),
            "model": model.state_dict(),
            "image_size": 64,
            "num_classes": 5,
            "label_names": [str(k) for k in range(5)],
            "step": 0,
            "version": "test",
        },
    )
    return path


@pytest.fixture(scope="module")
def no_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    md = run_profile(
        data="builtin:tiny",
        config=None,
        checkpoint=None,
        output=out,
        num_images=8,
        assignment_images=16,
        progress=False,
    )
    return md, json.loads((out / "profile.json").read_text())


def test_profile_without_checkpoint_writes_everything(no_checkpoint):
    md, result = no_checkpoint
    out = md.parent
    assert md.name == "profile.md"
    for name in FIGURES:
        assert (out / name).stat().st_size > 2000
        assert f"]({name})" in md.read_text()
    assert result["figures"] == FIGURES
    assert result["dataset"]["num_images"] == 64 and result["arch"] == "retinanet"
    assert result["assignment"]["num_images"] == 16 and result["class_ap"] is None
    # at initialisation only the data and the assignment mean something: no gradient statistics
    assert result["gradient"] is None
    text = md.read_text()
    ratio = sum(result["assignment"]["anchors_per_level"]) / sum(result["assignment"]["positives_per_level"])
    assert f"1 positive per {ratio:,.0f} anchors" in text
    assert "No checkpoint" in text and "per-class AP is skipped" in text
    assert "20 %" not in text and "hardest" not in text


def test_profile_recommendations_are_rules_with_numbers(no_checkpoint):
    md, result = no_checkpoint
    rules = [r["rule"] for r in result["recommendations"]]
    assert f"negatives per positive >= {DENSE_RATIO:g} in a dense one-stage detector" in rules
    focal = next(r for r in result["recommendations"] if r["rule"].startswith("negatives per positive"))
    assert "3.2 AP" in focal["remedy"] and "table 1a and 1d" in focal["source"]
    assert "**If negatives per positive" in md.read_text()


def test_profile_with_a_tiny_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    md = run_profile(
        data="builtin:tiny",
        config=None,
        checkpoint=ckpt,
        output=tmp_path / "out",
        num_images=4,
        assignment_images=8,
        progress=False,
    )
    result = json.loads((md.parent / "profile.json").read_text())
    assert result["checkpoint"] == str(ckpt)
    assert len(result["class_ap"]) == 5 and result["figures"][: len(TRAINED_FIGURES)] == TRAINED_FIGURES
    grad = result["gradient"]
    assert sum(grad["gradient_share"]["ce"].values()) == pytest.approx(1.0) and grad["num_examples"] % 6 == 0
    assert all(v is None or 0.0 <= v <= 1.0 for v in result["class_ap"])
    assert "checkpoint" in md.read_text()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt.* not found"):
        run_profile(
            data="builtin:tiny",
            config=None,
            checkpoint=tmp_path / "missing.pt",
            output=tmp_path,
            progress=False,
        )


def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = _checkpoint(tmp_path / "ssd.pt", arch="ssd")
    cfg = tmp_path / "retina.toml"
    cfg.write_text('[model]\narch = "retinanet"\n')
    with pytest.raises(ValueError, match="holds a ssd model but config .* asks for retinanet"):
        run_profile(data="builtin:tiny", config=cfg, checkpoint=ckpt, output=tmp_path / "o", progress=False)
    # a state dict that does not fit the architecture its config names
    bad = _checkpoint(tmp_path / "bad.pt", arch="retinanet", state_arch="ssd")
    with pytest.raises(ValueError, match="does not fit a retinanet model"):
        run_profile(
            data="builtin:tiny",
            config=None,
            checkpoint=bad,
            output=tmp_path / "o",
            num_images=2,
            assignment_images=2,
            progress=False,
        )


def test_empty_dataset(tmp_path):
    ann = tmp_path / "empty.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match="no images"):
        run_profile(data=str(ann), config=None, checkpoint=None, output=tmp_path / "o", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"num_images": 0}, "num_images"), ({"assignment_images": 0}, "assignment_images")]
)
def test_bad_counts(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_profile(
            data="builtin:tiny", config=None, checkpoint=None, output=tmp_path, progress=False, **kwargs
        )


# ------------------------------------------------------------------------------------- readings and rules


def _t(boxes, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "image_id": 0,
    }


def test_rules_fire_on_their_thresholds():
    # long tail: class 2 in 1 of 2000 images (f = 0.0005 < t = 0.001) -> repeat factor sqrt(2)
    targets = [_t([[0, 0, 8, 8]], [1])] * 1999 + [_t([[0, 0, 8, 8]], [2])]
    data = dataset_stats(targets, num_classes=2, class_names=["common", "rare"])
    anchors = torch.tensor(
        [[0, 0, 8, 8]] + [[100 + 10 * i, 0, 108 + 10 * i, 8] for i in range(200)], dtype=torch.float32
    )
    assign = assignment_stats(anchors, torch.zeros(201, dtype=torch.long), targets[:10], high=0.5, low=0.4)
    assert assign.negatives_per_positive == 200
    recs = recommendations(data, assign, None, arch="retinanet", trained=False)
    assert all(isinstance(r, Recommendation) for r in recs)
    rules = " | ".join(r.rule for r in recs)
    assert "negatives per positive >= 100" in rules and "LVIS's rare regime" in rules
    rfs = next(r for r in recs if "LVIS" in r.rule)
    assert "rare" in rfs.evidence and "r up to 1.41" in rfs.evidence
    # a two-stage detector gets the sampling rule, not the dense one
    two = " | ".join(r.rule for r in recommendations(data, assign, None, arch="faster_rcnn", trained=False))
    assert "dense" not in two and "two-stage" in two
    lines = readings(data, assign, None)
    assert any("Class 'rare' is 1999x rarer than the most common class 'common'" in ln for ln in lines)
    assert any("1 positive per 201 anchors (200 negatives per positive" in ln for ln in lines)


def test_fcos_is_refused_with_a_reason(tmp_path):
    cfg = tmp_path / "fcos.toml"
    cfg.write_text('[model]\nname = "fcos_resnet50_fpn"\n')
    with pytest.raises(ValueError, match="model.name = 'fcos_resnet50_fpn': profile's anchor statistics are IoU"):
        run_profile(data="builtin:tiny", config=cfg, checkpoint=None, output=tmp_path / "o", progress=False)


def test_profile_shows_what_the_long_tail_loss_applied_per_class(tmp_path):
    """A Seesaw run recorded with engine.record: profile reads its balance.jsonl and shows each class's factors."""
    from detbalance.analysis import class_values_over_training
    from detbalance.config import ExperimentConfig as Cfg
    from detbalance.config import apply_overrides
    from detbalance.engine import fit

    cfg = apply_overrides(Cfg(), ["data.train=builtin:tiny", "engine.device=cpu", "engine.batch_size=2",
                                  "engine.iterations=2", "engine.record=true", "model.arch=faster_rcnn",
                                  "remedy.cls_loss.name=seesaw", "model.norm=gn"])
    result = fit(cfg, output=tmp_path / "run", progress=False)
    md = run_profile(data="builtin:tiny", config=None, checkpoint=result.checkpoint, output=tmp_path / "p",
                     num_images=4, assignment_images=4, progress=False)
    data = json.loads((tmp_path / "p" / "profile.json").read_text())
    values = data["longtail_class_values"]
    assert set(values) == {"seesaw/mitigation", "seesaw/compensation"}
    assert all(v is None or v <= 1 + 1e-9 for v in values["seesaw/mitigation"])
    assert all(v is None or v >= 1 - 1e-9 for v in values["seesaw/compensation"])
    assert (tmp_path / "p" / "longtail_factors.png").is_file()
    assert "Seesaw mitigation factor" in md.read_text()
    # the aggregate is sum / count over the steps
    recs = [{"class_values": {"x": {"sum": [2.0, 0.0], "count": [1.0, 0.0]}}},
            {"class_values": {"x": {"sum": [4.0, 3.0], "count": [3.0, 1.0]}}}]
    assert class_values_over_training(recs) == {"x": [1.5, 3.0]}
