"""Libra R-CNN's sampler and loss in mmdetection, transcribed as literal oracles (Pang et al., CVPR 2019).

Sources (open-mmlab/mmdetection, 3.x layout; the arithmetic is that of the 2.x files, which 3.x moved):

* ``mmdet/models/task_modules/samplers/iou_balanced_neg_sampler.py`` at commit
  0c5159285b4d69e75679c2e34a08415fe2bec8d8 (``IoUBalancedNegSampler``: ``sample_via_interval``, ``_sample_neg``);
* ``mmdet/models/task_modules/samplers/instance_balanced_pos_sampler.py`` at commit
  19bceba56284d440278e80cfde1d95460330ccbb (``InstanceBalancedPosSampler._sample_pos``);
* ``mmdet/models/task_modules/samplers/base_sampler.py`` at commit 0c5159285b4d69e75679c2e34a08415fe2bec8d8
  (``BaseSampler.sample``: ``num_expected_pos = int(num * pos_fraction)``, positives first, ``.unique()``,
  ``num_expected_neg = num - num_sampled_pos``, ``neg_pos_ub = -1`` in the RoI head);
* ``mmdet/models/task_modules/samplers/random_sampler.py`` at commit 19bceba56284d440278e80cfde1d95460330ccbb
  (``random_choice``: ``torch.randperm(len(gallery))[:num]`` of the gallery);
* ``mmdet/models/losses/balanced_l1_loss.py`` at commit 030b5682a4fc5bfe7fda1b0c6fb6e896f33b61dc
  (``balanced_l1_loss``; 3.x adds type hints only);
* ``configs/libra_rcnn/libra-faster-rcnn_r50-fpn_1x_coco.py`` at commit 36491f9b39e6bb3bf0f681825ecca8de3f6ed4db:
  ``CombinedSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True,
  pos_sampler=InstanceBalancedPosSampler, neg_sampler=IoUBalancedNegSampler(floor_thr=-1, floor_fraction=0,
  num_bins=3))`` and ``BalancedL1Loss(alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0)`` in the RoI head
  (``BBoxHead.loss``: summed over the positives' 4 coordinates, ``avg_factor`` = the number of sampled RoIs).

Two changes, neither in the arithmetic: ``random_choice`` draws from a given ``torch.Generator`` (mmdetection
uses the global one), and the inputs are mmdetection's ``AssignResult`` fields as tensors of one image
(``gt_inds``: 0 background, ``i > 0`` matched to ground truth ``i - 1``, -1 ignore; ``max_overlaps``).
The ground truth is already among the RoIs (``add_gt_as_proposals``: gt_inds ``i``, max_overlaps 1).

Note what mmdetection's ``_sample_neg`` does with the config's ``floor_thr=-1``: its first call bins every
negative (IoU >= 0), then sets ``self.floor_thr = 0`` on the sampler, so every later call takes the
``floor_thr == 0`` branch: negatives with IoU > 0 are binned, those with IoU == 0 only make up a shortfall.
The transcription keeps that state, as the reference does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class _RandomChoice:
    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def random_choice(self, gallery, num):
        """``RandomSampler.random_choice``: ``num`` random elements of ``gallery`` (tensor in, tensor out)."""
        assert len(gallery) >= num
        is_tensor = isinstance(gallery, torch.Tensor)
        if not is_tensor:
            gallery = torch.tensor(gallery, dtype=torch.long, device="cpu")
        perm = torch.randperm(gallery.numel(), generator=self.generator)[:num].to(device=gallery.device)
        rand_inds = gallery[perm]
        if not is_tensor:
            rand_inds = rand_inds.cpu().numpy()
        return rand_inds


class InstanceBalancedPosSampler(_RandomChoice):
    """``InstanceBalancedPosSampler._sample_pos``, line by line."""

    def _sample_pos(self, gt_inds: Tensor, num_expected: int) -> Tensor:
        pos_inds = torch.nonzero(gt_inds > 0, as_tuple=False)
        if pos_inds.numel() != 0:
            pos_inds = pos_inds.squeeze(1)
        if pos_inds.numel() <= num_expected:
            return pos_inds
        else:
            unique_gt_inds = gt_inds[pos_inds].unique()
            num_gts = len(unique_gt_inds)
            num_per_gt = int(round(num_expected / float(num_gts)) + 1)
            sampled_inds = []
            for i in unique_gt_inds:
                inds = torch.nonzero(gt_inds == i.item(), as_tuple=False)
                if inds.numel() != 0:
                    inds = inds.squeeze(1)
                else:
                    continue
                if len(inds) > num_per_gt:
                    inds = self.random_choice(inds, num_per_gt)
                sampled_inds.append(inds)
            sampled_inds = torch.cat(sampled_inds)
            if len(sampled_inds) < num_expected:
                num_extra = num_expected - len(sampled_inds)
                extra_inds = np.array(list(set(pos_inds.cpu()) - set(sampled_inds.cpu())))
                if len(extra_inds) > num_extra:
                    extra_inds = self.random_choice(extra_inds, num_extra)
                extra_inds = torch.from_numpy(extra_inds).to(gt_inds.device).long()
                sampled_inds = torch.cat([sampled_inds, extra_inds])
            elif len(sampled_inds) > num_expected:
                sampled_inds = self.random_choice(sampled_inds, num_expected)
            return sampled_inds


class IoUBalancedNegSampler(_RandomChoice):
    """``IoUBalancedNegSampler`` (``sample_via_interval``, ``_sample_neg``), line by line; ``np.int`` is ``int``."""

    def __init__(self, generator: torch.Generator | None, *, floor_thr=-1, floor_fraction=0, num_bins=3) -> None:
        super().__init__(generator)
        assert floor_thr >= 0 or floor_thr == -1
        assert 0 <= floor_fraction <= 1
        assert num_bins >= 1
        self.floor_thr = floor_thr
        self.floor_fraction = floor_fraction
        self.num_bins = num_bins

    def sample_via_interval(self, max_overlaps, full_set, num_expected):
        max_iou = max_overlaps.max()
        iou_interval = (max_iou - self.floor_thr) / self.num_bins
        per_num_expected = int(num_expected / self.num_bins)

        sampled_inds = []
        for i in range(self.num_bins):
            start_iou = self.floor_thr + i * iou_interval
            end_iou = self.floor_thr + (i + 1) * iou_interval
            tmp_set = set(np.where(np.logical_and(max_overlaps >= start_iou, max_overlaps < end_iou))[0])
            tmp_inds = list(tmp_set & full_set)
            if len(tmp_inds) > per_num_expected:
                tmp_sampled_set = self.random_choice(tmp_inds, per_num_expected)
            else:
                tmp_sampled_set = np.array(tmp_inds, dtype=int)
            sampled_inds.append(tmp_sampled_set)

        sampled_inds = np.concatenate(sampled_inds)
        if len(sampled_inds) < num_expected:
            num_extra = num_expected - len(sampled_inds)
            extra_inds = np.array(list(full_set - set(sampled_inds)))
            if len(extra_inds) > num_extra:
                extra_inds = self.random_choice(extra_inds, num_extra)
            sampled_inds = np.concatenate([sampled_inds, extra_inds])

        return sampled_inds

    def _sample_neg(self, gt_inds: Tensor, max_overlaps_t: Tensor, num_expected: int) -> Tensor:
        neg_inds = torch.nonzero(gt_inds == 0, as_tuple=False)
        if neg_inds.numel() != 0:
            neg_inds = neg_inds.squeeze(1)
        if len(neg_inds) <= num_expected:
            return neg_inds
        else:
            max_overlaps = max_overlaps_t.cpu().numpy()
            # balance sampling for negative samples
            neg_set = set(neg_inds.cpu().numpy())

            if self.floor_thr > 0:
                floor_set = set(np.where(np.logical_and(max_overlaps >= 0, max_overlaps < self.floor_thr))[0])
                iou_sampling_set = set(np.where(max_overlaps >= self.floor_thr)[0])
            elif self.floor_thr == 0:
                floor_set = set(np.where(max_overlaps == 0)[0])
                iou_sampling_set = set(np.where(max_overlaps > self.floor_thr)[0])
            else:
                floor_set = set()
                iou_sampling_set = set(np.where(max_overlaps > self.floor_thr)[0])
                # for sampling interval calculation
                self.floor_thr = 0

            floor_neg_inds = list(floor_set & neg_set)
            iou_sampling_neg_inds = list(iou_sampling_set & neg_set)
            num_expected_iou_sampling = int(num_expected * (1 - self.floor_fraction))
            if len(iou_sampling_neg_inds) > num_expected_iou_sampling:
                if self.num_bins >= 2:
                    iou_sampled_inds = self.sample_via_interval(
                        max_overlaps, set(iou_sampling_neg_inds), num_expected_iou_sampling)
                else:
                    iou_sampled_inds = self.random_choice(iou_sampling_neg_inds, num_expected_iou_sampling)
            else:
                iou_sampled_inds = np.array(iou_sampling_neg_inds, dtype=int)
            num_expected_floor = num_expected - len(iou_sampled_inds)
            if len(floor_neg_inds) > num_expected_floor:
                sampled_floor_inds = self.random_choice(floor_neg_inds, num_expected_floor)
            else:
                sampled_floor_inds = np.array(floor_neg_inds, dtype=int)
            sampled_inds = np.concatenate((sampled_floor_inds, iou_sampled_inds))
            if len(sampled_inds) < num_expected:
                num_extra = num_expected - len(sampled_inds)
                extra_inds = np.array(list(neg_set - set(sampled_inds)))
                if len(extra_inds) > num_extra:
                    extra_inds = self.random_choice(extra_inds, num_extra)
                sampled_inds = np.concatenate((sampled_inds, extra_inds))
            sampled_inds = torch.from_numpy(sampled_inds).long().to(gt_inds.device)
            return sampled_inds


def combined_sample(
    gt_inds: Tensor,
    max_overlaps: Tensor,
    *,
    pos_sampler: InstanceBalancedPosSampler,
    neg_sampler: IoUBalancedNegSampler,
    num: int = 512,
    pos_fraction: float = 0.25,
) -> tuple[Tensor, Tensor]:
    """``BaseSampler.sample`` of ``CombinedSampler`` for one image (ground truth already among the RoIs,
    ``neg_pos_ub = -1``): ``(pos_inds, neg_inds)``, each ``.unique()`` (sorted)."""
    num_expected_pos = int(num * pos_fraction)
    pos_inds = pos_sampler._sample_pos(gt_inds, num_expected_pos)
    pos_inds = pos_inds.unique()
    num_sampled_pos = pos_inds.numel()
    num_expected_neg = num - num_sampled_pos
    neg_inds = neg_sampler._sample_neg(gt_inds, max_overlaps, num_expected_neg)
    neg_inds = neg_inds.unique()
    return pos_inds, neg_inds


def balanced_l1_loss(pred: Tensor, target: Tensor, beta=1.0, alpha=0.5, gamma=1.5) -> Tensor:
    """``balanced_l1_loss`` before ``@weighted_loss``'s reduction (per element)."""
    assert beta > 0
    assert pred.size() == target.size() and target.numel() > 0

    diff = torch.abs(pred - target)
    b = np.e ** (gamma / alpha) - 1
    loss = torch.where(
        diff < beta, alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff,
        gamma * diff + gamma / b - alpha * beta)

    return loss


def roi_head_box_loss(pos_bbox_pred: Tensor, pos_bbox_targets: Tensor, num_sampled: int, **hyper) -> Tensor:
    """``BBoxHead.loss`` with ``BalancedL1Loss``: ``sum(balanced_l1) / (avg_factor + eps)``, ``avg_factor =
    num_sampled`` (``mmdet/models/losses/utils.py`` ``weight_reduce_loss``, ``reduction='mean'`` with an
    ``avg_factor``, ``eps = torch.finfo(torch.float32).eps``; ``loss_weight = 1``)."""
    eps = torch.finfo(torch.float32).eps
    return balanced_l1_loss(pos_bbox_pred, pos_bbox_targets, **hyper).sum() / (num_sampled + eps)
