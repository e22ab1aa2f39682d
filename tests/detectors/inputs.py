"""Shared inputs of the dense-detector tests (RetinaNet, SSD): one small batch with known boxes."""

from __future__ import annotations

import torch

SIZE = 64


def make_batch(size: int = SIZE) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Three images ``[3, size, size]``, the second without objects; boxes 5-15 px (as the built-in benchmark at 64 px)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(3)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 12.0, 13.0], [30.0, 34.0, 45.0, 44.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[50.0, 2.0, 58.5, 11.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets
