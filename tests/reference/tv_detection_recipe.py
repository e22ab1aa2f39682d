"""Literal transcription of torchvision's detection training recipe: the learning rate of every iteration.

Source: pytorch/vision ``references/detection/train.py`` (commit 3ceb056d4c4a2d79ccdc65cbd2342b0e89a7ae47:
``--lr 0.02`` for 8 GPUs x 2 images, ``--momentum 0.9``, ``--wd 1e-4``, ``--epochs 26``, ``--lr-steps 16 22``,
``--lr-gamma 0.1``, ``MultiStepLR`` stepped once per epoch, ``SGD(params, lr, momentum, weight_decay)`` over every
trainable parameter) and ``references/detection/engine.py`` (commit 738bb42169380ef4d56afdf0bb5eb3e83b66815e:
in epoch 0, ``warmup_factor = 1. / 1000``, ``warmup_iters = min(1000, len(data_loader) - 1)``, a warm-up
scheduler stepped after every iteration; ``utils.warmup_lr_scheduler`` is the ``LambdaLR`` below). The model and
data are left out: one parameter stands for the model.
"""

from __future__ import annotations

import torch


def warmup_lr_scheduler(optimizer, warmup_iters, warmup_factor):
    def f(x):
        if x >= warmup_iters:
            return 1
        alpha = float(x) / warmup_iters
        return warmup_factor * (1 - alpha) + alpha

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def reference_lrs(iters_per_epoch, *, epochs=26, lr=0.02, lr_steps=(16, 22), lr_gamma=0.1):
    """The learning rate each iteration of the reference's ``epochs`` epochs trains with."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(lr_steps), gamma=lr_gamma)
    used = []
    for epoch in range(epochs):
        warmup = None
        if epoch == 0:
            warmup_factor = 1.0 / 1000
            warmup_iters = min(1000, iters_per_epoch - 1)
            warmup = warmup_lr_scheduler(optimizer, warmup_iters, warmup_factor)
        for _ in range(iters_per_epoch):
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if warmup is not None:
                warmup.step()
        lr_scheduler.step()
    return used
