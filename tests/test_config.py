"""Config: TOML round trip, --set overrides, type checks, impossible combinations, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from detbalance.config import (
    BootstrapConfig,
    CEConfig,
    ClassWeightsConfig,
    ConfigError,
    DataConfig,
    EngineConfig,
    ExperimentConfig,
    FixedRatioConfig,
    FocalConfig,
    GHMCConfig,
    GHMRConfig,
    ModelConfig,
    NormalizerConfig,
    OHEMConfig,
    OptimConfig,
    RemedyConfig,
    RepeatFactorConfig,
    RPNSamplerConfig,
    ScheduleConfig,
    SSDMiningConfig,
    StratifiedOHEMConfig,
    apply_overrides,
    config_from_dict,
    dump_toml,
    load_config,
    load_toml,
    parse_override,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


def _error(fn, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value


EXAMPLES = [
    ExperimentConfig(),
    ExperimentConfig(
        data=DataConfig(train="data/x.json", val="data/y.json", augment=False, num_workers=2, seed=3),
        model=ModelConfig(name="retinanet", image_size=96, norm="gn", head_convs=2),
        remedy=RemedyConfig(
            cls_loss=GHMCConfig(bins=12, momentum=0.5, normalization="valid_bins"),
            box_loss=GHMRConfig(mu=0.03),
            normalizer=NormalizerConfig(mode="ema", momentum=0.95),
            class_weights=ClassWeightsConfig(method="effective_number", beta=0.99),
            repeat_factor=RepeatFactorConfig(threshold=0.01, sqrt=False),
        ),
        optim=OptimConfig(name="adamw", lr=3e-4, betas=(0.8, 0.99), grad_clip=1.0 / 3.0),
        schedule=ScheduleConfig(name="step", warmup_iters=5, milestones=(10, 20), gamma=0.5),
        engine=EngineConfig(iterations=30, batch_size=2, accumulate=3, eval_interval=10, device="cpu", amp=True),
    ),
    ExperimentConfig(
        model=ModelConfig(name="faster_rcnn"),
        remedy=RemedyConfig(
            cls_loss=FocalConfig(alpha=None, gamma=1.5, loss_weight=2.0),
            roi_sampler=StratifiedOHEMConfig(num_samples=64, strata=3, nms_iou=None),
            rpn_sampler=RPNSamplerConfig(num_samples=128),
            bootstrap=BootstrapConfig(rounds=2, max_per_image=5),
        ),
    ),
    ExperimentConfig(
        model=ModelConfig(name="ssd"),
        remedy=RemedyConfig(cls_loss=CEConfig(alpha=0.75), ssd_mining=SSDMiningConfig(negative_ratio=2.5, min_negatives=4)),
    ),
]


@pytest.mark.parametrize("cfg", EXAMPLES, ids=range(len(EXAMPLES)))
def test_toml_round_trip(cfg: ExperimentConfig) -> None:
    text = dump_toml(cfg)
    assert load_toml(text) == cfg
    assert dump_toml(load_toml(text)) == text  # a fixed point


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    assert load_toml(dump_toml(cfg)) == cfg


def test_example_configs_cover_every_remedy_family() -> None:
    seen = {type(getattr(load_config(p).remedy, f)).__name__ for p in CONFIGS for f in RemedyConfig.__dataclass_fields__}
    for name in ("FocalConfig", "CEConfig", "GHMCConfig", "GHMRConfig", "OHEMConfig", "StratifiedOHEMConfig",
                 "FixedRatioConfig", "SSDMiningConfig", "RepeatFactorConfig", "ClassWeightsConfig", "BootstrapConfig"):
        assert name in seen, name


def test_missing_keys_take_defaults_and_ints_are_floats() -> None:
    cfg = load_toml("[optim]\nlr = 1\n[remedy.cls_loss]\nname = 'focal'\ngamma = 3\n")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.remedy.cls_loss == FocalConfig(alpha=0.25, gamma=3.0)
    assert cfg.engine == EngineConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[remedy.cls_loss]\nname = 'focal'\ngama = 2.0\n", "remedy.cls_loss.gama: unknown key"),
        ("[engine]\niterations = 'ten'\n", "engine.iterations: expected an integer, got 'ten'"),
        ("[engine]\niterations = true\n", "engine.iterations: expected an integer, got True"),
        ("[engine]\niterations = 1.5\n", "engine.iterations: expected an integer, got 1.5"),
        ("[engine]\namp = 1\n", "engine.amp: expected true or false, got 1"),
        ("[model]\narch = 'yolo'\n", "model.name: unknown model 'yolo'; accepted: the small presets ['retinanet', "
         "'faster_rcnn', 'ssd'] or ['retinanet_resnet50_fpn', 'retinanet_resnet50_fpn_v2', 'fcos_resnet50_fpn'"),
        ("[model]\nname = 'yolo'\n", "model.name: unknown model 'yolo'"),
        ("[model]\nname = 'ssd'\narch = 'retinanet'\n", "model.arch: is the earlier name of 'name'; give one"),
        ("[remedy.cls_loss]\ngamma = 2.0\n", "remedy.cls_loss.name: is required"),
        ("[remedy.cls_loss]\nname = 'fcal'\n",
         "remedy.cls_loss.name: must be one of ['focal', 'ce', 'ghm_c', 'qfl', 'vfl', 'seesaw', 'eqlv2', 'federated']"),
        ("[remedy.cls_loss]\nname = 'focal'\ngamma = -1.0\n", "remedy.cls_loss.gamma: must be >= 0, got -1.0"),
        ("[optim]\nbetas = [0.9]\n", "optim.betas: expected an array of 2 values"),
        ("[schedule]\nmilestones = [20, 10]\n", "schedule.milestones: must be increasing"),
        ("[engine]\ndevice = 'tpu'\n", "engine.device: must be 'auto', 'cpu' or 'cuda[:N]'"),
        ("[foo]\nx = 1\n", "foo: unknown key"),
        ("[engine\n", "invalid TOML"),
    ],
)
def test_bad_toml_names_the_key(text: str, message: str) -> None:
    assert message in str(_error(load_toml, text))


@pytest.mark.parametrize(
    ("arch", "remedy", "key"),
    [
        ("retinanet", "[remedy.roi_sampler]\nname = 'ohem'\n", "remedy.roi_sampler"),
        ("ssd", "[remedy.roi_sampler]\nname = 'fixed_ratio'\n", "remedy.roi_sampler"),
        ("retinanet", "[remedy.rpn_sampler]\n", "remedy.rpn_sampler"),
        ("retinanet", "[remedy.bootstrap]\n", "remedy.bootstrap"),
        ("retinanet", "[remedy.ssd_mining]\n", "remedy.ssd_mining"),
        ("ssd", "[remedy.normalizer]\n", "remedy.normalizer"),
        ("faster_rcnn", "[remedy.box_loss]\nname = 'giou'\n", "remedy.box_loss"),
        ("ssd", "[remedy.box_loss]\nname = 'ghm_r'\n", "remedy.box_loss"),
        ("faster_rcnn", "[remedy.cls_loss]\nname = 'ghm_c'\n", "remedy.cls_loss"),
        ("ssd", "[remedy.cls_loss]\nname = 'ghm_c'\n", "remedy.cls_loss"),
    ],
)
def test_impossible_combinations_are_errors(arch: str, remedy: str, key: str) -> None:
    err = _error(load_toml, f"[model]\narch = '{arch}'\n{remedy}")
    assert err.key == key
    assert str(err).startswith(f"{key}: ")


def test_bootstrap_needs_enough_iterations() -> None:
    err = _error(load_toml, "[model]\narch='faster_rcnn'\n[remedy.bootstrap]\nrounds = 3\n[engine]\niterations = 3\n")
    assert "remedy.bootstrap.rounds" in str(err)


def test_parse_override_values() -> None:
    assert parse_override("engine.iterations=5") == (["engine", "iterations"], 5)
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("data.train=builtin:tiny") == (["data", "train"], "builtin:tiny")
    assert parse_override('data.train="a b.json"') == (["data", "train"], "a b.json")
    assert parse_override("optim.betas=[0.8, 0.9]") == (["optim", "betas"], [0.8, 0.9])
    assert parse_override("engine.amp=true") == (["engine", "amp"], True)
    assert "KEY=VALUE" in str(_error(parse_override, "engine.iterations"))


def test_overrides_apply_in_order_and_type_check() -> None:
    cfg = apply_overrides(
        ExperimentConfig(),
        [
            "engine.iterations=7",
            "remedy.cls_loss.name=focal",
            "remedy.cls_loss.gamma=1",
            "remedy.cls_loss.name=ghm_c",  # switching class starts from its defaults
            "remedy.cls_loss.bins=12",
            "remedy.class_weights.method=sqrt_inverse",  # a None section is created from its defaults
            "optim.betas=[0.8, 0.9]",
            "optim.grad_clip=2",
            "optim.grad_clip=none",
            "remedy.cls_loss=none",  # each override is validated: GHM-C must go before the arch changes
            "model.arch=faster_rcnn",
            "remedy.roi_sampler.name=ohem",
            "remedy.roi_sampler.positive_fraction=0.25",
        ],
    )
    assert cfg.engine.iterations == 7
    assert cfg.remedy.cls_loss is None
    assert cfg.remedy.class_weights == ClassWeightsConfig(method="sqrt_inverse")
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.grad_clip is None
    assert cfg.remedy.roi_sampler == OHEMConfig(positive_fraction=0.25)
    ghm = apply_overrides(ExperimentConfig(), ["remedy.cls_loss.name=ghm_c", "remedy.cls_loss.bins=12"])
    assert ghm.remedy.cls_loss == GHMCConfig(bins=12)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine.iterationz=3", "engine.iterationz: unknown key"),
        ("enigne.iterations=3", "enigne: unknown key"),
        ("engine.iterations=abc", "engine.iterations: expected an integer, got 'abc'"),
        ("optim.lr.x=1", "optim.lr: is a value, not a section"),
        ("remedy.cls_loss.gamma=2", "remedy.cls_loss: is none; choose it first with --set remedy.cls_loss.name="),
        ("remedy.roi_sampler.name=ohem", "remedy.roi_sampler: not available with model.name = 'retinanet', a "
         "retinanet model"),
        ("engine=3", "engine: is a section"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    assert message in str(_error(apply_overrides, ExperimentConfig(), [override]))


def test_load_config_file_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[engine]\niterations = 3\n")
    assert load_config(path, overrides=["engine.batch_size=2"]).engine == EngineConfig(iterations=3, batch_size=2)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_config(tmp_path / "missing.toml")
    assert load_config(None) == ExperimentConfig()


def test_config_from_dict_accepts_dataclass_values() -> None:
    cfg = config_from_dict({"model": {"arch": "faster_rcnn"}, "remedy": {"roi_sampler": FixedRatioConfig(num_samples=64)}})
    assert cfg.remedy.roi_sampler == FixedRatioConfig(num_samples=64)


def test_warmup_as_long_as_the_run_is_an_error() -> None:
    from detbalance.config import apply_overrides

    cfg = load_config(Path(__file__).parents[1] / "configs" / "retinanet_focal.toml")
    err = _error(apply_overrides, cfg, ["engine.iterations=50"])
    assert str(err).startswith("schedule.warmup_iters: 100 warm-up steps would cover the whole run of engine.iterations = 50")
    assert "--set schedule.warmup_iters=5" in str(err)
    ok = apply_overrides(cfg, ["engine.iterations=50", "schedule.warmup_iters=5"])
    assert ok.schedule.warmup_iters == 5 and ok.engine.iterations == 50


def test_defaults_live_in_the_dataclasses() -> None:
    from detbalance.config import SSDMiningConfig

    # an unset min_negatives is torchvision's SSD (0), not a silent 3
    assert SSDMiningConfig().min_negatives == 0
    assert load_toml("[model]\narch = 'ssd'\n[remedy.ssd_mining]\nnegative_ratio = 3.0\n").remedy.ssd_mining.min_negatives == 0
    engine = EngineConfig()
    assert engine.eval_train is False and engine.sync_bn is False


def test_builders_take_their_defaults_from_the_dataclasses() -> None:
    from detbalance.builders import build_model
    from detbalance.config import SSDMiningConfig, apply_overrides

    ssd = apply_overrides(ExperimentConfig(), ["model.arch=ssd", "model.image_size=64"])
    model = build_model(ssd, num_classes=3, image_size=64)
    assert (model.negative_ratio, model.min_negatives) == (3.0, 0) == (
        SSDMiningConfig().negative_ratio, SSDMiningConfig().min_negatives)
    mined = apply_overrides(ssd, ["remedy.ssd_mining.min_negatives=5", "remedy.ssd_mining.negative_ratio=2.0"])
    model = build_model(mined, num_classes=3, image_size=64)
    assert (model.negative_ratio, model.min_negatives) == (2.0, 5)


# ------------------------------------------------------------------------------------ the model zoo


def test_zoo_model_keys_round_trip_and_set_the_family() -> None:
    cfg = apply_overrides(ExperimentConfig(), [
        "model.name=retinanet_resnet50_fpn_v2", "model.weights=DEFAULT", "model.trainable_backbone_layers=5",
        "model.min_size=512", "model.max_size=853", "model.image_mean=[0.5, 0.5, 0.5]",
        "model.image_std=[0.2, 0.2, 0.2]",
    ])
    assert cfg.model.arch == "retinanet" and cfg.model.is_zoo
    assert load_toml(dump_toml(cfg)) == cfg
    fcos = apply_overrides(cfg, ["model.name=fcos_resnet50_fpn", "remedy.cls_loss.name=ghm_c"])
    assert fcos.model.arch == "fcos" and fcos.model.weights == "DEFAULT"
    ssd = apply_overrides(ExperimentConfig(), ["model.name=ssdlite320_mobilenet_v3_large", "model.min_size=256",
                                               "remedy.ssd_mining.background_prior=0.01"])
    assert ssd.model.arch == "ssd" and ssd.remedy.ssd_mining.background_prior == 0.01


def test_arch_is_read_as_name() -> None:
    assert load_toml("[model]\narch = 'ssd'\n").model.name == "ssd"
    assert apply_overrides(ExperimentConfig(), ["model.arch=fasterrcnn_resnet50_fpn"]).model.arch == "faster_rcnn"
    assert "arch" not in dump_toml(ExperimentConfig())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=yolov8"], "model.name: unknown model 'yolov8'; accepted: the small presets"),
        (["model.name=retinanet_resnet50_fpn", "model.min_size=900", "model.max_size=800"],
         "model.min_size: 900 must not exceed model.max_size = 800"),
        (["model.name=retinanet_resnet50_fpn", "model.weights=FCOS_ResNet50_FPN_Weights.COCO_V1"],
         "model.weights: 'FCOS_ResNet50_FPN_Weights.COCO_V1' are the weights of fcos_resnet50_fpn (fcos family), "
         "not of retinanet_resnet50_fpn (retinanet family); accepted: ['DEFAULT', "
         "'RetinaNet_ResNet50_FPN_Weights.COCO_V1']"),
        (["model.name=retinanet_resnet50_fpn", "model.weights_backbone=VGG16_Weights.IMAGENET1K_V1"],
         "model.weights_backbone: 'VGG16_Weights.IMAGENET1K_V1' are VGG16_Weights"),
        (["model.name=retinanet_resnet50_fpn", "model.trainable_backbone_layers=3"],
         "model.trainable_backbone_layers: needs torchvision pretrained weights"),
        (["model.name=retinanet_resnet50_fpn", "model.weights=DEFAULT", "model.trainable_backbone_layers=6"],
         "model.trainable_backbone_layers: must be in [0, 5] for retinanet_resnet50_fpn, got 6"),
        (["model.name=retinanet_resnet50_fpn", "model.image_size=256"],
         "model.image_size: applies to the small presets only; 'retinanet_resnet50_fpn' is torchvision's "
         "(set model.min_size / model.max_size)"),
        (["model.min_size=256"], "model.min_size: applies to torchvision's zoo models"),
        (["model.weights=DEFAULT"], "model.weights: the small preset 'retinanet' takes only a local .pth"),
        (["model.name=ssdlite320_mobilenet_v3_large", "model.max_size=400"], "model.max_size: "
         "ssdlite320_mobilenet_v3_large takes a fixed square input"),
        (["model.name=ssd300_vgg16", "model.min_size=512"], "model.min_size: ssd300_vgg16's default boxes are laid "
         "out for 300 px"),
        (["model.name=retinanet_resnet50_fpn_v2", "remedy.roi_sampler.name=ohem"],
         "remedy.roi_sampler: not available with model.name = 'retinanet_resnet50_fpn_v2', a retinanet model (RoI "
         "sampling (fixed ratio, OHEM, S-OHEM) exists only in the two-stage Faster R-CNN); remove it or set "
         "model.name to one of 'faster_rcnn', 'fasterrcnn_resnet50_fpn', 'fasterrcnn_resnet50_fpn_v2'"),
        (["model.name=fcos_resnet50_fpn", "remedy.box_loss.name=giou"], "remedy.box_loss: not available with "
         "model.name = 'fcos_resnet50_fpn', a fcos model"),
        (["model.name=ssdlite320_mobilenet_v3_large", "remedy.cls_loss.name=ghm_c"],
         "remedy.cls_loss: GHM-C is a sigmoid (one-vs-all) loss and needs a retinanet or fcos model"),
    ],
)
def test_zoo_mistakes_name_the_key_and_the_accepted_values(overrides, message) -> None:
    err = _error(apply_overrides, ExperimentConfig(), overrides)
    assert message in str(err), str(err)
