"""Literal GHM oracles (Li, Liu, Wang, AAAI 2019, arXiv 1811.05181): loops over the bins as the formulas read.

* :func:`ghm_c_reference` / :func:`ghm_r_reference`: the paper's section 3 with ``epsilon = 1 / M``:
  ``R_j = #{g in region j}``, ``GD(g) = R_ind(g) / epsilon``, ``beta_i = N / GD(g_i)``,
  ``L = (1/N) sum_i beta_i L_i`` (``normalization='paper'``), or ``GD = R_ind(g) n`` with ``n`` the number of
  non-empty regions (``normalization='valid_bins'``).
* :func:`mmdet_ghmc` / :func:`mmdet_ghmr`: a transcription of mmdetection's ``GHMC``/``GHMR.forward``
  (mmdet/models/losses/ghm_loss.py), including its per-bin ``.item()`` loop and its zero-initialised EMA
  ``acc_sum``, for cross-checking ``'valid_bins'`` and documenting its first-step bias.

These are slow on purpose (they are the benchmark's "literal" baseline too). The weights are constants for
autograd, so the returned losses can be back-propagated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _edges(bins: int) -> list[float]:
    return [j / bins for j in range(bins + 1)]


def _expand(valid: Tensor, like: Tensor) -> Tensor:
    """A per-element or per-row (``like.shape[:-1]``) mask as a per-element bool mask."""
    valid = valid.bool()
    if valid.shape != like.shape:
        valid = valid.unsqueeze(-1)
    return valid.expand(like.shape)


def beta_reference(
    g: Tensor,
    *,
    bins: int,
    valid: Tensor | None = None,
    normalization: str = "paper",
    density: Tensor | None = None,
) -> Tensor:
    """``beta_i = N / GD(g_i)`` per element (0 where invalid), looping over the M regions."""
    g = g.detach().double()
    valid = torch.ones_like(g, dtype=torch.bool) if valid is None else _expand(valid, g)
    n = int(valid.sum())
    edges = _edges(bins)
    counts = []
    members = []
    for j in range(bins):
        lo, hi = edges[j], edges[j + 1]
        in_bin = (g >= lo) & ((g < hi) if j < bins - 1 else (g <= hi)) & valid
        members.append(in_bin)
        counts.append(int(in_bin.sum()))
    non_empty = sum(1 for c in counts if c > 0)
    beta = torch.zeros_like(g)
    for j in range(bins):
        r_j = counts[j] if density is None else float(density[j])
        if counts[j] == 0 or r_j == 0:
            continue
        m = bins if normalization == "paper" else non_empty
        gd = r_j * m  # R_j / epsilon with epsilon = 1 / M (paper), or R_j * n (reference code)
        beta[members[j]] = n / gd
    return beta


def ghm_c_reference(
    logits: Tensor,
    targets: Tensor,
    *,
    bins: int,
    valid: Tensor | None = None,
    normalization: str = "paper",
    density: Tensor | None = None,
) -> Tensor:
    """The paper's ``L_GHM-C = (1/N) sum_i beta_i CE_i`` (float64)."""
    x = logits.double()
    g = (torch.sigmoid(x.detach()) - targets.double()).abs()
    beta = beta_reference(g, bins=bins, valid=valid, normalization=normalization, density=density)
    n = max(g.numel() if valid is None else int(_expand(valid, g).sum()), 1)
    ce = F.binary_cross_entropy_with_logits(x, targets.double(), reduction="none")
    return (beta * ce).sum() / n


def ghm_r_reference(
    pred: Tensor,
    target: Tensor,
    *,
    mu: float,
    bins: int,
    valid: Tensor | None = None,
    normalization: str = "paper",
    density: Tensor | None = None,
) -> Tensor:
    """The paper's ``L_GHM-R = (1/N) sum_i beta_i ASL1(d_i)``, ``g = |d| / sqrt(d^2 + mu^2)`` (float64)."""
    d = pred.double() - target.double()
    g = d.detach().abs() / torch.sqrt(d.detach() ** 2 + mu**2)
    beta = beta_reference(g, bins=bins, valid=valid, normalization=normalization, density=density)
    n = max(int(_expand(valid, g).sum()) if valid is not None else g.numel(), 1)
    return (beta * (torch.sqrt(d**2 + mu**2) - mu)).sum() / n


class MMDetGHMC:
    """mmdetection ``GHMC`` (use_sigmoid=True, loss_weight=1), transcribed: per-bin loop and EMA ``acc_sum``."""

    def __init__(self, bins: int = 10, momentum: float = 0.0) -> None:
        self.bins, self.momentum = bins, momentum
        self.edges = [float(x) / bins for x in range(bins + 1)]
        self.edges[-1] += 1e-6
        self.acc_sum = [0.0] * bins

    def __call__(self, pred: Tensor, target: Tensor, label_weight: Tensor) -> Tensor:
        edges, mmt = self.edges, self.momentum
        weights = torch.zeros_like(pred)
        g = torch.abs(pred.sigmoid().detach() - target)
        valid = label_weight > 0
        tot = max(valid.float().sum().item(), 1.0)
        n = 0
        for i in range(self.bins):
            inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
            num_in_bin = inds.sum().item()
            if num_in_bin > 0:
                if mmt > 0:
                    self.acc_sum[i] = mmt * self.acc_sum[i] + (1 - mmt) * num_in_bin
                    weights[inds] = tot / self.acc_sum[i]
                else:
                    weights[inds] = tot / num_in_bin
                n += 1
        if n > 0:
            weights = weights / n
        return F.binary_cross_entropy_with_logits(pred, target, weights, reduction="sum") / tot


class MMDetGHMR:
    """mmdetection ``GHMR`` (loss_weight=1), transcribed."""

    def __init__(self, mu: float = 0.02, bins: int = 10, momentum: float = 0.0) -> None:
        self.mu, self.bins, self.momentum = mu, bins, momentum
        self.edges = [float(x) / bins for x in range(bins + 1)]
        self.edges[-1] = 1e3
        self.acc_sum = [0.0] * bins

    def __call__(self, pred: Tensor, target: Tensor, label_weight: Tensor) -> Tensor:
        mu, edges, mmt = self.mu, self.edges, self.momentum
        diff = pred - target
        loss = torch.sqrt(diff * diff + mu * mu) - mu
        g = torch.abs(diff / torch.sqrt(mu * mu + diff * diff)).detach()
        weights = torch.zeros_like(g)
        valid = label_weight > 0
        tot = max(label_weight.float().sum().item(), 1.0)
        n = 0
        for i in range(self.bins):
            inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
            num_in_bin = inds.sum().item()
            if num_in_bin > 0:
                n += 1
                if mmt > 0:
                    self.acc_sum[i] = mmt * self.acc_sum[i] + (1 - mmt) * num_in_bin
                    weights[inds] = tot / self.acc_sum[i]
                else:
                    weights[inds] = tot / num_in_bin
        if n > 0:
            weights /= n
        return (loss * weights).sum() / tot
