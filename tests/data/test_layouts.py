"""Real images: the standard COCO layouts are found, an explicit folder overrides them, images are decoded with
torchvision.io one at a time."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import detbalance.data.coco as coco_module
from detbalance.data import CocoDetection, DatasetError, image_root_candidates, open_dataset
from tests.cocofolders import SIZES, write_coco_folder


def test_coco2017_layout_annotations_beside_split_folder(tmp_path):
    paths = write_coco_folder(tmp_path, layout="coco2017")
    ds = open_dataset(paths["train"], split="train")
    assert ds.image_root == tmp_path / "train2017"
    assert [ds.image_size(i) for i in range(len(ds))] == list(SIZES)
    image, target = ds[2]
    assert image.shape == (3, 640, 1024) and image.dtype == torch.float32
    assert target["boxes"].shape[0] >= 1
    val = open_dataset(paths["val"], split="test")
    assert val.image_root == tmp_path / "val2017" and len(val) == 2


def test_coco_images_subfolder_variant_and_candidate_order(tmp_path):
    paths = write_coco_folder(tmp_path, layout="coco2017")
    # coco/images/train2017 (a common variant) instead of coco/train2017
    (tmp_path / "images").mkdir()
    shutil.move(tmp_path / "train2017", tmp_path / "images" / "train2017")
    assert open_dataset(paths["train"], split="train").image_root == tmp_path / "images" / "train2017"
    ann = tmp_path / "annotations"
    assert image_root_candidates(ann / "instances_train2017.json") == [
        ann / "images", tmp_path / "train2017", tmp_path / "images" / "train2017", ann / "train2017", ann,
    ]
    assert image_root_candidates(tmp_path / "train.json") == [tmp_path / "images", tmp_path]


def test_make_data_layout_and_json_folder_layout(tmp_path):
    paths = write_coco_folder(tmp_path, layout="make-data")
    assert open_dataset(tmp_path / "train", split="train").image_root == tmp_path / "train" / "images"
    # the images beside the json
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "train" / "images", flat)
    shutil.copy(paths["train"], flat / "mine.json")
    assert open_dataset(flat / "mine.json", split="train").image_root == flat


def test_an_empty_images_folder_beside_the_json_does_not_hide_the_coco_layout(tmp_path):
    paths = write_coco_folder(tmp_path, layout="coco2017")
    (tmp_path / "annotations" / "images").mkdir()  # exists, but holds none of the images
    assert open_dataset(paths["train"], split="train").image_root == tmp_path / "train2017"


def test_explicit_image_folder_overrides_the_layouts(tmp_path):
    paths = write_coco_folder(tmp_path, layout="coco2017")
    elsewhere = tmp_path / "photos"
    shutil.copytree(tmp_path / "train2017", elsewhere)
    # make the found folder differ from the named one: one image changed in the copy
    first = sorted(elsewhere.iterdir())[0]
    Image.fromarray(np.zeros((512, 768, 3), np.uint8)).save(first)
    ds = open_dataset(paths["train"], split="train", images=elsewhere)
    assert ds.image_root == elsewhere
    assert float(ds[0][0].max()) == 0.0  # read from the named folder, not train2017/
    with pytest.raises(ValueError, match=r"image folder .*nowhere.* is not a directory"):
        open_dataset(paths["train"], split="train", images=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="goes with a COCO json, not the built-in benchmark"):
        open_dataset("builtin:tiny", split="train", images=elsewhere)


def test_missing_images_say_where_they_were_looked_for(tmp_path):
    paths = write_coco_folder(tmp_path, layout="coco2017")
    shutil.rmtree(tmp_path / "train2017")
    with pytest.raises(DatasetError) as err:
        open_dataset(paths["train"], split="train")
    message = str(err.value)
    assert "looked for in" in message and "train2017" in message and "--images DIR" in message
    assert "image file not found" in message and "image id=1" in message


def test_images_are_decoded_with_torchvision_io_on_each_access(tmp_path, monkeypatch):
    paths = write_coco_folder(tmp_path, layout="coco2017")
    ds = open_dataset(paths["train"], split="train")
    reads = []
    real = coco_module.read_file
    monkeypatch.setattr(coco_module, "read_file", lambda p: reads.append(p) or real(p))
    a, _ = ds[1]
    b, _ = ds[1]
    assert len(reads) == 2  # decoded each time: nothing is cached in the dataset
    assert torch.equal(a, b)
    pil = np.asarray(Image.open(ds.image_path(1)).convert("RGB"))
    torch.testing.assert_close(a, torch.from_numpy(pil.copy()).permute(2, 0, 1).float() / 255, rtol=0, atol=0)


def test_formats_torchvision_io_does_not_read_go_to_pillow(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    data = {
        "images": [{"id": 1, "file_name": "a.bmp", "height": 6, "width": 9},
                   {"id": 2, "file_name": "broken.png", "height": 6, "width": 9}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "d.json").write_text(json.dumps(data))
    ds = CocoDetection(tmp_path / "d.json")
    assert ds.image_root == tmp_path
    assert torch.equal(ds.load_image(0), torch.from_numpy(rgb).permute(2, 0, 1))
    with pytest.raises(ValueError, match=r"image id=2: cannot decode .*broken.png"):
        ds.load_image(1)
