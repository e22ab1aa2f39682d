"""torchvision's model zoo: stock equality of every adapted model, offline weights, head surgery, describe.

Every zoo model is built with ``weights=None`` at a small input (64 px images) so that a ResNet-50 step fits a
CPU test. The weights tests fake torchvision's download: a ``weights=None`` model's state dict is saved under the
official cache file name in a temporary ``TORCH_HOME`` (one smallest model per family).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops.misc import FrozenBatchNorm2d

from detbalance.detectors import (
    ZOO,
    BalancedFCOSHead,
    balance_faster_rcnn,
    balance_fcos,
    balance_retinanet,
    balance_ssd,
    build_zoo_model,
    describe_model,
    init_background_prior,
    model_family,
    resolve_weights,
)
from detbalance.detectors.zoo import hub_cache_file
from detbalance.losses import GHMCLoss, GIoULoss, L1Loss, SigmoidFocalLoss, SoftmaxFocalLoss
from detbalance.sampling import FixedRatioSampler
from tests.detectors.inputs import make_batch

K = 3
BIG = 10**6  # sampler budgets above every candidate count: no randomness in Faster R-CNN
RESNET50 = {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn",
            "fasterrcnn_resnet50_fpn_v2"}


def _sizes(name: str) -> dict[str, int]:
    if name == "ssd300_vgg16":
        return {}
    if name == "ssdlite320_mobilenet_v3_large":
        return {"min_size": 128}
    return {"min_size": 64, "max_size": 64}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _stock_then_adapted(name: str) -> tuple[dict, dict, dict, dict]:
    torch.manual_seed(0)
    model = build_zoo_model(name, num_classes=K, **_sizes(name))
    family = model_family(name)
    if family == "faster_rcnn":  # fewer proposals keep the ResNet-50 box heads fast; the same for both
        model.rpn._pre_nms_top_n["training"], model.rpn._post_nms_top_n["training"] = 300, 150
        model.rpn.fg_bg_sampler = BalancedPositiveNegativeSampler(BIG, 0.5)
        model.roi_heads.fg_bg_sampler = BalancedPositiveNegativeSampler(BIG, 0.25)
    images, targets = make_batch()
    stock = model(images, targets)
    sum(stock.values()).backward()
    stock_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    match family:
        case "retinanet":
            model = balance_retinanet(model, cls_loss=SigmoidFocalLoss(alpha=0.25, gamma=2.0), normalizer="per_image",
                                      background_column=True)
        case "fcos":
            model = balance_fcos(model, cls_loss=SigmoidFocalLoss(alpha=0.25, gamma=2.0), normalizer="per_batch",
                                 background_column=True)
        case "faster_rcnn":
            model = balance_faster_rcnn(model, roi_sampler=FixedRatioSampler(num_samples=BIG, positive_fraction=0.25),
                                        rpn_sampler=FixedRatioSampler(num_samples=BIG, positive_fraction=0.5))
        case "ssd":
            model = balance_ssd(model)
    ours = model(images, targets)
    sum(ours.values()).backward()
    return stock, ours, stock_grads, _grads(model)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in RESNET50 | {"ssd300_vgg16"} else n for n in ZOO]
)
def test_adapted_zoo_model_configured_as_stock_gives_torchvision_losses_and_gradients(name):
    stock, ours, gs, go = _stock_then_adapted(name)
    assert stock.keys() == ours.keys()
    for key in stock:
        assert float(stock[key].detach()) > 0, key  # every term is exercised
        torch.testing.assert_close(ours[key], stock[key], rtol=1e-5, atol=1e-6, msg=key)
    assert gs.keys() == go.keys()
    for key in gs:  # float32 sums in another order: equal to 1e-4 of each tensor's largest entry
        torch.testing.assert_close(go[key], gs[key], rtol=1e-4, atol=1e-4 * float(gs[key].abs().max()), msg=key)


def test_retinanet_v2_keeps_its_giou_box_loss_and_v1_its_l1():
    v2 = balance_retinanet(build_zoo_model("retinanet_resnet50_fpn_v2", num_classes=K, min_size=64, max_size=64),
                           cls_loss=SigmoidFocalLoss())
    assert isinstance(v2.head.box_loss, GIoULoss)
    v1 = balance_retinanet(build_zoo_model("retinanet_resnet50_fpn", num_classes=K, min_size=64, max_size=64),
                           cls_loss=SigmoidFocalLoss())
    assert isinstance(v1.head.box_loss, L1Loss)


@pytest.mark.slow
def test_fcos_takes_the_dense_remedies_and_keeps_its_box_and_centerness_losses():
    torch.manual_seed(0)
    model = build_zoo_model("fcos_resnet50_fpn", num_classes=K, min_size=64, max_size=64)
    images, targets = make_batch()
    stock = model(images, targets)
    model = balance_fcos(model, cls_loss=GHMCLoss())
    out = model(images, targets)
    for key in ("bbox_regression", "bbox_ctrness"):
        torch.testing.assert_close(out[key], stock[key])
    assert not torch.allclose(out["classification"], stock["classification"])
    sum(out.values()).backward()
    head = model.head.classification_head
    assert head.cls_logits.weight.grad is not None and torch.isfinite(head.cls_logits.weight.grad).all()
    # GHM-C is called once per FPN level (the authors' setting), over all images
    assert len(model.head.anchors_per_level) == 5 and sum(model.head.anchors_per_level) > 0


# ------------------------------------------------------------------------------------------- weights


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A temporary, empty torch hub cache (TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"
    return tmp_path / "hub"


def _fake_download(name: str, *, perturb_classifier: bool = True) -> dict[str, torch.Tensor]:
    """Save a weights=None model (COCO's 91 classes) under the official cache file name of its DEFAULT weights."""
    torch.manual_seed(1)
    state = get_model(name, weights=None, weights_backbone=None).state_dict()
    g = torch.Generator().manual_seed(2)
    for key, value in state.items():
        if value.is_floating_point():  # distinct values everywhere (BN statistics included)
            state[key] = value + 0.01 * torch.randn(value.shape, generator=g)
    path = hub_cache_file(get_model_weights(name).DEFAULT)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


SMALLEST = {
    "retinanet": ("retinanet_resnet50_fpn", ["head.classification_head.cls_logits"]),
    "fcos": ("fcos_resnet50_fpn", ["head.classification_head.cls_logits"]),
    "faster_rcnn": ("fasterrcnn_mobilenet_v3_large_320_fpn", ["roi_heads.box_predictor"]),
    "ssd": ("ssdlite320_mobilenet_v3_large", [f"head.classification_head.module_list.{i}.1" for i in range(6)]),
}


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if SMALLEST[f][0] in RESNET50 else f for f in SMALLEST]
)
def test_named_weights_load_offline_with_the_head_replaced_for_k_classes(hub, family):
    name, heads = SMALLEST[family]
    state = _fake_download(name)
    model = build_zoo_model(name, num_classes=K, weights="DEFAULT")
    own = model.state_dict()
    fresh = [k for k in own if any(k.startswith(h + ".") for h in heads)]
    assert fresh, "the class-dependent layers were found"
    for key in fresh:  # sized for K + 1 columns, not COCO's 91
        assert own[key].shape != state[key].shape
    loaded = [k for k in own if k not in fresh]
    assert all(k in state for k in loaded)  # FrozenBatchNorm2d has no num_batches_tracked; nothing else is missing
    for key in loaded:
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0, msg=key)  # loaded bit for bit
    if family in ("retinanet", "fcos"):
        head = model.head.classification_head
        assert head.num_classes == K + 1 and head.cls_logits.out_channels == head.num_anchors * (K + 1)
        # only the fresh classifier gets the focal prior
        torch.testing.assert_close(head.cls_logits.bias, torch.full_like(head.cls_logits.bias, -math.log(99.0)))
    if family in ("retinanet", "fcos", "faster_rcnn"):  # torchvision's fine-tuning build: frozen BN, 3 layers
        assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    images, targets = make_batch()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_loaded_classifier_keeps_its_bias_through_the_config(hub):
    from detbalance.builders import build_model
    from detbalance.config import ExperimentConfig, ModelConfig

    state = _fake_download("retinanet_resnet50_fpn")
    cfg = ExperimentConfig(model=ModelConfig(name="retinanet_resnet50_fpn", weights="DEFAULT", min_size=64,
                                             max_size=64))
    model = build_model(cfg, num_classes=90, image_size=64)  # 91 columns: COCO's classifier is kept
    bias = model.head.classification_head.cls_logits.bias
    torch.testing.assert_close(bias, state["head.classification_head.cls_logits.bias"], rtol=0, atol=0)
    assert bias.std() > 0.005  # the file's distinct biases, not one prior value


def test_trainable_backbone_layers_pass_through_to_torchvision(hub):
    _fake_download("fasterrcnn_mobilenet_v3_large_320_fpn")
    frozen = build_zoo_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=K, weights="DEFAULT",
                             trainable_backbone_layers=0)
    assert not any(p.requires_grad for p in frozen.backbone.body.parameters())
    all_layers = build_zoo_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=K, weights="DEFAULT",
                                 trainable_backbone_layers=6)
    assert all(p.requires_grad for p in all_layers.backbone.body.parameters())


def test_missing_cache_file_names_the_path_and_the_url(hub):
    weight = get_model_weights("ssdlite320_mobilenet_v3_large").DEFAULT
    with pytest.raises(FileNotFoundError) as err:
        build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K, weights="DEFAULT")
    message = str(err.value)
    assert str(hub / "checkpoints" / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth") in message
    assert weight.url in message and "model.weights" in message
    with pytest.raises(FileNotFoundError, match="model.weights_backbone: MobileNet_V3_Large_Weights.IMAGENET1K_V1"):
        build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K,
                        weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1")


def test_local_state_dict_loads_every_tensor(tmp_path):
    torch.manual_seed(3)
    source = build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth")  # a checkpoint holding the state dict
    model = build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K, weights=str(tmp_path / "ckpt.pth"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    # another class count: the classifier is made afresh, the rest loaded
    other = build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K + 2, weights=str(tmp_path / "ckpt.pth"))
    assert other.head.classification_head.num_columns == K + 3
    torch.testing.assert_close(other.backbone.features[0][0][0].weight, state["backbone.features.0.0.0.weight"])
    # a file of another model is refused, naming the keys
    torch.save(get_model("ssd300_vgg16", weights=None, weights_backbone=None, num_classes=4).state_dict(),
               tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match=r"vgg.pth.*does not fit a SSD of this build: .*missing"):
        build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K, weights=str(tmp_path / "vgg.pth"))


@pytest.mark.parametrize(
    ("name", "spec", "match"),
    [
        ("retinanet_resnet50_fpn", "FCOS_ResNet50_FPN_Weights.COCO_V1",
         r"model.weights: 'FCOS_ResNet50_FPN_Weights.COCO_V1' are the weights of fcos_resnet50_fpn \(fcos family\), "
         r"not of retinanet_resnet50_fpn \(retinanet family\); accepted: \['DEFAULT', "
         r"'RetinaNet_ResNet50_FPN_Weights.COCO_V1'\]"),
        ("retinanet_resnet50_fpn", "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1", "weights of retinanet_resnet50_fpn_v2"),
        ("retinanet_resnet50_fpn", "COCO_V2", "'COCO_V2' is not a weights name of retinanet_resnet50_fpn"),
        ("retinanet_resnet50_fpn", "Nope_Weights.X", "unknown torchvision weights 'Nope_Weights.X'"),
        ("ssd300_vgg16", "missing.pth", "model.weights: file 'missing.pth' not found"),
    ],
)
def test_bad_weights_are_clear_errors(name, spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        resolve_weights(name, spec)


def test_weights_names_resolve_through_torchvision():
    assert str(resolve_weights("retinanet_resnet50_fpn_v2", "DEFAULT")) == "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"
    assert str(resolve_weights("retinanet_resnet50_fpn_v2", "COCO_V1")) == "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"
    assert str(resolve_weights("fcos_resnet50_fpn", "ResNet50_Weights.IMAGENET1K_V2", part="weights_backbone")) == (
        "ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(ValueError, match="weights_backbone: 'VGG16_Weights.IMAGENET1K_V1' are VGG16_Weights"):
        resolve_weights("fcos_resnet50_fpn", "VGG16_Weights.IMAGENET1K_V1", part="weights_backbone")


# ----------------------------------------------------------------------------------- sizes, describe


def test_sizes_follow_torchvision_and_the_settings():
    model = build_zoo_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=K)
    d = describe_model(model, name="fasterrcnn_mobilenet_v3_large_320_fpn")
    assert (d["min_size"], d["max_size"], d["fixed_size"]) == (320, 640, None)  # torchvision's defaults
    assert d["parameters"] == sum(p.numel() for p in model.parameters()) and d["weights"] == "none"
    assert d["family"] == "faster_rcnn"
    model = build_zoo_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=K, min_size=256, max_size=400,
                            image_mean=(0.1, 0.2, 0.3), image_std=(1.0, 1.0, 2.0))
    d = describe_model(model, name="fasterrcnn_mobilenet_v3_large_320_fpn", weights="DEFAULT")
    assert (d["min_size"], d["max_size"]) == (256, 400)
    assert d["image_mean"] == pytest.approx([0.1, 0.2, 0.3]) and d["image_std"] == [1.0, 1.0, 2.0]
    assert d["weights"] == "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"
    ssd = build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K, min_size=256)
    assert describe_model(ssd, name="ssdlite320_mobilenet_v3_large")["fixed_size"] == [256, 256]
    images, _ = make_batch()
    ssd.eval()
    with torch.no_grad():
        transformed, _ = ssd.transform(images)
    assert tuple(transformed.tensors.shape[-2:]) == (256, 256)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_size": 800, "max_size": 600}, r"model.min_size \(800\) must not exceed model.max_size \(600\)"),
        ({"trainable_backbone_layers": 3}, "model.trainable_backbone_layers: needs pretrained weights"),
        ({"weights": "DEFAULT", "weights_backbone": "DEFAULT"}, "model.weights_backbone: not used"),
    ],
)
def test_bad_build_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_zoo_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=K, **kwargs)


def test_unknown_model_lists_the_accepted_names():
    with pytest.raises(ValueError, match=r"unknown model 'yolov8'; accepted: the small presets \['retinanet', "
                                         r"'faster_rcnn', 'ssd'\] or \['retinanet_resnet50_fpn'"):
        model_family("yolov8")


# ------------------------------------------------------------------------------------ SSD background prior


def test_background_prior_starts_every_box_at_the_foreground_probability():
    model = build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K, min_size=128)
    init_background_prior(model, 0.01)
    head = model.head.classification_head
    for block in head.module_list:
        bias = block[-1].bias.view(-1, K + 1)
        probs = bias.softmax(-1)  # what a box with zero features predicts
        torch.testing.assert_close(probs[:, 0], torch.full_like(probs[:, 0], 0.99))
        torch.testing.assert_close(probs[:, 1:], torch.full_like(probs[:, 1:], 0.01 / K))
    # the softmax focal loss over all boxes starts far lower than with torchvision's zero biases
    images, targets = make_batch()
    torch.manual_seed(0)
    stock = balance_ssd(build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K, min_size=128),
                        negative_ratio=None, cls_loss=SoftmaxFocalLoss(alpha=None, gamma=2.0))
    torch.manual_seed(0)
    prior = balance_ssd(build_zoo_model("ssdlite320_mobilenet_v3_large", num_classes=K, min_size=128),
                        negative_ratio=None, cls_loss=SoftmaxFocalLoss(alpha=None, gamma=2.0), background_prior=0.01)
    with torch.no_grad():
        ratio = prior(images, targets)["classification"] / stock(images, targets)["classification"]
    assert float(ratio) < 0.2
    with pytest.raises(ValueError, match="background_prior must lie in"):
        init_background_prior(model, 1.0)


def test_the_torch_free_name_tables_match_torchvisions_registry():
    from torchvision.models import detection as tv_detection
    from torchvision.models import get_weight, list_models

    box_models = {n for n in list_models(module=tv_detection) if not n.startswith(("maskrcnn", "keypointrcnn"))}
    assert set(ZOO) == box_models
    for name, info in ZOO.items():
        enum = get_model_weights(name)
        assert (enum.__name__, tuple(m.name for m in enum)) == (info.weights, info.weights_members)
        backbone = type(get_weight(f"{info.backbone_weights}.DEFAULT"))
        assert tuple(m.name for m in backbone) == info.backbone_members


# ------------------------------------------------------------------------------------ through the config


@pytest.mark.parametrize(
    ("name", "overrides", "check"),
    [
        pytest.param("retinanet_resnet50_fpn_v2", ["remedy.cls_loss.name=ghm_c"],
                     lambda m: isinstance(m.head.box_loss, GIoULoss) and isinstance(m.head.cls_loss, GHMCLoss),
                     marks=pytest.mark.slow),
        pytest.param("fcos_resnet50_fpn", ["remedy.cls_loss.name=ce", "remedy.cls_loss.alpha=0.75"],
                     lambda m: isinstance(m.head, BalancedFCOSHead) and m.head.cls_loss.gamma == 0.0,
                     marks=pytest.mark.slow),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", ["remedy.roi_sampler.name=ohem"],
         lambda m: type(m.roi_heads.sampler).__name__ == "OHEMSampler"),
        ("ssdlite320_mobilenet_v3_large", ["model.min_size=128", "remedy.ssd_mining.negative_ratio=none",
                                           "remedy.cls_loss.name=focal", "remedy.ssd_mining.background_prior=0.01"],
         lambda m: m.negative_ratio is None and float(m.head.classification_head.module_list[0][-1].bias[0].detach()) > 5),
    ],
    ids=["retinanet_v2_ghmc", "fcos_alpha_ce", "frcnn_ohem", "ssdlite_focal_prior"],
)
def test_build_model_adapts_every_family_from_the_config(name, overrides, check):
    from detbalance.builders import build_model
    from detbalance.config import ExperimentConfig, apply_overrides

    sizes = [] if any(o.startswith("model.min_size") for o in overrides) or "ssd" in name else [
        "model.min_size=64", "model.max_size=64"]
    cfg = apply_overrides(ExperimentConfig(), [f"model.name={name}", *sizes, *overrides])
    model = build_model(cfg, num_classes=K, image_size=64)
    assert check(model)
    images, targets = make_batch()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert describe_model(model, name=name)["family"] == cfg.model.arch


def test_zoo_input_sizes_are_torchvisions():
    import inspect

    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    for cls in (RetinaNet, FCOS, FasterRCNN):
        params = inspect.signature(cls).parameters
        assert (params["min_size"].default, params["max_size"].default) == (800, 1333)
    for name in ("fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"):
        t = build_zoo_model(name, num_classes=K).transform
        assert (t.min_size[-1], t.max_size) == (ZOO[name].min_size, ZOO[name].max_size)
    assert {n: (m.min_size, m.max_size) for n, m in ZOO.items() if m.fixed_size} == {
        "ssd300_vgg16": (300, 300), "ssdlite320_mobilenet_v3_large": (320, 320)}


def test_fit_trains_a_zoo_model_and_describes_it(tmp_path):
    from detbalance.config import load_config
    from detbalance.engine import fit

    cfg = load_config(None, overrides=[
        "data.train=builtin:tiny", "model.name=ssdlite320_mobilenet_v3_large", "model.min_size=128",
        "engine.iterations=2", "engine.batch_size=2", "engine.device=cpu", "engine.log_interval=1",
    ])
    result = fit(cfg, output=tmp_path / "run", progress=False)
    assert result.steps == 2 and "AP" in result.metrics
    assert result.model["name"] == "ssdlite320_mobilenet_v3_large" and result.model["family"] == "ssd"
    assert result.model["fixed_size"] == [128, 128] and result.model["weights"] == "none"
    assert result.model["parameters"] > 1_000_000


def test_a_small_preset_loads_a_local_state_dict(tmp_path):
    from detbalance.builders import build_model
    from detbalance.config import ExperimentConfig, ModelConfig

    torch.manual_seed(5)  # an adapted model's state (its EMA normaliser buffers are left out when loading)
    source = build_model(ExperimentConfig(), num_classes=K, image_size=64)
    assert "head.normalizer.ema" in source.state_dict()
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "preset.pth")
    cfg = ExperimentConfig(model=ModelConfig(weights=str(tmp_path / "preset.pth")))
    model = build_model(cfg, num_classes=K, image_size=64)
    for key, value in model.state_dict().items():
        if "normalizer" not in key:
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    # another class count: the classifier is fresh (torchvision's prior), the rest is the file's
    other = build_model(cfg, num_classes=K + 1, image_size=64)
    bias = other.head.classification_head.cls_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(99.0)))
    torch.testing.assert_close(other.backbone.stem[0].weight, state["backbone.stem.0.weight"])
