"""Repeat-factor sampling (Gupta, Dollár and Girshick, "LVIS", CVPR 2019, appendix B.2 of the arXiv version).

For every category ``c`` let ``f(c)`` be the fraction of training images that contain ``c``. The
category-level repeat factor is ``r(c) = max(1, sqrt(t / f(c)))`` and an image's repeat factor is the
largest over the categories it contains, ``r(I) = max_{c in I} r(c)`` (1 for an image without annotations).
Each epoch an image is seen ``floor(r)`` times plus once more with probability ``r - floor(r)``
(stochastic rounding, redrawn every epoch), so the expected number of visits is exactly ``r``.

Unlike mmdetection's ``ClassBalancedDataset`` (which repeats every image ``ceil(r)`` times and so inflates
the epoch and the rare classes beyond ``r``), nothing is rounded up here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["RepeatFactorSampler", "repeat_factors"]


def repeat_factors(
    categories_per_image: Sequence[Sequence[int]],
    *,
    threshold: float = 0.001,
    sqrt: bool = True,
) -> Tensor:
    """Per-image repeat factors from category frequency (LVIS).

    ``r(c) = max(1, (t / f(c)) ** (1/2 if sqrt else 1))``, ``r(image) = max(1, max_{c in image} r(c))``.
    A category listed twice in one image counts once in ``f``.

    Args:
        categories_per_image: for each image, the category labels it contains (any integers >= 0, e.g.
            ``dataset.categories_per_image()``); an empty entry for an image without annotations.
        threshold: ``t``, the frequency below which images are repeated (LVIS: 0.001), ``> 0``.
        sqrt: use the square root (LVIS); ``False`` gives ``max(1, t / f(c))``.

    Returns:
        ``Tensor[N] (float64)`` repeat factors, ``>= 1``.

    Raises:
        ValueError: if ``threshold <= 0`` or a category is negative.

    Example (detectron2's test case: categories {0, 1}, {0}, {} with ``t = 0.5``; ``f(0) = 2/3`` gives
    ``r = 1``, ``f(1) = 1/3`` gives ``r = sqrt(3/2)``):

        >>> repeat_factors([[0, 1], [0], []], threshold=0.5)
        tensor([1.2247, 1.0000, 1.0000], dtype=torch.float64)
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    num_images = len(categories_per_image)
    lengths = torch.tensor([len(c) for c in categories_per_image], dtype=torch.int64)
    flat = torch.tensor(list(itertools.chain.from_iterable(categories_per_image)), dtype=torch.int64)
    factors = torch.ones(num_images, dtype=torch.float64)
    if flat.numel() == 0:
        return factors
    if int(flat.min()) < 0:
        raise ValueError(f"categories_per_image must hold non-negative category ids, got {int(flat.min())}")
    image = torch.repeat_interleave(torch.arange(num_images), lengths)
    num_categories = int(flat.max()) + 1
    pairs = torch.unique(image * num_categories + flat)  # (image, category) once each
    images_per_category = torch.bincount(pairs % num_categories, minlength=num_categories).double()
    frequency = images_per_category / num_images
    ratio = threshold / frequency  # inf for absent categories, never looked up
    category_factor = (ratio.sqrt() if sqrt else ratio).clamp(min=1.0)
    factors.scatter_reduce_(0, pairs // num_categories, category_factor[pairs % num_categories], reduce="amax")
    return factors


class RepeatFactorSampler(Sampler[int]):
    """Dataset indices with per-image repeat factors, stochastic rounding redrawn every epoch.

    Epoch ``e`` uses a generator seeded with ``seed + e``: image ``i`` appears ``floor(r_i) + Bernoulli(r_i -
    floor(r_i))`` times, the list is shuffled (``shuffle=True``), optionally cut or cycled to
    ``epoch_length`` indices, and split between ``num_replicas`` ranks by striding (rank ``k`` takes positions
    ``k, k + R, k + 2R, ...``). Every rank draws the same list, so the shares are disjoint (by position) and of
    equal length; the ``< R`` trailing positions that do not divide evenly are dropped (they differ from
    epoch to epoch when shuffling). Call :meth:`set_epoch` at the start of every epoch, as with
    ``DistributedSampler``.

    Args:
        repeat_factors: ``Tensor[N]`` (or a sequence) of non-negative factors, e.g. from :func:`repeat_factors`.
        seed: base seed; the same seed and epoch give the same indices on every rank.
        shuffle: shuffle the indices of each epoch.
        num_replicas: number of ranks; ``None`` takes the world size of the default process group (1 without).
        rank: this rank; ``None`` takes the rank in the default process group (0 without).
        epoch_length: indices per epoch over all ranks together; ``None`` uses the drawn length
            (``sum(r)`` in expectation), which varies a little from epoch to epoch.

    Example:
        >>> sampler = RepeatFactorSampler(torch.tensor([1.0, 2.5, 1.0]), seed=0)
        >>> sampler.set_epoch(0)
        >>> sorted(sampler)  # image 1 twice or three times (here twice), the others once
        [0, 1, 1, 2]
    """

    def __init__(
        self,
        repeat_factors: Tensor | Sequence[float],
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        epoch_length: int | None = None,
    ) -> None:
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64).cpu()
        if factors.dim() != 1:
            raise ValueError(f"repeat_factors must be 1-D, got shape {tuple(factors.shape)}")
        if factors.numel() and not bool((torch.isfinite(factors) & (factors >= 0)).all()):
            raise ValueError("repeat_factors must be finite and non-negative")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, {num_replicas}), got {rank!r}")
        if epoch_length is not None and (
            isinstance(epoch_length, bool) or not isinstance(epoch_length, int) or epoch_length < 0
        ):
            raise ValueError(f"epoch_length must be a non-negative int or None, got {epoch_length!r}")
        if epoch_length is not None and epoch_length > 0 and float(factors.sum()) == 0:
            raise ValueError("epoch_length > 0 needs at least one positive repeat factor")
        self.repeat_factors = factors
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch_length = epoch_length
        self.epoch = 0
        self._cache: tuple[int, Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which selects the stochastic rounding and the order."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def epoch_indices(self) -> Tensor:
        """``Tensor[L] (int64)``: the whole epoch's indices over all ranks, before sharding."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        factors = self.repeat_factors
        whole = factors.floor()
        extra = torch.rand(factors.shape, generator=generator, dtype=torch.float64) < (factors - whole)
        counts = whole.long() + extra.long()
        indices = torch.repeat_interleave(torch.arange(factors.numel()), counts)
        if self.shuffle:
            indices = indices[torch.randperm(indices.numel(), generator=generator)]
        if self.epoch_length is not None:
            if indices.numel() == 0:
                indices = indices[:0]
            else:
                cycles = math.ceil(self.epoch_length / indices.numel())
                indices = indices.repeat(cycles)[: self.epoch_length]
        self._cache = (self.epoch, indices)
        return indices

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        per_rank = indices.numel() // self.num_replicas
        return iter(indices[self.rank : per_rank * self.num_replicas : self.num_replicas].tolist())

    def __len__(self) -> int:
        """Indices this rank yields in the current epoch (fixed if ``epoch_length`` is set)."""
        if self.epoch_length is not None:
            return self.epoch_length // self.num_replicas
        return self.epoch_indices().numel() // self.num_replicas
