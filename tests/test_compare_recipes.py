"""configs/ and the compare suites draw their recipe from one place: detbalance.compare.recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from detbalance.compare import SUITES, recipe
from detbalance.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))

# Shipped configs that are a compare arm (same remedy): training one reproduces that arm with --optim sgd.
ARMS = {
    "retinanet_focal.toml": ("losses", "focal"),
    "retinanet_alpha_ce.toml": ("losses", "alpha_ce"),
    "retinanet_ghm.toml": ("losses", "ghm_c_r"),
    "ssd_mining.toml": ("ssd", "mining"),
    "class_weights.toml": ("classes", "weights"),
    "retinanet_atss.toml": ("losses", "atss_focal"),
}


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_uses_the_sgd_recipe(path):
    cfg = load_config(path)
    optim, sched = recipe("sgd", batch_size=cfg.engine.batch_size, iters=cfg.engine.iterations)
    assert cfg.optim == optim
    assert cfg.schedule == sched  # warm-up, decay and milestones too


def test_recipes():
    sgd, sched = recipe("sgd", batch_size=32, iters=1200, decay="step")
    assert (sgd.name, sgd.lr, sgd.momentum, sgd.weight_decay, sgd.grad_clip) == ("sgd", 0.02, 0.9, 1e-4, 35.0)
    assert sched.milestones == (800, 1100) and sched.warmup_iters == 100 and sched.warmup_factor == 0.001
    adamw, cos = recipe("adamw", batch_size=8, iters=50)
    assert (adamw.name, adamw.lr, adamw.grad_clip, cos.name, cos.warmup_iters) == ("adamw", 2e-3, 10.0, "cosine", 5)
    with pytest.raises(ValueError, match="--optim"):
        recipe("adam", batch_size=16, iters=10)


@pytest.mark.parametrize("name", sorted(ARMS))
def test_config_is_its_compare_arm(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    suite, key = ARMS[name]
    arm = next(m for m in SUITES[suite].methods if m.key == key)
    assert cfg.model.arch == SUITES[suite].arch
    for field in ("cls_loss", "box_loss", "roi_sampler", "ssd_mining", "class_weights", "repeat_factor", "bootstrap",
                  "assigner", "pisa"):
        want = getattr(arm.remedy, field)
        if want is not None:
            assert getattr(cfg.remedy, field) == want, field
