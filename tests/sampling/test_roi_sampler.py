"""The RoI sampler contract (detbalance.sampling.roi_sampler): each sampler against its pure function."""

from __future__ import annotations

import pytest
import torch

from detbalance.config import FixedRatioConfig, OHEMConfig, StratifiedOHEMConfig
from detbalance.sampling import (
    BootstrappedSampler,
    FixedRatioSampler,
    OHEMSampler,
    RoIBatch,
    RoILosses,
    StratifiedOHEMSampler,
    sample_fixed_ratio_batched,
    sampler_loss_weights,
    sampler_needs_losses,
    select_hard_examples,
    select_hard_examples_stratified,
)
from tests.sampling.inputs import random_rois


def batch(num_images: int = 3, per_image: int = 60, seed: int = 0) -> tuple[RoIBatch, RoILosses]:
    r = random_rois(num_images, per_image, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rois = RoIBatch(
        labels=r.labels, boxes=r.boxes, batch_idx=r.batch_idx,
        max_iou=torch.rand(r.labels.numel(), generator=g),
        mined=torch.rand(r.labels.numel(), generator=g) < 0.1,
        progress=0.3, num_images=num_images,
    )
    return rois, RoILosses(r.cls_losses, r.loc_losses)


def test_declared_needs():
    assert not sampler_needs_losses(FixedRatioSampler()) and not sampler_needs_losses(BootstrappedSampler())
    assert sampler_needs_losses(OHEMSampler()) and sampler_needs_losses(StratifiedOHEMSampler())
    assert not sampler_needs_losses(lambda rois, *, losses=None, generator=None: None)
    assert sampler_loss_weights(FixedRatioSampler(), 0.5) == (1.0, 1.0)
    assert sampler_loss_weights(StratifiedOHEMSampler(), 0.5) == (1.0, 1.0)
    assert sampler_loss_weights(StratifiedOHEMSampler(), 0.0) == (1.5, 0.5)
    assert sampler_loss_weights(StratifiedOHEMSampler(cls_weight=(2.0, 0.0)), 0.75) == (0.5, 1.25)


def test_fixed_ratio_is_the_batched_function_with_image_offsets():
    rois, _ = batch()
    out = FixedRatioSampler(num_samples=16, positive_fraction=0.25)(rois, generator=torch.Generator().manual_seed(3))
    per_image = sample_fixed_ratio_batched(list(rois.labels.split(rois.counts())), 16, 0.25,
                                           generator=torch.Generator().manual_seed(3))
    offsets = [0, 60, 120]
    assert torch.equal(out.positive, torch.cat([s.positive + o for s, o in zip(per_image, offsets)]))
    assert torch.equal(out.negative, torch.cat([s.negative + o for s, o in zip(per_image, offsets)]))


def test_bootstrapped_takes_mined_background_first():
    rois, _ = batch()
    out = BootstrappedSampler(num_samples=16, positive_fraction=0.25)(rois, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        rows = torch.nonzero(rois.batch_idx == b).flatten()
        mined_bg = rows[(rois.mined[rows]) & (rois.labels[rows] == 0)]
        pos = out.positive[rois.batch_idx[out.positive] == b]
        neg = out.negative[rois.batch_idx[out.negative] == b]
        budget = 16 - pos.numel()
        assert pos.numel() == min(4, int((rois.labels[rows] > 0).sum()))
        assert bool(torch.isin(mined_bg, neg).all()) if mined_bg.numel() <= budget else True
        assert neg.numel() == min(budget, int((rois.labels[rows] == 0).sum()))
        assert bool((rois.labels[neg] == 0).all())
    # without a mined RoI it is the fixed-ratio sampler, draw for draw
    plain = rois._replace(mined=torch.zeros_like(rois.mined))
    a = BootstrappedSampler(num_samples=16)(plain, generator=torch.Generator().manual_seed(5))
    b = FixedRatioSampler(num_samples=16)(plain, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.positive, b.positive) and torch.equal(a.negative, b.negative)


def test_ohem_and_sohem_call_their_functions_with_the_schedule():
    rois, losses = batch()
    out = OHEMSampler(num_samples=10)(rois, losses=losses)
    ref = select_hard_examples(losses.cls + losses.loc, rois.labels, rois.boxes, rois.batch_idx, num_samples=10)
    assert torch.equal(out.positive, ref.positive) and torch.equal(out.negative, ref.negative)
    s = StratifiedOHEMSampler(num_samples=10)
    out = s(rois, losses=losses)
    ref = select_hard_examples_stratified(
        losses.cls, losses.loc, rois.labels, rois.boxes, rois.batch_idx, num_samples=10, progress=0.3,
        loss_weights=(1.5 - 0.3, 0.5 + 0.3), quotas=s.distribution(0.3),
    )
    assert torch.equal(out.positive, ref.positive) and torch.equal(out.negative, ref.negative)
    # the default schedule is the stratified module's default distribution
    from detbalance.sampling import default_stratum_distribution

    for p in (0.0, 0.4, 1.0):
        torch.testing.assert_close(torch.tensor(s.distribution(p)), torch.tensor(default_stratum_distribution(p, 4)))
    with pytest.raises(ValueError, match="losses"):
        OHEMSampler()(rois)
    with pytest.raises(ValueError, match="losses"):
        s(rois, losses=RoILosses(losses.cls[:3], losses.loc[:3]))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: FixedRatioSampler(num_samples=0), "num_samples"),
        (lambda: BootstrappedSampler(positive_fraction=1.5), "positive_fraction"),
        (lambda: OHEMSampler(nms_iou=1.2), "nms_iou"),
        (lambda: StratifiedOHEMSampler(strata=0), "strata"),
        (lambda: StratifiedOHEMSampler(cls_weight=(1.0, -1.0)), "cls_weight"),
        (lambda: StratifiedOHEMSampler(decay=(1.0,)), "decay"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_config_classes_are_the_samplers_plus_a_name():
    """Each hyperparameter is declared once (torch-free): the sampler adds the sampling, the config only ``name``,
    and the builder maps a config to the sampler with the same hyperparameters."""
    import dataclasses

    from detbalance.builders import build_roi_sampler
    from detbalance.config import RemedyConfig

    for config, sampler in ((FixedRatioConfig, FixedRatioSampler), (OHEMConfig, OHEMSampler),
                            (StratifiedOHEMConfig, StratifiedOHEMSampler)):
        params = sampler.__mro__[1]
        assert issubclass(config, params) and not issubclass(config, sampler)
        assert {f.name for f in dataclasses.fields(sampler)} == {f.name for f in dataclasses.fields(params)}
        own = {f.name for f in dataclasses.fields(config)} - {f.name for f in dataclasses.fields(params)}
        assert own == {"name"}
        assert "num_samples" not in config.__dict__.get("__annotations__", {})
        assert "num_samples" not in sampler.__dict__.get("__annotations__", {})
        cfg = config(num_samples=7)
        built = build_roi_sampler(RemedyConfig(roi_sampler=cfg))
        assert type(built) is sampler
        assert dataclasses.asdict(built) == {k: v for k, v in dataclasses.asdict(cfg).items() if k != "name"}
