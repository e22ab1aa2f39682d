"""ATSS assignment: equal to mmdetection's ATSSAssigner (literal transcription), invariants, edge cases."""

from __future__ import annotations

import pytest
import torch

from detbalance.sampling.atss import ATSSAssigner, assign_atss
from tests.reference.mmdet_atss import atss_assign


def _anchors(image: int = 96, strides: tuple[int, ...] = (8, 16, 32), scale: float = 4.0,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[int]]:
    """One square anchor per location and level (mmdetection's ATSS config: ratio 1, one scale)."""
    out, sizes = [], []
    for s in strides:
        n = image // s
        c = (torch.arange(n, dtype=dtype) + 0.5) * s
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        half = scale * s / 2
        boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], -1).reshape(-1, 4)
        out.append(boxes)
        sizes.append(boxes.shape[0])
    return torch.cat(out), sizes


def _gts(gen: torch.Generator, g: int, image: int = 96) -> torch.Tensor:
    xy = torch.rand(g, 2, generator=gen) * image * 0.8
    wh = 4 + torch.rand(g, 2, generator=gen) * image * 0.5
    return torch.cat([xy, (xy + wh).clamp(max=image)], 1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("topk", [9, 3])
def test_matches_mmdet_transcription(seed: int, topk: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    anchors, sizes = _anchors()
    gt = _gts(gen, 1 + seed)
    ours = assign_atss(anchors, gt, sizes, topk=topk)
    ref_inds, ref_max, ref_thr = atss_assign(anchors, sizes, gt, topk=topk)
    torch.testing.assert_close(ours.matched_idxs, ref_inds - 1)
    torch.testing.assert_close(ours.threshold, ref_thr)
    pos = ref_inds > 0
    torch.testing.assert_close(ours.iou[pos], ref_max[pos])
    assert int(ours.num_positive.sum()) == int(pos.sum())


def test_level_smaller_than_topk_matches_mmdet() -> None:
    """A level with fewer anchors than topk contributes all of them (mmdetection's selectable_k)."""
    anchors, sizes = _anchors(image=64, strides=(8, 32, 64))  # the last levels hold 4 and 1 anchors
    gt = torch.tensor([[10.0, 12.0, 50.0, 40.0], [30.0, 30.0, 60.0, 62.0]])
    ours = assign_atss(anchors, gt, sizes, topk=9)
    ref_inds, _, ref_thr = atss_assign(anchors, sizes, gt, topk=9)
    torch.testing.assert_close(ours.matched_idxs, ref_inds - 1)
    torch.testing.assert_close(ours.threshold, ref_thr)


def test_invariants() -> None:
    gen = torch.Generator().manual_seed(3)
    anchors, sizes = _anchors()
    gt = _gts(gen, 5)
    out = assign_atss(anchors, gt, sizes)
    pos = out.matched_idxs >= 0
    assert bool(pos.any())
    m = out.matched_idxs[pos]
    ctr = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    box = gt[m]
    assert bool(((ctr > box[:, :2]) & (ctr < box[:, 2:])).all())  # centre inside its object
    assert bool((out.iou[pos] >= out.threshold[m]).all())  # IoU at least the object's threshold
    # at most topk candidates per level and object -> at most topk * levels positives per object
    assert bool((out.num_positive <= 9 * len(sizes)).all())
    assert set(out.matched_idxs.unique().tolist()) <= set(range(-1, gt.shape[0]))


def test_no_objects_gives_all_background() -> None:
    anchors, sizes = _anchors()
    out = assign_atss(anchors, torch.zeros(0, 4), sizes)
    assert bool((out.matched_idxs == -1).all())
    assert out.threshold.shape == (0,)
    ref, _, _ = atss_assign(anchors, sizes, torch.zeros(0, 4))
    assert bool((ref == 0).all())


def test_assigner_object_and_bad_input() -> None:
    anchors, sizes = _anchors()
    gt = torch.tensor([[10.0, 10.0, 40.0, 50.0]])
    assigner = ATSSAssigner()
    torch.testing.assert_close(assigner(anchors, gt, sizes), assign_atss(anchors, gt, sizes).matched_idxs)
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        assigner(anchors, gt, sizes[:-1])
    with pytest.raises(ValueError, match="topk"):
        ATSSAssigner(topk=0)
    with pytest.raises(ValueError, match="gt_boxes"):
        assigner(anchors, torch.tensor([[10.0, 10.0, 5.0, 50.0]]), sizes)


def test_float64() -> None:
    anchors, sizes = _anchors(dtype=torch.float64)
    gt = torch.tensor([[10.0, 12.0, 50.0, 40.0]], dtype=torch.float64)
    out = assign_atss(anchors, gt, sizes)
    ref_inds, _, _ = atss_assign(anchors, sizes, gt)
    torch.testing.assert_close(out.matched_idxs, ref_inds - 1)


def test_torchvision_anchors_with_ties_match_mmdet() -> None:
    """RetinaNet's 9 anchors per location tie in centre distance (and integer boxes put centres on midpoints):
    the candidates, hence the assignment, still equal mmdetection's."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    size = 128
    gen = AnchorGenerator(tuple((16 * 2**i, 16 * 2**i * 2 ** (1 / 3), 16 * 2**i * 2 ** (2 / 3)) for i in range(3)),
                          ((0.5, 1.0, 2.0),) * 3)
    feats = [torch.zeros(1, 1, size // s, size // s) for s in (8, 16, 32)]
    anchors = gen(ImageList(torch.zeros(1, 3, size, size), [(size, size)]), feats)[0]
    levels = [int(f.shape[-1] * f.shape[-2] * 9) for f in feats]
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.randint(0, 90, (n, 2), generator=g).float()
        gt = torch.cat([xy, xy + torch.randint(4, 40, (n, 2), generator=g).float()], 1)
        ref, _, ref_thr = atss_assign(anchors, levels, gt)
        ours = assign_atss(anchors, gt, levels)
        torch.testing.assert_close(ours.matched_idxs, ref - 1, msg=f"seed {seed}")
        torch.testing.assert_close(ours.threshold, ref_thr, msg=f"seed {seed}")
