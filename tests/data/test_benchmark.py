"""The built-in benchmark: determinism, the imbalance knobs measured on generated splits, box tightness."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from detbalance.data import PRESETS, BenchmarkDataset, BenchmarkSpec, class_probabilities, make_benchmark
from detbalance.data.benchmark import _digit_pools

# Small canvases and sizes so that thousands of targets generate in well under a second.
SMALL = BenchmarkSpec(
    image_size=40,
    objects_per_image=(3, 3),
    object_size=(7, 9),
    distractors_per_image=(0, 0),
    strokes_per_image=(0, 0),
    num_train=2500,
    num_test=600,
)


def _digest(ds: BenchmarkDataset) -> str:
    h = hashlib.sha256()
    for arr in (ds.images, ds.boxes, ds.labels, ds.offsets, ds.negative_boxes, ds.negative_kinds):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _binomial_ok(count: int, n: int, p: float, *, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_presets_match_the_documented_benchmark():
    d = PRESETS["default"]
    assert (d.image_size, d.objects_per_image, d.object_size) == (128, (1, 2), (7, 18))
    assert (d.distractors_per_image, d.strokes_per_image, d.long_tail_ratio) == ((1, 4), (0, 3), 100.0)
    assert (d.num_train, d.num_test, d.label_noise) == (8000, 500, 0.0)
    assert PRESETS["balanced"] == dataclasses.replace(d, long_tail_ratio=None)
    assert PRESETS["noisy"] == dataclasses.replace(d, long_tail_ratio=None, label_noise=0.1, box_noise=0.1)
    tiny = PRESETS["tiny"]
    assert (tiny.image_size, tiny.num_train, tiny.num_test) == (64, 64, 16)


def test_same_seed_same_bytes_different_seed_or_split_different_bytes():
    a = make_benchmark("tiny", split="train", seed=5)
    b = make_benchmark("tiny", split="train", seed=5)
    assert _digest(a) == _digest(b)
    assert _digest(make_benchmark("tiny", split="train", seed=6)) != _digest(a)
    assert _digest(make_benchmark("tiny", split="test", seed=5)) != _digest(a)


def test_dataset_interface_on_the_tiny_preset():
    ds = make_benchmark("tiny", split="train")
    assert len(ds) == 64 and ds.images.shape == (64, 64, 64) and ds.images.dtype == np.uint8
    assert ds.num_classes == 5 and ds.label_names == ["0", "1", "2", "3", "4"]
    image, target = ds[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    expected = torch.from_numpy(ds.images[3]).float() / 255
    for c in range(3):
        assert torch.equal(image[c], expected)
    assert target["image_id"] == 4 and ds.image_size(3) == (64, 64)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert torch.equal(target["boxes"], torch.from_numpy(ds.boxes[ds.offsets[3] : ds.offsets[4]]))
    assert ds.categories_per_image() == [sorted(set(ds.target(i)["labels"].tolist())) for i in range(len(ds))]
    gt = ds.to_coco_dict()
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3, 4, 5]
    assert len(gt["annotations"]) == len(ds.labels) and len(gt["images"]) == 64
    assert {a["id"] for a in gt["annotations"]} == set(range(1, len(ds.labels) + 1))


def test_boxes_are_valid_and_items_respect_the_overlap_limit():
    spec = dataclasses.replace(PRESETS["tiny"], num_train=200)
    ds = make_benchmark(spec)
    b = ds.boxes
    assert bool((b[:, 2:] > b[:, :2]).all()) and b.min() >= 0 and b.max() <= 64
    assert bool((b == np.round(b)).all())  # ink boxes lie on the pixel grid
    for i in range(len(ds)):
        items = np.concatenate(
            [
                ds.boxes[ds.offsets[i] : ds.offsets[i + 1]],
                ds.negative_boxes[ds.negative_offsets[i] : ds.negative_offsets[i + 1]],
            ]
        )
        for p in range(len(items)):
            for q in range(p):
                iw = min(items[p, 2], items[q, 2]) - max(items[p, 0], items[q, 0])
                ih = min(items[p, 3], items[q, 3]) - max(items[p, 1], items[q, 1])
                area = [(r[2] - r[0]) * (r[3] - r[1]) for r in (items[p], items[q])]
                assert max(iw, 0) * max(ih, 0) <= spec.max_overlap * min(area) + 1e-9


def test_box_is_the_tight_box_of_the_pasted_ink():
    """Without pixel noise or other items the background is bilinear, so outside a box each pixel equals the
    linear extrapolation of the two pixels beyond it; every edge row/column of the box holds ink above that."""
    spec = dataclasses.replace(SMALL, objects_per_image=(1, 1), noise_std=0.0, num_train=60, image_size=48)
    ds = make_benchmark(spec)
    img = ds.images.astype(np.int64)
    checked = 0
    for i in range(len(ds)):
        x1, y1, x2, y2 = ds.boxes[ds.offsets[i]].astype(int)
        if x1 < 3 or y1 < 3 or x2 > 45 or y2 > 45:
            continue
        a = img[i]
        # per side: (the box's edge line, the line just outside, the two lines beyond it)
        sides = [
            (a[y1, x1:x2], a[y1 - 1, x1:x2], a[y1 - 2, x1:x2], a[y1 - 3, x1:x2]),
            (a[y2 - 1, x1:x2], a[y2, x1:x2], a[y2 + 1, x1:x2], a[y2 + 2, x1:x2]),
            (a[y1:y2, x1], a[y1:y2, x1 - 1], a[y1:y2, x1 - 2], a[y1:y2, x1 - 3]),
            (a[y1:y2, x2 - 1], a[y1:y2, x2], a[y1:y2, x2 + 1], a[y1:y2, x2 + 2]),
        ]
        for edge, out1, out2, out3 in sides:
            assert np.abs(out1 - (2 * out2 - out3)).max() <= 3  # just outside the box: background only
            assert (edge - (2 * out1 - out2)).max() >= 8  # the box edge touches ink
        checked += 1
    assert checked >= 40


def test_class_probabilities_closed_form():
    p = class_probabilities(PRESETS["default"])
    np.testing.assert_allclose(p, 100.0 ** (-np.arange(5) / 4) / np.sum(100.0 ** (-np.arange(5) / 4)))
    assert p[0] / p[4] == pytest.approx(100.0) and p[0] / p[2] == pytest.approx(10.0)
    np.testing.assert_allclose(class_probabilities(PRESETS["default"], split="test"), np.full(5, 0.2))
    np.testing.assert_allclose(class_probabilities(PRESETS["balanced"]), np.full(5, 0.2))


def test_long_tail_train_frequencies_and_balanced_test():
    ds = make_benchmark(SMALL, split="train")
    n = len(ds.labels)
    assert n >= 7400  # 2,500 images x 3 targets, almost all placed
    counts = ds.class_counts()
    p = class_probabilities(SMALL)
    assert all(_binomial_ok(int(c), n, float(q)) for c, q in zip(counts, p)), counts
    assert 60 <= counts[0] / counts[4] <= 170  # 100:1 within sampling error (~55 rare-class targets)
    test = make_benchmark(SMALL, split="test")
    tc = test.class_counts()
    assert all(_binomial_ok(int(c), len(test.labels), 0.2) for c in tc), tc


def test_objects_per_image_and_empty_fraction():
    spec = dataclasses.replace(
        SMALL, image_size=64, objects_per_image=(1, 4), empty_fraction=0.3, num_train=2000
    )
    ds = make_benchmark(spec)
    per_image = np.diff(ds.offsets)
    empty = int((per_image == 0).sum())
    assert _binomial_ok(empty, 2000, 0.3)
    nonempty = per_image[per_image > 0]
    assert nonempty.min() >= 1 and nonempty.max() == 4
    assert abs(nonempty.mean() - 2.5) < 0.1  # uniform on {1, 2, 3, 4}
    assert ds.describe()["empty_images"] == empty


def test_default_like_scenes_have_about_one_and_a_half_targets_and_hard_negatives():
    spec = dataclasses.replace(PRESETS["default"], num_train=300)
    ds = make_benchmark(spec)
    # per-image counts are uniform on {1, 2} targets, {1..4} digits, {0..3} strokes: means 1.5, 2.5, 1.5;
    # bounds are 4 standard errors (a few items may find no place: only below)
    se = lambda k: 4 * math.sqrt((k * k - 1) / 12 / 300)  # noqa: E731 - sd of a uniform on k integers
    assert 1.5 - se(2) <= len(ds.labels) / len(ds) <= 1.5 + se(2)
    digits = ds.negative_kinds[ds.negative_kinds >= 0]
    strokes = int((ds.negative_kinds == -1).sum())
    assert set(np.unique(digits).tolist()) == {5, 6, 7, 8, 9}  # distractors are digits 5-9, never targets
    assert 2.5 - se(4) <= len(digits) / len(ds) <= 2.5 + se(4)
    assert 1.5 - se(4) <= strokes / len(ds) <= 1.5 + se(4)
    assert np.diff(ds.negative_offsets).min() >= 1


def test_label_and_box_noise_fractions_train_only():
    spec = dataclasses.replace(SMALL, num_train=1000, label_noise=0.2, box_noise=0.3)
    ds = make_benchmark(spec)
    n = len(ds.labels)
    wrong = ds.labels != ds.clean_labels
    assert np.array_equal(wrong, ds.noisy_label) and _binomial_ok(int(wrong.sum()), n, 0.2)
    moved = (ds.boxes != ds.clean_boxes).any(axis=1)
    assert _binomial_ok(int(ds.noisy_box.sum()), n, 0.3)
    assert not moved[~ds.noisy_box].any() and moved[ds.noisy_box].mean() > 0.9
    b = ds.boxes
    assert bool((b[:, 2:] >= b[:, :2] + 1).all()) and b.min() >= 0 and b.max() <= spec.image_size
    test = make_benchmark(spec, split="test")
    assert (
        np.array_equal(test.labels, test.clean_labels)
        and not test.noisy_label.any()
        and not test.noisy_box.any()
    )
    d = ds.describe()
    assert d["noisy_labels"] == int(wrong.sum()) and d["label_noise"] == 0.2
    json.dumps(d)


def test_train_and_test_digit_pools_are_disjoint_and_stratified():
    pools = _digit_pools()
    (tr_img, tr_dig), (te_img, te_dig) = pools["train"], pools["test"]
    assert len(tr_dig) + len(te_dig) == 1797
    for d in range(10):
        frac = (te_dig == d).sum() / ((te_dig == d).sum() + (tr_dig == d).sum())
        assert abs(frac - 0.25) < 0.01
    from sklearn.datasets import load_digits

    all_scans = {s.tobytes() for s in (load_digits().images / 16.0).astype(np.float32)}
    assert len({s.tobytes() for s in tr_img} | {s.tobytes() for s in te_img}) == len(all_scans)


def test_bad_specs_and_arguments_raise_naming_the_value():
    with pytest.raises(
        ValueError, match=r"objects_per_image must be integers 0 <= low <= high, got \(3, 1\)"
    ):
        BenchmarkSpec(objects_per_image=(3, 1))
    with pytest.raises(ValueError, match="label_noise must lie in"):
        BenchmarkSpec(label_noise=1.5)
    with pytest.raises(ValueError, match="long_tail_ratio must be >= 1"):
        BenchmarkSpec(long_tail_ratio=0.5)
    with pytest.raises(ValueError, match="object_size must lie in"):
        BenchmarkSpec(image_size=16, object_size=(7, 18))
    with pytest.raises(ValueError, match="preset_or_spec must be one of"):
        make_benchmark("huge")
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        make_benchmark("tiny", split="val")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        make_benchmark("tiny", seed=-1)


def test_empty_split_and_describe():
    spec = dataclasses.replace(PRESETS["tiny"], num_test=0)
    ds = make_benchmark(spec, split="test")
    assert len(ds) == 0 and ds.images.shape == (0, 64, 64) and ds.boxes.shape == (0, 4)
    d = make_benchmark("tiny").describe()
    assert d["preset"] == "tiny" and d["num_images"] == 64 and sum(d["class_counts"]) == d["num_objects"]
    assert PRESETS["tiny"].describe()["objects_per_image"] == [1, 2]


def test_noisy_preset_does_not_single_out_any_class():
    # Uniform flips on a 100:1 long tail make most of the rarest class's labels wrong; the noisy preset has
    # balanced classes, so every class's share of wrong labels stays near the 10 % noise rate.
    tail = make_benchmark(dataclasses.replace(SMALL, long_tail_ratio=100.0, label_noise=0.3))
    flat = make_benchmark(dataclasses.replace(SMALL, long_tail_ratio=None, label_noise=0.3))

    def wrong_share(ds, label):
        given = ds.labels == label
        return float((ds.noisy_label & given).sum() / given.sum())

    assert wrong_share(tail, 5) > 0.8
    assert all(0.2 < wrong_share(flat, c) < 0.4 for c in range(1, 6))
    assert PRESETS["noisy"].long_tail_ratio is None


def test_a_split_is_generated_once_per_process():
    from detbalance.data import benchmark

    benchmark._generate_cached.cache_clear()
    a = make_benchmark(SMALL)
    b = make_benchmark(SMALL)
    assert a.images is b.images and benchmark._generate_cached.cache_info().hits == 1
