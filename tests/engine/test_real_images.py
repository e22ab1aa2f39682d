"""fit() on a COCO folder of non-square 512-1024 px images in COCO 2017's layout (annotations/ beside
train2017/): it trains without moving files, with batches grouped by aspect ratio."""

from __future__ import annotations

import json

import pytest
import torch

import detbalance.engine.run as run_module
from detbalance.config import apply_overrides, load_config
from detbalance.engine import fit
from tests.cocofolders import write_coco_folder


def test_fit_trains_on_the_coco2017_layout_with_aspect_ratio_groups(tmp_path, monkeypatch):
    paths = write_coco_folder(tmp_path / "coco", layout="coco2017")
    cfg = apply_overrides(load_config(), [
        f"data.train={paths['train']}", f"data.val={paths['val']}", "model.image_size=96",
        "engine.iterations=2", "engine.batch_size=2", "engine.device=cpu", "engine.log_interval=1",
    ])
    assert cfg.data.aspect_ratio_group_factor == 3
    seen = []
    real = run_module._pass_samples

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(run_module, "_pass_samples", spy)
    result = fit(cfg, output=tmp_path / "run", progress=False)
    assert result.steps == 2 and set(result.metrics) >= {"AP", "AP50"}
    # 4 images: 2 landscape (ratio 1.5, 1.6), 2 portrait (0.67, 0.625): each batch is one orientation
    landscape = {0, 2}  # dataset indices of the landscape images (SIZES order)
    for batch in seen[0]:
        kinds = {i in landscape for i, _ in batch}
        assert len(kinds) == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "train", "eval"]
    assert torch.isfinite(torch.tensor(records[0]["loss"]))


def test_image_folders_from_the_config_override_the_layout(tmp_path):
    paths = write_coco_folder(tmp_path / "coco", layout="coco2017")
    moved = tmp_path / "elsewhere"
    (tmp_path / "coco" / "train2017").rename(moved)
    from detbalance.builders import build_datasets

    cfg = apply_overrides(load_config(), [f"data.train={paths['train']}", f"data.val={paths['val']}",
                                          f"data.train_images={moved}"])
    train, val = build_datasets(cfg)
    assert train.image_root == moved and val.image_root == tmp_path / "coco" / "val2017"
    assert train[0][0].shape[0] == 3


def test_epochs_are_whole_passes_and_amp_dtypes():
    from detbalance.engine import amp_dtype_for, iterations_for_epochs

    assert iterations_for_epochs(3, num_images=10, batch_size=4) == 6  # 2 full batches per pass
    assert iterations_for_epochs(2, num_images=100, batch_size=2, accumulate=2, world_size=5) == 10
    with pytest.raises(ValueError, match="less than one step of 8 images"):
        iterations_for_epochs(1, num_images=7, batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        iterations_for_epochs(0, num_images=7, batch_size=1)
    assert amp_dtype_for(torch.device("cpu")) == torch.bfloat16


@pytest.mark.cuda
def test_amp_on_cuda_is_bf16_where_supported():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from detbalance.engine import amp_dtype_for

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype_for(torch.device("cuda")) == expected
