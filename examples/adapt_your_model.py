"""Adapt your own torchvision detector: swap RetinaNet's loss and Faster R-CNN's RoI sampler.

Any torchvision RetinaNet / FasterRCNN / SSD works, with any backbone; the adapters subclass the heads
and share every module, so weights, optimisers and checkpoints of the model stay as they are.

    python examples/adapt_your_model.py
"""

from __future__ import annotations

import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, retinanet_resnet50_fpn

from detbalance.detectors import balance_faster_rcnn, balance_retinanet
from detbalance.losses import GHMCLoss, PositiveNormalizer, SmoothL1Loss
from detbalance.sampling import StratifiedOHEMSampler


def main() -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 160, 160), torch.rand(3, 160, 160)]
    targets = [
        {"boxes": torch.tensor([[20.0, 30.0, 80.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    # No pretrained weights here (no download); pass weights=... in your own code.
    retina = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=160, max_size=160)
    retina = balance_retinanet(
        retina, cls_loss=GHMCLoss(), box_loss=SmoothL1Loss(beta=1 / 9), normalizer=PositiveNormalizer(mode="per_batch")
    )
    print("RetinaNet + GHM-C:", {k: round(v.item(), 4) for k, v in retina(images, targets).items()})

    frcnn = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=160, max_size=160)
    frcnn = balance_faster_rcnn(frcnn, roi_sampler=StratifiedOHEMSampler(num_samples=64))
    frcnn.roi_heads.set_progress(0.1)  # or detbalance.detectors.set_training_progress(model, p)
    print("Faster R-CNN + S-OHEM:", {k: round(v.item(), 4) for k, v in frcnn(images, targets).items()})


if __name__ == "__main__":
    main()
