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


@pytest.mark.parametrize("iters_per_epoch", [1, 2, 40, 1100])
def test_finetune_recipe_is_torchvisions_detection_schedule(iters_per_epoch):
    """Every iteration's learning rate equals torchvision's reference (tests/reference/tv_detection_recipe.py)
    over its 26 epochs, when the budget is 26 epochs of ``iters_per_epoch`` iterations at the reference's batch."""
    import torch

    from detbalance.builders import build_optimizer, build_scheduler
    from tests.reference.tv_detection_recipe import reference_lrs

    iters = 26 * iters_per_epoch
    opt_cfg, sched_cfg = recipe("finetune", batch_size=16, iters=iters)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = build_optimizer(model, opt_cfg)
    scheduler = build_scheduler(optimizer, sched_cfg, iters)
    ours = []
    for _ in range(iters):
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert ours == pytest.approx(reference_lrs(iters_per_epoch), rel=1e-12, abs=0)
    # SGD, momentum 0.9, weight decay 1e-4 on every parameter (biases and norm layers too), no clipping
    groups = [g for g in optimizer.param_groups if g["params"]]
    assert all(g["weight_decay"] == 1e-4 and g["momentum"] == 0.9 for g in groups)
    assert sum(len(g["params"]) for g in groups) == 4 and opt_cfg.grad_clip is None


def test_finetune_recipe_scales_lr_with_the_batch_and_caps_the_warmup():
    opt, sched = recipe("finetune", batch_size=4, iters=200_000)
    assert opt.lr == pytest.approx(0.005) and sched.warmup_iters == 1000
    assert sched.milestones == (200_000 * 16 // 26, 200_000 * 22 // 26)
    _, short = recipe("finetune", batch_size=2, iters=20)
    assert short.warmup_iters == 0 and short.milestones == (12, 16)
