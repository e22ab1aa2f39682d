"""Literal reference for LVIS repeat factors (Gupta et al., CVPR 2019): dictionaries and loops."""

from __future__ import annotations

import math


def repeat_factors_reference(categories_per_image: list[list[int]], *, threshold: float, sqrt: bool = True) -> list[float]:
    """r(c) = max(1, sqrt(t / f(c))), r(image) = max over its categories (1 without any)."""
    num_images = len(categories_per_image)
    images_with: dict[int, int] = {}
    for cats in categories_per_image:
        for c in set(cats):
            images_with[c] = images_with.get(c, 0) + 1
    category_factor = {}
    for c, n in images_with.items():
        ratio = threshold / (n / num_images)
        category_factor[c] = max(1.0, math.sqrt(ratio) if sqrt else ratio)
    return [max([category_factor[c] for c in set(cats)], default=1.0) for cats in categories_per_image]
