"""Transform presets: boxes move with the image, degenerate boxes leave with their labels, determinism."""

from __future__ import annotations

import pytest
import torch

from detbalance.data import DetectionTransform, eval_transform, train_basic, train_ssd


def _scene(h: int = 40, w: int = 60) -> tuple[torch.Tensor, dict]:
    """A dark image with two bright blocks exactly filling their boxes."""
    image = torch.zeros(3, h, w)
    boxes = torch.tensor([[5.0, 10.0, 17.0, 30.0], [30.0, 2.0, 55.0, 12.0]])
    for x1, y1, x2, y2 in boxes.int().tolist():
        image[:, y1:y2, x1:x2] = 1.0
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "image_id": 7}


def _ink_box(image: torch.Tensor) -> torch.Tensor:
    """Tight xyxy box of the pixels brighter than halfway between the image's min and max."""
    g = image.mean(0)
    mask = g > (g.min() + g.max()) / 2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def test_flip_moves_boxes_with_the_image_content():
    image, target = _scene()
    out_image, out = train_basic(flip=1.0)(image, target)
    assert torch.equal(out_image, image.flip(-1))
    expected = torch.tensor([[43.0, 10.0, 55.0, 30.0], [5.0, 2.0, 30.0, 12.0]])  # x -> W - x
    torch.testing.assert_close(out["boxes"], expected)
    for box in out["boxes"]:  # each flipped box covers exactly a bright block of the flipped image
        x1, y1, x2, y2 = box.int().tolist()
        assert bool((out_image[:, y1:y2, x1:x2] == 1).all())
    assert out["labels"].tolist() == [1, 2] and out["image_id"] == 7


def test_plain_tensors_at_the_boundary_and_inputs_untouched():
    image, target = _scene()
    before = target["boxes"].clone()
    out_image, out = train_basic(flip=1.0, size=32)(image, target)
    assert type(out_image) is torch.Tensor and type(out["boxes"]) is torch.Tensor
    assert out["boxes"].dtype == torch.float32
    assert torch.equal(target["boxes"], before) and type(target["boxes"]) is torch.Tensor


def test_resize_scales_boxes_and_content_together():
    image, target = _scene(40, 60)
    out_image, out = train_basic(flip=None, size=(20, 90))(image, target)
    assert out_image.shape == (3, 20, 90)
    scale = torch.tensor([90 / 60, 20 / 40, 90 / 60, 20 / 40])
    torch.testing.assert_close(out["boxes"], target["boxes"] * scale)
    single = {"boxes": target["boxes"][:1], "labels": target["labels"][:1], "image_id": 0}
    img1 = torch.zeros(3, 40, 60)
    img1[:, 10:30, 5:17] = 1.0
    resized, t1 = train_basic(flip=None, size=(20, 90))(img1, single)
    torch.testing.assert_close(_ink_box(resized), t1["boxes"][0], atol=1.0, rtol=0)


def test_sanitize_drops_degenerate_boxes_together_with_their_labels():
    image = torch.zeros(3, 32, 32)
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 1.0, 10.0], [4.0, 4.0, 20.0, 20.0], [8.0, 3.0, 9.0, 4.0]]),
        "labels": torch.tensor([3, 2, 1]),
        "image_id": 0,
    }
    _, out = train_basic(flip=None, size=16)(image, target)  # halves every box: widths 0.5, 8, 0.5
    torch.testing.assert_close(out["boxes"], torch.tensor([[2.0, 2.0, 10.0, 10.0]]))
    assert out["labels"].tolist() == [2]


def test_eval_transform_is_identity_or_a_resize_that_keeps_every_box():
    image, target = _scene()
    same_image, same = eval_transform()(image, target)
    assert same_image is image and same is target
    tiny = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "labels": torch.tensor([4]), "image_id": 1}
    out_image, out = eval_transform(size=20)(image, tiny)
    assert out_image.shape == (3, 20, 20)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 1 / 3, 0.5]]))
    assert out["labels"].tolist() == [4]


def _one_object_scene() -> tuple[torch.Tensor, dict]:
    image = torch.zeros(3, 64, 64)
    image[:, 20:40, 12:30] = 1.0
    return image, {
        "boxes": torch.tensor([[12.0, 20.0, 30.0, 40.0]]),
        "labels": torch.tensor([5]),
        "image_id": 3,
    }


@pytest.mark.parametrize("seed", range(6))
def test_ssd_augmentation_keeps_boxes_on_their_object(seed):
    image, target = _one_object_scene()
    torch.manual_seed(seed)
    out_image, out = train_ssd(size=48, fill=0.0)(image, target)
    assert out_image.shape == (3, 48, 48)
    assert out["boxes"].shape[0] == out["labels"].shape[0] <= 1
    if out["boxes"].shape[0]:
        box = out["boxes"][0]
        assert bool((box[2:] > box[:2]).all()) and bool((box >= 0).all()) and bool((box <= 48).all())
        assert out["labels"].tolist() == [5]
        # the bright object (photometric distortion keeps it the brightest thing) sits in the box
        torch.testing.assert_close(_ink_box(out_image), box, atol=1.5, rtol=0)


def test_ssd_augmentation_is_deterministic_given_the_torch_seed_and_depends_on_it():
    image, target = _one_object_scene()
    transform = train_ssd(size=32)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(transform(image, target))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_ssd_augmentation_handles_images_without_boxes():
    image = torch.rand(3, 40, 40)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 0}
    torch.manual_seed(0)
    out_image, out = train_ssd(size=24)(image, empty)
    assert out_image.shape == (3, 24, 24) and out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="flip must be a probability"):
        train_basic(flip=1.5)
    with pytest.raises(ValueError, match="size must be a positive int"):
        train_basic(size=0)
    with pytest.raises(ValueError, match="zoom_out"):
        train_ssd(size=32, zoom_out=(0.5, 2.0))
    with pytest.raises(ValueError, match=r"target\['boxes'\] must be Tensor\[G, 4\]"):
        train_basic()(torch.zeros(3, 4, 4), {"boxes": torch.zeros(4), "labels": torch.zeros(1)})
    assert (
        "RandomHorizontalFlip" in repr(train_basic())
        and repr(DetectionTransform([])) == "DetectionTransform([])"
    )


# ------------------------------------------------------------------------------------------ mined boxes
def _fp_scene() -> tuple[torch.Tensor, dict]:
    """Grey 64 px image: an object (0.5) and a white 12x10 false-positive patch; the patch is the mined box."""
    image = torch.zeros(3, 64, 64)
    image[:, 8:24, 6:20] = 0.5
    image[:, 30:40, 40:52] = 1.0
    target = {"boxes": torch.tensor([[6.0, 8.0, 20.0, 24.0]]), "labels": torch.tensor([1]), "image_id": 3,
              "mined_boxes": torch.tensor([[40.0, 30.0, 52.0, 40.0]])}
    return image, target


def _brightest_inside(image: torch.Tensor, box: torch.Tensor, margin: float = 0.25) -> bool:
    """The pixels under ``box`` (its central part, ``margin`` of each side left for the resize's blur)
    are brighter than every pixel more than a pixel away from it."""
    g = image.mean(0)
    x1, y1, x2, y2 = box.tolist()
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    inner = g[round(y1 + dy) : round(y2 - dy), round(x1 + dx) : round(x2 - dx)]
    outside = g.clone()
    outside[max(0, int(y1) - 1) : int(y2) + 2, max(0, int(x1) - 1) : int(x2) + 2] = -1
    return inner.numel() > 0 and float(inner.min()) > float(outside.max())


def test_flip_moves_mined_boxes_onto_the_false_positive():
    image, target = _fp_scene()
    out_image, out = train_basic(flip=1.0)(image, target)
    torch.testing.assert_close(out["mined_boxes"], torch.tensor([[12.0, 30.0, 24.0, 40.0]]))  # x -> 64 - x
    x1, y1, x2, y2 = out["mined_boxes"][0].int().tolist()
    assert bool((out_image[:, y1:y2, x1:x2] == 1).all())  # exactly the white patch, mirrored
    assert _brightest_inside(out_image, out["mined_boxes"][0], margin=0.0)
    torch.testing.assert_close(out["boxes"], torch.tensor([[44.0, 8.0, 58.0, 24.0]]))
    # without a flip they stay; an image without mined boxes gets no key
    _, same = train_basic(flip=0.0, size=64)(image, target)
    torch.testing.assert_close(same["mined_boxes"], target["mined_boxes"])
    _, plain = train_basic(flip=1.0)(image, {k: v for k, v in target.items() if k != "mined_boxes"})
    assert "mined_boxes" not in plain


def test_ssd_crop_zoom_and_resize_keep_mined_boxes_on_the_false_positive():
    image, target = _fp_scene()
    moved = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out = train_ssd(size=96)(image, target)
        # the crop is chosen from the ground truth alone: the same draw without mined boxes
        torch.manual_seed(seed)
        ref_image, ref = train_ssd(size=96)(image, {k: v for k, v in target.items() if k != "mined_boxes"})
        assert torch.equal(out_image, ref_image) and torch.equal(out["boxes"], ref["boxes"])
        assert out["mined_boxes"].shape[0] <= 1
        if out["mined_boxes"].shape[0] == 0:
            continue  # the crop left the patch out (its centre outside), as it would drop an object
        box = out["mined_boxes"][0]
        assert _brightest_inside(out_image, box), (seed, box)
        moved += not torch.allclose(box, target["mined_boxes"][0] * 1.5)  # 64 -> 96 px alone
    assert moved >= 10  # zoom-outs and crops did move the box, many times
