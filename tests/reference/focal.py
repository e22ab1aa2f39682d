"""Literal focal-loss oracles (slow; float64 Python per element). Lin et al., ICCV 2017, eq. (5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid_focal(logits: Tensor, targets: Tensor, *, alpha: float | None, gamma: float) -> Tensor:
    """Per element: ``-alpha_t (1 - p_t)^gamma log p_t`` with soft-target CE ``-(y log p + (1 - y) log(1 - p))``."""
    xs, ys = logits.double().reshape(-1).tolist(), targets.double().reshape(-1).tolist()
    out = []
    for x, y in zip(xs, ys, strict=True):
        p = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
        ce = -(y * _log_sigmoid(x) + (1.0 - y) * _log_sigmoid(-x))
        p_t = p * y + (1.0 - p) * (1.0 - y)
        loss = (1.0 - p_t) ** gamma * ce
        if alpha is not None:
            loss *= alpha * y + (1.0 - alpha) * (1.0 - y)
        out.append(loss)
    return torch.tensor(out, dtype=torch.float64).reshape(logits.shape)


def softmax_focal(
    logits: Tensor, labels: Tensor, *, alpha: float | Tensor | None, gamma: float, ignore_index: int = -1
) -> Tensor:
    """Per row: ``-alpha_t (1 - p_t)^gamma log p_t``, ``p_t = softmax(x)[label]``; 0 at ignored rows."""
    out = []
    for row, label in zip(logits.double().tolist(), labels.tolist(), strict=True):
        if label == ignore_index:
            out.append(0.0)
            continue
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        log_p = row[label] - log_z
        loss = -((1.0 - math.exp(log_p)) ** gamma) * log_p
        if isinstance(alpha, Tensor):
            loss *= float(alpha[label])
        elif alpha is not None:
            loss *= alpha if label > 0 else 1.0 - alpha
        out.append(loss)
    return torch.tensor(out, dtype=torch.float64)
