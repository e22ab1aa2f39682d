"""BootstrapHook (the engine's TrainingHook for offline bootstrapping) and DetectionDataset.set_mined_boxes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detbalance.config import BootstrapConfig
from detbalance.data import DetectionDataset, train_basic
from detbalance.sampling import BootstrapHook, build_bootstrap_hook


class TinySet(DetectionDataset):
    """Three 32x48 images; image 1 has no object. ``transforms`` as given."""

    label_names = ["a", "b"]

    def __init__(self, transforms=None) -> None:
        self.transforms = transforms

    def __len__(self) -> int:
        return 3

    def load_image(self, index: int) -> torch.Tensor:
        image = torch.zeros(3, 32, 48, dtype=torch.uint8)
        image[:, 4:12, 30 + index : 40 + index] = 255  # a bright false-positive patch
        return image

    def image_size(self, index: int) -> tuple[int, int]:
        return 32, 48

    def target(self, index: int) -> dict:
        boxes = torch.zeros(0, 4) if index == 1 else torch.tensor([[2.0, 2.0, 10.0, 12.0]])
        return {"boxes": boxes, "labels": torch.ones(boxes.shape[0], dtype=torch.int64), "image_id": 100 + index}


class FindsPatch(nn.Module):
    """In eval mode: the patch (score 0.9), the object (0.8) and a weak box (0.2); records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        assert not self.training
        out = []
        for image in images:
            self.seen.append(image)
            cols = (image[0].amax(0) > 0.99).nonzero().flatten()
            x1, x2 = float(cols.min()), float(cols.max()) + 1
            out.append({"boxes": torch.tensor([[x1, 4.0, x2, 12.0], [2.0, 2.0, 10.0, 12.0], [20.0, 20.0, 30.0, 30.0]]),
                        "scores": torch.tensor([0.9, 0.8, 0.2]), "labels": torch.tensor([1, 1, 1])})
        return out


def test_steps_split_the_budget_into_rounds_plus_one():
    assert BootstrapHook(rounds=1).steps(700) == [350]
    assert BootstrapHook(rounds=2).steps(90) == [30, 60]
    with pytest.raises(ValueError, match="total_steps"):
        BootstrapHook(rounds=3).steps(3)


def test_run_mines_unaugmented_images_and_gives_the_dataset_its_false_positives(tmp_path):
    data = TinySet(transforms=train_basic(flip=1.0))
    model = FindsPatch().train()
    hook = build_bootstrap_hook(BootstrapConfig(rounds=1, iou=0.5, score_threshold=0.5))
    record = hook.run(350, model=model, train_set=data, device=torch.device("cpu"))
    assert model.training  # restored
    # the patch in every image; in image 1 (no object) the 0.8 box is a false positive too
    assert record == {"type": "bootstrap", "step": 350, "round": 1, "hard_negatives": 4, "images": 3}
    torch.testing.assert_close(data.mined_boxes(1), torch.tensor([[31.0, 4.0, 41.0, 12.0], [2.0, 2.0, 10.0, 12.0]]))
    # the model saw the un-augmented images (the patch where load_image puts it, not mirrored)
    for i, image in enumerate(model.seen):
        assert torch.equal(image, data.load_image(i).float() / 255)
    for i in range(3):
        torch.testing.assert_close(data.mined_boxes(i)[:1], torch.tensor([[30.0 + i, 4.0, 40.0 + i, 12.0]]))
        image, target = data[i]  # flipped: the mined box is mirrored with the patch
        x1, y1, x2, y2 = target["mined_boxes"][0].int().tolist()
        assert (x1, x2) == (48 - 40 - i, 48 - 30 - i)
        assert bool((image[:, y1:y2, x1:x2] == 1).all())
    # checkpoint round trip: tensors only, restores the dataset's boxes on load
    path = tmp_path / "hook.pt"
    torch.save(hook.state_dict(), path)
    fresh_data = TinySet()
    fresh = BootstrapHook(rounds=1)
    fresh.attach(fresh_data)
    assert fresh_data.mined_boxes(0) is None
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.rounds_done == 1
    for i in range(3):
        torch.testing.assert_close(fresh_data.mined_boxes(i), data.mined_boxes(i))


def test_empty_state_restores_nothing_and_bad_state_raises():
    hook = BootstrapHook()
    other = BootstrapHook()
    other.load_state_dict(hook.state_dict())
    assert other.mined is None and other.rounds_done == 0
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"boxes": torch.zeros(0, 4)})
    with pytest.raises(ValueError, match="rounds"):
        BootstrapHook(rounds=0)


def test_set_mined_boxes_validates_and_defaults_to_no_key():
    data = TinySet()
    assert "mined_boxes" not in data[0][1]
    data.set_mined_boxes({2: torch.tensor([[1.0, 1.0, 5.0, 5.0]])})
    assert data[0][1]["mined_boxes"].shape == (0, 4)
    torch.testing.assert_close(data[2][1]["mined_boxes"], torch.tensor([[1.0, 1.0, 5.0, 5.0]]))
    with pytest.raises(ValueError, match="index 3"):
        data.set_mined_boxes({3: torch.zeros(0, 4)})
    with pytest.raises(ValueError, match="image 0"):
        data.set_mined_boxes({0: torch.tensor([[1.0, float("nan"), 5.0, 5.0]])})
    data.set_mined_boxes(None)
    assert "mined_boxes" not in data[2][1]
