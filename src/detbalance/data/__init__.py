"""Datasets (COCO files and the built-in imbalanced benchmark), transforms and collation.

Every dataset yields ``(image Tensor[3, H, W] float32 in [0, 1], DetectionTarget)`` and answers
``target(i)``, ``image_size(i)``, ``num_classes``, ``label_names``, ``categories_per_image()`` and
``to_coco_dict()`` without decoding images (see :class:`DetectionDataset`).
"""

from detbalance.data.base import (
    DatasetError,
    DetectionDataset,
    Transform,
    check_categories,
    collate_detection,
)
from detbalance.data.benchmark import (
    PRESETS,
    BenchmarkDataset,
    BenchmarkSpec,
    class_probabilities,
    make_benchmark,
)
from detbalance.data.coco import (
    CocoDetection,
    held_out_spec,
    image_root_candidates,
    open_dataset,
    resolve_annotation_file,
    write_coco,
)
from detbalance.data.grouping import aspect_ratio_groups, group_batches
from detbalance.data.transforms import DetectionTransform, eval_transform, train_basic, train_ssd
from detbalance.data.verify import HeldOutCheck, check_held_out, verify_images

__all__ = [
    "PRESETS",
    "BenchmarkDataset",
    "BenchmarkSpec",
    "CocoDetection",
    "DatasetError",
    "DetectionDataset",
    "DetectionTransform",
    "HeldOutCheck",
    "Transform",
    "aspect_ratio_groups",
    "check_categories",
    "check_held_out",
    "class_probabilities",
    "collate_detection",
    "eval_transform",
    "group_batches",
    "held_out_spec",
    "image_root_candidates",
    "make_benchmark",
    "open_dataset",
    "resolve_annotation_file",
    "train_basic",
    "train_ssd",
    "verify_images",
    "write_coco",
]
