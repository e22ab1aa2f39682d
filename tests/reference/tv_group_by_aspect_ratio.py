"""Literal transcription of torchvision's aspect-ratio grouping (the detection reference's
``--aspect-ratio-group-factor``).

Source: pytorch/vision, ``references/detection/group_by_aspect_ratio.py`` at commit
d2aeec2a39981969440d24550feb86c75d894f82 (``GroupedBatchSampler``, ``_repeat_to_at_least``, ``_quantize`` and
the bins of ``create_aspect_ratio_groups``; the ratio is ``width / height`` as in its
``_compute_aspect_ratios_custom_dataset``). Only the sampler argument is a plain iterable here (the original
checks ``isinstance(sampler, Sampler)``) and the prints are left out.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections import defaultdict
from itertools import chain, repeat

import numpy as np


def _repeat_to_at_least(iterable, n):
    repeat_times = math.ceil(n / len(iterable))
    repeated = chain.from_iterable(repeat(iterable, repeat_times))
    return list(repeated)


class GroupedBatchSampler:
    def __init__(self, sampler, group_ids, batch_size):
        self.sampler = sampler
        self.group_ids = group_ids
        self.batch_size = batch_size

    def __iter__(self):
        buffer_per_group = defaultdict(list)
        samples_per_group = defaultdict(list)

        num_batches = 0
        for idx in self.sampler:
            group_id = self.group_ids[idx]
            buffer_per_group[group_id].append(idx)
            samples_per_group[group_id].append(idx)
            if len(buffer_per_group[group_id]) == self.batch_size:
                yield buffer_per_group[group_id]
                num_batches += 1
                del buffer_per_group[group_id]
            assert len(buffer_per_group[group_id]) < self.batch_size

        expected_num_batches = len(self)
        num_remaining = expected_num_batches - num_batches
        if num_remaining > 0:
            for group_id, _ in sorted(buffer_per_group.items(), key=lambda x: len(x[1]), reverse=True):
                remaining = self.batch_size - len(buffer_per_group[group_id])
                samples_from_group_id = _repeat_to_at_least(samples_per_group[group_id], remaining)
                buffer_per_group[group_id].extend(samples_from_group_id[:remaining])
                assert len(buffer_per_group[group_id]) == self.batch_size
                yield buffer_per_group[group_id]
                num_remaining -= 1
                if num_remaining == 0:
                    break
        assert num_remaining == 0

    def __len__(self):
        return len(self.sampler) // self.batch_size


def _quantize(x, bins):
    bins = copy.deepcopy(bins)
    bins = sorted(bins)
    quantized = list(map(lambda y: bisect.bisect_right(bins, y), x))
    return quantized


def create_aspect_ratio_groups(sizes, k=0):
    """``sizes``: ``(height, width)`` per image (the reference reads them from the dataset)."""
    aspect_ratios = [float(w) / float(h) for h, w in sizes]
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    groups = _quantize(aspect_ratios, bins)
    return groups
