"""Offline bootstrapping: mining confident background false positives, weights, boxes, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from detbalance.sampling import HardNegativeSet, RepeatFactorSampler, find_hard_negatives


def _case():
    detections = [
        {
            "boxes": torch.tensor(
                [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 9.0], [20.0, 20.0, 30.0, 30.0],
                 [0.0, 0.0, 10.0, 4.0], [70.0, 0.0, 80.0, 10.0]]
            ),
            "scores": torch.tensor([0.9, 0.8, 0.95, 0.3, 0.7, 0.6]),
            "labels": torch.tensor([1, 1, 2, 1, 1, 3]),
        },
        {"boxes": torch.tensor([[5.0, 5.0, 15.0, 15.0]]), "scores": torch.tensor([0.6]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]), "image_id": 11},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 12},  # no objects
        {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1]), "image_id": 13},
    ]
    return detections, targets


def test_mines_confident_background_false_positives():
    mined = find_hard_negatives(*_case(), iou=0.5, score_threshold=0.5)
    # Image 11: IoU 1.0 and 0.9 are hits; 0.3 is not confident; [0,0,10,4] has IoU 0.4 < 0.5 -> mined;
    # [50..60] and [70..80] overlap nothing -> mined; sorted by score: 0.8, 0.7, 0.6.
    boxes = mined.boxes_for([11, 12, 13, 99])
    assert boxes[0].tolist() == [[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 4.0], [70.0, 0.0, 80.0, 10.0]]
    assert boxes[1].tolist() == [[5.0, 5.0, 15.0, 15.0]]  # an image without objects: every confident detection
    assert boxes[2].shape == (0, 4) and boxes[3].shape == (0, 4)
    assert mined.scores_for([11])[0].tolist() == pytest.approx([0.8, 0.7, 0.6])
    assert len(mined) == 3 and mined.num_boxes == 4 and 13 in mined and 99 not in mined
    assert mined.counts([11, 12, 13, 99]).tolist() == [3, 1, 0, 0]


def test_max_per_image_keeps_highest_scores():
    mined = find_hard_negatives(*_case(), max_per_image=1)
    assert mined.boxes_for([11])[0].tolist() == [[50.0, 50.0, 60.0, 60.0]]


def test_sampling_weights():
    mined = find_hard_negatives(*_case())
    ids = [11, 12, 13, 99]
    assert mined.sampling_weights(ids).tolist() == [4.0, 2.0, 1.0, 1.0]
    assert mined.sampling_weights(ids, per_negative=0.5, max_weight=2.0).tolist() == [2.0, 1.5, 1.0, 1.0]
    # Usable as repeat factors: the expected visits per epoch are the weights.
    sampler = RepeatFactorSampler(mined.sampling_weights(ids, per_negative=0.5), seed=0, shuffle=False)
    counts = torch.bincount(torch.tensor(list(sampler)), minlength=4).tolist()  # factors 2.5, 1.5, 1, 1
    assert counts[0] in (2, 3) and counts[1] in (1, 2) and counts[2:] == [1, 1]


def test_state_dict_round_trip_weights_only(tmp_path):
    mined = find_hard_negatives(*_case(), iou=0.4, score_threshold=0.55)
    state = mined.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "hn.pt")
    restored = HardNegativeSet()
    restored.load_state_dict(torch.load(tmp_path / "hn.pt", weights_only=True))
    ids = [11, 12, 13, 99]
    for a, b in zip(mined.boxes_for(ids), restored.boxes_for(ids), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(mined.sampling_weights(ids), restored.sampling_weights(ids))
    assert (restored.iou, restored.score_threshold) == (pytest.approx(0.4), pytest.approx(0.55))
    assert len(restored) == 3
    empty = HardNegativeSet()
    empty.load_state_dict(HardNegativeSet().state_dict())
    assert len(empty) == 0 and empty.num_boxes == 0


def test_boxes_for_device_and_dtype():
    mined = find_hard_negatives(*_case())
    out = mined.boxes_for([12], device="cpu")[0]
    assert out.dtype == torch.float32 and out.device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(iou=1.5), "iou"), (dict(score_threshold=-0.1), "score_threshold"), (dict(max_per_image=-1), "max_per_image")],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        find_hard_negatives(*_case(), **kwargs)


def test_bad_inputs_raise():
    detections, targets = _case()
    with pytest.raises(ValueError, match="same length"):
        find_hard_negatives(detections[:2], targets)
    with pytest.raises(ValueError, match="image_id"):
        find_hard_negatives(detections[:2], [targets[0], targets[0]])
    bad = [dict(detections[1], boxes=torch.tensor([[5.0, 5.0, 1.0, 15.0]]))]
    with pytest.raises(ValueError, match=r"detections\[0\]\['boxes'\]"):
        find_hard_negatives(bad, targets[1:2])
    with pytest.raises(ValueError, match="state_dict"):
        HardNegativeSet().load_state_dict({"boxes": torch.zeros(0, 4)})
