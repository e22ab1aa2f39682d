"""At initialisation, the gradient norm each losses-suite arm sends into the classification head and trunk."""
import torch

from detbalance.builders import build_datasets, build_model, resolve_image_size
from detbalance.compare.suites import suite_configs
from detbalance.engine.run import seed_everything

torch.set_num_threads(1)
cfgs = dict((m.key, c) for m, c in suite_configs("losses", iters=3000, seed=0, optim="sgd"))
train, _ = build_datasets(cfgs["ce"], seed=0)
size = resolve_image_size(cfgs["ce"], train)
batches = [[train[i] for i in range(b * 16, b * 16 + 16)] for b in range(4)]
for arm in ("ce", "alpha_ce", "focal", "ghm_c"):
    cfg = cfgs[arm]
    seed_everything(0)
    model = build_model(cfg, num_classes=5, image_size=size)
    model.train()
    head_n, trunk_n, cls_l = [], [], []
    for batch in batches:
        imgs = [im for im, _ in batch]
        tg = [t for _, t in batch]
        model.zero_grad()
        losses = model(imgs, tg)
        losses["classification"].backward()
        head = [p for n, p in model.named_parameters() if "classification_head" in n and p.grad is not None]
        trunk = [p for n, p in model.named_parameters() if n.startswith("backbone") and p.grad is not None]
        head_n.append(torch.norm(torch.stack([p.grad.norm() for p in head])).item())
        trunk_n.append(torch.norm(torch.stack([p.grad.norm() for p in trunk])).item())
        cls_l.append(losses["classification"].item())
    print(f"{arm:9s} cls loss {sum(cls_l)/4:.3f}  |grad| cls head {sum(head_n)/4:.4f}  trunk {sum(trunk_n)/4:.4f}")
