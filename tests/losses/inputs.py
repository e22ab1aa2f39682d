"""Input builders shared by the loss tests and ``benchmarks/bm_losses.py`` (same shapes, same regimes)."""

from __future__ import annotations

import torch
from torch import Tensor

REGIMES = ("normal", "small", "big", "zeros", "ones", "saturated", "mixed")


def classification_inputs(
    n: int,
    k: int,
    *,
    regime: str = "normal",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    soft_targets: bool = False,
    pos_fraction: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Logits ``Tensor[n, k]`` and one-vs-all targets in a given regime (torchvision's focal-test generator).

    Regimes: ``normal`` N(0, 1), ``small`` N(0, 1e-3), ``big`` N(0, 10^2), ``zeros``, ``ones``,
    ``saturated`` (+-100), ``mixed`` (a bit of everything). Random numbers come from a CPU generator.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (n, k)
    if regime == "normal":
        x = torch.randn(shape, generator=gen)
    elif regime == "small":
        x = torch.randn(shape, generator=gen) * 1e-3
    elif regime == "big":
        x = torch.randn(shape, generator=gen) * 10.0
    elif regime == "zeros":
        x = torch.zeros(shape)
    elif regime == "ones":
        x = torch.ones(shape)
    elif regime == "saturated":
        x = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float() * 100.0
    elif regime == "mixed":
        scale = torch.tensor([1e-3, 1.0, 5.0, 30.0])[torch.randint(0, 4, shape, generator=gen)]
        x = torch.randn(shape, generator=gen) * scale
    else:
        raise ValueError(f"unknown regime {regime!r}")
    if soft_targets:
        y = torch.rand(shape, generator=gen)
    else:
        y = (torch.rand(shape, generator=gen) < pos_fraction).float()
    return x.to(dtype), y.to(dtype)


def dense_detection_inputs(
    n: int, k: int = 80, *, pos_fraction: float = 0.001, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """RetinaNet-like logits ``Tensor[n, k]`` (mostly confident negatives, prior 0.01) and sparse targets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, k), generator=gen) * 2.0 - 4.6  # sigmoid(-4.6) ~ 0.01: the focal-loss prior
    y = (torch.rand((n, k), generator=gen) < pos_fraction).float()
    return x, y
