"""Initial classification loss of a from-scratch torchvision SSD at step 1: softmax focal over every box (no mining)
against 3:1 mining with CE, with and without the background prior (K = 5 classes, 2 images of 2 boxes, seed 0)."""
import torch

from detbalance.detectors import balance_ssd, build_zoo_model
from detbalance.losses import SoftmaxFocalLoss

torch.set_num_threads(1)
for name, side in (("ssdlite320_mobilenet_v3_large", 320), ("ssd300_vgg16", 300)):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, side, side, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[30.0, 40.0, 150.0, 200.0], [180.0, 60.0, 260.0, 140.0]]),
                "labels": torch.tensor([1, 4])} for _ in range(2)]
    out = {}
    for arm, kw in (("mining_ce", {}),
                    ("focal_all", {"negative_ratio": None, "cls_loss": SoftmaxFocalLoss(alpha=0.25, gamma=2.0)}),
                    ("focal_all_prior", {"negative_ratio": None, "cls_loss": SoftmaxFocalLoss(alpha=0.25, gamma=2.0),
                                         "background_prior": 0.01})):
        torch.manual_seed(0)
        model = balance_ssd(build_zoo_model(name, num_classes=5), **kw)
        with torch.no_grad():
            out[arm] = float(model(images, targets)["classification"])
    print(name, {k: round(v, 3) for k, v in out.items()},
          "focal/mining", round(out["focal_all"] / out["mining_ce"], 1),
          "focal+prior/mining", round(out["focal_all_prior"] / out["mining_ce"], 2))
