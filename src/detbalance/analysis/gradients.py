"""Easy/hard imbalance of a model's sigmoid outputs, and the one gradient-probe loop of the package.

The gradient norm ``g = |sigmoid(x) - y|`` per (anchor, class) element (GHM, Li et al., 2019, eq. 2), its
density histogram (GHM figure 1), the easy/hard x positive/negative quadrants, the share of the total
gradient each quadrant contributes under CE, focal and GHM-C, and the loss CDFs of the focal paper's
figure 4 (Lin et al., 2017). :func:`probe_gradients` runs a RetinaNet over dataset images and streams
them into a :class:`GradientAccumulator`; ``compare`` and ``profile`` both use it.
:func:`per_class_ap` gives COCO AP per class from the official evaluator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from detbalance.losses import sigmoid_focal_gradient
from detbalance.types import DetectionTarget

__all__ = [
    "QUADRANTS",
    "GradientAccumulator",
    "GradientStats",
    "focal_gradient_magnitude",
    "gradient_stats",
    "per_class_ap",
    "probe_gradients",
    "sigmoid_targets",
]


QUADRANTS: tuple[str, ...] = ("easy_positive", "hard_positive", "easy_negative", "hard_negative")



@dataclass(frozen=True)
class GradientStats:
    """Gradient-norm and loss statistics of a model's sigmoid outputs, per (anchor, class) element.

    An *example* is one sigmoid output (anchor ``a``, class column ``c``) with target ``y`` in {0, 1}, the
    unit focal loss and GHM-C act on. ``g = |sigmoid(x) - y|`` is the norm of the CE gradient w.r.t. the
    logit (GHM eq. 2). Positive: ``y = 1``; negative: ``y = 0``; *easy*: ``g < easy_threshold``.

    Attributes:
        num_examples: valid (non-ignored) elements.
        num_positive: elements with ``y = 1``.
        num_negative: elements with ``y = 0``.
        easy_threshold: ``g`` below which an example is easy (0.5: ``p_t > 0.5``, the focal paper's
            "well-classified").
        bins: ``M``, equal-width ``g`` bins on [0, 1] (GHM default 30).
        focal_alpha: alpha of the focal loss compared (``None``: no alpha weighting).
        focal_gamma: gamma of the focal loss compared.
        quadrant_counts: examples per quadrant (keys :data:`QUADRANTS`).
        gradient_share: ``{"ce" | "focal" | "ghm_c": {quadrant: share}}``, the fraction of the summed
            gradient magnitude ``sum |dL/dx|`` each quadrant contributes; each loss's shares sum to 1.
        density: ``M`` counts of ``g`` per bin (:func:`detbalance.losses.gradient_density`).
        density_positive: the same over positives only.
        density_negative: the same over negatives only.
        mean_gradient: ``{loss: [M]}`` mean per-example gradient magnitude in each ``g`` bin (GHM figure 2;
            ``None`` for empty bins). GHM-C's is ``g * beta`` with ``beta = N / GD(g)``,
            ``GD(g) = count(bin(g)) * M`` (GHM eq. 7-8).
        bin_share: ``{loss: [M]}`` share of the total gradient magnitude contributed by each ``g`` bin.
        cdf_gammas: gammas of the loss CDFs (focal figure 4: 0, 0.5, 1, 2).
        cdf_fraction: ``P`` points in [0, 1], fraction of examples sorted by increasing loss.
        cdf_positive: ``[len(cdf_gammas)][P]`` cumulative share of the total loss ``(1 - p_t)^gamma CE``
            over positives, at each fraction.
        cdf_negative: the same over negatives.
    """

    num_examples: int
    num_positive: int
    num_negative: int
    easy_threshold: float
    bins: int
    focal_alpha: float | None
    focal_gamma: float
    quadrant_counts: dict[str, int]
    gradient_share: dict[str, dict[str, float]]
    density: list[float]
    density_positive: list[float]
    density_negative: list[float]
    mean_gradient: dict[str, list[float | None]]
    bin_share: dict[str, list[float]]
    cdf_gammas: list[float]
    cdf_fraction: list[float]
    cdf_positive: list[list[float]]
    cdf_negative: list[list[float]]


def focal_gradient_magnitude(
    logits: Tensor, targets: Tensor, *, alpha: float | None = 0.25, gamma: float = 2.0
) -> Tensor:
    """``|d FL / d x|`` per element for the sigmoid focal loss (Lin et al., 2017, appendix, eq. 9-10).

    The magnitude of :func:`detbalance.losses.sigmoid_focal_gradient`, the derivative the loss's own
    backward uses; with ``gamma = 0`` and ``alpha = None`` it is CE's ``g = |p - y|``.

    Args:
        logits: ``Tensor[...]``.
        targets: ``Tensor[...]`` in {0, 1}, same shape.
        alpha: weight of positives (``1 - alpha`` for negatives); ``None`` disables.
        gamma: focusing parameter, ``>= 0``.

    Returns:
        ``Tensor[...]`` float32 (float64 for float64 input), non-negative.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return sigmoid_focal_gradient(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma).abs()


class GradientAccumulator:
    """Streams :class:`GradientStats` over batches in O(bins) memory (one pass, exact).

    Everything is a per-bin sum: GHM-C's weight is constant within a ``g`` bin, so its gradient share is
    ``sum_bins (sum of g in bin) / count(bin)`` up to a constant; the loss CDFs are cumulative sums over
    ``cdf_bins`` log-spaced ``g`` bins (every ``(1 - p_t)^gamma CE`` is increasing in ``g``, so sorting by
    ``g`` sorts by loss). CDF points are therefore exact at bin edges (relative ``g`` resolution about
    1.2% with the defaults).

    Args:
        bins: ``M`` for the density and GHM-C (paper default 30).
        easy_threshold: ``g`` below which an example is easy.
        focal_alpha: alpha of the compared focal loss (``None`` disables).
        focal_gamma: gamma of the compared focal loss.
        cdf_gammas: gammas of the loss CDFs.
        cdf_bins: log-spaced ``g`` bins on ``[1e-12, 1]`` for the CDFs.
    """

    def __init__(
        self,
        *,
        bins: int = 30,
        easy_threshold: float = 0.5,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        cdf_gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
        cdf_bins: int = 2400,
    ) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not 0.0 < easy_threshold <= 1.0:
            raise ValueError(f"easy_threshold must lie in (0, 1], got {easy_threshold}")
        if focal_alpha is not None and not 0.0 <= focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must lie in [0, 1] or be None, got {focal_alpha}")
        if focal_gamma < 0 or any(g < 0 for g in cdf_gammas):
            raise ValueError(
                f"gammas must be >= 0, got focal_gamma={focal_gamma}, cdf_gammas={tuple(cdf_gammas)}"
            )
        self.bins = bins
        self.easy_threshold = easy_threshold
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cdf_gammas = tuple(float(g) for g in cdf_gammas)
        self.cdf_bins = cdf_bins
        self._log_lo = -12.0
        # [pos/neg, easy/hard, M] cells (pos = 0, neg = 1; easy = 0, hard = 1)
        self.count = torch.zeros(2, 2, bins, dtype=torch.float64)
        self.density = torch.zeros(bins, dtype=torch.float64)  # gradient_density over all valid examples
        self.sum_g = torch.zeros(2, 2, bins, dtype=torch.float64)
        self.sum_focal = torch.zeros(2, 2, bins, dtype=torch.float64)
        self.cdf_count = torch.zeros(2, cdf_bins, dtype=torch.float64)
        self.cdf_loss = torch.zeros(len(self.cdf_gammas), 2, cdf_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch (about 25 elementwise passes over it; no host synchronisation but the target check).

        Args:
            logits: ``Tensor[N, C]`` (or any shape) sigmoid logits.
            targets: same shape, one-vs-all targets in {0, 1} (:func:`sigmoid_targets`).
            valid: bool mask broadcastable to ``logits`` (``False`` = ignored); default all valid.
        """
        from detbalance.losses import gradient_density

        if logits.shape != targets.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape"
            )
        x = logits.detach().float().reshape(-1)
        y = targets.detach().float().reshape(-1)
        v = (
            torch.ones_like(x, dtype=torch.bool)
            if valid is None
            else valid.to(torch.bool).expand_as(logits).reshape(-1)
        )
        if bool(((y != 0) & (y != 1) & v).any()):
            raise ValueError("targets must be 0 or 1 on valid elements")
        m, c = self.bins, self.cdf_bins
        g = (torch.sigmoid(x) - y).abs()  # GHM eq. 2; g = 1 - p_t
        neg = (y < 0.5).long()
        ce = F.softplus(torch.where(neg.bool(), x, -x))  # -log p_t, stable
        # [pos/neg, easy/hard, M] cells; invalid elements go to a spare cell that is dropped
        idx = (g * m).floor().clamp(0, m - 1).long()  # the bin of gradient_density: min(floor(g M), M - 1)
        cell = (neg * 2 + (g >= self.easy_threshold).long()) * m + idx
        cell = torch.where(v, cell, 4 * m)
        dev = self.count.device

        def per_cell(weights: Tensor | None, size: int, index: Tensor) -> Tensor:
            out = torch.bincount(index, weights=weights, minlength=size + 1)[:size]
            return out.to(dev, torch.float64)

        self.count += per_cell(None, 4 * m, cell).view(2, 2, m)
        self.density += gradient_density(g, bins=m, valid=v).to(dev, torch.float64)
        self.sum_g += per_cell(g, 4 * m, cell).view(2, 2, m)
        focal = focal_gradient_magnitude(x, y, alpha=self.focal_alpha, gamma=self.focal_gamma)
        self.sum_focal += per_cell(focal, 4 * m, cell).view(2, 2, m)
        # loss CDFs: log-spaced g bins (every (1 - p_t)^gamma CE increases with g)
        cidx = (torch.log10(g.clamp_min(10.0**self._log_lo)) - self._log_lo) * (c / -self._log_lo)
        ccell = torch.where(v, cidx.floor().clamp(0, c - 1).long() + neg * c, 2 * c)
        self.cdf_count += per_cell(None, 2 * c, ccell).view(2, c)
        for gi, gamma in enumerate(self.cdf_gammas):
            w = ce if gamma == 0 else ce * g.pow(gamma)
            self.cdf_loss[gi] += per_cell(w, 2 * c, ccell).view(2, c)

    def result(self, *, cdf_points: int = 101) -> GradientStats:
        """The statistics of everything added so far.

        Raises:
            ValueError: nothing (valid) was added.
        """
        n = float(self.count.sum())
        if n == 0:
            raise ValueError("no valid examples were added: cannot compute gradient statistics")
        count_bin = self.density
        # GHM-C per-example weight beta = N / GD(g), GD(g) = count(bin) * M (paper normalisation)
        beta = torch.where(count_bin > 0, n / (count_bin.clamp_min(1) * self.bins), 0.0)
        totals = {"ce": self.sum_g, "focal": self.sum_focal, "ghm_c": self.sum_g * beta}
        share, mean_grad, bin_share = {}, {}, {}
        for name, t in totals.items():
            tot = float(t.sum())
            quad = t.sum(dim=2).reshape(-1)
            share[name] = {q: (float(quad[i]) / tot if tot > 0 else 0.0) for i, q in enumerate(QUADRANTS)}
            per_bin = t.sum(dim=(0, 1))
            mean_grad[name] = [
                (float(s) / float(c) if c > 0 else None) for s, c in zip(per_bin.tolist(), count_bin.tolist())
            ]
            bin_share[name] = (per_bin / tot if tot > 0 else per_bin * 0).tolist()
        fraction = torch.linspace(0, 1, cdf_points, dtype=torch.float64)
        cdfs = [[], []]
        for gi in range(len(self.cdf_gammas)):
            for si in range(2):
                cdfs[si].append(_cdf_at(self.cdf_count[si], self.cdf_loss[gi, si], fraction))
        counts = self.count.sum(dim=2).reshape(-1)
        return GradientStats(
            num_examples=int(n),
            num_positive=int(self.count[0].sum()),
            num_negative=int(self.count[1].sum()),
            easy_threshold=float(self.easy_threshold),
            bins=self.bins,
            focal_alpha=self.focal_alpha,
            focal_gamma=float(self.focal_gamma),
            quadrant_counts={q: int(counts[i]) for i, q in enumerate(QUADRANTS)},
            gradient_share=share,
            density=count_bin.tolist(),
            density_positive=self.count[0].sum(0).tolist(),
            density_negative=self.count[1].sum(0).tolist(),
            mean_gradient=mean_grad,
            bin_share=bin_share,
            cdf_gammas=list(self.cdf_gammas),
            cdf_fraction=fraction.tolist(),
            cdf_positive=cdfs[0],
            cdf_negative=cdfs[1],
        )


def _cdf_at(count: Tensor, loss: Tensor, fraction: Tensor) -> list[float]:
    """Cumulative loss share at each fraction of examples sorted by loss, linear within a bin."""
    total_n, total_l = float(count.sum()), float(loss.sum())
    if total_n == 0 or total_l == 0:
        return [0.0] * len(fraction) if total_n == 0 else fraction.tolist()
    cn = torch.cat([count.new_zeros(1), count.cumsum(0)]) / total_n
    cl = torch.cat([loss.new_zeros(1), loss.cumsum(0)]) / total_l
    keep = torch.cat([torch.tensor([True]), count > 0])  # strictly increasing x for interpolation
    cn, cl = cn[keep], cl[keep]
    j = torch.searchsorted(cn, fraction, right=False).clamp(1, len(cn) - 1)
    x0, x1, y0, y1 = cn[j - 1], cn[j], cl[j - 1], cl[j]
    t = ((fraction - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
    return (y0 + t * (y1 - y0)).clamp(0, 1).tolist()


def gradient_stats(
    logits: Tensor,
    targets: Tensor,
    *,
    valid: Tensor | None = None,
    bins: int = 30,
    easy_threshold: float = 0.5,
    focal_alpha: float | None = 0.25,
    focal_gamma: float = 2.0,
    cdf_gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    cdf_points: int = 101,
) -> GradientStats:
    """Gradient-norm density, easy/hard quadrants, per-loss gradient shares and loss CDFs (pure).

    Args:
        logits: ``Tensor[N, C]`` sigmoid logits (any shape works; every element is one example).
        targets: ``Tensor[N, C]`` one-vs-all targets in {0, 1}.
        valid: bool mask broadcastable to ``logits`` (e.g. ``Tensor[N, 1]`` from ``labels >= 0``).
        bins, easy_threshold, focal_alpha, focal_gamma, cdf_gammas: see :class:`GradientAccumulator`.
        cdf_points: points of each CDF.

    Returns:
        :class:`GradientStats`.
    """
    acc = GradientAccumulator(
        bins=bins,
        easy_threshold=easy_threshold,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
        cdf_gammas=cdf_gammas,
    )
    acc.update(logits, targets, valid)
    return acc.result(cdf_points=cdf_points)


def sigmoid_targets(labels: Tensor, num_columns: int, *, background_column: bool) -> tuple[Tensor, Tensor]:
    """One-vs-all targets and the valid mask of a sigmoid head from anchor labels.

    Args:
        labels: ``Tensor[...]`` int64 (-1 ignore / 0 background / 1..K, :mod:`detbalance.types`).
        num_columns: ``C``, the head's output columns.
        background_column: ``True`` when label ``k`` is column ``k`` (torchvision RetinaNet with
            ``num_classes = K + 1``, column 0 never positive); ``False`` when label ``k`` is column ``k - 1``.

    Returns:
        ``(targets, valid)``: ``Tensor[..., C]`` float in {0, 1} and ``Tensor[..., 1]`` bool (labels >= 0).
    """
    from detbalance.types import one_hot_targets

    k = num_columns - 1 if background_column else num_columns
    if labels.numel() and int(labels.max()) > k:
        raise ValueError(f"labels go up to {int(labels.max())} but the head has {num_columns} columns")
    onehot = one_hot_targets(labels.reshape(-1), k).to(labels.device)
    if background_column:
        onehot = torch.cat([onehot.new_zeros(onehot.shape[0], 1), onehot], dim=1)
    return onehot.reshape(*labels.shape, num_columns), (labels >= 0)[..., None]


@torch.no_grad()
def probe_gradients(
    model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    batch_size: int = 16,
    bins: int = 30,
    easy_threshold: float = 0.5,
    on_batch: Any = None,
) -> GradientStats:
    """The one gradient-probe loop: a RetinaNet's sigmoid outputs on dataset images -> :class:`GradientStats`.

    Args:
        model: a torchvision RetinaNet (adapted or not), in eval mode.
        dataset: ``dataset[i] -> (image, target)``, without augmentation.
        indices: the images to probe.
        batch_size: images per forward pass.
        bins: ``g`` bins of the density.
        easy_threshold: see :class:`GradientStats`.
        on_batch: called with the number of images after every batch (progress), or ``None``.
    """
    from detbalance.detectors import anchor_outputs

    acc = GradientAccumulator(bins=bins, easy_threshold=easy_threshold)
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        batch = [dataset[i] for i in indices[start : start + batch_size]]
        out = anchor_outputs(model, [b[0] for b in batch], [b[1] for b in batch])
        tgt, valid = sigmoid_targets(out.labels, out.cls_logits.shape[-1], background_column=True)
        acc.update(out.cls_logits, tgt, valid)
        if on_batch is not None:
            on_batch(len(batch))
    return acc.result()


def per_class_ap(
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[DetectionTarget],
    *,
    num_classes: int,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[float | None]:
    """COCO AP@[.5:.95] per class from the official evaluator (:func:`detbalance.engine.evaluate.coco_metrics`,
    faster-coco-eval), never a hand-written AP.

    Args:
        predictions: per image ``{"boxes": Tensor[D, 4] x1y1x2y2, "scores": Tensor[D], "labels": Tensor[D]}``
            (torchvision's eval output), in the frame of ``targets`` and in the same order.
        targets: ground truth per image.
        num_classes: ``K`` (category ids ``1..K``).
        image_sizes: ``(h, w)`` per image, written into the COCO image records.

    Returns:
        ``K`` values in [0, 1]; ``None`` for classes without ground truth in ``targets``.
    """
    from detbalance.engine.evaluate import coco_metrics

    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
    images, anns, dets = [], [], []
    for i, t in enumerate(targets):
        h, w = image_sizes[i] if image_sizes is not None else (0, 0)
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for box, lab in zip(t["boxes"].reshape(-1, 4).double().tolist(), t["labels"].tolist()):
            bw, bh = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(lab),
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], bw, bh],
                    "area": bw * bh,
                }
            )
        p = predictions[i]
        boxes = p["boxes"].detach().reshape(-1, 4).double().cpu().tolist()
        for box, s, lab in zip(boxes, p["scores"].detach().cpu().tolist(), p["labels"].cpu().tolist()):
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": int(lab),
                    "score": float(s),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    names = [str(k) for k in range(1, num_classes + 1)]
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k, "name": names[k - 1]} for k in range(1, num_classes + 1)],
    }
    per_class = coco_metrics(gt, dets, label_names=names)["per_class"]
    return [None if per_class[n] != per_class[n] else float(per_class[n]) for n in names]

