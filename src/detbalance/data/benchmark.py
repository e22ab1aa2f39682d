"""The built-in imbalanced detection benchmark: seeded scenes of real handwritten digits, no download.

Scenes are generated in memory from the 1,797 8x8 handwritten-digit scans that ship inside scikit-learn
(:func:`sklearn.datasets.load_digits`). The digit *instances* are split once, by a fixed stratified
permutation, into a train pool (75 %) and a test pool (25 %), so no scan seen in training is pasted into a
test scene. Each scene is

* a **background**: a smoothly varying intensity field (a random 4x4 grid, bilinearly upsampled) plus
  Gaussian pixel noise;
* **targets**: digits ``0..4`` (labels ``1..5``, named ``"0".."4"``), each scaled bilinearly from 8x8 to a
  random height in ``object_size`` with aspect jitter and pasted with a random contrast; the box is the
  tight box of the pasted ink;
* **hard negatives**, unannotated: digits ``5..9`` ("distractors", same sizes and contrasts as targets) and
  anti-aliased line strokes.

Objects are placed by rejection sampling so that no two pasted items (targets, distractors, strokes)
overlap by more than ``max_overlap`` of the smaller one's area; an item that finds no place in
``placement_tries`` tries is left out. Generation is vectorised over images (placement, backgrounds,
noise, resizing grouped by size) and takes a few seconds for the 8,000-image default train split.

Each knob of :class:`BenchmarkSpec` controls one kind of imbalance; see its docstring. The test split
uses the test digit pool, a seed derived from ``seed``, balanced classes and no label/box noise; every
other knob is shared with the train split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from detbalance.data.base import DetectionDataset, Transform
from detbalance.types import DetectionTarget

__all__ = ["PRESETS", "BenchmarkDataset", "BenchmarkSpec", "class_probabilities", "make_benchmark"]

Split = Literal["train", "test"]

NUM_CLASSES = 5
LABEL_NAMES = [str(d) for d in range(NUM_CLASSES)]
_SPLIT_CODES = {"train": 0, "test": 1}
_POOL_SEED = 20_240_601  # fixed: the train/test split of the digit scans never depends on the user's seed
_TEST_POOL_FRACTION = 0.25
_INK_THRESHOLD = 0.25  # alpha below this is cut away, so the box is the tight box of what is pasted
_BACKGROUND_GRID = 4
_CHUNK = 256  # images composed at once (bounds the float32 temporaries)

KIND_TARGET, KIND_DIGIT, KIND_STROKE = 0, 1, 2


@dataclass(frozen=True)
class BenchmarkSpec:
    """The knobs of the built-in benchmark, each with the imbalance it controls.

    Ranges are inclusive ``(low, high)`` pairs sampled uniformly per image (counts) or per item (sizes).

    Attributes:
        image_size: side of the square grayscale images in pixels. With ``object_size`` it sets the
            **positive:negative anchor ratio**: a larger canvas or smaller objects means more background
            anchors per positive one.
        objects_per_image: number of annotated targets per (non-empty) image: the positive density.
        object_size: height of a pasted glyph in pixels (before cropping to its ink); small objects match
            few anchors (the foreground-background imbalance of small objects).
        aspect_jitter: glyph width = height x ``a`` with ``log a`` uniform in ``[-log(1+j), log(1+j)]``.
        distractors_per_image: unannotated digits 5..9 per image: **hard negatives** that look like targets.
        strokes_per_image: unannotated line strokes per image: hard negatives shaped like parts of digits.
        long_tail_ratio: **class imbalance** of the train split: class ``i`` (digit ``i``) is drawn with
            probability proportional to ``ratio ** (-i / (K - 1))``, so digit 0 is ``ratio`` times more
            frequent than digit 4. ``None`` (or 1) draws the classes uniformly. The test split is always balanced.
        label_noise: fraction of train targets whose label is replaced by a different class drawn uniformly:
            the wrong-label **outliers** GHM claims to down-weight. Test targets are clean. Under a long tail
            uniform flips swamp the rare classes (at ratio 100 and 10 % noise most labels of the rarest class
            would be wrong), so the ``noisy`` preset has balanced classes.
        box_noise: fraction of train targets whose box corners are jittered independently by up to
            ``box_jitter`` of the box width/height (clipped to the image, at least 1 px wide/high).
        box_jitter: relative size of the box jitter above.
        empty_fraction: fraction of images without any target (they keep their distractors and strokes):
            **image-level imbalance**, the pure-negative images.
        contrast: range of the ink strength of every pasted item (targets and hard negatives alike).
        noise_std: standard deviation of the Gaussian pixel noise (intensities in ``[0, 1]``).
        max_overlap: the largest allowed intersection between two pasted items, as a fraction of the
            smaller one's area.
        placement_tries: candidate positions tried per item before leaving it out.
        num_train: images in the train split.
        num_test: images in the test split.
    """

    image_size: int = 128
    objects_per_image: tuple[int, int] = (1, 2)
    object_size: tuple[int, int] = (7, 18)
    aspect_jitter: float = 0.25
    distractors_per_image: tuple[int, int] = (1, 4)
    strokes_per_image: tuple[int, int] = (0, 3)
    long_tail_ratio: float | None = 100.0
    label_noise: float = 0.0
    box_noise: float = 0.0
    box_jitter: float = 0.3
    empty_fraction: float = 0.0
    contrast: tuple[float, float] = (0.35, 0.9)
    noise_std: float = 0.04
    max_overlap: float = 0.1
    placement_tries: int = 30
    num_train: int = 8000
    num_test: int = 500

    def __post_init__(self) -> None:
        for name in ("objects_per_image", "distractors_per_image", "strokes_per_image", "object_size"):
            lo, hi = getattr(self, name)
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
                raise ValueError(f"{name} must be integers 0 <= low <= high, got {getattr(self, name)!r}")
        if self.object_size[0] < 3 or self.object_size[1] > self.image_size:
            raise ValueError(
                f"object_size must lie in [3, image_size={self.image_size}], got {self.object_size!r}"
            )
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size!r}")
        for name in ("label_noise", "box_noise", "empty_fraction", "max_overlap"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
        if self.long_tail_ratio is not None and not self.long_tail_ratio >= 1.0:
            raise ValueError(f"long_tail_ratio must be >= 1 or None, got {self.long_tail_ratio!r}")
        lo, hi = self.contrast
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"contrast must satisfy 0 < low <= high <= 1, got {self.contrast!r}")
        if self.aspect_jitter < 0 or self.box_jitter < 0 or self.noise_std < 0:
            raise ValueError(
                "aspect_jitter, box_jitter and noise_std must be >= 0, got "
                f"{self.aspect_jitter!r}, {self.box_jitter!r}, {self.noise_std!r}"
            )
        if self.placement_tries < 1:
            raise ValueError(f"placement_tries must be >= 1, got {self.placement_tries!r}")
        if self.num_train < 0 or self.num_test < 0:
            raise ValueError(
                f"num_train and num_test must be >= 0, got {self.num_train!r}, {self.num_test!r}"
            )

    def describe(self) -> dict[str, Any]:
        """The knobs as a JSON-serialisable dict (tuples as lists) for reports and run records."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        out["num_classes"] = NUM_CLASSES
        return out


PRESETS: dict[str, BenchmarkSpec] = {
    "default": BenchmarkSpec(),
    "balanced": BenchmarkSpec(long_tail_ratio=None),
    "noisy": BenchmarkSpec(long_tail_ratio=None, label_noise=0.1, box_noise=0.1),
    "crowded": BenchmarkSpec(
        image_size=192,
        objects_per_image=(1, 4),
        object_size=(5, 12),
        distractors_per_image=(3, 8),
        strokes_per_image=(2, 6),
    ),
    "tiny": BenchmarkSpec(
        image_size=64,
        object_size=(7, 14),
        distractors_per_image=(0, 2),
        strokes_per_image=(0, 2),
        num_train=64,
        num_test=16,
    ),
}
"""Named specs. ``default``: 128x128, 1-2 targets of 7-18 px, 1-4 distractor digits, 0-3 strokes, 100:1
long tail, 8,000 train / 500 test images. ``balanced``: no long tail. ``noisy``: the ``balanced`` images
with 10 % wrong labels (uniform flips; with balanced classes about 10 % of every class's labels are wrong,
so the noise does not single out any class) and 10 % jittered boxes. ``crowded``: a candidate to discriminate at convergence (not a default: that needs the study's
measurement): 192x192, more and smaller targets (1-4 of 5-12 px), more clutter (3-8 distractor digits, 2-6
strokes), the 100:1 long tail; about 1 positive per 2,500 negative anchors under RetinaNet's assignment
(``default``: 1 per 1,100). ``tiny``: a 64x64, 64-train / 16-test miniature of ``default`` for tests."""


def class_probabilities(spec: BenchmarkSpec, *, split: Split = "train") -> np.ndarray:
    """Probability of each class ``0..K-1`` for a target: ``p_i ∝ ratio ** (-i / (K - 1))`` (train), uniform (test).

    Returns:
        ``ndarray[K]`` float64 summing to 1.
    """
    _check_split(split)
    ratio = spec.long_tail_ratio if (split == "train" and spec.long_tail_ratio is not None) else 1.0
    w = float(ratio) ** (-np.arange(NUM_CLASSES) / (NUM_CLASSES - 1))
    return w / w.sum()


class BenchmarkDataset(DetectionDataset):
    """One split of the built-in benchmark, held in memory.

    Attributes:
        images: ``ndarray[N, H, W]`` uint8 grayscale scenes (``__getitem__`` expands to 3 channels float).
        boxes: ``ndarray[M, 4]`` float32 xyxy of all targets, image by image (``offsets`` delimits them).
        labels: ``ndarray[M]`` int64 labels ``1..K`` as given for training (with label noise if any).
        clean_labels, clean_boxes: the same before label/box noise; ``noisy_label``/``noisy_box`` (bool [M])
            mark the corrupted targets.
        offsets: ``ndarray[N + 1]`` int64; image ``i`` owns rows ``offsets[i]:offsets[i + 1]``.
        negative_boxes, negative_kinds, negative_offsets: the unannotated hard negatives (xyxy, kind: digit
            ``5..9`` or ``-1`` for a stroke) in the same layout, for hard-negative analyses.
        spec, split, seed, preset: how the split was made (``preset`` is ``None`` for a custom spec).

    Image ``i`` has ``image_id = i + 1`` (ids and COCO annotation ids start at 1).
    """

    def __init__(
        self,
        spec: BenchmarkSpec,
        *,
        split: Split = "train",
        seed: int = 0,
        transforms: Transform | None = None,
        preset: str | None = None,
    ) -> None:
        _check_split(split)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.spec, self.split, self.seed, self.preset = spec, split, seed, preset
        self.label_names = list(LABEL_NAMES)
        self.transforms = transforms
        scene = _generate_cached(spec, split, seed)
        self.images: np.ndarray = scene["images"]
        self.boxes: np.ndarray = scene["boxes"]
        self.labels: np.ndarray = scene["labels"]
        self.clean_boxes: np.ndarray = scene["clean_boxes"]
        self.clean_labels: np.ndarray = scene["clean_labels"]
        self.noisy_label: np.ndarray = scene["noisy_label"]
        self.noisy_box: np.ndarray = scene["noisy_box"]
        self.offsets: np.ndarray = scene["offsets"]
        self.negative_boxes: np.ndarray = scene["negative_boxes"]
        self.negative_kinds: np.ndarray = scene["negative_kinds"]
        self.negative_offsets: np.ndarray = scene["negative_offsets"]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load_image(self, index: int) -> Tensor:
        index = self._check_index(index)
        return torch.from_numpy(self.images[index]).unsqueeze(0).expand(3, -1, -1).contiguous()

    def target(self, index: int) -> DetectionTarget:
        index = self._check_index(index)
        a, b = self.offsets[index], self.offsets[index + 1]
        return {
            "boxes": torch.from_numpy(self.boxes[a:b].copy()),
            "labels": torch.from_numpy(self.labels[a:b].copy()),
            "image_id": index + 1,
        }

    def image_size(self, index: int) -> tuple[int, int]:
        self._check_index(index)
        return int(self.images.shape[1]), int(self.images.shape[2])

    def categories_per_image(self) -> list[list[int]]:
        return [
            np.unique(self.labels[self.offsets[i] : self.offsets[i + 1]]).tolist() for i in range(len(self))
        ]

    def class_counts(self) -> np.ndarray:
        """``ndarray[K]`` int64: number of (given, possibly noisy) targets of each label ``1..K``."""
        return np.bincount(self.labels - 1, minlength=NUM_CLASSES)

    def describe(self) -> dict[str, Any]:
        """Spec knobs plus what was generated: counts of images, targets per class, empty images, noise."""
        per_image = np.diff(self.offsets)
        return {
            "preset": self.preset,
            "split": self.split,
            "seed": self.seed,
            **self.spec.describe(),
            "num_images": len(self),
            "num_objects": int(len(self.labels)),
            "objects_per_image_mean": float(per_image.mean()) if len(self) else 0.0,
            "empty_images": int((per_image == 0).sum()),
            "class_counts": self.class_counts().tolist(),
            "noisy_labels": int(self.noisy_label.sum()),
            "noisy_boxes": int(self.noisy_box.sum()),
            "hard_negatives": int(len(self.negative_kinds)),
        }

    def __repr__(self) -> str:
        name = self.preset if self.preset is not None else "custom"
        return f"BenchmarkDataset({name!r}, split={self.split!r}, seed={self.seed}, images={len(self)})"


def make_benchmark(
    preset_or_spec: str | BenchmarkSpec = "default",
    *,
    split: Split = "train",
    seed: int = 0,
    transforms: Transform | None = None,
) -> BenchmarkDataset:
    """Generate one split of the built-in benchmark (deterministic: same arguments, same bytes).

    Args:
        preset_or_spec: a name in :data:`PRESETS` (``"default"``, ``"balanced"``, ``"noisy"``, ``"tiny"``)
            or a :class:`BenchmarkSpec`.
        split: ``"train"`` or ``"test"`` (test: test digit pool, seed derived from ``seed``, balanced,
            no label noise).
        seed: generator seed.
        transforms: joint transform applied by ``__getitem__``, or ``None``.
    """
    if isinstance(preset_or_spec, BenchmarkSpec):
        spec, preset = preset_or_spec, None
    elif isinstance(preset_or_spec, str) and preset_or_spec in PRESETS:
        spec, preset = PRESETS[preset_or_spec], preset_or_spec
    else:
        raise ValueError(
            f"preset_or_spec must be one of {sorted(PRESETS)} or a BenchmarkSpec, got {preset_or_spec!r}"
        )
    return BenchmarkDataset(spec, split=split, seed=seed, transforms=transforms, preset=preset)


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@functools.cache
def _digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"test": (glyphs float32 [n, 8, 8] in [0, 1], digits int64 [n])}``, a fixed stratified split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    target = digits.target.astype(np.int64)
    rng = np.random.default_rng(_POOL_SEED)
    is_test = np.zeros(len(target), dtype=bool)
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(target == d))
        is_test[idx[: int(round(_TEST_POOL_FRACTION * len(idx)))]] = True
    return {"train": (images[~is_test], target[~is_test]), "test": (images[is_test], target[is_test])}


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` bilinear resampling matrix (half-pixel centres, edge clamping, rows sum to 1)."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - f)
    np.add.at(m, (np.arange(n_out), i1), f)
    return m


def _crop_to_ink(alpha: np.ndarray) -> list[np.ndarray]:
    """Crop each ``alpha[n, h, w]`` to the tight box of pixels >= the ink threshold (zeroing the rest)."""
    alpha = np.where(alpha >= _INK_THRESHOLD, alpha, 0.0).astype(np.float32)
    rows, cols = alpha.any(axis=2), alpha.any(axis=1)
    h, w = alpha.shape[1:]
    r0, c0 = rows.argmax(1), cols.argmax(1)
    r1, c1 = h - rows[:, ::-1].argmax(1), w - cols[:, ::-1].argmax(1)
    return [alpha[k, r0[k] : r1[k], c0[k] : c1[k]] for k in range(len(alpha))]


def _render_digits(glyphs: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> list[np.ndarray]:
    """Resize ``glyphs[n, 8, 8]`` to each ``(height, width)`` (bilinear) and crop to the ink; grouped by size."""
    out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(glyphs)
    sizes = heights.astype(np.int64) * 10_000 + widths
    for key in np.unique(sizes):
        idx = np.flatnonzero(sizes == key)
        ry, rx = _bilinear_matrix(int(key // 10_000), 8), _bilinear_matrix(int(key % 10_000), 8)
        resized = np.einsum("hi,nij,wj->nhw", ry, glyphs[idx], rx, optimize=True)
        resized /= np.maximum(resized.max(axis=(1, 2), keepdims=True), 1e-6)
        for k, patch in zip(idx, _crop_to_ink(resized)):
            out[k] = patch
    return out


def _render_strokes(lengths: np.ndarray, angles: np.ndarray, thickness: np.ndarray) -> list[np.ndarray]:
    """Anti-aliased line segments (alpha = coverage by distance to the segment), cropped to their ink."""
    if len(lengths) == 0:
        return []
    p = int(np.ceil(lengths.max() + thickness.max())) + 4
    c = (p - 1) / 2.0
    yy, xx = np.mgrid[0:p, 0:p].astype(np.float32)
    dx = (np.cos(angles) * lengths / 2).astype(np.float32)[:, None, None]
    dy = (np.sin(angles) * lengths / 2).astype(np.float32)[:, None, None]
    thickness = thickness.astype(np.float32)
    ax, ay = c - dx, c - dy  # segment from a to b through the centre
    vx, vy = 2 * dx, 2 * dy
    t = ((xx - ax) * vx + (yy - ay) * vy) / np.maximum(vx * vx + vy * vy, 1e-6)
    t = np.clip(t, 0.0, 1.0)
    dist = np.hypot(xx - (ax + t * vx), yy - (ay + t * vy))
    alpha = np.clip(thickness[:, None, None] / 2 + 0.5 - dist, 0.0, 1.0)
    return _crop_to_ink(alpha.astype(np.float32))


def _place(
    ph: np.ndarray, pw: np.ndarray, active: np.ndarray, *, size: int, tries: int, max_overlap: float, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Rejection-sample positions for ``[N, M]`` items slot by slot, vectorised over images.

    An item is placed at the first of ``tries`` uniform candidates whose intersection with every item
    already placed in its image is at most ``max_overlap`` of the smaller area.

    Returns:
        ``(boxes float64 [N, M, 4] xyxy, placed bool [N, M])``.
    """
    n, m = ph.shape
    boxes = np.zeros((n, m, 4), dtype=np.float64)
    placed = np.zeros((n, m), dtype=bool)
    for j in range(m):
        h, w = ph[:, j].astype(np.float64), pw[:, j].astype(np.float64)
        u = rng.random((n, tries, 2))
        x = np.floor(u[..., 0] * (size - w + 1)[:, None])
        y = np.floor(u[..., 1] * (size - h + 1)[:, None])
        cand = np.stack([x, y, x + w[:, None], y + h[:, None]], axis=-1)  # [N, T, 4]
        ok = np.ones((n, tries), dtype=bool)
        if j:
            prev = boxes[:, None, :j]  # [N, 1, j, 4]
            cb = cand[:, :, None]  # [N, T, 1, 4]
            iw = np.clip(np.minimum(cb[..., 2], prev[..., 2]) - np.maximum(cb[..., 0], prev[..., 0]), 0, None)
            ih = np.clip(np.minimum(cb[..., 3], prev[..., 3]) - np.maximum(cb[..., 1], prev[..., 1]), 0, None)
            area_c = (w * h)[:, None, None]
            area_p = (prev[..., 2] - prev[..., 0]) * (prev[..., 3] - prev[..., 1])
            frac = iw * ih / np.maximum(np.minimum(area_c, area_p), 1.0)
            frac = np.where(placed[:, None, :j], frac, 0.0)
            ok = (frac <= max_overlap).all(axis=-1)
        found = ok.any(axis=1)
        first = ok.argmax(axis=1)
        sel = active[:, j] & found
        boxes[sel, j] = cand[sel, first[sel]]
        placed[:, j] = sel
    return boxes, placed


def _smooth_backgrounds(count: int, size: int, rng) -> np.ndarray:
    """``[count, size, size]`` float32: a per-image level plus a bilinearly upsampled random 4x4 field."""
    g = _BACKGROUND_GRID
    level = rng.uniform(0.12, 0.42, size=(count, 1, 1))
    amplitude = rng.uniform(0.02, 0.12, size=(count, 1, 1))  # the field stays in [0, 0.54]: never clipped
    grid = (level + amplitude * rng.uniform(-1.0, 1.0, size=(count, g, g))).astype(np.float32)
    up = _bilinear_matrix(size, g)
    return (up @ grid) @ up.T


def _add_noise(images: np.ndarray, std: float, rng) -> None:
    """Add Gaussian pixel noise in place: each image gets a random window of one ``[2H, 2W]`` Gaussian field.

    Drawing ``2H x 2W`` normals per chunk instead of ``N x H x W`` keeps generation fast; the windows of a
    chunk overlap, which no detector can exploit (pixel noise carries no label information).
    """
    if std == 0 or len(images) == 0:
        return
    n, hgt, wid = images.shape
    field = rng.standard_normal((2 * hgt, 2 * wid), dtype=np.float32) * np.float32(std)
    dy = rng.integers(0, hgt + 1, size=n)
    dx = rng.integers(0, wid + 1, size=n)
    flip = rng.random(n) < 0.5
    for k in range(n):
        window = field[dy[k] : dy[k] + hgt, dx[k] : dx[k] + wid]
        images[k] += window.T if flip[k] and hgt == wid else window


@functools.lru_cache(maxsize=6)
def _generate_cached(spec: BenchmarkSpec, split: Split, seed: int) -> dict[str, np.ndarray]:
    """:func:`_generate`, kept for the last few (spec, split, seed): a ``compare`` run opens the same split
    for every run, its data summary and its class counts, and generates it once. The arrays are shared and
    only ever read (targets are copied out)."""
    return _generate(spec, split=split, seed=seed)


def _generate(spec: BenchmarkSpec, *, split: Split, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split]]))
    glyphs, digits = _digit_pools()[split]
    n = spec.num_train if split == "train" else spec.num_test
    size = spec.image_size

    # --- how many items of each kind per image; slot columns: targets, then digits, then strokes ---
    def counts(lo_hi: tuple[int, int]) -> np.ndarray:
        return rng.integers(lo_hi[0], lo_hi[1] + 1, size=n)

    n_obj = counts(spec.objects_per_image)
    n_obj[rng.random(n) < spec.empty_fraction] = 0
    n_dig, n_str = counts(spec.distractors_per_image), counts(spec.strokes_per_image)
    widths = (spec.objects_per_image[1], spec.distractors_per_image[1], spec.strokes_per_image[1])
    kinds = np.repeat([KIND_TARGET, KIND_DIGIT, KIND_STROKE], widths)
    rank = np.concatenate([np.arange(w) for w in widths]).astype(np.int64)
    m = len(kinds)
    active = rank[None, :] < np.stack([n_obj, n_dig, n_str], axis=1)[:, kinds]  # [N, M]
    ii, jj = np.nonzero(active)  # items in image-major, slot order
    item_kind = kinds[jj]
    n_items = len(ii)

    # --- what each item is: digit class and scan, size, contrast ---
    digit = np.full(n_items, -1, dtype=np.int64)
    is_t, is_d, is_s = item_kind == KIND_TARGET, item_kind == KIND_DIGIT, item_kind == KIND_STROKE
    digit[is_t] = rng.choice(NUM_CLASSES, size=int(is_t.sum()), p=class_probabilities(spec, split=split))
    digit[is_d] = rng.integers(NUM_CLASSES, 10, size=int(is_d.sum()))
    by_digit = [np.flatnonzero(digits == d) for d in range(10)]
    scan = np.full(n_items, -1, dtype=np.int64)
    pick = rng.random(n_items)
    for d in range(10):
        sel = digit == d
        scan[sel] = by_digit[d][(pick[sel] * len(by_digit[d])).astype(np.int64)]
    h = rng.integers(spec.object_size[0], spec.object_size[1] + 1, size=n_items)
    log_j = math.log1p(spec.aspect_jitter)
    w = np.clip(np.rint(h * np.exp(rng.uniform(-log_j, log_j, size=n_items))), 3, size).astype(np.int64)
    contrast = rng.uniform(spec.contrast[0], spec.contrast[1], size=n_items).astype(np.float32)
    stroke_len = rng.uniform(spec.object_size[0], spec.object_size[1], size=int(is_s.sum()))
    stroke_angle = rng.uniform(0.0, np.pi, size=int(is_s.sum()))
    stroke_thick = rng.uniform(1.0, 2.0, size=int(is_s.sum()))

    patches: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * n_items
    is_digit = np.flatnonzero(~is_s)
    for k, patch in zip(is_digit, _render_digits(glyphs[scan[is_digit]], h[is_digit], w[is_digit])):
        patches[k] = patch
    for k, patch in zip(np.flatnonzero(is_s), _render_strokes(stroke_len, stroke_angle, stroke_thick)):
        patches[k] = patch
    ph = np.ones((n, m), dtype=np.int64)
    pw = np.ones((n, m), dtype=np.int64)
    ph[ii, jj] = [p.shape[0] for p in patches]
    pw[ii, jj] = [p.shape[1] for p in patches]

    # --- where: rejection sampling, vectorised over images ---
    boxes_nm, placed_nm = _place(
        ph, pw, active, size=size, tries=spec.placement_tries, max_overlap=spec.max_overlap, rng=rng
    )
    placed = placed_nm[ii, jj]
    item_box = boxes_nm[ii, jj]

    # --- compose: smooth background + ink (max over items) + pixel noise ---
    images = np.empty((n, size, size), dtype=np.uint8)
    xy = item_box[:, :2].astype(np.int64)
    starts = np.searchsorted(ii, np.arange(0, n + _CHUNK, _CHUNK))
    for c0 in range(0, n, _CHUNK):
        c1 = min(c0 + _CHUNK, n)
        bg = _smooth_backgrounds(c1 - c0, size, rng)
        ink = np.zeros_like(bg)
        for k in range(starts[c0 // _CHUNK], starts[c0 // _CHUNK + 1]):
            if placed[k]:
                p = patches[k]
                x, y = xy[k]
                view = ink[ii[k] - c0, y : y + p.shape[0], x : x + p.shape[1]]
                np.maximum(view, contrast[k] * p, out=view)
        img = bg + (1.0 - bg) * ink
        _add_noise(img, spec.noise_std, rng)
        np.clip(img * 255.0 + 0.5, 0.0, 255.0, out=img)
        images[c0:c1] = img.astype(np.uint8)

    # --- annotations: placed targets; label and box noise on the train split only ---
    tgt = placed & is_t
    t_img = ii[tgt]
    clean_boxes = item_box[tgt].astype(np.float32)
    clean_labels = digit[tgt] + 1
    n_t = len(clean_labels)
    labels, boxes = clean_labels.copy(), clean_boxes.copy()
    noisy_label = np.zeros(n_t, dtype=bool)
    noisy_box = np.zeros(n_t, dtype=bool)
    if split == "train":
        noisy_label = rng.random(n_t) < spec.label_noise
        shift = rng.integers(1, NUM_CLASSES, size=n_t)
        labels = np.where(noisy_label, (clean_labels - 1 + shift) % NUM_CLASSES + 1, clean_labels)
        noisy_box = rng.random(n_t) < spec.box_noise
        bw = (clean_boxes[:, 2] - clean_boxes[:, 0])[:, None]
        bh = (clean_boxes[:, 3] - clean_boxes[:, 1])[:, None]
        scale = np.concatenate([bw, bh, bw, bh], axis=1)
        jitter = rng.uniform(-spec.box_jitter, spec.box_jitter, size=(n_t, 4)) * scale
        jittered = np.clip(np.rint(clean_boxes + jitter), 0, size)
        jittered[:, 2:] = np.clip(np.maximum(jittered[:, 2:], jittered[:, :2] + 1), None, size)
        jittered[:, :2] = np.minimum(jittered[:, :2], jittered[:, 2:] - 1)
        boxes = np.where(noisy_box[:, None], jittered, clean_boxes).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(t_img, minlength=n))]).astype(np.int64)

    neg = placed & ~is_t
    return {
        "images": images,
        "boxes": boxes,
        "labels": labels.astype(np.int64),
        "clean_boxes": clean_boxes,
        "clean_labels": clean_labels.astype(np.int64),
        "noisy_label": noisy_label,
        "noisy_box": noisy_box,
        "offsets": offsets,
        "negative_boxes": item_box[neg].astype(np.float32),
        "negative_kinds": digit[neg],
        "negative_offsets": np.concatenate([[0], np.cumsum(np.bincount(ii[neg], minlength=n))]).astype(
            np.int64
        ),
    }
