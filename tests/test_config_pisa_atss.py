"""Config and builders for PISA (ISR-N sampler, ISR-P + CARL) and ATSS: TOML round trip, errors naming the key,
and the built model carries the configured objects."""

from __future__ import annotations

import pytest

from detbalance.builders import build_model
from detbalance.config import ConfigError, dump_toml, load_config, load_toml
from detbalance.losses.pisa import PrimeSampleAttention
from detbalance.sampling import ATSSAssigner, ScoreHLRSampler


def test_round_trip_and_defaults() -> None:
    cfg = load_config(overrides=["model.arch=faster_rcnn", "remedy.roi_sampler.name=score_hlr", "remedy.pisa={}"])
    assert load_toml(dump_toml(cfg)) == cfg
    s, p = cfg.remedy.roi_sampler, cfg.remedy.pisa
    assert (s.num_samples, s.positive_fraction, s.k, s.bias, s.score_thr, s.iou_thr) == (512, 0.25, 0.5, 0.0, 0.05, 0.5)
    assert (p.isr_k, p.isr_bias, p.carl_k, p.carl_bias) == (2.0, 0.0, 1.0, 0.2)
    cfg = load_config(overrides=['remedy.assigner={name="atss", topk=9}', "remedy.pisa.carl_k=none"])
    assert load_toml(dump_toml(cfg)) == cfg
    assert cfg.remedy.assigner.topk == 9 and cfg.remedy.pisa.carl_k is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.arch=ssd", "remedy.assigner.name=atss"], "remedy.assigner"),
        (["model.arch=faster_rcnn", "remedy.assigner.name=atss"], "remedy.assigner"),
        (["model.arch=ssd", "remedy.pisa={}"], "remedy.pisa"),
        (["remedy.cls_loss.name=ghm_c", "remedy.pisa={}"], "remedy.pisa"),
        (["remedy.assigner.name=atss", "remedy.assigner.topk=0"], "remedy.assigner.topk"),
        (["remedy.pisa.isr_bias=2"], "remedy.pisa.isr_bias"),
        (["model.arch=faster_rcnn", "remedy.roi_sampler.name=score_hlr", "remedy.roi_sampler.score_thr=-1"],
         "remedy.roi_sampler.score_thr"),
        (["remedy.assigner.name=atss", "remedy.assigner.top_k=9"], "remedy.assigner.top_k"),
    ],
)
def test_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value).startswith(key)


def test_builders_pass_the_objects() -> None:
    cfg = load_config(overrides=["model.arch=faster_rcnn", "remedy.roi_sampler.name=score_hlr", "remedy.pisa={}"])
    model = build_model(cfg, num_classes=3, image_size=64)
    assert isinstance(model.roi_heads.sampler, ScoreHLRSampler)
    assert isinstance(model.roi_heads.pisa, PrimeSampleAttention)
    cfg = load_config(overrides=["remedy.assigner.name=atss", "remedy.pisa={}"])
    model = build_model(cfg, num_classes=3, image_size=64)
    assert isinstance(model.head.assigner, ATSSAssigner) and model.head.assigner.topk == 9
    assert isinstance(model.head.pisa, PrimeSampleAttention)


def test_fcos_takes_the_assigner() -> None:
    cfg = load_config(overrides=["model.name=fcos_resnet50_fpn", "model.min_size=64", "model.max_size=64",
                                 'remedy.assigner={name="atss", topk=9}'])
    model = build_model(cfg, num_classes=3, image_size=64)
    assert isinstance(model.head.assigner, ATSSAssigner) and model.head.atss_anchor_scale == 8.0
