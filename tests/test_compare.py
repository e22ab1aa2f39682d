"""`detbalance compare`: controlled arms, >= 8 curve points, runs keyed by settings (never deleted),
reuse, --data/--val on a make-data folder, and a report whose HTML renders its Markdown."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess

import pytest
import torch

from detbalance.builders import build_model
from detbalance.compare import MIN_CURVE_POINTS, SUITES, run_compare, select_suites, suite_configs
from detbalance.compare.runs import run_dir, run_key, run_one
from detbalance.config import dump_toml, load_toml
from detbalance.engine import seed_everything


@pytest.mark.parametrize("suite", list(SUITES))
def test_methods_differ_only_in_the_remedy(suite):
    configs = suite_configs(suite, iters=10, seed=3)
    assert [m.key for m, _ in configs] == [m.key for m in SUITES[suite].methods]

    def without_remedy(cfg, method):
        out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "remedy"}
        if method.train_preset is not None:  # the noise suite's clean arm: other training labels only
            assert out["data"].train == f"builtin:{method.train_preset}"
            out["data"] = dataclasses.replace(out["data"], train=configs[0][1].data.train)
        return out

    base = without_remedy(configs[0][1], configs[0][0])
    for method, cfg in configs:
        assert without_remedy(cfg, method) == base
        assert cfg.engine.seed == 3 and cfg.engine.iterations == 10 and cfg.data.val is not None
    # an explicit preset drops the clean arms (there is no clean twin of an arbitrary preset)
    keys = [m.key for m, _ in suite_configs(suite, preset="tiny", iters=10, seed=0)]
    assert not {"focal_clean", "ghm_c_clean"} & set(keys)
    # a clean twin trains the remedy of the arm it is the twin of, on the clean labels
    remedies = {m.key: cfg.remedy for m, cfg in configs}
    for arm, twin in SUITES[suite].clean.items():
        assert remedies[arm] == remedies[twin] and next(m for m, _ in configs if m.key == twin).train_preset


@pytest.mark.parametrize("suite", ["losses", "samplers", "ssd"])
def test_same_initial_weights_for_every_method(suite):
    states = []
    for _, cfg in suite_configs(suite, preset="tiny", iters=10, seed=1):
        seed_everything(cfg.engine.seed)
        model = build_model(cfg, num_classes=5, image_size=64)
        states.append({k: v for k, v in model.state_dict().items() if "cls_loss" not in k and "box_loss" not in k
                       and "normalizer" not in k})
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for k in states[0]:
            torch.testing.assert_close(other[k], states[0][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("iters", [8, 9, 15, 700, 3000, 10_001])
def test_every_learning_curve_has_at_least_8_evaluations(iters):
    (_, cfg), *_ = suite_configs("losses", iters=iters, seed=0)
    assert iters // cfg.engine.eval_interval >= MIN_CURVE_POINTS
    assert cfg.engine.checkpoint_interval == cfg.engine.eval_interval  # resumable near where it stopped


def test_keys_added_later_count_only_when_they_leave_their_default(tmp_path):
    from dataclasses import replace

    from detbalance.compare.runs import KEYS_ADDED_LATER

    (_, a), *_ = suite_configs("losses", iters=100, seed=0)
    text = dump_toml(a, leave_out=KEYS_ADDED_LATER)
    assert "aspect_ratio_group_factor" not in text and "train_images" not in text  # as earlier versions wrote it
    assert load_toml(text) == a
    grouped_off = replace(a, data=replace(a.data, aspect_ratio_group_factor=None))
    other_factor = replace(a, data=replace(a.data, aspect_ratio_group_factor=1))
    assert len({run_key(a), run_key(grouped_off), run_key(other_factor)}) == 3
    # a finished run whose saved config predates the keys is this config's run
    folder = run_dir(tmp_path, "losses", "ce", a)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"config": text, "metrics": {"AP": 0.5}}))
    result, reused = run_one(folder, a, on_step=lambda m: None, rare=[])
    assert reused and result["metrics"]["AP"] == 0.5


def test_run_folders_are_keyed_by_the_settings(tmp_path):
    (_, a), *_ = suite_configs("losses", iters=100, seed=0)
    (_, b), *_ = suite_configs("losses", iters=200, seed=0)
    (_, c), *_ = suite_configs("losses", iters=100, seed=1)
    (_, d), *_ = suite_configs("losses", iters=100, seed=0, optim="sgd")
    (_, e), *_ = suite_configs("losses", iters=100, seed=0, data_seed=1)
    assert run_key(a) == run_key(c) and len({run_key(x) for x in (a, b, d, e)}) == 4
    assert run_dir(tmp_path, "losses", "ce", a).parent == run_dir(tmp_path, "losses", "ce", c).parent
    assert run_dir(tmp_path, "losses", "ce", c).name == "seed1"
    # a folder holding another configuration is refused, never overwritten
    folder = run_dir(tmp_path, "losses", "ce", a)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"config": "something else"}))
    with pytest.raises(ValueError, match="another configuration"):
        run_one(folder, a, on_step=lambda m: None, rare=[])
    (folder / "result.json").write_text('{"config": "torn')
    with pytest.raises(ValueError, match="result.json: not valid JSON"):
        run_one(folder, a, on_step=lambda m: None, rare=[])


def test_suite_selection():
    assert select_suites(None, user_data=False) == ["losses"]
    assert select_suites(None, user_data=True) == ["losses", "samplers", "ssd", "classes", "longtail"]
    assert select_suites("all", user_data=False) == list(SUITES)
    with pytest.raises(ValueError, match="needs the built-in benchmark"):
        select_suites("noise", user_data=True)
    with pytest.raises(ValueError, match="--suite must be one of"):
        select_suites("nope", user_data=False)
    assert select_suites("noise, losses", user_data=False) == ["noise", "losses"]
    with pytest.raises(ValueError, match="'nope'"):
        select_suites("losses,nope", user_data=False)
    with pytest.raises(ValueError, match="needs the built-in benchmark"):
        select_suites("losses,noise", user_data=True)
    with pytest.raises(ValueError, match="twice"):
        select_suites("losses,losses", user_data=False)


def test_compare_end_to_end_reuse_and_keying(tmp_path, monkeypatch):
    from detbalance.compare import runs as runs_module

    kw = dict(suite="noise", preset="tiny", seeds=2, output=tmp_path, batch_size=4, device="cpu", progress=False,
              command="detbalance compare --suite noise")
    monkeypatch.setattr(runs_module, "LOAD_SAMPLE_S", 0.0)  # a load sample at every step
    report = run_compare(iters=8, **kw)
    text = report.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    suite = results["suites"]["noise"]
    assert [m["key"] for m in suite["methods"]] == ["focal", "ghm_c"]
    assert all(len(m["runs"]) == 2 for m in suite["methods"])
    for m in suite["methods"]:
        for run in m["runs"]:
            assert 0.0 <= run["metrics"]["AP"] <= 1.0 and run["wall_s"] > 0
            assert run["grad_density"]["split"] == "train" and sum(run["grad_density"]["counts"]) > 0
            assert len([p for p in run["curve"] if "AP" in p]) >= MIN_CURVE_POINTS
            assert len(run["load_average"]) == 8 + 2 and run["images_per_s"] > 0 and run["device"] == "CPU"
            assert 0 < run["cpu_s"] and run["threads"] >= 1
            assert (tmp_path / run["folder"] / "checkpoint.pt").is_file()
    assert "| focal (2, 0.25) |" in text and "| GHM-C |" in text and "pos:neg (retinanet assignment, per level)" in text
    assert "| trained on | CPU (4 runs) |" in text
    assert "| seeds | 2 (0, 1) |" in text and "verdict (AP)" in text and "needs seeds" in text
    assert "**Runs used.**" in text and "runs/noise/ghm_c/" in text
    for png in ("noise_ap.png", "noise_curves.png", "noise_per_class.png", "noise_grad_density.png"):
        assert (tmp_path / png).stat().st_size > 5000 and f"]({png})" in text
    page = (tmp_path / "report.html").read_text()
    assert "<strong>Findings.</strong>" in page and "**" not in page and "<code>runs/noise/" in page
    wall = results["setup"]["wall time"]
    summed = sum(r["wall_s"] for m in suite["methods"] for r in m["runs"]) / 60
    assert wall.startswith(f"{summed:.1f} min summed over the 4 runs used")

    # A second run reuses every finished run; the wall time is still the sum over the runs used.
    def no_training(*args, **kwargs):
        raise AssertionError("fit() called for a finished run")

    monkeypatch.setattr("detbalance.engine.fit", no_training)
    trained_with = suite["methods"][0]["runs"][0]["threads"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # the reused runs keep the thread count they trained with
    try:
        again = run_compare(iters=8, **kw)
    finally:
        torch.set_num_threads(threads)
    results2 = json.loads((tmp_path / "results.json").read_text())
    assert f"torch threads per run: {trained_with} (4 runs)" in results2["setup"]["machine"]
    assert results2["suites"]["noise"]["methods"] == suite["methods"] and again == report
    assert results2["setup"]["wall time"].startswith(f"{summed:.1f} min summed over the 4 runs used")

    # --finished-only trains nothing: it reports the finished runs and names the missing ones.
    kw3 = {**kw, "seeds": 3}
    run_compare(iters=8, finished_only=True, **kw3)
    results3 = json.loads((tmp_path / "results.json").read_text())
    assert results3["setup"]["runs not finished (not in this report)"] == "2: noise/focal seed 2, noise/ghm_c seed 2"
    assert results3["suites"]["noise"]["methods"] == suite["methods"]
    run_compare(iters=9, finished_only=True, **kw3)  # nothing finished at these settings: no suite to report
    results4 = json.loads((tmp_path / "results.json").read_text())
    assert results4["suites"] == {} and results4["setup"]["suites without a finished baseline run"] == ["noise"]

    # Other settings go to other folders: the finished runs are never touched.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    with pytest.raises(AssertionError, match="fit"):
        run_compare(iters=9, **kw)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_compare_on_a_make_data_folder(tmp_path):
    """On a user's data the report describes that data; a second suite into the same folder keeps the first's."""
    from detbalance.cli import main

    assert main(["make-data", "--preset", "tiny", "--output", str(tmp_path / "d")]) == 0
    kw = dict(data=str(tmp_path / "d" / "train"), val=str(tmp_path / "d" / "test"), iters=2, output=tmp_path / "out",
              batch_size=2, device="cpu", progress=False)
    report = run_compare(suite="ssd", **kw)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    summary = results["suites"]["ssd"]["data_summary"]
    assert summary["images"].startswith("64 train / 16 validation")
    assert summary["rare classes"].startswith("3, 4 ") and "pos:neg (ssd assignment, per level)" in summary
    assert all(r["config"].count(str(tmp_path / "d")) == 2 for m in results["suites"]["ssd"]["methods"] for r in m["runs"])
    assert "Suite `ssd`" in report.read_text() and "(test split)" in summary["validation"]

    report = run_compare(suite="classes", **kw)  # a second command, another suite, the same folder
    out = tmp_path / "out"
    for name in ("ssd", "classes"):
        assert (out / f"report-{name}.md").is_file() and (out / f"report-{name}.html").is_file()
        assert list(json.loads((out / f"results-{name}.json").read_text())["suites"]) == [name]
        assert f"[report-{name}.md](report-{name}.md)" in report.read_text()
    assert "Suite `ssd`" not in (out / "report-classes.md").read_text()
    text = report.read_text()
    assert text.index("Suite `ssd`") < text.index("Suite `classes`")  # both, in the order of SUITES
    assert "## Setup of `ssd`" in text and "## Setup of `classes`" in text  # two commands, two setups
    # the descriptions are the data's, never the built-in benchmark's
    classes = json.loads((out / "results-classes.json").read_text())["suites"]["classes"]
    counts = classes["train_class_frequency"]
    assert f"training split: {sum(counts.values())} instances over 5 classes, " in classes["description"]
    assert f"{max(counts.values()) / min(counts.values()):,.0f}:1 most to least frequent" in classes["description"]
    for text in (report.read_text(), (out / "report-classes.md").read_text(), (out / "report-ssd.md").read_text()):
        for builtin in ("100:1", "balanced test split", "128 px", "long-tailed training split"):
            assert builtin not in text


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--suite must be one of"):
        run_compare(suite="nope", iters=1, progress=False, output=tmp_path)
    with pytest.raises(ValueError, match="--iters must be >= 1"):
        run_compare(iters=0, progress=False, output=tmp_path)
    with pytest.raises(ValueError, match="--data needs --val"):
        run_compare(data="x", iters=1, progress=False, output=tmp_path)
    with pytest.raises(ValueError, match="--val needs --data"):
        run_compare(val="x", iters=1, progress=False, output=tmp_path)
    with pytest.raises(ValueError, match="--budget"):
        run_compare(budget="long", progress=False, output=tmp_path)


def test_profile_counts_pos_neg_as_compare_does(tmp_path):
    from detbalance.analysis.profile import run_profile
    from detbalance.compare.driver import _data_summary

    (_, cfg), *_ = suite_configs("losses", preset="tiny", iters=8, seed=0)
    summary = _data_summary(cfg)["summary"]
    md = run_profile(data="builtin:tiny", config=None, checkpoint=None, output=tmp_path, progress=False)
    ratio = json.loads((md.parent / "profile.json").read_text())["assignment"]["negatives_per_positive"]
    assert summary["pos:neg (retinanet assignment, all levels)"] == f"1:{ratio:,.0f}"


def test_an_interrupted_compare_resumes_where_it_stopped(tmp_path, monkeypatch):
    from detbalance.analysis.progress import Progress

    kw = dict(suite="noise", preset="tiny", iters=8, seeds=1, output=tmp_path, batch_size=4, device="cpu",
              progress=False)
    real = Progress.set_completed

    def interrupt(self, n, *, skipped=False):
        if n == 8 + 5:  # second run (GHM-C), after its 5th step (checkpoints every step at 8 iterations)
            raise KeyboardInterrupt
        real(self, n, skipped=skipped)

    monkeypatch.setattr(Progress, "set_completed", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_compare(**kw)
    partial = json.loads((tmp_path / "results.json").read_text())  # written as it goes
    assert [len(m["runs"]) for m in partial["suites"]["noise"]["methods"]] == [1, 0]
    monkeypatch.setattr(Progress, "set_completed", real)
    run_compare(**kw)
    runs = [m["runs"][0] for m in json.loads((tmp_path / "results.json").read_text())["suites"]["noise"]["methods"]]
    assert [r["resumed"] for r in runs] == [False, True]
    assert [p["iter"] for p in runs[1]["curve"] if "AP" in p] == list(range(1, 9))


def test_a_run_interrupted_before_its_first_checkpoint_starts_again(tmp_path):
    method, cfg = suite_configs("noise", preset="tiny", iters=4, seed=0, batch_size=4, device="cpu")[0]
    folder = run_dir(tmp_path, "noise", method.key, cfg)
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(dump_toml(cfg))  # what fit() writes first, before any checkpoint
    (folder / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 9.0}\n')
    (folder / "devices.txt").write_text("CUDA left by the interrupted part\n")
    result, reused = run_one(folder, cfg, on_step=lambda m: None, rare=[])
    assert not reused and not result["resumed"] and result["device"] == "CPU"
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps and steps == sorted(steps) and steps[-1] == 4 and 9.0 not in [
        json.loads(line).get("loss") for line in (folder / "metrics.jsonl").read_text().splitlines()]

    other = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, iterations=5))
    (folder / "result.json").unlink()
    (folder / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match="another configuration"):
        run_one(folder, other, on_step=lambda m: None, rare=[])  # not its run: nothing is rewritten


def test_a_run_is_claimed_by_one_process_at_a_time(tmp_path):
    from detbalance.compare.runs import claimed

    folder = tmp_path / "runs" / "s" / "m" / "k" / "seed0"
    lock = folder.parent / "seed0.lock"
    with claimed(folder) as mine:
        assert mine and json.loads(lock.read_text())["pid"] == os.getpid()
        with claimed(folder) as again:  # held (by this live process): not claimable
            assert not again
    assert not lock.exists()  # released on exit
    other = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with claimed(folder) as mine:
            assert not mine  # another live process trains it
        lock.write_text(json.dumps({"pid": other.pid, "host": "another-machine"}))
        with claimed(folder) as mine:
            assert not mine  # another machine's lock is never taken over
    finally:
        other.kill()
        other.wait()
    lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
    with claimed(folder) as mine:
        assert mine  # its process is gone: the stale lock is taken over


def test_compare_skips_runs_another_process_trains_and_comes_back(tmp_path, monkeypatch):
    from detbalance.compare import driver

    kw = dict(suite="noise", preset="tiny", seeds=1, output=tmp_path, batch_size=4, device="cpu", progress=False,
              iters=4)
    (method, cfg), = [(m, c) for m, c in suite_configs("noise", preset="tiny", iters=4, seed=0, batch_size=4,
                                                        device="cpu") if m.key == "ghm_c"]
    lock = run_dir(tmp_path, "noise", "ghm_c", cfg).parent / "seed0.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # "another process"
    waits = []

    def other_process_finishes(seconds=30.0):
        waits.append(seconds)
        lock.unlink()  # it died without a result: this process takes the run over on its next look

    monkeypatch.setattr(driver, "_wait_for_others", other_process_finishes)
    run_compare(**kw)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(waits) == 1
    assert [len(m["runs"]) for m in results["suites"]["noise"]["methods"]] == [1, 1]


def test_a_run_shared_by_two_suites_is_copied_not_trained_again(tmp_path, monkeypatch):
    from detbalance.compare.runs import find_twin

    classes = dict((m.key, c) for m, c in suite_configs("classes", iters=10, seed=1))
    losses = dict((m.key, c) for m, c in suite_configs("losses", iters=10, seed=1))
    cfg = classes["none"]
    assert dump_toml(cfg) == dump_toml(losses["focal"])  # the classes suite's baseline is the losses suite's focal arm
    original = run_dir(tmp_path, "losses", "focal", cfg)
    original.mkdir(parents=True)
    (original / "config.toml").write_text(dump_toml(cfg))
    (original / "metrics.jsonl").write_text('{"type": "eval", "step": 10, "metrics": {"AP": 0.4}}\n')
    per_class = {"0": 0.6, "1": 0.5, "2": 0.3, "3": 0.2}
    result = {"config": dump_toml(cfg), "seed": 1, "folder": str(original), "wall_s": 60.0,
              "metrics": {"AP": 0.4, "per_class": per_class, "rare_AP": 0.25}}
    (original / "result.json").write_text(json.dumps(result))
    folder = run_dir(tmp_path, "classes", "none", cfg)
    # another seed, another config, and the folder itself are not twins
    assert find_twin(tmp_path, folder, dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, seed=2))) is None
    assert find_twin(tmp_path, run_dir(tmp_path, "classes", "repeat", classes["repeat"]), classes["repeat"]) is None
    assert find_twin(tmp_path, original, cfg) is None
    twin = find_twin(tmp_path, folder, cfg)
    assert twin == original

    def no_training(*args, **kwargs):
        raise AssertionError("fit() called for a run whose twin is finished")

    monkeypatch.setattr("detbalance.engine.fit", no_training)
    out, reused = run_one(folder, cfg, on_step=lambda m: None, rare=["3"], twin=twin)
    assert reused and out["twin_of"] == str(original) and out["metrics"]["rare_AP"] == 0.2  # this suite's rare set
    assert out["metrics"]["AP"] == 0.4 and json.loads((folder / "result.json").read_text()) == out
    assert (folder / "metrics.jsonl").read_text() == (original / "metrics.jsonl").read_text()
    assert json.loads((original / "result.json").read_text()) == result  # the original is untouched
    # a copy is never the source of another copy; a second call reuses the copy itself
    assert find_twin(tmp_path, run_dir(tmp_path, "x", "y", cfg), cfg) == original
    again, reused = run_one(folder, cfg, on_step=lambda m: None, rare=["3"], twin=twin)
    assert reused and again == out


def test_throughput_names_the_device_unless_every_run_was_on_a_cpu():
    from detbalance.analysis.report import _throughput, summarize_method

    def method(*devices):
        runs = [{"metrics": {"AP": 0.5}, "images_per_s": 100.0 * (i + 1), "load_average": [1.0, 2.5],
                 **({"device": d} if d else {})} for i, d in enumerate(devices)]
        return {"key": "m", "label": "m", "runs": runs}

    cpu = method("CPU", "CPU")
    assert _throughput(summarize_method(cpu), cpu) == "150 (load 1.8)"  # the mean of the samples
    mixed = method("CPU", "CUDA NVIDIA H200")
    assert _throughput(summarize_method(mixed), mixed) == "150 on CPU, CUDA NVIDIA H200 (load 1.8)"
    old = method(None)
    assert _throughput(summarize_method(old), old) == "100 on unrecorded (load 1.8)"


def test_a_run_names_every_device_that_trained_a_part_of_it(tmp_path):
    from detbalance.compare.runs import _devices

    assert _devices(tmp_path, "CPU") == "CPU"  # nothing recorded: the device training it now
    (tmp_path / "devices.txt").write_text("CUDA NVIDIA H200\nCUDA NVIDIA H200\nCPU\nCUDA NVIDIA H200\n")
    assert _devices(tmp_path, "CPU") == "CUDA NVIDIA H200 then CPU then CUDA NVIDIA H200"


def test_suite_configs_pass_the_same_settings_to_every_arm():
    arms = suite_configs(
        "losses", iters=52, seed=0, amp=True, workers=2, device="cpu",
        settings={"data": {"aspect_ratio_group_factor": 0}, "engine": {"eval_batch_size": 4}},
        overrides=["engine.log_interval=3"],
    )
    assert len({str(cfg.remedy) for _, cfg in arms}) == len(arms)  # the arms still differ in their remedy
    for _, cfg in arms:
        assert cfg.engine.amp and cfg.data.num_workers == 2 and cfg.data.aspect_ratio_group_factor == 0
        assert cfg.engine.eval_batch_size == 4 and cfg.engine.log_interval == 3
    with pytest.raises(ValueError, match=r"remedy.cls_loss.gamma is set by compare \(each arm's remedy\)"):
        suite_configs("losses", iters=52, seed=0, overrides=["remedy.cls_loss.gamma=1"])
    with pytest.raises(ValueError, match=r"--config: engine.iterations is set by compare \(--iters"):
        suite_configs("losses", iters=52, seed=0, settings={"engine": {"iterations": 5}})


def test_finetune_recipe_turns_amp_on_for_cuda_only():
    (_, cpu), *_ = suite_configs("samplers", iters=52, seed=0, optim="finetune", device="cpu", batch_size=4)
    (_, gpu), *_ = suite_configs("samplers", iters=52, seed=0, optim="finetune", device="cuda", batch_size=4)
    assert not cpu.engine.amp and gpu.engine.amp
    assert cpu.optim.lr == pytest.approx(0.005) and cpu.optim.decay_all and cpu.schedule.milestones == (32, 44)
