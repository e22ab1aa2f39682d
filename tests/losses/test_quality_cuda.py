"""QFL / VFL on CUDA: equal to the CPU result in value and gradient, and no host sync by default (skips without a GPU)."""

from __future__ import annotations

import pytest
import torch

from detbalance.losses import quality_focal_loss, varifocal_loss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("fn", [quality_focal_loss, varifocal_loss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_cpu(fn, dtype):
    gen = torch.Generator().manual_seed(0)  # inputs drawn on the CPU, then moved (kornia's rule)
    x = (torch.randn(3000, 80, generator=gen) * 3 - 2).to(dtype)
    y = (torch.rand(3000, 80, generator=gen) < 0.01).float() * torch.rand(3000, 80, generator=gen)
    y = y.to(dtype)
    xc = x.clone().requires_grad_(True)
    xg = x.cuda().requires_grad_(True)
    lc, lg = fn(xc, y), fn(xg, y.cuda())
    lc.sum().backward()
    lg.sum().backward()
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-4, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(xg.grad.cpu().float(), xc.grad.float(), rtol=tol, atol=tol)


def test_cuda_default_does_not_validate():
    x = torch.full((4, 3), float("nan"), device="cuda")
    fn_out = quality_focal_loss(x, torch.zeros(4, 3, device="cuda"))  # validate_args=None: no sync on CUDA
    assert fn_out.shape == (4, 3)
    with pytest.raises(ValueError, match="NaN"):
        quality_focal_loss(x, torch.zeros(4, 3, device="cuda"), validate_args=True)
