"""Training engine: a readable loop, COCO evaluation, atomic checkpoints, DDP helpers and ``fit(cfg)``.

``fit`` (in :mod:`.run`) is the only function that reads a whole :class:`~detbalance.config.ExperimentConfig`;
the rest take explicit arguments and can be used from your own script.
"""

from detbalance.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)
from detbalance.engine.distributed import DistInfo, dist_info, init_distributed, unwrap
from detbalance.engine.evaluate import COCO_METRICS, coco_metrics, evaluate, predict
from detbalance.engine.files import ForeignFilesError, OutputFolder, WriteError
from detbalance.engine.hooks import TrainingHook
from detbalance.engine.run import (
    FitResult,
    amp_dtype_for,
    fit,
    iterations_for_epochs,
    resolve_device,
    seed_everything,
)
from detbalance.engine.train import (
    NonFiniteLossError,
    StepMetrics,
    StepOutput,
    ThreadChoice,
    choose_threads,
    configure_cpu,
    train_one_epoch,
    train_step,
)

__all__ = [
    "COCO_METRICS",
    "CheckpointError",
    "DistInfo",
    "FitResult",
    "ForeignFilesError",
    "NonFiniteLossError",
    "OutputFolder",
    "StepMetrics",
    "StepOutput",
    "ThreadChoice",
    "TrainingHook",
    "WriteError",
    "amp_dtype_for",
    "choose_threads",
    "coco_metrics",
    "configure_cpu",
    "dist_info",
    "evaluate",
    "fit",
    "init_distributed",
    "iterations_for_epochs",
    "load_checkpoint",
    "predict",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "train_one_epoch",
    "train_step",
    "unwrap",
    "validate_checkpoint",
]
