"""The ``detbalance`` command line: train, eval, make-data, compare, profile, plot.

Errors print one line (``detbalance: error: ...``) and exit with status 1; ``--debug`` shows the traceback.
Heavy modules are imported inside the subcommands, so ``--help`` and ``--version`` are instant.

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
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detbalance import __version__

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="detbalance",
        description="Train and compare object detectors under sample imbalance (focal, GHM, OHEM, S-OHEM, "
        "SSD mining, repeat-factor sampling) on torchvision detectors.",
    )
    parser.add_argument("--version", action="version", version=f"detbalance {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p = sub.add_parser("train", help="train one experiment", description="Train one experiment (see configs/).")
    p.add_argument("--config", type=Path, default=None, help="experiment TOML (default: the built-in defaults)")
    p.add_argument("--data", default=None, help="training data: builtin[:preset], a COCO .json or a folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set engine.iterations=200 (repeatable)")
    p.add_argument("--output", type=Path, default=None, help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="write the run files into an --output that already holds files or a run (replacing it)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (COCO AP)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", default=None,
                   help="evaluation data (default: the run's held-out data; required when it has none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", type=Path, default=None, help="also write the metrics to this JSON file")
    common(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("make-data", help="write the built-in benchmark as COCO files")
    p.add_argument("--preset", default="default", help="default | balanced | noisy | tiny")
    p.add_argument("--output", type=Path, required=True, help="folder; gets train/ and test/ (COCO json + images)")
    p.add_argument("--split", choices=("train", "test", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    common(p)
    p.set_defaults(func=_cmd_make_data)

    p = sub.add_parser(
        "compare",
        help="run comparison suites and write a report",
        description="Train every arm of a suite (same data, same initial weights per seed, same recipe) and "
        "write report.md / report.html with paired 95 % intervals and verdicts. Rerunning a command reuses "
        "its finished runs and resumes interrupted ones; other settings go to other run folders.",
    )
    p.add_argument("--suite", default=None,
                   help="losses | samplers | ssd | classes | noise | all, or a comma-separated list run in that "
                   "order, e.g. classes,noise (default: losses; with --data every suite that fits the data)")
    p.add_argument("--data", default=None, help="training data: a COCO .json or a folder (as make-data writes)")
    p.add_argument("--val", default=None, help="validation data, required with --data")
    p.add_argument("--preset", default=None, help="built-in benchmark preset (default: each suite's own)")
    p.add_argument("--data-seed", type=int, default=0, help="draw another instance of the built-in benchmark")
    p.add_argument("--budget", choices=("short", "full"), default="short",
                   help="iterations per run: short (default, minutes) or full (each suite's plateau)")
    p.add_argument("--iters", type=int, default=None, help="iterations per run, overriding --budget")
    p.add_argument("--optim", choices=("sgd", "adamw"), default=None,
                   help="training recipe (default: each suite's own; see the report)")
    p.add_argument("--decay", choices=("cosine", "step"), default="cosine", help="learning-rate decay")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0, 1, ...); verdicts need 3")
    p.add_argument("--output", type=Path, default=Path("compare-out"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--study", action="store_true",
                   help="also write README.md with the paper-claims table (docs/study)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: report the finished runs, list the others (read a long study while it runs)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    common(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("profile", help="imbalance statistics of a dataset and a detector")
    p.add_argument("--data", required=True, help="builtin[:preset], a COCO .json or a folder")
    p.add_argument("--config", type=Path, default=None, help="experiment TOML (default: the checkpoint's)")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    common(p)
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("plot", help="plot a training run's metrics and recorder statistics")
    p.add_argument("run_dir", type=Path)
    common(p)
    p.set_defaults(func=_cmd_plot)
    return parser


# ----------------------------------------------------------------------------------------- commands


def _fmt_metric(v: Any) -> str:
    return "nan" if v is None or v != v else f"{100 * v:.2f}"


def _print_metrics(metrics: dict[str, Any]) -> None:
    from detbalance.engine.evaluate import COCO_METRICS

    print("  ".join(f"{k} {_fmt_metric(metrics.get(k))}" for k in COCO_METRICS))
    per_class = metrics.get("per_class", {})
    if per_class:
        print("per class AP: " + ", ".join(f"{k} {_fmt_metric(v)}" for k, v in per_class.items()))


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from detbalance.config import apply_overrides, load_config
    from detbalance.engine import fit

    config = args.config
    if args.resume:
        if args.output is None:
            raise ValueError("--resume needs --output (the run folder to continue)")
        if config is None:
            config = args.output / "config.toml"
    cfg = load_config(config)
    if args.data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(args.data)))
    cfg = apply_overrides(cfg, args.overrides)
    output = args.output
    if output is None:
        stem = config.stem if config is not None else "train"
        output = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config is not None and not args.resume:
        from detbalance.engine.run import RUN_FILES

        run_files = {(Path(output) / name).resolve() for name in RUN_FILES}
        if Path(config).resolve() in run_files:
            raise ValueError(
                f"--config {str(config)!r} is a file that training into --output {str(output)!r} would replace; "
                "copy it elsewhere, choose another --output, or continue that run with --resume"
            )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no held-out data")  # printed below as a note
        result = fit(cfg, output=output, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    if result.already_finished:
        print(f"{result.note}; evaluate it with: detbalance eval --checkpoint {result.checkpoint}")
        return 0
    try:
        from detbalance.analysis.plots import plot_run
    except ImportError:
        plot_run = None
    if plot_run is not None and result.metrics_file.is_file():
        plot_run(output)
    if result.metrics:
        _print_metrics(result.metrics)
    if result.train_metrics is not None:
        print("TRAINING-SET AP (the training images, not held out):")
        _print_metrics(result.train_metrics)
    if result.note is not None:
        print(f"note: {result.note}")
    print(f"run folder: {output}  ({result.images_per_s:.1f} train images/s)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from detbalance.data import (
        check_categories,
        collate_detection,
        eval_transform,
        held_out_spec,
        open_dataset,
        resolve_annotation_file,
    )
    from detbalance.engine.evaluate import evaluate
    from detbalance.engine.files import write_json
    from detbalance.engine.run import load_trained_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
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
    train_file = resolve_annotation_file(cfg.data.train, split="train")
    held_out = train_file is None or resolve_annotation_file(spec, split="test") != train_file
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_detection)
    device = torch.device("cpu")
    if cfg.engine.device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda")
        model.to(device)
    metrics = evaluate(model, loader, device=device)
    if not held_out:
        print(f"TRAINING-SET AP: --data {str(spec)!r} holds the images the run trained on (not held out)")
    _print_metrics(metrics)
    if args.output is not None:
        write_json(args.output, {"data": str(spec), "held_out": held_out, **metrics})
    return 0


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

    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(args.run_dir)!r} not found")
    for path in plot_run(args.run_dir):
        print(f"plot: {path}")
    return 0


# -------------------------------------------------------------------------------------------- entry


def _one_line(err: BaseException) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


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
    try:
        from detbalance.engine.train import configure_cpu

        configure_cpu(getattr(args, "threads", None))  # before any tensor work: denormals, thread count
        return int(args.func(args))
    except KeyboardInterrupt:
        print("detbalance: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        else:
            print(f"detbalance: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
