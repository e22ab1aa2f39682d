"""The Faster R-CNN RPN's training proposal pool (issue 21): a config key, the samplers suite in OHEM's regime
(B / R of a few %), the earlier regime kept as its own suite, and run folders that stay where they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detbalance.builders import build_model
from detbalance.compare import SUITES, select_suites, suite_configs
from detbalance.compare.runs import run_key
from detbalance.compare.suites import FULL_ITERS
from detbalance.config import ConfigError, apply_overrides, load_toml
from detbalance.detectors.build import build_detector, faster_rcnn_sizes

ROOT = Path(__file__).resolve().parents[1]


def test_build_detector_takes_the_pool_and_defaults_to_the_sizes():
    model = build_detector("faster_rcnn", num_classes=3, image_size=128, rpn_pre_nms_top_n_train=2000,
                           rpn_post_nms_top_n_train=1000)
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 300}
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 100}
    default = build_detector("faster_rcnn", num_classes=3, image_size=128)
    sizes = faster_rcnn_sizes(128)
    assert default.rpn._pre_nms_top_n["training"] == sizes["rpn_pre_nms_top_n_train"] == 600
    assert default.rpn._post_nms_top_n["training"] == sizes["rpn_post_nms_top_n_train"] == 128


@pytest.mark.parametrize(("arch", "kwargs", "message"), [
    ("faster_rcnn", {"rpn_post_nms_top_n_train": 0}, "rpn_post_nms_top_n_train must be None or an int >= 1, got 0"),
    ("faster_rcnn", {"rpn_pre_nms_top_n_train": True}, "rpn_pre_nms_top_n_train must be None or an int >= 1"),
    ("retinanet", {"rpn_post_nms_top_n_train": 100}, "arch 'retinanet' has none"),
])
def test_build_detector_rejects_a_bad_pool(arch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_detector(arch, num_classes=3, image_size=64, **kwargs)


def test_pool_config_keys_build_the_model_and_bad_values_name_the_key():
    cfg = load_toml("[model]\narch = 'faster_rcnn'\n")
    cfg = apply_overrides(cfg, ["model.rpn_pre_nms_top_n_train=2000", "model.rpn_post_nms_top_n_train=1000"])
    model = build_model(cfg, num_classes=3, image_size=64)
    assert model.rpn._pre_nms_top_n["training"] == 2000 and model.rpn._post_nms_top_n["training"] == 1000
    with pytest.raises(ConfigError, match=r"model.rpn_post_nms_top_n_train: must be >= 1"):
        load_toml("[model]\narch = 'faster_rcnn'\nrpn_post_nms_top_n_train = 0\n")
    with pytest.raises(ConfigError, match=r"model.rpn_pre_nms_top_n_train: sets the RPN's proposal pool"):
        load_toml("[model]\narch = 'ssd'\nrpn_pre_nms_top_n_train = 1000\n")
    # torchvision's zoo models keep their own pool (fasterrcnn_*: 2000 / 2000 in training)
    with pytest.raises(ConfigError, match=r"model.rpn_post_nms_top_n_train: applies to the small presets only"):
        load_toml("[model]\nname = 'fasterrcnn_resnet50_fpn_v2'\nrpn_post_nms_top_n_train = 1000\n")


def test_the_samplers_suite_selects_from_a_large_pool():
    """B / R: the OHEM paper back-propagates 128 of ~4000 RoIs over 2 images (3 %); ours 64 of 1000 (6.4 %)."""
    for suite, pool in (("samplers", 1000), ("samplers_pool128", 128)):
        for _, cfg in suite_configs(suite, iters=10, seed=0):
            post = cfg.model.rpn_post_nms_top_n_train or faster_rcnn_sizes(128)["rpn_post_nms_top_n_train"]
            assert post == pool
            assert cfg.remedy.roi_sampler.num_samples == 64
    new = suite_configs("samplers", iters=10, seed=0)[0][1]
    assert new.model.rpn_pre_nms_top_n_train == 2000
    assert 64 / new.model.rpn_post_nms_top_n_train < 0.1
    assert "model.rpn_post_nms_top_n_train = 1000" in SUITES["samplers"].description
    # the same arms in both regimes; the earlier one is never a default suite for a user's data
    assert [m.key for m in SUITES["samplers"].methods[:4]] == [m.key for m in SUITES["samplers_pool128"].methods]
    assert "samplers_pool128" not in select_suites(None, user_data=True)
    assert "samplers_pool128" in select_suites("all", user_data=False)


def test_the_pool_draws_1000_proposals_per_image():
    (_, cfg), *_ = suite_configs("samplers", iters=10, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, image_size=128).train()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    images_t, targets_t = model.transform(images, targets)
    proposals, _ = model.rpn(images_t, model.backbone(images_t.tensors), targets_t)
    assert [p.shape[0] for p in proposals] == [1000, 1000]


def test_runs_stored_before_the_pool_keys_keep_their_folders():
    """Adding a config key must not move stored runs: the earlier regime's configs hash to the committed folders."""
    keys = {m.key: run_key(cfg) for m, cfg in suite_configs("samplers_pool128", iters=FULL_ITERS, seed=0)}
    for method, key in keys.items():
        assert (ROOT / "docs" / "study" / "runs" / "samplers" / method / key).is_dir(), (method, key)
    new = {m.key: run_key(cfg) for m, cfg in suite_configs("samplers", iters=FULL_ITERS, seed=0)}
    assert not set(new.values()) & set(keys.values())
