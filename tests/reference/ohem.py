"""Literal, slow reference for OHEM (Shrivastava et al., CVPR 2016): Python loops, no vectorisation.

Per image: drop ignored RoIs, fully sort by (loss descending, index ascending), greedy NMS written by hand
(a RoI is dropped when its IoU with an already kept RoI is > nms_iou), then take the first num_samples;
with positive_fraction, at most int(num_samples * positive_fraction) positives and negatives fill the rest.
"""

from __future__ import annotations


def box_iou_1(a: list[float], b: list[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in plain floats."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ohem_reference(
    losses: list[float],
    labels: list[int],
    boxes: list[list[float]],
    batch_idx: list[int],
    *,
    num_samples: int,
    nms_iou: float | None,
    positive_fraction: float | None = None,
) -> tuple[list[int], list[int]]:
    """Return (sorted positive indices, sorted negative indices) into the flat RoIs."""
    positive: list[int] = []
    negative: list[int] = []
    for image in sorted(set(batch_idx)):
        rois = [i for i in range(len(labels)) if batch_idx[i] == image and labels[i] >= 0]
        rois.sort(key=lambda i: (-losses[i], i))
        kept: list[int] = []
        for i in rois:
            if nms_iou is not None and any(box_iou_1(boxes[i], boxes[j]) > nms_iou for j in kept):
                continue
            kept.append(i)
        if positive_fraction is None:
            chosen = kept[:num_samples]
        else:
            max_pos = int(num_samples * positive_fraction)
            pos = [i for i in kept if labels[i] > 0][:max_pos]
            neg = [i for i in kept if labels[i] == 0][: num_samples - len(pos)]
            chosen = pos + neg
        positive += [i for i in chosen if labels[i] > 0]
        negative += [i for i in chosen if labels[i] == 0]
    return sorted(positive), sorted(negative)
