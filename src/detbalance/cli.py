"""The ``detbalance`` command line: train, eval, make-data, compare, profile, plot.

Errors print one line (``detbalance: error: ...``) and exit with status 1 (2 for a flag argparse rejects);
``--debug`` shows the traceback. A command that fails removes the output folder it created, if it holds
nothing. SIGINT (Ctrl-C) and SIGTERM end a command with one line that gives the exact command to resume
it (``compare``: the same command; ``train``: ``--resume``), exit status 130 / 143.

How a command is put together (add a flag or a command the same way):

1. every flag is declared once, in :func:`build_parser`;
2. ``_check_<command>(args)`` validates the arguments, the paths and the config **without importing torch**
   (only :mod:`detbalance.config` and :mod:`detbalance._preflight`), raising ``ValueError`` with a message
   that names the flag; what it parses (the config, the default output folder) it stores on ``args``;
3. ``_cmd_<command>(args)`` imports the heavy modules and does the work.

:func:`main` runs the check, then sets the CPU threads, then the command, so a wrong argument is reported
in well under a second even on a busy machine (importing torch takes seconds there).

Examples::

    detbalance train --data builtin:tiny --set engine.iterations=50 --output runs/tiny
    detbalance train --config configs/ghm.toml --set remedy.cls_loss.bins=10 --output runs/ghm
    detbalance train --output runs/ghm --resume
    torchrun --nproc_per_node=2 -m detbalance train --config configs/focal.toml --output runs/ddp
    detbalance eval --checkpoint runs/ghm/checkpoint.pt --data builtin:default
    detbalance make-data --preset default --output data/bench
    detbalance compare --data data/bench/train --val data/bench/test --seeds 3
    detbalance compare --suite all --seeds 3 --budget full --study --output docs/study
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from detbalance import __version__
from detbalance._preflight import (
    BENCHMARK_PRESETS,
    RUN_FILES,
    SUITE_NAMES,
    check_data_spec,
    check_device,
    check_output_folder,
    select_suites,
)

__all__ = ["build_parser", "main"]

_PRESETS = ", ".join(BENCHMARK_PRESETS)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"detbalance: error: {message} (see `{self.prog} --help`)\n")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """``--model`` and the flags that go with it: each sets one config key (see :func:`_model_overrides`)."""
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a small preset (retinanet, faster_rcnn, ssd) or a torchvision detection builder "
                   "(retinanet_resnet50_fpn_v2, fasterrcnn_resnet50_fpn_v2, ssdlite320_mobilenet_v3_large, ...)")
    p.add_argument("--weights", default=None, help="torchvision weights name (DEFAULT, ...) or a .pth state dict")
    p.add_argument("--weights-backbone", default=None, help="backbone weights name (ResNet50_Weights.IMAGENET1K_V1)")
    p.add_argument("--min-size", type=int, default=None, help="model.min_size (torchvision's transform)")
    p.add_argument("--max-size", type=int, default=None, help="model.max_size (torchvision's transform)")
    p.add_argument("--images", default=None, metavar="DIR", help="image folder of --data (data.train_images)")
    p.add_argument("--val-images", default=None, metavar="DIR", help="image folder of the validation data")


_MODEL_FLAGS = (
    ("model", "model.name"), ("weights", "model.weights"), ("weights_backbone", "model.weights_backbone"),
    ("min_size", "model.min_size"), ("max_size", "model.max_size"), ("images", "data.train_images"),
    ("val_images", "data.val_images"),
)


def _model_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides that ``--model``, ``--weights``, ... stand for, before the user's own ``--set``."""
    out = []
    for attr, key in _MODEL_FLAGS:
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(
        prog="detbalance",
        description="Train and compare object detectors under sample imbalance (focal, GHM, OHEM, S-OHEM, "
        "SSD mining, repeat-factor sampling) on torchvision detectors.",
    )
    parser.add_argument("--version", action="version", version=f"detbalance {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, auto_threads: bool = False) -> None:
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads (torch.set_num_threads), >= 1 (default: "
                       + ("the cores the load leaves free, printed at the start" if auto_threads else "torch's")
                       + "; OMP_NUM_THREADS also sets it)")
        p.set_defaults(auto_threads=auto_threads)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p = sub.add_parser("train", help="train one experiment", description="Train one experiment (see configs/).")
    p.add_argument("--config", type=Path, default=None, help="experiment TOML (default: the built-in defaults)")
    p.add_argument("--data", default=None, help="training data: builtin[:PRESET], a COCO .json or a folder "
                   f"(presets: {_PRESETS})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set engine.iterations=200 (repeatable)")
    p.add_argument("--output", type=Path, default=None, help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="write the run files into an --output that already holds files or a run (replacing it)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _model_flags(p)
    p.add_argument("--optim", choices=("sgd", "adamw", "finetune"), default=None,
                   help="set optim and schedule to a named recipe at this batch and budget (default: finetune for a "
                   "model loaded with pretrained weights unless the config or --set sets optim / schedule)")
    p.add_argument("--epochs", type=int, default=None, help="train this many passes over data.train (sets "
                   "engine.iterations)")
    p.add_argument("--amp", action="store_true", help="engine.amp: mixed precision")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers")
    common(p, auto_threads=True)
    p.set_defaults(check=_check_train, func=_cmd_train, output_is_folder=True)

    p = sub.add_parser("eval", help="evaluate a checkpoint (COCO AP)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", default=None,
                   help="evaluation data: builtin[:PRESET], a COCO .json or a folder (default: the run's held-out "
                   "data; required when it has none)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch, >= 1")
    p.add_argument("--output", type=Path, default=None, help="also write the metrics to this JSON file")
    common(p)
    p.set_defaults(check=_check_eval, func=_cmd_eval, output_is_folder=False)

    p = sub.add_parser("make-data", help="write the built-in benchmark as COCO files")
    p.add_argument("--preset", default="default", choices=BENCHMARK_PRESETS, metavar="PRESET",
                   help=f"one of {_PRESETS} (default: default)")
    p.add_argument("--output", type=Path, required=True, help="folder; gets train/ and test/ (COCO json + images)")
    p.add_argument("--split", choices=("train", "test", "both"), default="both")
    p.add_argument("--seed", type=int, default=0, help="generation seed, >= 0")
    common(p)
    p.set_defaults(check=_check_make_data, func=_cmd_make_data, output_is_folder=True)

    p = sub.add_parser(
        "compare",
        help="run comparison suites and write a report",
        description="Train every arm of a suite (same data, same initial weights per seed, same recipe) and "
        "write report-<suite>.md / .html per suite, with paired 95 % intervals and verdicts, and report.md / "
        ".html with every suite of the output folder. Rerunning a command reuses its finished runs and resumes "
        "interrupted ones; other settings go to other run folders.",
    )
    p.add_argument("--suite", default=None,
                   help=f"{' | '.join(SUITE_NAMES)} | all, or a comma-separated list run in that "
                   "order, e.g. classes,noise (default: losses; with --data every suite that fits the data)")
    p.add_argument("--data", default=None, help="training data: a COCO .json or a folder (as make-data writes)")
    p.add_argument("--val", default=None, help="validation data (a COCO .json or a folder); goes with --data")
    p.add_argument("--preset", default=None, choices=BENCHMARK_PRESETS, metavar="PRESET",
                   help=f"built-in benchmark preset, one of {_PRESETS} (default: each suite's own)")
    p.add_argument("--data-seed", type=int, default=0, help="draw another instance of the built-in benchmark (>= 0)")
    p.add_argument("--budget", choices=("short", "full"), default="short",
                   help="iterations per run: short (default: 700, SSD 1500; minutes) or full (6000 for every "
                   "suite: the longest budget measured, not a plateau)")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (>= 1), overriding --budget")
    p.add_argument("--optim", choices=("sgd", "adamw", "finetune"), default=None,
                   help="training recipe (default: finetune for a model with pretrained weights, else each suite's "
                   "own; see the report)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training data per run, instead of --iters")
    _model_flags(p)
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16, or fp16 + grad scaler on older GPUs)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes per run (>= 0)")
    p.add_argument("--config", type=Path, default=None,
                   help="TOML whose keys are set in every arm (not remedy.*, nor what the flags set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config key in every arm, e.g. --set model.trainable_backbone_layers=5 (repeatable)")
    p.add_argument("--decay", choices=("cosine", "step"), default="cosine", help="learning-rate decay")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds, >= 1 (runs seeds 0 .. N-1); verdicts need 3")
    p.add_argument("--output", type=Path, default=Path("compare-out"),
                   help="report folder (default: compare-out); runs go to OUTPUT/runs, another suite adds to it")
    p.add_argument("--batch-size", type=int, default=16, help="images per iteration, >= 1")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--study", action="store_true",
                   help="also write README.md with the paper-claims table (docs/study)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: report the finished runs, list the others (read a long study while it runs)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    common(p, auto_threads=True)
    p.set_defaults(check=_check_compare, func=_cmd_compare, output_is_folder=True)

    p = sub.add_parser("profile", help="imbalance statistics of a dataset and a detector")
    p.add_argument("--data", required=True, help=f"builtin[:PRESET], a COCO .json or a folder (presets: {_PRESETS})")
    p.add_argument("--config", type=Path, default=None, help="experiment TOML (default: the checkpoint's)")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=200, help="decoded images for the model statistics, >= 1")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    common(p)
    p.set_defaults(check=_check_profile, func=_cmd_profile, output_is_folder=True)

    p = sub.add_parser("plot", help="plot a training run's metrics and recorder statistics")
    p.add_argument("run_dir", type=Path)
    common(p)
    p.set_defaults(check=_check_plot, func=_cmd_plot, output_is_folder=False)
    return parser


# ------------------------------------------------------------------------------- checks (no torch here)


def _at_least(flag: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def _check_file(flag: str, path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise ValueError(f"{flag} {str(path)!r}: " + ("is a folder, not a file" if path.is_dir() else "not found"))


def _check_common(args: argparse.Namespace) -> None:
    _at_least("--threads", getattr(args, "threads", None), 1)


def _check_train(args: argparse.Namespace) -> None:
    import dataclasses

    from detbalance.config import apply_overrides, load_config

    config = args.config
    if args.resume:
        if args.output is None:
            raise ValueError("--resume needs --output (the run folder to continue)")
        if config is None:
            config = args.output / "config.toml"
            if not config.is_file():
                raise ValueError(f"--resume: --output {str(args.output)!r} holds no run (no config.toml)")
    _check_file("--config", config)
    cfg = load_config(config)
    if args.data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(args.data)))
    flags = _model_overrides(args) + (["engine.amp=true"] if args.amp else [])
    flags += [f"data.num_workers={args.workers}"] if args.workers is not None else []
    cfg = apply_overrides(cfg, flags + list(args.overrides))
    _at_least("--epochs", args.epochs, 1)
    args.recipe = None
    if not args.resume:
        import tomllib

        raw = tomllib.loads(Path(config).read_text(encoding="utf-8")) if config is not None else {}
        sets_recipe = "optim" in raw or "schedule" in raw or any(
            o.split("=", 1)[0].strip().startswith(("optim.", "schedule.")) for o in args.overrides
        )
        m = cfg.model
        if args.optim is not None:
            args.recipe = (args.optim, f"--optim {args.optim}")
        elif (m.weights is not None or m.weights_backbone is not None) and not sets_recipe:
            loaded = m.weights if m.weights is not None else f"backbone {m.weights_backbone}"
            args.recipe = ("finetune", f"the default for a model loaded with pretrained weights ({loaded}); "
                                       "--optim or optim / schedule keys choose another")
    elif args.optim is not None or args.epochs is not None:
        raise ValueError("--resume continues the run as it was configured; --optim / --epochs cannot change it")
    check_data_spec(cfg.data.train, flag="--data" if args.data is not None else "data.train", split="train")
    if cfg.data.val is not None:
        check_data_spec(cfg.data.val, flag="data.val", split="test")
    for key in ("train_images", "val_images"):
        folder = getattr(cfg.data, key)
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"data.{key} {folder!r}: no such folder")
    if args.output is None:
        stem = config.stem if config is not None else "train"
        args.output = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_folder(args.output)
    if config is not None and not args.resume:
        run_files = {(Path(args.output) / name).resolve() for name in RUN_FILES}
        if Path(config).resolve() in run_files:
            raise ValueError(
                f"--config {str(config)!r} is a file that training into --output {str(args.output)!r} would "
                "replace; copy it elsewhere, choose another --output, or continue that run with --resume"
            )
    args.cfg = cfg


def _check_eval(args: argparse.Namespace) -> None:
    _check_file("--checkpoint", args.checkpoint)
    if args.data is not None:
        check_data_spec(args.data, flag="--data", split="test")
    _at_least("--batch-size", args.batch_size, 1)
    if args.output is not None and args.output.is_dir():
        raise ValueError(f"--output {str(args.output)!r} is a folder; give the JSON file to write")


def _check_make_data(args: argparse.Namespace) -> None:
    _at_least("--seed", args.seed, 0)
    check_output_folder(args.output)


def _check_compare(args: argparse.Namespace) -> None:
    import os
    import tomllib

    from detbalance.config import ConfigError, apply_overrides, config_from_dict

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "compare does not run under torchrun (each run is one process); to use several GPUs, start one compare "
            "per GPU on the same --output (CUDA_VISIBLE_DEVICES=i detbalance compare ...): each run is claimed by one "
            "process, the others wait for it"
        )
    if args.epochs is not None and args.iters is not None:
        raise ValueError("--epochs and --iters both set the budget; give one")
    _at_least("--epochs", args.epochs, 1)
    _at_least("--workers", args.workers, 0)
    _check_file("--config", args.config)
    args.settings = None
    if args.config is not None:
        try:
            args.settings = tomllib.loads(args.config.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--config {str(args.config)!r}: invalid TOML: {err}") from None
    args.overrides = _model_overrides(args) + list(args.overrides)
    # every key of --config and --set is checked now, before torch is imported (an error names the key)
    try:
        probe = config_from_dict({k: v for k, v in (args.settings or {}).items() if k != "remedy"})
        probe = apply_overrides(probe, [o for o in args.overrides if not o.startswith("remedy.")])
    except ConfigError as err:
        raise ValueError(f"--config / --set / --model: {err}") from None
    named = any(o.split("=", 1)[0] in ("model.name", "model.arch") for o in args.overrides) or "model" in (
        args.settings or {}
    )
    select_suites(args.suite, user_data=args.data is not None, family=probe.model.arch if named else None)
    if args.val is not None and args.data is None:
        raise ValueError("--val needs --data (the training data it validates)")
    if args.data is not None and args.val is None:
        raise ValueError("--data needs --val (a validation set: never evaluate on the training images)")
    if args.data is not None and args.preset is not None:
        raise ValueError("--preset picks a built-in benchmark; it cannot go with --data")
    _at_least("--seeds", args.seeds, 1)
    _at_least("--iters", args.iters, 1)
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--data-seed", args.data_seed, 0)
    check_device(args.device)
    if args.data is not None:
        check_data_spec(args.data, flag="--data", split="train")
        check_data_spec(args.val, flag="--val", split="test")
    check_output_folder(args.output)


def _check_profile(args: argparse.Namespace) -> None:
    from detbalance.config import load_config

    check_data_spec(args.data, flag="--data", split="train")
    _check_file("--config", args.config)
    _check_file("--checkpoint", args.checkpoint)
    if args.config is not None:
        load_config(args.config)
    _at_least("--num-images", args.num_images, 1)
    check_output_folder(args.output)


def _check_plot(args: argparse.Namespace) -> None:
    if not args.run_dir.is_dir():
        raise ValueError(f"run folder {str(args.run_dir)!r} not found")


# ----------------------------------------------------------------------------------------- commands


def _fmt_metric(v: Any) -> str:
    return "nan" if v is None or v != v else f"{100 * v:.2f}"


def _print_metrics(metrics: dict[str, Any]) -> None:
    from detbalance.engine.evaluate import COCO_METRICS

    print("  ".join(f"{k} {_fmt_metric(metrics.get(k))}" for k in COCO_METRICS))
    per_class = metrics.get("per_class", {})
    if per_class:
        print("per class AP: " + ", ".join(f"{k} {_fmt_metric(v)}" for k, v in per_class.items()))


def _apply_budget_and_recipe(cfg: Any, args: argparse.Namespace) -> Any:
    """``--epochs`` as engine.iterations, then the recipe (``--optim``, or finetune for pretrained weights) at the
    effective batch (batch x accumulate x processes) and that budget; says which recipe and why."""
    import dataclasses
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    e = cfg.engine
    if getattr(args, "epochs", None) is not None:
        from detbalance.data import open_dataset
        from detbalance.engine import iterations_for_epochs

        train = open_dataset(cfg.data.train, split="train", seed=cfg.data.seed, images=cfg.data.train_images)
        iters = iterations_for_epochs(args.epochs, num_images=len(train), batch_size=e.batch_size,
                                      accumulate=e.accumulate, world_size=world)
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(e, iterations=iters))
        print(f"--epochs {args.epochs}: {iters} iterations ({len(train)} images, {world} x batch {e.batch_size} x "
              f"accumulate {e.accumulate} per step)")
    if getattr(args, "recipe", None) is not None:
        from detbalance.compare.suites import _on_cuda, recipe

        name, why = args.recipe
        batch = e.batch_size * e.accumulate * world
        opt, sched = recipe(name, batch_size=batch, iters=cfg.engine.iterations)
        amp = cfg.engine.amp or (name == "finetune" and _on_cuda(cfg.engine.device))
        cfg = dataclasses.replace(cfg, optim=opt, schedule=sched, engine=dataclasses.replace(cfg.engine, amp=amp))
        print(f"recipe: {name} ({why}): {opt.name} lr {opt.lr:g} for an effective batch of {batch}, "
              f"{sched.name} schedule, warm-up {sched.warmup_iters} steps" + (", AMP" if amp else ""))
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from detbalance.engine import fit

    cfg, output = args.cfg, args.output
    cfg = _apply_budget_and_recipe(cfg, args)
    import torch

    wall0, cpu0 = time.perf_counter(), time.process_time()
    _check_plot_names(output)  # the plots drawn after training never replace a file of yours: refuse now
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no held-out data")  # printed below as a note
        warnings.filterwarnings("ignore", message=r"data\.val .* is not held out")  # printed below as a note
        result = fit(cfg, output=output, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if result.already_finished:
        print(f"{result.note}; evaluate it with: detbalance eval --checkpoint {result.checkpoint}")
        return 0
    try:
        from detbalance.analysis.plots import plot_run
    except ImportError:
        plot_run = None
    if plot_run is not None and result.metrics_file.is_file():
        from detbalance.engine.files import ForeignFilesError

        try:
            plot_run(output)
        except ForeignFilesError as err:  # the run is saved; a figure of yours is never replaced
            print(f"note: the plots were not drawn: {_one_line(err)}; the run itself is complete")
    if result.metrics:
        if result.held_out is not None and not result.held_out.held_out:
            print(f"TRAINING-SET AP (data.val {cfg.data.val!r} {result.held_out.describe()}):")
        _print_metrics(result.metrics)
    if result.train_metrics is not None:
        print("TRAINING-SET AP (the training images, not held out):")
        _print_metrics(result.train_metrics)
    if result.note is not None:
        print(f"note: {result.note}")
    print(f"run folder: {output}  ({result.images_per_s:.1f} train images/s; wall {wall:.0f} s, CPU {cpu:.0f} s "
          f"at {torch.get_num_threads()} threads)")
    return 0


def _check_plot_names(output: Path) -> None:
    import fnmatch

    from detbalance.analysis.plots import RUN_PLOT_PATTERNS
    from detbalance.engine.files import OutputFolder

    plots = Path(output) / "plots"
    # with a manifest the plots' owner is known now; a folder from before manifests is told after training
    if plots.is_dir() and OutputFolder(output).manifest_path.exists():
        names = [f"plots/{p.name}" for p in plots.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in RUN_PLOT_PATTERNS)]
        OutputFolder(output).check(names, what="the run's plots")


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from detbalance.data import (
        check_categories,
        collate_detection,
        eval_transform,
        held_out_spec,
        open_dataset,
    )
    from detbalance.engine.evaluate import evaluate
    from detbalance.engine.run import load_trained_model

    if args.output is not None:  # never over a file of yours: refuse before evaluating
        from detbalance.engine.files import OutputFolder

        OutputFolder(args.output.parent).check([args.output.name], what="eval --output")
    model, cfg, info = load_trained_model(args.checkpoint)
    spec = args.data if args.data is not None else (cfg.data.val or held_out_spec(cfg.data.train))
    if spec is None:
        raise ValueError(
            f"--data is needed: the run has no held-out data (data.val is unset and data.train "
            f"{cfg.data.train!r} is a single COCO file, whose images it trained on)"
        )
    dataset = open_dataset(spec, split="test", transforms=eval_transform(), seed=cfg.data.seed)
    check_categories(
        info["label_names"], info["category_ids"], dataset.label_names, dataset.category_ids(),
        expected=f"the checkpoint {str(args.checkpoint)!r}", got=f"--data {str(spec)!r}",
    )
    held = _held_out_of_run(cfg, dataset)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_detection)
    device = torch.device("cpu")
    if cfg.engine.device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda")
        model.to(device)
    metrics = evaluate(model, loader, device=device)
    if held["overlap"] is None:
        print(f"note: not checked against the training data {cfg.data.train!r} ({held['reason']}); this AP may "
              "include training images")
    elif held["overlap"]:
        print(f"TRAINING-SET AP: --data {str(spec)!r} overlaps training: {held['overlap']} of {held['of']} images "
              f"(checked by content; e.g. {held.get('example')})")
    _print_metrics(metrics)
    if args.output is not None:
        from detbalance.engine.files import OutputFolder

        OutputFolder(args.output.parent).write_json(args.output.name, {"data": str(spec), "held_out": held, **metrics})
    return 0


def _held_out_of_run(cfg: Any, evaluated: Any) -> dict[str, Any]:
    """The content check of ``evaluated`` against the run's training data, as ``result.json`` records it
    (``overlap: None`` with a ``reason`` when the training data cannot be opened here)."""
    from detbalance.data import DatasetError, check_held_out, open_dataset

    try:
        train = open_dataset(cfg.data.train, split="train", seed=cfg.data.seed, images=cfg.data.train_images)
    except (OSError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        return {"checked_by": None, "overlap": None, "of": len(evaluated), "reason": _one_line(err)}
    return check_held_out(train, evaluated).to_dict()


def _cmd_make_data(args: argparse.Namespace) -> int:
    from detbalance.data import make_benchmark, write_coco

    splits = ("train", "test") if args.split == "both" else (args.split,)
    for split in splits:
        path = write_coco(make_benchmark(args.preset, split=split, seed=args.seed), args.output / split)
        print(f"{split}: {path}")
    if len(splits) == 2:
        print(f"train with: detbalance train --data {args.output / 'train'} --set data.val=\"{args.output / 'test'}\"")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from detbalance.compare import run_compare

    path = run_compare(
        suite=args.suite,
        preset=args.preset,
        iters=args.iters,
        budget=args.budget,
        seeds=args.seeds,
        output=args.output,
        batch_size=args.batch_size,
        device=args.device,
        progress=args.progress,
        command=args.command_line,
        optim=args.optim,
        decay=args.decay,
        data=args.data,
        val=args.val,
        data_seed=args.data_seed,
        study=args.study,
        finished_only=args.finished_only,
        amp=args.amp,
        workers=args.workers,
        settings=args.settings,
        overrides=args.overrides,
        epochs=args.epochs,
    )
    print(f"report: {path}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from detbalance.analysis.profile import run_profile

    path = run_profile(
        data=args.data,
        config=args.config,
        checkpoint=args.checkpoint,
        output=args.output,
        num_images=args.num_images,
        progress=args.progress,
    )
    print(f"profile: {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from detbalance.analysis.plots import plot_run

    for path in plot_run(args.run_dir):
        print(f"plot: {path}")
    return 0


# -------------------------------------------------------------------------------------------- entry


def _one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what a command would create), or ``None``."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            return missing
        missing = p
    return missing


def _project_file(name: str) -> bool:
    """The manifest, its lock, a temp file of the project: not a file of the user's or a result."""
    return name in (".detbalance-manifest.json", ".detbalance-manifest.lock") or ".detbalance-tmp-" in name


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it holds no file (only empty folders and the project's bookkeeping files, written by
    this command since it created the folder); a folder with anything else in it stays."""
    if folder.is_dir() and not any(
        (p.is_file() or p.is_symlink()) and not _project_file(p.name) for p in folder.rglob("*")
    ):
        shutil.rmtree(folder)


def _configure_threads(args: argparse.Namespace) -> None:
    """Set the intra-op threads: ``--threads``, else (train, compare) the cores the load leaves free, printed
    with the reason, unless ``OMP_NUM_THREADS`` chose (torchrun sets it to 1 per process)."""
    from detbalance.engine.train import choose_threads, configure_cpu

    threads = args.threads
    if threads is None and args.auto_threads and "OMP_NUM_THREADS" not in os.environ:
        choice = choose_threads()
        threads = choice.threads
        if os.environ.get("RANK", "0") == "0":
            print(f"threads: {threads} ({choice.reason}; --threads N sets it)", flush=True)
    configure_cpu(threads)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM ends a command as Ctrl-C does: through ``KeyboardInterrupt``, so locks and files are cleaned up."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _resume_hint(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """How to continue an interrupted command: the exact command line to run."""
    command = shlex.join(["detbalance", *argv])
    if args.command == "compare":
        return (f"finished runs are kept and the interrupted one resumes from its last checkpoint; resume with: "
                f"{command}")
    if args.command == "train":
        output = Path(args.output)
        if (output / "checkpoint.pt").is_file():
            return f"resume with: {shlex.join(['detbalance', 'train', '--output', str(output), '--resume'])}"
        again = command if "--overwrite" in argv or not output.exists() else f"{command} --overwrite"
        return f"no checkpoint was written yet; start again with: {again}"
    return f"rerun: {command}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (argparse printed the message)
        return int(exit_.code) if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    args.command_line = "detbalance " + " ".join(argv)
    debug = bool(getattr(args, "debug", False))
    created: Path | None = None
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _check_common(args)
        args.check(args)  # arguments, paths and config, before torch is imported
        if args.output_is_folder:
            created = _first_missing(Path(args.output))
        _configure_threads(args)  # before any tensor work: denormals, thread count
        return int(args.func(args))
    except KeyboardInterrupt as interrupt:
        name = str(interrupt) or "SIGINT"
        print(f"detbalance: interrupted by {name}; {_resume_hint(args, argv)}", file=sys.stderr)
        return 128 + int(getattr(signal, name, signal.SIGINT))
    except Exception as err:
        if created is not None:
            _remove_if_empty(created)
        if debug:
            traceback.print_exc()
        else:
            print(f"detbalance: error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
