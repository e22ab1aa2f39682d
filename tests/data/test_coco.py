"""CocoDetection: loading, label map, crowd handling, whole-file validation, write_coco and open_dataset."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detbalance.data.benchmark as benchmark_module
from detbalance.data import (
    BenchmarkDataset,
    CocoDetection,
    DatasetError,
    collate_detection,
    make_benchmark,
    open_dataset,
    train_basic,
    write_coco,
)


def _pixels(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _write_images(root: Path, images: list[dict]) -> dict[str, np.ndarray]:
    """Write one PNG per image record (mode from ``_mode``, default RGB); return the pixel arrays."""
    arrays = {}
    for k, im in enumerate(images):
        if im.get("_skip"):
            continue
        mode = im.get("_mode", "RGB")
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        arr = _pixels(im.get("_true_height", im["height"]), im["width"], channels, seed=k)
        path = root / im["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode=mode).save(path)
        arrays[im["file_name"]] = arr
    return arrays


def _write_coco(tmp_path: Path, images: list[dict], annotations: list[dict], categories: list[dict], **extra):
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    arrays = _write_images(root, images)
    clean = [{k: v for k, v in im.items() if not k.startswith("_")} for im in images]
    ann = tmp_path / "annotations.json"
    ann.write_text(
        json.dumps({"images": clean, "annotations": annotations, "categories": categories, **extra})
    )
    return ann, root, arrays


CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 5, "name": "eel"}]


@pytest.fixture
def coco(tmp_path):
    images = [
        {"id": 10, "file_name": "a.png", "height": 20, "width": 30},
        {"id": 20, "file_name": "sub/b.png", "height": 16, "width": 16, "_mode": "L"},
        {"id": 30, "file_name": "c.png", "height": 12, "width": 8, "_mode": "RGBA"},
    ]
    annotations = [
        {"id": 100, "image_id": 10, "category_id": 7, "bbox": [1, 2, 5, 6], "iscrowd": 0},
        {"id": 101, "image_id": 10, "category_id": 3, "bbox": [10.5, 0, 4, 3.25]},
        {"id": 102, "image_id": 10, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1},
        {"id": 103, "image_id": 30, "category_id": 5, "bbox": [0, 0, 8, 12], "iscrowd": 0},
    ]
    return _write_coco(tmp_path, images, annotations, CATEGORIES)


# --- loading -------------------------------------------------------------------------------------


def test_label_map_is_contiguous_in_sorted_category_id_order(coco):
    ds = CocoDetection(coco[0], coco[1])
    assert ds.cat_id_to_label == {3: 1, 5: 2, 7: 3}
    assert ds.label_to_cat_id == {1: 3, 2: 5, 3: 7}
    assert ds.label_names == ["dog", "eel", "cat"]
    assert ds.num_classes == 3


def test_targets_are_xyxy_float32_with_labels_and_image_ids(coco):
    ds = CocoDetection(coco[0], coco[1])
    assert len(ds) == 3 and ds.image_ids == [10, 20, 30]
    t = ds.target(0)
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    torch.testing.assert_close(t["boxes"], torch.tensor([[1.0, 2.0, 6.0, 8.0], [10.5, 0.0, 14.5, 3.25]]))
    assert t["labels"].tolist() == [3, 1] and t["image_id"] == 10
    torch.testing.assert_close(ds.target(2)["boxes"], torch.tensor([[0.0, 0.0, 8.0, 12.0]]))
    assert ds.target(-1)["image_id"] == 30
    assert [ds.image_size(i) for i in range(3)] == [(20, 30), (16, 16), (12, 8)]


def test_images_without_annotations_are_kept_as_negatives_unless_drop_empty(coco):
    ds = CocoDetection(coco[0], coco[1])
    t = ds.target(1)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert ds.categories_per_image() == [[1, 3], [], [2]]
    dropped = CocoDetection(coco[0], coco[1], drop_empty=True)
    assert dropped.image_ids == [10, 30]
    torch.testing.assert_close(dropped.target(1)["boxes"], torch.tensor([[0.0, 0.0, 8.0, 12.0]]))
    torch.testing.assert_close(dropped.crowd_boxes(0)[0], torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert dropped.categories_per_image() == [[1, 3], [2]]


def test_crowd_annotations_are_kept_out_of_targets_but_exported_as_ignore_regions(coco):
    ds = CocoDetection(coco[0], coco[1])
    assert ds.target(0)["boxes"].shape[0] == 2  # the crowd box [0, 0, 10, 10] is not a target
    boxes, labels = ds.crowd_boxes(0)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert labels.tolist() == [3]
    gt = ds.to_coco_dict()
    crowd = [a for a in gt["annotations"] if a["iscrowd"] == 1]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [0.0, 0.0, 10.0, 10.0] and crowd[0]["category_id"] == 3
    assert crowd[0]["image_id"] == 10


def test_images_are_rgb_float_in_unit_range_for_gray_rgb_and_rgba(coco):
    ann, root, arrays = coco
    ds = CocoDetection(ann, root)
    rgb, _ = ds[0]
    assert rgb.shape == (3, 20, 30) and rgb.dtype == torch.float32
    torch.testing.assert_close(
        rgb, torch.from_numpy(arrays["a.png"]).permute(2, 0, 1).float() / 255, rtol=0, atol=0
    )
    gray, _ = ds[1]
    expected = torch.from_numpy(arrays["sub/b.png"]).float() / 255
    for c in range(3):
        torch.testing.assert_close(gray[c], expected, rtol=0, atol=0)
    rgba, _ = ds[2]
    torch.testing.assert_close(
        rgba, torch.from_numpy(arrays["c.png"][..., :3]).permute(2, 0, 1).float() / 255
    )


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    images = [{"id": 1, "file_name": "deep.png", "height": 3, "width": 4, "_skip": True}]
    ann, root, _ = _write_coco(tmp_path, images, [], CATEGORIES)
    deep = np.array([[0, 257, 65535, 1000]] * 3, dtype=np.uint16)
    Image.fromarray(deep).save(root / "deep.png")
    image, _ = CocoDetection(ann, root)[0]
    expected = torch.tensor([0.0, 1.0, 255.0, 4.0]) / 255  # round(v / 257)
    assert image.shape == (3, 3, 4)
    for c in range(3):
        torch.testing.assert_close(image[c], expected.expand(3, 4), rtol=0, atol=0)


def test_transforms_are_applied_in_getitem_but_not_in_target(coco):
    ds = CocoDetection(coco[0], coco[1], transforms=train_basic(flip=1.0))
    image, t = ds[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[24.0, 2.0, 29.0, 8.0], [15.5, 0.0, 19.5, 3.25]]))
    torch.testing.assert_close(
        image, torch.from_numpy(_pixels(20, 30, 3, 0)).permute(2, 0, 1).flip(-1) / 255.0
    )
    torch.testing.assert_close(ds.target(0)["boxes"][0], torch.tensor([1.0, 2.0, 6.0, 8.0]))


def test_to_coco_dict_is_accepted_by_the_coco_evaluator_and_scores_perfect_predictions(coco):
    cocoapi = pytest.importorskip("faster_coco_eval")
    ds = CocoDetection(coco[0], coco[1])
    gt = ds.to_coco_dict()
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4]
    coco_gt = cocoapi.COCO(gt)
    dets = []
    for i in range(len(ds)):
        t = ds.target(i)
        for (x1, y1, x2, y2), lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
            dets.append(
                {
                    "image_id": t["image_id"],
                    "category_id": lab,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": 1.0,
                }
            )
    ev = cocoapi.COCOeval_faster(coco_gt, coco_gt.loadRes(dets), "bbox", print_function=lambda *a: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # AP@0.5


def test_collate_detection_keeps_lists(coco):
    ds = CocoDetection(coco[0], coco[1])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert [tuple(im.shape) for im in images] == [(3, 20, 30), (3, 16, 16), (3, 12, 8)]
    assert [t["image_id"] for t in targets] == [10, 20, 30]


# --- validation: every problem, with its id --------------------------------------------------------


def test_corrupt_json_reports_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError) as err:
        CocoDetection(bad, tmp_path)
    assert "line 2, column 12" in str(err.value) and str(bad) in str(err.value)
    assert len(err.value.problems) == 1 and isinstance(err.value, ValueError)


def test_missing_annotation_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_degenerate_box_names_the_annotation(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}]
    anns = [
        {"id": 42, "image_id": 1, "category_id": 3, "bbox": [5, 5, -3, 4]},  # x2 < x1
        {"id": 43, "image_id": 1, "category_id": 3, "bbox": [5, 5, 2, 0]},  # zero height
        {"id": 44, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},
    ]
    ann, root, _ = _write_coco(tmp_path, images, anns, CATEGORIES)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root, invalid_boxes="clip")  # degenerate boxes are errors in both modes
    assert len(err.value.problems) == 2
    assert (
        "annotation id=42" in err.value.problems[0]
        and "non-positive width or height" in err.value.problems[0]
    )
    assert "annotation id=43" in err.value.problems[1]


def test_missing_image_file_names_file_and_image_id(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "height": 10, "width": 10},
        {"id": 7, "file_name": "nope.png", "height": 10, "width": 10, "_skip": True},
    ]
    ann, root, _ = _write_coco(tmp_path, images, [], CATEGORIES)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    (problem,) = err.value.problems
    assert "image id=7" in problem and "nope.png" in problem and "not found" in problem


def test_unknown_category_and_image_ids_are_reported(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}]
    anns = [
        {"id": 5, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]},
        {"id": 6, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]},
    ]
    ann, root, _ = _write_coco(tmp_path, images, anns, CATEGORIES)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    p = err.value.problems
    assert len(p) == 2
    assert "annotation id=5" in p[0] and "unknown category_id 99" in p[0]
    assert "annotation id=6" in p[1] and "unknown image_id 2" in p[1]


def test_duplicate_ids_are_reported(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "height": 10, "width": 10},
        {"id": 1, "file_name": "b.png", "height": 10, "width": 10},
    ]
    anns = [
        {"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},
        {"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 3, 3]},
    ]
    cats = [*CATEGORIES, {"id": 3, "name": "again"}]
    ann, root, _ = _write_coco(tmp_path, images, anns, cats)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    p = err.value.problems
    assert any("duplicate category id 3" in s for s in p)
    assert any("duplicate image id 1 (images[0] and images[1])" in s for s in p)
    assert any("duplicate annotation id 9 (annotations[0] and annotations[1])" in s for s in p)
    assert len(p) == 3


def test_missing_keys_name_the_key_and_the_record(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "height": 10, "width": 10},
        {"id": 2, "height": 10, "width": 10, "file_name": "b.png"},
    ]
    anns = [
        {"id": 3, "image_id": 1, "category_id": 3},
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},
    ]
    ann, root, _ = _write_coco(tmp_path, images, anns, [{"id": 3}])
    data = json.loads(ann.read_text())
    del data["images"][1]["file_name"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    p = err.value.problems
    assert p[0] == "category 3 (categories[0]): missing key 'name'"
    assert any("image id=2 (images[1]): missing key 'file_name'" == s for s in p)
    assert any("annotation id=3" in s and "missing key 'bbox'" in s for s in p)
    assert any("annotations[1]" in s and "missing key 'id'" in s for s in p)


def test_malformed_values_are_reported(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "height": 10, "width": 10},
        {"id": "2", "file_name": "b.png", "height": 10, "width": 10},
        {"id": 3, "file_name": "c.png", "height": 0, "width": 10, "_true_height": 10},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 2},
        {"id": 3, "image_id": 3, "category_id": 3, "bbox": [1, 2, 3, 40]},
    ]
    ann, root, _ = _write_coco(tmp_path, images, anns, CATEGORIES)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    assert err.value.problems == [
        "image id='2' (images[1]): id must be an integer, got '2'",
        "image id=3 (images[2]): height must be a positive integer, got 0",
        "annotation id=1 (annotations[0]) of image id=1: bbox must be a list of 4 finite numbers [x, y, w, h], "
        "got [1, 2, 3]",
        "annotation id=2 (annotations[1]) of image id=1: iscrowd must be 0 or 1, got 2",
    ]


def test_missing_top_level_key(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="missing top-level key 'categories'"):
        CocoDetection(ann, tmp_path)


def test_every_problem_is_reported_in_one_error_and_the_message_is_capped(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}]
    anns = [{"id": 100 + j, "image_id": 1, "category_id": 3, "bbox": [0, 0, -1, 1]} for j in range(25)]
    anns.append({"id": 200, "image_id": 1, "category_id": 42, "bbox": [0, 0, 1, 1]})
    ann, root, _ = _write_coco(tmp_path, images, anns, CATEGORIES)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    assert len(err.value.problems) == 26
    msg = str(err.value)
    assert "26 problem(s)" in msg and "and 6 more" in msg
    assert "annotation id=119" in msg and "annotation id=120" not in msg
    assert "annotation id=200" in err.value.problems[-1]
    again = pickle.loads(pickle.dumps(err.value))
    assert again.problems == err.value.problems and str(again) == msg


def test_outside_boxes_error_by_default_and_clip_with_one_warning(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 20}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [15, 2, 10, 4]},  # x2 = 25 > 20
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [-2, -1, 4, 4]},  # negative corner
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [25, 0, 3, 3]},  # entirely outside
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [1, 1, 19.004, 9]},  # within round-off tolerance
    ]
    ann, root, _ = _write_coco(tmp_path, images, anns, CATEGORIES)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, root)
    p = err.value.problems
    assert len(p) == 3 and all("outside the 20x10 (WxH) image" in s for s in p)
    assert ["annotation id=1" in p[0], "annotation id=2" in p[1], "annotation id=3" in p[2]] == [True] * 3
    with pytest.warns(UserWarning, match="clipped 3 box") as rec:
        ds = CocoDetection(ann, root, invalid_boxes="clip")
    assert len(rec) == 1 and "1 of them lay entirely outside" in str(rec[0].message)
    torch.testing.assert_close(
        ds.target(0)["boxes"],
        torch.tensor([[15.0, 2.0, 20.0, 6.0], [0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 20.0, 10.0]]),
    )
    assert ds.target(0)["labels"].tolist() == [1, 1, 2]


def test_bad_arguments_and_declared_size_mismatch(tmp_path):
    images = [{"id": 5, "file_name": "a.png", "height": 10, "width": 10, "_true_height": 12}]
    ann, root, _ = _write_coco(tmp_path, images, [], CATEGORIES)
    with pytest.raises(ValueError, match="invalid_boxes must be 'error' or 'clip', got 'drop'"):
        CocoDetection(ann, root, invalid_boxes="drop")
    ds = CocoDetection(ann, root)
    with pytest.raises(ValueError, match=r"image id=5: .*a.png is 12x10 \(HxW\) but .* declares height=10"):
        ds[0]
    with pytest.raises(IndexError):
        ds.target(1)


def test_image_root_that_is_not_a_directory(tmp_path):
    images = [{"id": 5, "file_name": "a.png", "height": 10, "width": 10}]
    ann, _, _ = _write_coco(tmp_path, images, [], CATEGORIES)
    with pytest.raises(DatasetError, match="image_root .*elsewhere.* is not a directory"):
        CocoDetection(ann, tmp_path / "elsewhere")


# --- write_coco round trips ------------------------------------------------------------------------


def _assert_same_dataset(a, b) -> None:
    assert len(a) == len(b) and a.label_names == b.label_names
    for i in range(len(a)):
        ia, ta = a[i]
        ib, tb = b[i]
        assert torch.equal(ia, ib)
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
        assert ta["image_id"] == tb["image_id"]


def test_write_coco_round_trips_the_benchmark(tmp_path):
    bench = make_benchmark("tiny", split="test", seed=3)
    ann = write_coco(bench, tmp_path / "out")
    assert ann == tmp_path / "out" / "annotations.json"
    back = CocoDetection(ann, tmp_path / "out" / "images")
    _assert_same_dataset(bench, back)
    assert back.categories_per_image() == bench.categories_per_image()
    # grayscale scenes are stored as 1-channel PNG
    assert Image.open(tmp_path / "out" / "images" / "000000.png").mode == "L"


def test_write_coco_round_trips_a_coco_dataset_with_crowds_and_fractional_boxes(coco, tmp_path):
    ds = CocoDetection(coco[0], coco[1])
    back = open_dataset(write_coco(ds, tmp_path / "copy"), split="train")
    _assert_same_dataset(ds, back)
    for i in range(len(ds)):
        for x, y in zip(ds.crowd_boxes(i), back.crowd_boxes(i)):
            assert torch.equal(x, y)


def test_write_coco_refuses_a_dataset_with_transforms(coco, tmp_path):
    ds = CocoDetection(coco[0], coco[1], transforms=train_basic())
    with pytest.raises(ValueError, match="transforms=None"):
        write_coco(ds, tmp_path / "x")


# --- open_dataset ------------------------------------------------------------------------------------


def test_open_dataset_builtin_presets(monkeypatch):
    tiny = open_dataset("builtin:tiny", split="test", seed=1)
    assert isinstance(tiny, BenchmarkDataset) and len(tiny) == 16 and tiny.seed == 1 and tiny.preset == "tiny"
    calls = []
    monkeypatch.setattr(benchmark_module, "make_benchmark", lambda p, **kw: calls.append((p, kw)) or "made")
    assert open_dataset("builtin", split="train") == "made"
    assert calls == [("default", {"split": "train", "seed": 0, "transforms": None})]
    with pytest.raises(ValueError, match="unknown built-in preset 'huge'"):
        open_dataset("builtin:huge", split="train")


def test_open_dataset_json_and_folder_layouts(coco, tmp_path):
    ann, root, _ = coco
    # a json next to an images/ folder
    assert open_dataset(ann, split="train").image_root == root
    # a json whose images sit beside it
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((root / "a.png").read_bytes())
    data = json.loads(ann.read_text())
    data["images"] = data["images"][:1]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 10]
    (flat / "mine.json").write_text(json.dumps(data))
    ds = open_dataset(str(flat / "mine.json"), split="train")
    assert ds.image_root == flat and len(ds) == 1
    # a folder: DIR/<split>.json preferred over DIR/annotations.json
    assert open_dataset(tmp_path, split="train").ann_file == ann
    (tmp_path / "test.json").write_text(json.dumps(data))
    assert open_dataset(tmp_path, split="test").ann_file == tmp_path / "test.json"
    with pytest.raises(ValueError, match="neither test.json nor annotations.json"):
        open_dataset(flat, split="test")
    with pytest.raises(ValueError, match="is neither 'builtin'"):
        open_dataset(tmp_path / "missing.json", split="train")
    with pytest.raises(ValueError, match="is neither 'builtin'"):
        open_dataset("coco", split="train")


def test_check_categories_names_the_first_mismatch():
    from detbalance.data import check_categories

    check_categories(["a", "b"], [1, 2], ["a", "b"], [1, 2], expected="x", got="y")
    check_categories(["a", "b"], [1, 2], ["a", "b"], None, expected="x", got="y")  # ids unknown: names only
    with pytest.raises(ValueError, match=r"^y does not match x \(2 vs 2 classes\): label 2 is 'b' \(category id 7\) "
                                         r"in y but 'b' \(category id 2\) in x"):
        check_categories(["a", "b"], [1, 2], ["a", "b"], [1, 7], expected="x", got="y")
    with pytest.raises(ValueError, match=r"label 1 is 'b' in y but 'a' in x"):
        check_categories(["a", "b"], None, ["b", "a"], None, expected="x", got="y")
    with pytest.raises(ValueError, match=r"\(3 vs 2 classes\): label 3 is 'c' in y but missing in x"):
        check_categories(["a", "b"], None, ["a", "b", "c"], None, expected="x", got="y")


def test_held_out_spec_only_for_data_with_a_separate_test_split(tmp_path):
    from detbalance.data import held_out_spec

    assert held_out_spec("builtin:tiny") == "builtin:tiny"
    ann = write_coco(make_benchmark("tiny", split="test"), tmp_path / "one")
    assert held_out_spec(ann) is None and held_out_spec(tmp_path / "one") is None  # the training file itself
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.json").write_text(ann.read_text())
    (split / "test.json").write_text(ann.read_text())
    assert held_out_spec(split) == str(split)
    assert open_dataset(ann, split="test").category_ids() == [1, 2, 3, 4, 5]
