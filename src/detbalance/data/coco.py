"""COCO-format detection datasets: loading with whole-file validation, writing, and opening by name.

:class:`CocoDetection` reads a COCO json (``images``, ``annotations``, ``categories``; ``bbox`` as
``[x, y, w, h]`` pixels) and an image folder, and yields torchvision-style targets (``boxes`` xyxy
float32, ``labels`` ``1..K``). Category ids are mapped to contiguous labels ``1..K`` in ascending
category-id order; the map is kept (``cat_id_to_label``, ``label_to_cat_id``, ``label_names``).

Validation happens once, at construction, over the whole file: every problem (bad JSON with its line and
column, missing keys, duplicate ids, unknown category or image ids, degenerate or out-of-image boxes,
missing image files) is collected with the id of the record it concerns and raised together as one
:class:`~detbalance.data.base.DatasetError`.

Crowd annotations (``iscrowd=1``) are **not** training targets: ``target(i)`` and ``__getitem__`` leave
them out, as torchvision's reference scripts do, because a crowd box covers many instances and would
teach the detector a wrong positive. They are kept (``crowd_boxes(i)``) and exported by
:meth:`CocoDetection.to_coco_dict` with ``iscrowd=1``, so the COCO evaluator treats them as ignore
regions exactly as on the original file.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

try:  # deprecated since torchvision 0.29 in favour of TorchCodec; Pillow takes over where it is gone
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # pragma: no cover
    decode_image = None

from detbalance.data.base import DatasetError, DetectionDataset, Transform, _coco_annotations
from detbalance.types import DetectionTarget

__all__ = ["CocoDetection", "image_root_candidates", "open_dataset", "write_coco"]

InvalidBoxes = Literal["error", "clip"]

# Boxes this little (in pixels) past the image border are float round-off in exported files and are clipped
# silently in both modes; anything further out is an "outside the image" problem.
_OUTSIDE_TOLERANCE = 1e-2


class CocoDetection(DetectionDataset):
    """A COCO json + image folder as a detbalance dataset.

    Args:
        ann_file: path of the COCO json.
        image_root: folder that ``images[*].file_name`` is relative to; ``None`` finds it among the standard
            layouts (:func:`image_root_candidates`): the first candidate folder that holds the json's first
            image file.
        transforms: joint ``(image, target) -> (image, target)`` transform applied in ``__getitem__``
            (see :mod:`detbalance.data.transforms`), or ``None``.
        invalid_boxes: what to do with boxes that extend outside their image: ``"error"`` reports them
            with the other problems; ``"clip"`` clips them to the image, drops the ones left empty, and
            emits one warning with the counts. Boxes with non-positive width or height are always errors.
        drop_empty: drop images without (non-crowd) annotations. By default they are kept: they are the
            pure negatives that imbalance experiments need.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist.
        DatasetError: (a ``ValueError``) listing every problem found in the file, each with its id.

    Attributes:
        cat_id_to_label: ``dict[int, int]`` COCO category id -> label ``1..K`` (ascending id order).
        label_to_cat_id: ``dict[int, int]``, the inverse.
        label_names: ``list[str]``, ``label_names[k - 1]`` names label ``k``.
        image_ids: ``list[int]``, the COCO id of each image, in dataset order (the json's order).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path | None = None,
        *,
        transforms: Transform | None = None,
        invalid_boxes: InvalidBoxes = "error",
        drop_empty: bool = False,
    ) -> None:
        if invalid_boxes not in ("error", "clip"):
            raise ValueError(f"invalid_boxes must be 'error' or 'clip', got {invalid_boxes!r}")
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.invalid_boxes = invalid_boxes
        self.drop_empty = drop_empty
        data = _read_json(self.ann_file)
        tried = None
        if image_root is None:
            tried = image_root_candidates(self.ann_file)
            image_root = _find_image_root(tried, data)
        self.image_root = Path(image_root)
        _Parser(data, self.ann_file, self.image_root, invalid_boxes, tried=tried).build(self)
        if drop_empty:
            keep = np.flatnonzero(np.diff(self._offsets_gt) > 0)
            self._select_images(keep)

    # --- the dataset interface ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_size(self, index: int) -> tuple[int, int]:
        index = self._check_index(index)
        return int(self._heights[index]), int(self._widths[index])

    def target(self, index: int) -> DetectionTarget:
        index = self._check_index(index)
        a, b = self._offsets_gt[index], self._offsets_gt[index + 1]
        return {
            "boxes": torch.from_numpy(self._boxes[a:b].copy()),
            "labels": torch.from_numpy(self._labels[a:b].copy()),
            "image_id": int(self.image_ids[index]),
        }

    def crowd_boxes(self, index: int) -> tuple[Tensor, Tensor]:
        """The ``iscrowd=1`` annotations of image ``index``: ``(boxes Tensor[C, 4] xyxy, labels Tensor[C])``."""
        index = self._check_index(index)
        a, b = self._offsets_crowd[index], self._offsets_crowd[index + 1]
        boxes = torch.from_numpy(self._crowd_boxes[a:b].copy())
        return boxes, torch.from_numpy(self._crowd_labels[a:b].copy())

    def image_path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self.image_root / self.file_names[self._check_index(index)]

    def load_image(self, index: int) -> Tensor:
        """Decode image ``index`` as ``Tensor[3, H, W]`` uint8; grayscale and RGBA files become RGB.

        The file is read and decoded when asked (``torchvision.io``; Pillow for formats it does not read), so
        a dataset never holds its images in memory.
        """
        index = self._check_index(index)
        path = self.image_path(index)
        image = _decode_rgb(path, image_id=int(self.image_ids[index]))
        expected = self.image_size(index)
        if tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"image id={self.image_ids[index]}: {path} is {image.shape[1]}x{image.shape[2]} (HxW) but "
                f"{self.ann_file} declares height={expected[0]}, width={expected[1]}"
            )
        return image

    def category_ids(self) -> list[int]:
        return [self.label_to_cat_id[k] for k in range(1, self.num_classes + 1)]

    def categories_per_image(self) -> list[list[int]]:
        out = []
        for i in range(len(self)):
            labels = self._labels[self._offsets_gt[i] : self._offsets_gt[i + 1]]
            out.append(np.unique(labels).tolist())
        return out

    def to_coco_dict(self) -> dict[str, Any]:
        """COCO ground truth with category ids = labels ``1..K`` and crowd regions kept (``iscrowd=1``).

        Images keep their ids and file names; annotation ids are renumbered ``1..M``.
        """
        images, annotations = [], []
        for i in range(len(self)):
            h, w = self.image_size(i)
            image_id = int(self.image_ids[i])
            images.append({"id": image_id, "width": w, "height": h, "file_name": self.file_names[i]})
            t = self.target(i)
            annotations += _coco_annotations(t["boxes"], t["labels"], image_id, len(annotations) + 1)
            cb, cl = self.crowd_boxes(i)
            annotations += _coco_annotations(cb, cl, image_id, len(annotations) + 1, iscrowd=1)
        return {"images": images, "annotations": annotations, "categories": self._coco_categories()}

    def __repr__(self) -> str:
        return (
            f"CocoDetection({str(self.ann_file)!r}, images={len(self)}, classes={self.num_classes}, "
            f"boxes={len(self._labels)}, crowd={len(self._crowd_labels)})"
        )

    # --- internals ------------------------------------------------------------------------------
    def _select_images(self, keep: np.ndarray) -> None:
        self.image_ids = [self.image_ids[i] for i in keep]
        self.file_names = [self.file_names[i] for i in keep]
        self._heights, self._widths = self._heights[keep], self._widths[keep]
        self._boxes, self._labels, self._offsets_gt = _select_rows(
            self._boxes, self._labels, self._offsets_gt, keep
        )
        self._crowd_boxes, self._crowd_labels, self._offsets_crowd = _select_rows(
            self._crowd_boxes, self._crowd_labels, self._offsets_crowd, keep
        )


def _select_rows(
    boxes: np.ndarray, labels: np.ndarray, offsets: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.diff(offsets)
    row_image = np.repeat(np.arange(len(counts)), counts)
    rows = np.flatnonzero(np.isin(row_image, keep))
    new_offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
    return boxes[rows], labels[rows], new_offsets


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"ann_file {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(str(path), [f"not UTF-8 text (byte {e.start}): {e.reason}"]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            str(path), [f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]
        ) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Parser:
    """Walks a decoded COCO dict once, collecting every problem instead of stopping at the first."""

    def __init__(
        self, data: Any, ann_file: Path, image_root: Path, invalid_boxes: InvalidBoxes, *, tried: list[Path] | None
    ) -> None:
        self.data = data
        self.source = str(ann_file)
        self.image_root = image_root
        self.invalid_boxes = invalid_boxes
        self.tried = tried
        self.problems: list[str] = []

    def _records(self, key: str) -> list[dict[str, Any]]:
        value = self.data.get(key)
        if value is None:
            self.problems.append(f"missing top-level key {key!r}")
            return []
        if not isinstance(value, list):
            self.problems.append(f"top-level {key!r} must be a list, got {type(value).__name__}")
            return []
        good = []
        for j, rec in enumerate(value):
            if isinstance(rec, dict):
                good.append(rec)
            else:
                self.problems.append(f"{key}[{j}] must be an object, got {type(rec).__name__}")
        return good

    def _missing(self, rec: dict[str, Any], keys: tuple[str, ...], where: str) -> bool:
        missing = [k for k in keys if k not in rec]
        for k in missing:
            self.problems.append(f"{where}: missing key {k!r}")
        return bool(missing)

    def build(self, ds: CocoDetection) -> None:
        if not isinstance(self.data, dict):
            raise DatasetError(
                self.source, [f"top level must be a JSON object, got {type(self.data).__name__}"]
            )
        categories = self._records("categories")
        images = self._records("images")
        annotations = self._records("annotations")

        # categories -> contiguous labels in ascending id order
        cat_names: dict[int, str] = {}
        for j, c in enumerate(categories):
            where = f"category {c['id']!r} (categories[{j}])" if "id" in c else f"categories[{j}]"
            if self._missing(c, ("id", "name"), where):
                continue
            if not _is_int(c["id"]):
                self.problems.append(f"{where}: id must be an integer, got {c['id']!r}")
            elif c["id"] in cat_names:
                self.problems.append(f"duplicate category id {c['id']} (categories[{j}])")
            else:
                cat_names[c["id"]] = str(c["name"])
        if categories and not cat_names:
            self.problems.append("no valid categories")
        elif not categories and "categories" in self.data and isinstance(self.data["categories"], list):
            self.problems.append("'categories' is empty: a detection dataset needs at least one category")
        sorted_ids = sorted(cat_names)
        ds.cat_id_to_label = {cid: k + 1 for k, cid in enumerate(sorted_ids)}
        ds.label_to_cat_id = {k + 1: cid for k, cid in enumerate(sorted_ids)}
        ds.label_names = [cat_names[cid] for cid in sorted_ids]

        # images
        image_index: dict[int, int] = {}
        ids, files, heights, widths = [], [], [], []
        root_ok = self.image_root.is_dir()
        if not root_ok:
            self.problems.append(f"image_root {str(self.image_root)!r} is not a directory")
        for j, im in enumerate(images):
            where = f"image id={im['id']!r} (images[{j}])" if "id" in im else f"images[{j}]"
            if self._missing(im, ("id", "file_name", "width", "height"), where):
                continue
            iid, w, h = im["id"], im["width"], im["height"]
            bad = False
            if not _is_int(iid):
                self.problems.append(f"{where}: id must be an integer, got {iid!r}")
                continue
            if iid in image_index:
                self.problems.append(f"duplicate image id {iid} (images[{image_index[iid]}] and images[{j}])")
                continue
            for name, v in (("width", w), ("height", h)):
                if not (_is_int(v) and v > 0):
                    self.problems.append(f"{where}: {name} must be a positive integer, got {v!r}")
                    bad = True
            path = self.image_root / str(im["file_name"])
            if root_ok and not path.is_file():
                self.problems.append(f"{where}: image file not found: {str(path)!r}")
            image_index[iid] = len(ids)
            ids.append(iid)
            files.append(str(im["file_name"]))
            heights.append(h if not bad else math.inf)  # (already reported) no "outside" reports for it
            widths.append(w if not bad else math.inf)

        # annotations
        ann_seen: dict[Any, int] = {}
        rows_img, rows_box, rows_label, rows_crowd, rows_where = [], [], [], [], []
        for j, a in enumerate(annotations):
            where = f"annotation id={a['id']!r} (annotations[{j}])" if "id" in a else f"annotations[{j}]"
            if "image_id" in a:
                where += f" of image id={a['image_id']!r}"
            if self._missing(a, ("id", "image_id", "category_id", "bbox"), where):
                continue
            bad_ids = [k for k in ("id", "image_id", "category_id") if not _is_int(a[k])]
            for k in bad_ids:
                self.problems.append(f"{where}: {k} must be an integer, got {a[k]!r}")
            if bad_ids:
                continue
            if a["id"] in ann_seen:
                self.problems.append(
                    f"duplicate annotation id {a['id']!r} (annotations[{ann_seen[a['id']]}] and annotations[{j}])"
                )
                continue
            ann_seen[a["id"]] = j
            ok = True
            if a["image_id"] not in image_index:
                self.problems.append(f"{where}: unknown image_id {a['image_id']!r}")
                ok = False
            if a["category_id"] not in cat_names:
                self.problems.append(
                    f"{where}: unknown category_id {a['category_id']!r} (known: {sorted_ids[:20]})"
                )
                ok = False
            crowd = a.get("iscrowd", 0)
            if crowd not in (0, 1) or isinstance(crowd, bool):
                self.problems.append(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
                ok = False
            bbox = a["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                self.problems.append(
                    f"{where}: bbox must be a list of 4 finite numbers [x, y, w, h], got {bbox!r}"
                )
                ok = False
            elif bbox[2] <= 0 or bbox[3] <= 0:
                self.problems.append(
                    f"{where}: bbox {bbox} has non-positive width or height (w={bbox[2]}, h={bbox[3]})"
                )
                ok = False
            if ok:
                rows_img.append(image_index[a["image_id"]])
                rows_box.append(bbox)
                rows_label.append(ds.cat_id_to_label[a["category_id"]])
                rows_crowd.append(crowd == 1)
                rows_where.append(where)

        n_img = len(ids)
        img_idx = np.asarray(rows_img, dtype=np.int64)
        xywh = np.asarray(rows_box, dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        w_of = np.asarray(widths, dtype=np.float64)[img_idx]
        h_of = np.asarray(heights, dtype=np.float64)[img_idx]
        limit = np.stack([w_of, h_of, w_of, h_of], axis=1)
        lower = np.zeros_like(boxes)
        outside = ((boxes < lower - _OUTSIDE_TOLERANCE) | (boxes > limit + _OUTSIDE_TOLERANCE)).any(axis=1)
        keep = np.ones(len(boxes), dtype=bool)
        if self.invalid_boxes == "error":
            for r in np.flatnonzero(outside):
                b, lim = rows_box[r], limit[r]
                self.problems.append(
                    f"{rows_where[r]}: bbox {b} (x2={b[0] + b[2]:g}, y2={b[1] + b[3]:g}) extends outside the "
                    f"{int(lim[0])}x{int(lim[1])} (WxH) image"
                )
        boxes = np.clip(boxes, lower, limit)
        if self.invalid_boxes == "clip":
            empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            keep = ~empty
            if outside.any():
                warnings.warn(
                    f"{self.source}: clipped {int(outside.sum())} box(es) extending outside their image; "
                    f"{int(empty.sum())} of them lay entirely outside and were dropped",
                    stacklevel=3,
                )

        if self.problems:
            if self.tried is not None and any("image file not found" in p for p in self.problems):
                self.problems.insert(
                    0,
                    f"the image folder was looked for in {[str(p) for p in self.tried]} and none holds the images; "
                    "name it (--images DIR, data.train_images / data.val_images, or image_root=)",
                )
            raise DatasetError(self.source, self.problems)

        crowd = np.asarray(rows_crowd, dtype=bool)
        labels = np.asarray(rows_label, dtype=np.int64)
        for is_crowd in (False, True):
            sel = keep & (crowd == is_crowd)
            order = np.argsort(img_idx[sel], kind="stable")
            b = boxes[sel][order].astype(np.float32)
            lab = labels[sel][order]
            offsets = np.concatenate([[0], np.cumsum(np.bincount(img_idx[sel], minlength=n_img))]).astype(
                np.int64
            )
            if is_crowd:
                ds._crowd_boxes, ds._crowd_labels, ds._offsets_crowd = b, lab, offsets
            else:
                ds._boxes, ds._labels, ds._offsets_gt = b, lab, offsets
        ds.image_ids = ids
        ds.file_names = files
        ds._heights = np.asarray(heights, dtype=np.int64)
        ds._widths = np.asarray(widths, dtype=np.int64)


def _decode_rgb(path: Path, *, image_id: int) -> Tensor:
    """Decode ``path`` to ``Tensor[3, H, W]`` uint8 (gray replicated, alpha dropped, 16 bit scaled to 8).

    ``torchvision.io`` reads JPEG, PNG, WebP and GIF; any other file (BMP, TIFF, ...) goes to Pillow. EXIF
    orientation is not applied (COCO boxes refer to the stored pixels, as torchvision's reference reads them).
    """
    if decode_image is None:  # pragma: no cover
        return _decode_rgb_pillow(path, image_id=image_id)
    try:
        data = read_file(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"image id={image_id}: cannot read {str(path)!r}: {e}") from e
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return _decode_rgb_pillow(path, image_id=image_id)
    if image.dtype == torch.uint16:  # 16-bit PNG: v / 257 maps 0..65535 onto 0..255
        image = torch.round(image.to(torch.float32) / 257.0).to(torch.uint8)
    return image.contiguous()


def _decode_rgb_pillow(path: Path, *, image_id: int) -> Tensor:
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale
                gray = np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
                arr = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"image id={image_id}: cannot decode {str(path)!r}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def image_root_candidates(ann_file: str | Path) -> list[Path]:
    """The folders where the images of a COCO json are looked for, in order.

    1. ``<json folder>/images`` (the layout :func:`write_coco` and ``make-data`` write);
    2. the COCO release layout: for ``<root>/annotations/instances_<split>.json`` (or any ``<name>_<split>.json``)
       the folders ``<root>/<split>`` (``annotations/instances_train2017.json`` beside ``train2017/``),
       ``<root>/images/<split>`` and ``<json folder>/<split>``;
    3. the json's own folder.

    Args:
        ann_file: path of the COCO json.

    Returns:
        The candidate folders (whether or not they exist), without repeats.
    """
    ann = Path(ann_file)
    here = ann.parent
    out = [here / "images"]
    stem = ann.stem
    if "_" in stem:
        split = stem.rsplit("_", 1)[1]
        if split:
            out += [here.parent / split, here.parent / "images" / split, here / split]
    out.append(here)
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def _find_image_root(candidates: list[Path], data: Any) -> Path:
    """The first candidate holding the json's first image file; else the first existing candidate (the
    parser then reports the missing files with where it looked)."""
    first = None
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"]:
        record = data["images"][0]
        if isinstance(record, dict) and "file_name" in record:
            first = str(record["file_name"])
    existing = [p for p in candidates if p.is_dir()]
    if first is not None:
        for p in existing:
            if (p / first).is_file():
                return p
    return existing[0] if existing else candidates[-1]


def write_coco(dataset: DetectionDataset, out_dir: str | Path) -> Path:
    """Write ``dataset`` as ``out_dir/images/NNNNNN.png`` + ``out_dir/annotations.json`` (COCO, bbox xywh).

    ``CocoDetection(out_dir / "annotations.json", out_dir / "images")`` (or ``open_dataset(out_dir)``) reads
    it back with the same images, boxes, labels, label names and image ids. Images whose three channels
    are equal are written as 8-bit grayscale PNG. Category ids are the labels ``1..K``.

    Args:
        dataset: a detbalance dataset without ``transforms`` (what is written is the untransformed data).
        out_dir: output folder (created). Files of the same names that an earlier ``write_coco`` wrote there are
            replaced; a file the project did not write is never replaced (``ForeignFilesError``, listing them,
            before anything is written).

    Returns:
        The path of the written ``annotations.json``.
    """
    if getattr(dataset, "transforms", None) is not None:
        raise ValueError(
            "write_coco writes the untransformed data; pass a dataset with transforms=None, "
            f"got transforms={dataset.transforms!r}"
        )
    from detbalance.engine.files import OutputFolder

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file, not a folder")
    folder = OutputFolder(out)
    coco = dataset.to_coco_dict()
    names = [f"images/{i:06d}.png" for i in range(len(coco["images"]))]
    # only the project's own files are replaced: a file of yours there is refused before anything is written
    folder.check(["annotations.json", *names], what="write_coco")
    with folder.transaction():
        for i, record in enumerate(coco["images"]):
            image = dataset.load_image(i).permute(1, 2, 0).numpy()
            gray = bool((image[..., 0] == image[..., 1]).all()) and bool((image[..., 0] == image[..., 2]).all())
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image[..., 0] if gray else image)).save(
                buf, format="PNG", compress_level=1
            )
            folder.write_bytes(names[i], buf.getvalue(), durable=False)
            record["file_name"] = Path(names[i]).name
        return folder.write_text("annotations.json", json.dumps(coco))


def resolve_annotation_file(spec: str | Path, *, split: str) -> Path | None:
    """The COCO json that :func:`open_dataset` reads for ``spec`` and ``split`` (``None`` for a built-in)."""
    text = str(spec)
    if text == "builtin" or text.startswith("builtin:"):
        return None
    path = Path(text)
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        for name in (f"{split}.json", "annotations.json"):
            if (path / name).is_file():
                return (path / name).resolve()
    return None


def held_out_spec(train: str | Path) -> str | None:
    """The held-out data that goes with training data ``train``, or ``None`` when it has none.

    A built-in benchmark has one (its ``test`` split, generated separately); a folder has one when it holds
    a ``test.json`` besides its training json; a single COCO file has none.
    """
    text = str(train)
    if text == "builtin" or text.startswith("builtin:"):
        return text
    train_file = resolve_annotation_file(text, split="train")
    test_file = resolve_annotation_file(text, split="test")
    if train_file is None or test_file is None or train_file == test_file:
        return None
    return text


def open_dataset(
    spec: str | Path,
    *,
    split: str,
    transforms: Transform | None = None,
    seed: int = 0,
    images: str | Path | None = None,
) -> DetectionDataset:
    """Open a dataset by name: the built-in benchmark or a COCO json / folder.

    Args:
        spec: one of

            * ``"builtin"`` or ``"builtin:PRESET"``: :func:`~detbalance.data.benchmark.make_benchmark`
              with that preset (``"default"`` when omitted) and ``split`` (``"train"`` or ``"test"``);
            * a path to a ``.json`` file: a COCO file whose images are found in the standard layouts
              (:func:`image_root_candidates`: ``<json folder>/images``, ``annotations/instances_<split>.json``
              beside ``<split>/``, the json's own folder);
            * a directory ``DIR``: ``DIR/<split>.json`` if present, else ``DIR/annotations.json``, with
              images found likewise (``DIR/images`` as :func:`write_coco` writes it, else ``DIR``).
        split: the split to open (for folders: the json name to prefer).
        transforms: joint transform applied by the dataset's ``__getitem__``, or ``None``.
        seed: generator seed of the built-in benchmark (unused for COCO files, which are fixed data).
        images: the image folder of a COCO json, overriding the layouts above (``--images``,
            ``data.train_images`` / ``data.val_images``).

    Raises:
        ValueError: ``spec`` is none of the above, names an unknown preset / split, or ``images`` is given
            for the built-in benchmark or is not a folder.
    """
    from detbalance.data.benchmark import PRESETS, make_benchmark

    text = str(spec)
    if images is not None and (text == "builtin" or text.startswith("builtin:")):
        raise ValueError(f"an image folder ({str(images)!r}) goes with a COCO json, not the built-in benchmark {text!r}")
    if images is not None and not Path(images).is_dir():
        raise ValueError(f"image folder {str(images)!r} (for {text!r}) is not a directory")
    if text == "builtin" or text.startswith("builtin:"):
        preset = text.partition(":")[2] or "default"
        if preset not in PRESETS:
            raise ValueError(
                f"unknown built-in preset {preset!r} in spec {text!r}; choose from {sorted(PRESETS)}"
            )
        return make_benchmark(preset, split=split, seed=seed, transforms=transforms)
    path = Path(text)
    if path.is_file() and path.suffix.lower() == ".json":
        return CocoDetection(path, images, transforms=transforms)
    if path.is_dir():
        for name in (f"{split}.json", "annotations.json"):
            if (path / name).is_file():
                return CocoDetection(path / name, images, transforms=transforms)
        raise ValueError(f"dataset folder {text!r} has neither {split}.json nor annotations.json")
    raise ValueError(
        f"dataset spec {text!r} is neither 'builtin' / 'builtin:PRESET' (presets: {sorted(PRESETS)}), "
        "an existing .json file, nor a folder"
    )
