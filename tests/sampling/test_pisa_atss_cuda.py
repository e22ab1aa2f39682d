"""ATSS, Score-HLR and ISR-P on CUDA equal their CPU results (inputs generated on CPU, then moved)."""

from __future__ import annotations

import pytest
import torch

from detbalance.losses.pisa import isr_p_weights
from detbalance.sampling.atss import assign_atss
from detbalance.sampling.score_hlr import sample_score_hlr

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_atss_cuda_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    c = torch.cat([torch.stack(torch.meshgrid(torch.arange(0.0, 96, s) + s / 2, torch.arange(0.0, 96, s) + s / 2,
                                              indexing="xy"), -1).reshape(-1, 2) for s in (8, 16, 32)])
    half = torch.cat([torch.full((144,), 16.0), torch.full((36,), 32.0), torch.full((9,), 64.0)])[:, None]
    anchors = torch.cat([c - half, c + half], 1)
    xy = torch.rand(5, 2, generator=g) * 60
    gt = torch.cat([xy, xy + 10 + torch.rand(5, 2, generator=g) * 30], 1)
    cpu = assign_atss(anchors, gt, [144, 36, 9])
    gpu = assign_atss(anchors.cuda(), gt.cuda(), [144, 36, 9])
    torch.testing.assert_close(gpu.matched_idxs.cpu(), cpu.matched_idxs)
    torch.testing.assert_close(gpu.threshold.cpu(), cpu.threshold)


def test_score_hlr_and_isr_cuda_equal_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    n = 80
    labels = torch.zeros(n, dtype=torch.int64)
    labels[:8] = torch.randint(1, 4, (8,), generator=g)
    xy = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1)
    scores = torch.rand(n, generator=g)
    loss = torch.rand(n, generator=g) + 0.1
    args = dict(num_images=1, num_samples=40)
    cpu = sample_score_hlr(labels, torch.zeros_like(labels), boxes, scores, loss, **args)
    gpu = sample_score_hlr(*(t.cuda() for t in (labels, torch.zeros_like(labels), boxes, scores, loss)), **args)
    assert gpu[0].negative.cpu().tolist() == cpu[0].negative.tolist()  # every valid negative ranked, no draw
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])
    ious, lab, gt = torch.rand(30, generator=g), torch.randint(1, 4, (30,), generator=g), torch.randint(0, 6, (30,), generator=g)
    torch.testing.assert_close(isr_p_weights(ious.cuda(), lab.cuda(), gt.cuda(), loss[:30].cuda()).cpu(),
                               isr_p_weights(ious, lab, gt, loss[:30]))
