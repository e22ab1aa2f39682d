"""The `crowded` benchmark preset has a lower positive fraction than `default` (counted as compare does)."""

from __future__ import annotations

import dataclasses

from detbalance.analysis.assignment import dataset_assignment_stats
from detbalance.builders import build_model
from detbalance.config import ExperimentConfig
from detbalance.data import PRESETS, make_benchmark


def test_crowded_preset_has_more_negatives_per_positive():
    ratio = {}
    for name in ("default", "crowded"):
        spec = dataclasses.replace(PRESETS[name], num_train=120)
        ds = make_benchmark(spec)
        model = build_model(ExperimentConfig(), num_classes=5, image_size=spec.image_size)
        stats = dataset_assignment_stats(model, ds, num_images=120)
        assert stats.num_unmatched_gt == 0
        ratio[name] = stats.negatives_per_positive
        objects = len(ds.labels) / len(ds)
        assert objects > (2.0 if name == "crowded" else 1.0)
    assert ratio["crowded"] > 2 * ratio["default"] > 2000
