"""``detbalance compare``: plan the runs of the chosen suites, train what is missing, write the report.

Resumable at any point: each run's folder is keyed by its settings (:mod:`detbalance.compare.runs`),
finished runs are reused, interrupted ones resume from their last checkpoint (every evaluation), and
``results.json`` is rewritten atomically after every run. Rerunning the same command finishes the work.
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from detbalance import __version__
from detbalance._preflight import select_suites
from detbalance.compare.runs import (
    claimed,
    find_twin,
    load_average,
    read_result,
    run_dir,
    run_one,
    write_json_atomic,
)
from detbalance.compare.stats import RARE_FRACTION, findings, rare_classes
from detbalance.compare.suites import SUITES, Budget, Decay, Optimizer, model_of, suite_configs

__all__ = ["run_compare", "select_suites"]


def _assigner(arch: str) -> str:
    return "faster_rcnn RPN" if arch == "faster_rcnn" else arch


def _data_summary(cfg: Any, *, sample: int = 500) -> dict[str, Any]:
    """What the report says about one suite's data: sizes, classes, empty images and pos:neg per FPN level
    under the suite's own detector assignment (counted as ``profile`` counts it)."""
    from detbalance.analysis.assignment import dataset_assignment_stats
    from detbalance.analysis.dataset import dataset_stats
    from detbalance.builders import (
        build_model,
        class_counts,
        class_image_counts,
        needs_image_counts,
        resolve_image_size,
    )
    from detbalance.data import check_held_out, open_dataset

    d = cfg.data
    train = open_dataset(d.train, split="train", seed=d.seed, images=d.train_images)
    val = open_dataset(d.val or d.train, split="test", seed=d.seed, images=d.val_images if d.val else d.train_images)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"--data {cfg.data.train!r} / --val {cfg.data.val!r}: a split has no images")
    # a verdict on training images would be wrong: the validation images must not be training images, by content
    held = check_held_out(train, val)
    if not held.held_out:
        raise ValueError(
            f"validation data {cfg.data.val or cfg.data.train!r} is not held out from training data "
            f"{cfg.data.train!r}: {held.overlap} of its {held.of} images are training images (compared by content; "
            f"e.g. {held.example}); compare scores every arm on the validation images, so they must be disjoint"
        )
    targets = [train.target(i) for i in range(len(train))]
    ds = dataset_stats(targets, num_classes=train.num_classes, class_names=train.label_names)
    val_ds = dataset_stats([val.target(i) for i in range(len(val))], num_classes=val.num_classes,
                           class_names=val.label_names)
    size = resolve_image_size(cfg, train)
    counts = class_counts(train) if cfg.remedy.class_weights is not None else None
    image_counts = class_image_counts(train) if needs_image_counts(cfg) else None
    model = build_model(cfg, num_classes=train.num_classes, image_size=size, counts=counts, image_counts=image_counts)
    from detbalance.detectors.zoo import describe_model

    m = cfg.model
    described = describe_model(model, name=m.name, weights=m.weights, weights_backbone=m.weights_backbone)
    assign = dataset_assignment_stats(model, train, num_images=sample, targets=targets)
    per_level = []
    for name, pos, neg in zip(assign.level_names, assign.positives_per_level, assign.negatives_per_level, strict=True):
        per_level.append(f"{name} 1:{neg / pos:,.0f}" if pos else f"{name} no positives")
    class_freq = {c: int(k) for c, k in zip(ds.class_names, ds.instance_counts, strict=True)}
    rare = rare_classes(class_freq)
    summary = {
        "train": cfg.data.train + (f" (data seed {cfg.data.seed})" if cfg.data.train.startswith("builtin") else ""),
        "validation": f"{cfg.data.val or cfg.data.train} (test split)",
        "model": _model_text(described, size=size),
        "images": f"{len(train)} train / {len(val)} validation",
        "validation held out": f"yes: none of the {held.of} validation images is a training image (checked by content)",
        "empty train images": f"{ds.num_empty_images} of {ds.num_images}",
        "objects per train image": f"{ds.objects_per_image_mean:.2f}",
        "train instances per class": ", ".join(f"{c}: {k}" for c, k in class_freq.items())
        + (f" ({ds.imbalance_ratio:.0f}:1)" if ds.imbalance_ratio else ""),
        "rare classes": (", ".join(rare) if rare else "none")
        + f" (fewer than {RARE_FRACTION:.0%} of the most frequent class's instances)",
        f"pos:neg ({_assigner(cfg.model.arch)} assignment, per level)": ", ".join(per_level)
        + f" (on {assign.num_images} train images)",
        f"pos:neg ({_assigner(cfg.model.arch)} assignment, all levels)": "–"
        if assign.negatives_per_positive is None
        else f"1:{assign.negatives_per_positive:,.0f}",
    }
    if hasattr(train, "describe") and cfg.data.train.startswith("builtin"):
        d = train.describe()
        summary["benchmark"] = (
            f"preset {d.get('preset')}, label noise {d.get('label_noise')}, box noise {d.get('box_noise')}, "
            f"long tail {d.get('long_tail_ratio')}, noisy labels {d.get('noisy_labels')}"
        )
    facts = {"image_size": size, "train_classes": _class_spread(ds), "val_classes": _class_spread(val_ds)}
    return {"summary": summary, "class_frequency": class_freq, "rare": rare, "facts": facts, "model": described}


def _class_spread(ds: Any) -> str:
    """How a split's instances spread over its classes, in words (``dataset_stats`` of the split)."""
    total = sum(ds.instance_counts)
    text = f"{total:,} instances over {len(ds.instance_counts)} classes"
    if ds.imbalance_ratio is None:
        return text
    ratio = ds.imbalance_ratio
    spread = f"balanced ({ratio:.1f}:1 most to least frequent)" if ratio < 1.5 else f"{ratio:,.0f}:1 most to least frequent"
    absent = f", {len(ds.absent_classes)} absent" if ds.absent_classes else ""
    return f"{text}, {spread}{absent}"


def _suite_results(output: Path) -> list[dict[str, Any]]:
    """The per-suite results (``results-<suite>.json``) in ``output``, in the order of :data:`SUITES`."""
    import json

    order = {name: i for i, name in enumerate(SUITES)}
    paths = sorted(output.glob("results-*.json"), key=lambda p: (order.get(p.stem[len("results-"):], len(order)), p.name))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def _epoch_iters(
    epochs: int, *, data: str | None, preset: str, data_seed: int, batch_size: int, settings: dict[str, Any] | None
) -> int:
    """``--epochs N`` as iterations: N passes over the training images at ``batch_size`` (one process)."""
    from detbalance.data import open_dataset
    from detbalance.engine.run import iterations_for_epochs

    images = ((settings or {}).get("data") or {}).get("train_images")
    spec = data if data is not None else f"builtin:{preset}"
    train = open_dataset(spec, split="train", seed=data_seed, images=images if data is not None else None)
    return iterations_for_epochs(epochs, num_images=len(train), batch_size=batch_size)


def _model_text(d: dict[str, Any], *, size: int) -> str:
    """The report's line on the model: name, family, parameters, weights, input size."""
    if d.get("fixed_size"):
        where = f"input {d['fixed_size'][0]}x{d['fixed_size'][1]} px"
    elif d.get("min_size") is not None:
        where = f"input resized to min side {d['min_size']} / max side {d['max_size']} px"
    else:
        where = f"input {size} px"
    return (
        f"{d['name']} ({d['family']}), {d['parameters'] / 1e6:.2f} M parameters ({d['trainable_parameters'] / 1e6:.2f} M "
        f"trained), weights {d['weights']}, backbone weights {d['weights_backbone']}, {where}"
    )


def _wait_for_others(seconds: float = 30.0) -> None:
    """Pause before looking again at the runs other processes hold (their locks go when they finish)."""
    time.sleep(seconds)


def _drop_unfinished(results: dict[str, Any], pending: list[str]) -> None:
    """Leave out the arms without a finished run, and the suites whose baseline has none; say what is missing."""
    results["setup"]["runs not finished (not in this report)"] = (
        f"{len(pending)}: " + ", ".join(pending) if pending else "none"
    )
    for name in list(results["suites"]):
        entry = results["suites"][name]
        entry["methods"] = [m for m in entry["methods"] if m["runs"]]
        if not any(m["key"] == entry["baseline"] for m in entry["methods"]):
            del results["suites"][name]
            results["setup"].setdefault("suites without a finished baseline run", []).append(name)
        elif entry.get("clean"):
            present = {m["key"] for m in entry["methods"]}
            entry["clean"] = {arm: twin for arm, twin in entry["clean"].items() if arm in present and twin in present}


def _recipe_text(cfg: Any, *, suite: Any, optim: str | None, batch_size: int, why: str | None = None) -> str:
    """What the report says about a suite's recipe: which ran, with its numbers, and why that one."""
    opt, sched, e = cfg.optim, cfg.schedule, cfg.engine
    name = optim or suite.optim
    decay = (
        f"x {sched.gamma:g} at steps {', '.join(map(str, sched.milestones))}" if sched.name == "step" else f"{sched.name} decay"
    )
    if why is None:
        why = (
            f"`--optim {optim}` was given" if optim is not None
            else f"the suite's default is `{suite.optim}`: {suite.optim_evidence}"
        )
    if name == "finetune":
        what = "torchvision's detection fine-tuning recipe (references/detection, 26-epoch schedule scaled to the budget)"
    else:
        what = f"the `{name}` recipe"
    return (
        f"Recipe: {what}: {'SGD' if opt.name == 'sgd' else 'AdamW'} lr {opt.lr:g}"
        + (f", momentum {opt.momentum:g}" if opt.name == "sgd" else "")
        + f", weight decay {opt.weight_decay:g}" + (" on every parameter" if opt.decay_all else "")
        + (f", gradient clip {opt.grad_clip:g}" if opt.grad_clip is not None else ", no gradient clipping")
        + f", linear warm-up {sched.warmup_iters} steps from {sched.warmup_factor:g} x lr, {decay}, "
        f"{e.iterations} iterations at batch {batch_size}"
        + (", AMP" if e.amp else "")
        + f" (why: {why}). Budgets: short {suite.budgets['short']}, full {suite.budgets['full']} iterations "
        f"({suite.budget_evidence})."
    )


def _setup(command: str, seeds: list[int], batch_size: int) -> dict[str, Any]:
    return {
        "command": command,
        "batch size": batch_size,
        "seeds": f"{len(seeds)} ({', '.join(map(str, seeds))})",
        # the devices the runs trained on are listed under "trained on" once the runs are known
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "load average at start": str(load_average()),
        "versions": f"detbalance {__version__}, torch {torch.__version__}, python {platform.python_version()}",
    }


def run_compare(
    *,
    suite: str | None = "losses",
    preset: str | None = None,
    iters: int | None = None,
    budget: Budget = "short",
    seeds: int = 1,
    output: str | Path = "compare-out",
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    command: str | None = None,
    optim: Optimizer | None = None,
    decay: Decay = "cosine",
    data: str | None = None,
    val: str | None = None,
    data_seed: int = 0,
    study: bool = False,
    finished_only: bool = False,
    amp: bool = False,
    workers: int = 0,
    settings: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    epochs: int | None = None,
) -> Path:
    """Train every arm of the chosen suites for ``seeds`` seeds and write the report.

    Args:
        suite: ``losses`` | ``samplers`` | ``ssd`` | ``classes`` | ``noise`` | ``all`` | ``None`` (with
            ``data``: every suite that fits it; else ``losses``).
        preset: built-in benchmark preset for every suite (``None``: each suite's own).
        iters: iterations per run (``None``: the suite's ``budget``).
        budget: ``short`` (the default, minutes) or ``full`` (the study's 6000 iterations: the longest budget
            measured, not a plateau).
        seeds: number of seeds, >= 1 (seeds ``0 .. seeds - 1`` run); verdicts need 3.
        output: report folder; runs are kept under ``output/runs``.
        batch_size: images per iteration.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        progress: show progress (a bar on a terminal, log lines otherwise).
        command: the command line to print in the report (default: this process's argv).
        optim: ``sgd`` | ``adamw`` (``None``: each suite's default).
        decay: ``cosine`` | ``step``.
        data: a COCO json or folder to train on (with ``val``).
        val: the validation COCO json or folder (required with ``data``).
        data_seed: the built-in benchmark's generation seed.
        study: also write ``README.md`` with the paper-claims table (the committed study).
        finished_only: train nothing; report the runs that have finished and list the others as not finished
            (to read a long study while it runs elsewhere, or after an interruption).
        amp: autocast every run's forward (``engine.amp``); the ``finetune`` recipe does so by itself on CUDA.
        workers: data loader worker processes per run.
        settings: a config table (``--config FILE``) set in every arm (see :func:`suite_configs`).
        overrides: ``--set key=value`` applied to every arm.
        epochs: passes over the training data per run instead of ``iters`` (``--epochs``).

    Returns:
        The path of ``report.md``.
    """
    from detbalance.analysis.progress import Progress
    from detbalance.analysis.report import write_combined_report, write_report

    if iters is not None and iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    if epochs is not None and iters is not None:
        raise ValueError("--epochs and --iters both set the budget; give one")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if budget not in ("short", "full"):
        raise ValueError(f"--budget must be 'short' or 'full', got {budget!r}")
    if data_seed < 0:
        raise ValueError(f"--data-seed must be >= 0, got {data_seed}")
    if val is not None and data is None:
        raise ValueError("--val needs --data (the training data it validates)")
    if data is not None and val is None:
        raise ValueError("--data needs --val (a validation set: never evaluate on the training images)")
    if data is not None and preset is not None:
        raise ValueError("--preset picks a built-in benchmark; it cannot go with --data")
    model = model_of(settings=settings, overrides=tuple(overrides))
    names = select_suites(suite, user_data=data is not None, family=None if model is None else model.arch)
    recipe_why = None
    if optim is None and model is not None and (model.weights is not None or model.weights_backbone is not None):
        optim = "finetune"
        loaded = model.weights if model.weights is not None else f"backbone {model.weights_backbone}"
        recipe_why = (f"the model loads pretrained weights ({loaded}): torchvision's fine-tuning recipe is the "
                      "default for a pretrained model (`--optim` picks another)")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file, not a folder")
    # only the project's own files are ever replaced: refuse before training anything
    from detbalance.analysis.report import report_files
    from detbalance.engine.files import OutputFolder

    OutputFolder(output).check(
        [*report_files(names), "results.json", *(["README.md"] if study else [])], what="compare's report"
    )
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from detbalance.engine.files import write_error

        raise write_error(output, err) from None
    seed_list = list(range(seeds))
    command = command or "detbalance " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: dict[str, Any] = {"setup": _setup(command, seed_list, batch_size), "suites": {}}

    plan = []
    for name in names:
        s = SUITES[name]
        n_iters = iters if iters is not None else s.budgets[budget]
        if epochs is not None:
            n_iters = _epoch_iters(epochs, data=data, preset=preset or s.preset, data_seed=data_seed,
                                   batch_size=batch_size, settings=settings)
        unfit: list[tuple[str, str]] = []
        per_seed = [
            suite_configs(name, preset=preset, iters=n_iters, seed=seed, batch_size=batch_size, device=device,
                          optim=optim, decay=decay, data=data, val=val, data_seed=data_seed, amp=amp,
                          workers=workers, settings=settings, overrides=overrides, unfit=unfit if seed == 0 else None)
            for seed in seed_list
        ]
        if unfit:
            results["setup"].setdefault("arms the model does not take (left out)", []).extend(
                f"{name}/{arm}: {why}" for arm, why in unfit
            )
        base_cfg = next(cfg for m, cfg in per_seed[0] if m.key == s.baseline)
        info = _data_summary(base_cfg)
        if s.primary == "rare_AP" and not info["rare"]:
            if suite in (None, "all"):
                results["setup"].setdefault("skipped suites", []).append(f"{name} (the data has no rare class)")
                continue
        recipe_text = _recipe_text(base_cfg, suite=s, optim=optim, batch_size=batch_size, why=recipe_why)
        results["suites"][name] = {
            "title": s.title,
            "description": s.describe(**info["facts"]),
            "recipe": recipe_text,
            "model": info["model"],
            "arch": s.arch,
            "iterations": n_iters,
            "optim": optim or s.optim,
            "baseline": s.baseline,
            "primary": s.primary,
            "clean": {arm: twin for arm, twin in s.clean.items() if {arm, twin} <= {m.key for m, _ in per_seed[0]}},
            "data_summary": info["summary"],
            "train_class_frequency": info["class_frequency"],
            "rare_classes": info["rare"],
            "methods": [{"key": m.key, "label": m.label, "runs": []} for m, _ in per_seed[0]],
        }
        for seed_cfgs in per_seed:
            for method, cfg in seed_cfgs:
                plan.append((name, method, cfg))

    pending: list[str] = []
    total = sum(cfg.engine.iterations for _, _, cfg in plan)
    t0 = time.perf_counter()
    with Progress(progress, total=total, description="compare", name="compare") as bar:
        queue = plan
        while queue:
            busy = []  # runs another compare process is training in this output folder: come back to them
            for item in queue:
                name, method, cfg = item
                entry = results["suites"][name]
                mentry = next(m for m in entry["methods"] if m["key"] == method.key)
                bar.describe(f"{name}/{method.key} seed {cfg.engine.seed}")
                done_before = bar.completed
                folder = run_dir(output, name, method.key, cfg)
                if finished_only and read_result(folder / "result.json") is None:
                    pending.append(f"{name}/{method.key} seed {cfg.engine.seed}")
                    bar.set_completed(done_before + cfg.engine.iterations, skipped=True)
                    continue

                def on_step(m: Any, _base: int = done_before) -> None:
                    bar.set_completed(_base + int(m.step))

                with claimed(folder) as mine:
                    if not mine:
                        busy.append(item)
                        continue
                    twin = find_twin(output, folder, cfg)
                    run, reused = run_one(folder, cfg, on_step=on_step, rare=entry["rare_classes"], twin=twin)
                run = {**run, "folder": str(folder.relative_to(output))}
                bar.set_completed(done_before + cfg.engine.iterations, skipped=reused)
                mentry["runs"].append(run)
                write_json_atomic(output / "results.json", results)
            if busy:
                bar.describe(f"waiting for {len(busy)} run(s) another compare process is training")
                _wait_for_others()
            queue = busy

    if finished_only:
        _drop_unfinished(results, pending)
    runs = [r for e in results["suites"].values() for m in e["methods"] for r in m["runs"]]
    # a run copied from its twin in another suite cost nothing here: its training time is counted once
    trained = [r for r in runs if "twin_of" not in r]
    wall = sum(float(r.get("wall_s") or 0.0) for r in trained)
    twins = len(runs) - len(trained)
    results["setup"]["wall time"] = (
        f"{wall / 60:.1f} min summed over the {len(trained)} runs used"
        + (f" ({twins} more copied from an identical run of another suite, counted once)" if twins else "")
        + f" (this invocation: {(time.perf_counter() - t0) / 60:.1f} min)"
    )
    results["setup"]["load average at end"] = str(load_average())
    # The runs may have been trained by earlier invocations with other thread counts: say what they used.
    threads = Counter(r.get("threads") for r in runs)
    results["setup"]["machine"] = results["setup"]["machine"].replace(
        f"{torch.get_num_threads()} torch threads",
        "torch threads per run: "
        + ", ".join(f"{t if t is not None else 'unrecorded'} ({n} runs)" for t, n in sorted(threads.items(), key=str)),
    )
    devices = Counter(r.get("device", "unrecorded") for r in runs)
    results["setup"]["trained on"] = ", ".join(f"{d} ({n} runs)" for d, n in sorted(devices.items()))
    for entry in results["suites"].values():
        entry["findings"] = findings(entry)
    write_json_atomic(output / "results.json", results)
    # Each suite keeps its own results and report, so a later compare into this folder adds to them; report.md
    # shows every suite found here.
    for name, entry in results["suites"].items():
        one = {"setup": results["setup"], "suites": {name: entry}}
        write_json_atomic(output / f"results-{name}.json", one)
        write_report(one, output, name=f"report-{name}")
    report = write_combined_report(_suite_results(output), output)
    if study:
        from detbalance.compare.study import write_study_readme

        write_study_readme(results, output)
    return report
