"""Bad inputs to every public loss and sampler, as a direct caller meets them: a table per family.

Each case names what is wrong, the expected class of outcome (``error``: a ``ValueError`` whose message holds
the keywords; ``ok``: the correct result, checked against a closed form) and runs in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from detbalance import losses as L
from detbalance.sampling import (
    BootstrappedSampler,
    FixedRatioSampler,
    IoUBalancedSampler,
    OHEMSampler,
    RoIBatch,
    RoILosses,
    ScoreHLRSampler,
    StratifiedOHEMSampler,
    mine_hard_negatives,
    repeat_factors,
    sample_fixed_ratio,
    select_hard_examples,
)

N, K = 6, 3


def _logits() -> torch.Tensor:
    return torch.linspace(-2, 2, N * K).reshape(N, K)


def _onehot() -> torch.Tensor:
    t = torch.zeros(N, K)
    t[0, 1] = 1.0
    t[3, 2] = 1.0
    return t


def _boxes(n: int = N) -> torch.Tensor:
    xy = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    return torch.cat([xy, xy + 5.0], dim=1)


# --------------------------------------------------------------------------------------- the loss table
# name -> (factory(**hyper), inputs()) with inputs a tuple of positional tensors of a correct call
LOSSES: dict[str, tuple[Callable[..., Any], Callable[[], tuple[torch.Tensor, ...]]]] = {
    "SigmoidFocalLoss": (L.SigmoidFocalLoss, lambda: (_logits(), _onehot())),
    "QualityFocalLoss": (L.QualityFocalLoss, lambda: (_logits(), _onehot() * 0.7)),
    "VarifocalLoss": (L.VarifocalLoss, lambda: (_logits(), _onehot() * 0.7)),
    "GHMCLoss": (L.GHMCLoss, lambda: (_logits(), _onehot())),
    "SoftmaxFocalLoss": (L.SoftmaxFocalLoss, lambda: (torch.linspace(-2, 2, N * (K + 1)).reshape(N, K + 1),
                                                      torch.tensor([0, 1, 2, 3, 0, -1]))),
    "SmoothL1Loss": (L.SmoothL1Loss, lambda: (_boxes() * 0.1, _boxes() * 0.1 + 0.05)),
    "ASL1Loss": (L.ASL1Loss, lambda: (_boxes() * 0.1, _boxes() * 0.1 + 0.05)),
    "L1Loss": (L.L1Loss, lambda: (_boxes() * 0.1, _boxes() * 0.1 + 0.05)),
    "GHMRLoss": (L.GHMRLoss, lambda: (_boxes() * 0.1, _boxes() * 0.1 + 0.05)),
    "GIoULoss": (L.GIoULoss, lambda: (_boxes(), _boxes() + 1.0)),
}
WITH_REDUCTION = [n for n in LOSSES if n not in ("GHMCLoss", "GHMRLoss")]

# (loss, hyperparameter, bad value)
BAD_HYPER = [
    ("SigmoidFocalLoss", "gamma", -1.0), ("SigmoidFocalLoss", "gamma", math.nan), ("SigmoidFocalLoss", "alpha", 1.5),
    ("SigmoidFocalLoss", "alpha", -0.1), ("SoftmaxFocalLoss", "gamma", -0.5), ("QualityFocalLoss", "beta", -1.0),
    ("VarifocalLoss", "alpha", -1.0), ("VarifocalLoss", "gamma", -2.0), ("GHMCLoss", "bins", 0),
    ("GHMCLoss", "momentum", 1.5), ("GHMCLoss", "momentum", -0.1), ("GHMRLoss", "mu", 0.0), ("GHMRLoss", "bins", 0),
    ("SmoothL1Loss", "beta", -1.0), ("ASL1Loss", "mu", 0.0), ("ASL1Loss", "mu", -1.0), ("GIoULoss", "eps", 0.0),
    ("GIoULoss", "eps", -1e-7),
]


@pytest.mark.parametrize("name", WITH_REDUCTION)
def test_unknown_reduction_is_refused(name: str) -> None:
    factory, _ = LOSSES[name]
    with pytest.raises(ValueError, match="reduction"):
        factory(reduction="avg")


@pytest.mark.parametrize("name", list(LOSSES))
def test_mismatched_shapes_are_refused(name: str) -> None:
    factory, inputs = LOSSES[name]
    x, y = inputs()
    with pytest.raises(ValueError, match="shape|must"):
        factory()(x, y[:-1])


@pytest.mark.parametrize("name", list(LOSSES))
def test_integer_predictions_are_refused(name: str) -> None:
    factory, inputs = LOSSES[name]
    x, y = inputs()
    with pytest.raises((ValueError, TypeError), match="float|dtype|floating"):
        factory()(x.round().long(), y)


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_correct_call_is_finite_with_finite_gradients(name: str) -> None:
    factory, inputs = LOSSES[name]
    x, y = inputs()
    x = x.clone().requires_grad_(True)
    loss = factory()(x, y)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("name", "key", "value"), BAD_HYPER, ids=[f"{n}-{k}={v}" for n, k, v in BAD_HYPER])
def test_bad_hyperparameters_name_the_parameter(name: str, key: str, value: Any) -> None:
    factory, _ = LOSSES[name]
    with pytest.raises(ValueError, match=key):
        factory(**{key: value})


# ----------------------------------------------------------------------------------- GIoU: inverted boxes


@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        ([10.0, 10.0, 5.0, 5.0], 1.0),  # inverted in x and y: an empty box at (10, 10); enclosing = target
        ([0.0, 0.0, -5.0, 10.0], 1.0),  # inverted in x: empty, touching the target's corner
        ([20.0, 0.0, 15.0, 10.0], 1.0 + (200 - 100) / 200),  # empty at x = 20: enclosing 20x10, union 100
        ([0.0, 0.0, 10.0, 10.0], 0.0),  # equal to the target
    ],
    ids=["inverted-xy", "inverted-x", "inverted-far", "equal"],
)
def test_giou_clamps_an_inverted_predicted_box_to_an_empty_box(pred: list[float], expected: float) -> None:
    loss = L.GIoULoss()(torch.tensor([pred]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(loss, torch.tensor([expected]))


def test_giou_refuses_an_inverted_target_box() -> None:
    with pytest.raises(ValueError, match="target box has x2 < x1"):
        L.GIoULoss()(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[10.0, 0.0, 0.0, 10.0]]))
    # validate_args=False: the caller vouches for the targets (no check, no error)
    L.GIoULoss(validate_args=False)(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[10.0, 0.0, 0.0, 10.0]]))


# ------------------------------------------------------------------------------ sample_class_weights


@pytest.mark.parametrize("label", [3, 4, 100, -2, -7])
def test_sample_class_weights_refuses_labels_outside_minus_one_to_k(label: int) -> None:
    with pytest.raises(ValueError, match=r"labels must be in -1\.\.2"):
        L.sample_class_weights(torch.tensor([0, 1, label]), torch.tensor([0.5, 2.0]))


@pytest.mark.parametrize(
    ("labels", "expected"),
    [([-1], [0.0]), ([0], [1.0]), ([1], [0.5]), ([2], [2.0]), ([2, -1, 0, 1], [2.0, 0.0, 1.0, 0.5])],
)
def test_sample_class_weights_in_range(labels: list[int], expected: list[float]) -> None:
    torch.testing.assert_close(L.sample_class_weights(torch.tensor(labels), torch.tensor([0.5, 2.0])),
                               torch.tensor(expected))


def test_sample_class_weights_without_validation_is_the_documented_clamp() -> None:
    w = L.sample_class_weights(torch.tensor([5]), torch.tensor([0.5, 2.0]), validate_args=False)
    torch.testing.assert_close(w, torch.tensor([2.0]))


@pytest.mark.parametrize(
    ("class_weight", "kwargs", "keyword"),
    [(torch.ones(2, 2), {}, "1-D"), (torch.ones(0), {}, "non-empty"), (torch.ones(2), {"background_weight": -1.0},
                                                                        "background_weight")],
)
def test_sample_class_weights_bad_arguments(class_weight: torch.Tensor, kwargs: dict, keyword: str) -> None:
    with pytest.raises(ValueError, match=keyword):
        L.sample_class_weights(torch.tensor([1]), class_weight, **kwargs)


# -------------------------------------------------------------------------------------- RoI samplers


def _rois(batch_idx: list[int], labels: list[int], num_images: int = 2) -> RoIBatch:
    n = len(labels)
    return RoIBatch(
        labels=torch.tensor(labels), boxes=_boxes(n), batch_idx=torch.tensor(batch_idx),
        max_iou=torch.where(torch.tensor(labels) > 0, 0.7, 0.1), mined=torch.zeros(n, dtype=torch.bool),
        progress=0.5, num_images=num_images, gt_index=torch.where(torch.tensor(labels) > 0, 0, -1),
    )


SAMPLERS: dict[str, Callable[[], Any]] = {
    "FixedRatioSampler": lambda: FixedRatioSampler(num_samples=2, positive_fraction=0.5),
    "BootstrappedSampler": lambda: BootstrappedSampler(num_samples=2, positive_fraction=0.5),
    "OHEMSampler": lambda: OHEMSampler(num_samples=2, nms_iou=None),
    "StratifiedOHEMSampler": lambda: StratifiedOHEMSampler(num_samples=2, strata=1, nms_iou=None),
    "ScoreHLRSampler": lambda: ScoreHLRSampler(num_samples=2, positive_fraction=0.5),
    "IoUBalancedSampler": lambda: IoUBalancedSampler(num_samples=2, positive_fraction=0.5),
}
INTERLEAVED = ([0, 1, 0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 1, 0, 0])


def _call(name: str, rois: RoIBatch, seed: int = 0) -> Any:
    n = len(rois.labels)
    losses = RoILosses(cls=torch.arange(n, dtype=torch.float32), loc=torch.zeros(n),
                       scores=torch.linspace(0.1, 0.9, n), pred_boxes=rois.boxes)
    sampler = SAMPLERS[name]()
    out = sampler(rois, losses=losses if sampler.needs_losses else None, generator=torch.Generator().manual_seed(seed))
    return getattr(out, "indices", out)  # a WeightedSample (Score-HLR) carries its indices


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rois_not_grouped_by_image_get_each_image_its_budget(name: str, seed: int) -> None:
    """The issue's case: interleaved batch_idx gave image 0 three RoIs against a budget of 2."""
    rois = _rois(*INTERLEAVED)
    out = _call(name, rois, seed)
    chosen = torch.cat([out.positive, out.negative])
    per_image = torch.bincount(rois.batch_idx[chosen], minlength=2)
    assert per_image.tolist() == [2, 2], (name, out)
    assert (rois.labels[out.positive] > 0).all() and (rois.labels[out.negative] == 0).all()
    assert chosen.unique().numel() == chosen.numel()


@pytest.mark.parametrize("name", ["FixedRatioSampler", "BootstrappedSampler"])
def test_interleaved_rois_sample_as_the_grouped_ones(name: str) -> None:
    """Same draws as the same RoIs given grouped (the sort is stable), mapped back to the caller's indices."""
    b, labels = INTERLEAVED
    order = sorted(range(len(b)), key=lambda i: b[i])
    grouped = _call(name, _rois([b[i] for i in order], [labels[i] for i in order]))
    mixed = _call(name, _rois(b, labels))
    to_mixed = torch.tensor(order)
    assert sorted(to_mixed[grouped.positive].tolist()) == mixed.positive.tolist()
    assert sorted(to_mixed[grouped.negative].tolist()) == mixed.negative.tolist()


@pytest.mark.parametrize("name", ["FixedRatioSampler", "BootstrappedSampler"])
@pytest.mark.parametrize("bad", [[0, 2], [-1, 0]], ids=["above", "negative"])
def test_batch_idx_outside_the_images_is_refused(name: str, bad: list[int]) -> None:
    with pytest.raises(ValueError, match="batch_idx must be in"):
        _call(name, _rois(bad, [1, 0], num_images=2))


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize(
    ("key", "value"), [("num_samples", 0), ("num_samples", -3), ("num_samples", 1.5), ("num_samples", True)]
)
def test_bad_budgets_are_refused(name: str, key: str, value: Any) -> None:
    cls = type(SAMPLERS[name]())
    with pytest.raises(ValueError, match=key):
        cls(**{key: value})


@pytest.mark.parametrize("name", ["FixedRatioSampler", "BootstrappedSampler"])
@pytest.mark.parametrize("value", [-0.1, 1.5, "half", math.nan])
def test_bad_positive_fractions_are_refused(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match="positive_fraction"):
        type(SAMPLERS[name]())(positive_fraction=value)


@pytest.mark.parametrize("name", ["OHEMSampler", "StratifiedOHEMSampler", "ScoreHLRSampler"])
def test_mining_samplers_need_losses(name: str) -> None:
    with pytest.raises(ValueError, match="losses must be given"):
        SAMPLERS[name]()(_rois([0, 1], [1, 0]), losses=None)


@pytest.mark.parametrize("name", ["OHEMSampler", "StratifiedOHEMSampler", "ScoreHLRSampler"])
def test_mining_samplers_refuse_losses_of_another_length(name: str) -> None:
    losses = RoILosses(cls=torch.zeros(3), loc=torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        SAMPLERS[name]()(_rois([0, 1], [1, 0]), losses=losses)


def test_score_hlr_needs_the_scores_of_the_read_only_pass() -> None:
    losses = RoILosses(cls=torch.zeros(2), loc=torch.zeros(2))
    with pytest.raises(ValueError, match="scores and pred_boxes"):
        SAMPLERS["ScoreHLRSampler"]()(_rois([0, 1], [1, 0]), losses=losses)


@pytest.mark.parametrize(("key", "value"), [("strata", 0), ("cls_weight", (1.0,)), ("decay", (-1.0, 0.5)),
                                            ("nms_iou", 1.5)])
def test_stratified_ohem_bad_hyperparameters(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        StratifiedOHEMSampler(**{key: value})


@pytest.mark.parametrize(
    ("call", "keyword"),
    [
        (lambda: sample_fixed_ratio(torch.tensor([1, 0]), -1, 0.5), "num_samples"),
        (lambda: sample_fixed_ratio(torch.tensor([1, 0]), 4, 1.5), "positive_fraction"),
        (lambda: sample_fixed_ratio(torch.tensor([1.0, 0.0]), 4, 0.5), "labels"),
        (lambda: mine_hard_negatives(torch.zeros(1, 3), torch.tensor([[1, 0, 0]]), negative_ratio=-1.0),
         "negative_ratio"),
        (lambda: mine_hard_negatives(torch.zeros(3), torch.tensor([1, 0, 0])), "shape"),
        (lambda: select_hard_examples(torch.zeros(2), torch.tensor([1, 0]), _boxes(2), torch.tensor([0, 0]),
                                      num_samples=-1), "num_samples"),
        (lambda: repeat_factors([[1]], threshold=-0.1), "threshold"),
    ],
    ids=["fixed-ratio-budget", "fixed-ratio-fraction", "fixed-ratio-float-labels", "mining-ratio", "mining-shape",
         "ohem-budget", "repeat-threshold"],
)
def test_sampling_functions_refuse_bad_arguments(call: Callable[[], Any], keyword: str) -> None:
    with pytest.raises(ValueError, match=keyword):
        call()
