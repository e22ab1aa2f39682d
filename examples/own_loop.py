"""Use detbalance's losses and samplers in your own training loop, without its engine or configs.

A dense head on random features: the focal loss normalised by the number of positives (as RetinaNet
does), then the same head with GHM-C, whose EMA histogram is updated once per step.

    python examples/own_loop.py --steps 20
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from detbalance.losses import GHMCLoss, sigmoid_focal_loss


def main(steps: int) -> dict[str, float]:
    """Train the head with each loss; return the mean true-class probability on positives per loss."""
    torch.manual_seed(0)
    num_anchors, num_classes, dim = 4096, 5, 16
    features = torch.randn(num_anchors, dim)
    # ~1 positive per 500 anchors, the imbalance of a one-stage detector
    labels = torch.zeros(num_anchors, dtype=torch.long)
    labels[torch.randperm(num_anchors)[:8]] = torch.randint(1, num_classes + 1, (8,))
    targets = torch.zeros(num_anchors, num_classes)
    targets[labels > 0, labels[labels > 0] - 1] = 1.0
    # signal: positives are shifted along a class-specific direction
    features[labels > 0] += 3.0 * nn.functional.one_hot(labels[labels > 0] - 1, dim).float()

    final = {}
    for name in ("focal", "ghm_c"):
        head = nn.Linear(dim, num_classes)
        nn.init.constant_(head.bias, -4.595)  # focal paper prior pi = 0.01: -log((1 - pi) / pi)
        ghm = GHMCLoss(bins=30, momentum=0.75).train()
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        for _ in range(steps):
            logits = head(features)
            if name == "focal":
                loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
                loss = loss / max(1, int((labels > 0).sum()))
            else:
                loss = ghm(logits, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            # GHM's loss value is not comparable across steps (its weights move), so report what the head
            # learnt: the mean probability of the true class on positives, and the highest on negatives.
            prob = torch.sigmoid(head(features))
            pos_prob = float(prob[targets > 0].mean())
            neg_max = float(prob[labels == 0].max())
        final[name] = pos_prob
        print(f"{name}: after {steps} steps, mean p(true class | positive) = {pos_prob:.3f}, "
              f"max p on negatives = {neg_max:.3f}")
    return final


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    main(parser.parse_args().steps)
