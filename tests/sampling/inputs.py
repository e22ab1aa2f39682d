"""Input builders shared by the sampling tests and benchmarks/bm_sampling.py (same shapes in both)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RoIBatch(NamedTuple):
    cls_losses: Tensor  # [R]
    loc_losses: Tensor  # [R]
    labels: Tensor  # [R] int64
    boxes: Tensor  # [R, 4]
    batch_idx: Tensor  # [R] int64

    @property
    def losses(self) -> Tensor:
        return self.cls_losses + self.loc_losses


def random_rois(
    num_images: int,
    rois_per_image: int,
    *,
    num_classes: int = 5,
    fg_fraction: float = 0.25,
    ignore_fraction: float = 0.05,
    num_clusters: int = 8,
    image_size: float = 512.0,
    tie_decimals: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> RoIBatch:
    """RoIs jittered around a few cluster centres (so loss-scored NMS has work to do), random labels and
    distinct losses (or losses rounded to ``tie_decimals`` to create ties). Generated on CPU."""
    g = torch.Generator().manual_seed(seed)
    total = num_images * rois_per_image
    centres = torch.rand(num_images, num_clusters, 2, generator=g) * image_size * 0.8 + image_size * 0.1
    sizes = torch.rand(num_images, num_clusters, 2, generator=g) * image_size * 0.2 + 16.0
    cluster = torch.randint(num_clusters, (num_images, rois_per_image), generator=g)
    rows = torch.arange(num_images)[:, None].expand_as(cluster)
    c = centres[rows, cluster] + torch.randn(num_images, rois_per_image, 2, generator=g) * 6.0
    s = sizes[rows, cluster] * (1.0 + 0.2 * torch.rand(num_images, rois_per_image, 2, generator=g))
    boxes = torch.cat([c - s / 2, c + s / 2], dim=-1).reshape(total, 4).to(dtype)
    u = torch.rand(total, generator=g)
    labels = torch.zeros(total, dtype=torch.int64)
    labels[u < fg_fraction] = torch.randint(1, num_classes + 1, (total,), generator=g)[u < fg_fraction]
    labels[u > 1.0 - ignore_fraction] = -1
    cls_losses = torch.rand(total, generator=g, dtype=torch.float64) * 3.0
    loc_losses = torch.where(labels > 0, torch.rand(total, generator=g, dtype=torch.float64), 0.0)
    if tie_decimals is not None:
        cls_losses = cls_losses.round(decimals=tie_decimals)
        loc_losses = loc_losses.round(decimals=tie_decimals)
    batch_idx = torch.arange(num_images).repeat_interleave(rois_per_image)
    return RoIBatch(cls_losses.to(dtype), loc_losses.to(dtype), labels, boxes, batch_idx)


def random_anchor_labels(
    num_images: int,
    num_anchors: int,
    *,
    pos_fraction: float = 0.01,
    ignore_fraction: float = 0.1,
    num_classes: int = 5,
    seed: int = 0,
) -> Tensor:
    """``Tensor[B, A] (int64)`` anchor labels with few positives, many negatives and some ignored."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(num_images, num_anchors, generator=g)
    labels = torch.zeros(num_images, num_anchors, dtype=torch.int64)
    fg = u < pos_fraction
    labels[fg] = torch.randint(1, num_classes + 1, (int(fg.sum()),), generator=g)
    labels[u > 1.0 - ignore_fraction] = -1
    return labels
