"""COCO folders of real-sized, non-square photos-like images for the tests (written with Pillow).

:func:`write_coco_folder` writes ``annotations/instances_<split>.json`` beside ``<split>/`` (COCO 2017's
layout) or ``<split>/images`` + ``<split>/annotations.json`` (``make-data``'s), with JPEG images of the given
sizes, each holding one or two filled rectangles of 2 classes annotated as boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZES = ((512, 768), (768, 512), (640, 1024), (1024, 640))  # (height, width): landscape and portrait
CATEGORIES = [{"id": 1, "name": "box"}, {"id": 3, "name": "disc"}]


def write_coco_split(
    images_dir: Path, ann_file: Path, *, sizes=SIZES, seed: int = 0, first_id: int = 1
) -> Path:
    """Write the images of ``sizes`` into ``images_dir`` and their COCO json to ``ann_file``; return it."""
    rng = np.random.default_rng(seed)
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k, (h, w) in enumerate(sizes):
        image_id = first_id + k
        name = f"{image_id:012d}.jpg"
        background = tuple(int(v) for v in rng.integers(0, 120, size=3))
        im = Image.new("RGB", (w, h), background)
        draw = ImageDraw.Draw(im)
        for j in range(1 + k % 2):
            bw, bh = int(rng.integers(w // 8, w // 3)), int(rng.integers(h // 8, h // 3))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cat = CATEGORIES[(k + j) % 2]["id"]
            fill = (230, 60, 40) if cat == 1 else (40, 200, 230)
            if cat == 1:
                draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=fill)
            else:
                draw.ellipse([x, y, x + bw - 1, y + bh - 1], fill=fill)
            annotations.append({"id": len(annotations) + 1 + 1000 * first_id, "image_id": image_id,
                                "category_id": cat, "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        im.save(images_dir / name, quality=90)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann_file


def write_coco_folder(root: Path, *, layout: str = "coco2017", train_sizes=SIZES, val_sizes=SIZES[:2]) -> dict:
    """A train and a val split under ``root``; returns ``{"train": json, "val": json}`` (and the folders).

    ``layout``: ``"coco2017"`` (``annotations/instances_train2017.json`` beside ``train2017/``) or
    ``"make-data"`` (``train/annotations.json`` + ``train/images/``, and ``test/`` for validation).
    """
    if layout == "coco2017":
        train = write_coco_split(root / "train2017", root / "annotations" / "instances_train2017.json",
                                 sizes=train_sizes, seed=0)
        val = write_coco_split(root / "val2017", root / "annotations" / "instances_val2017.json",
                               sizes=val_sizes, seed=1, first_id=100)
        return {"train": train, "val": val, "train_images": root / "train2017", "val_images": root / "val2017"}
    if layout == "make-data":
        train = write_coco_split(root / "train" / "images", root / "train" / "annotations.json", sizes=train_sizes, seed=0)
        val = write_coco_split(root / "test" / "images", root / "test" / "annotations.json", sizes=val_sizes, seed=1,
                               first_id=100)
        return {"train": train, "val": val, "train_images": root / "train" / "images",
                "val_images": root / "test" / "images"}
    raise ValueError(f"unknown layout {layout!r}")
