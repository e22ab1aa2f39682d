"""One progress display: plain log lines (step, total, ETA) when the stream is not a terminal."""

from __future__ import annotations

import io

from detbalance.analysis.progress import Progress


def test_plain_lines_without_a_terminal():
    out = io.StringIO()
    with Progress(True, total=100, description="losses/ce seed 0", stream=out, interval=0.0, name="compare") as bar:
        bar.set_completed(40, skipped=True)  # reused from disk: no rate from it
        assert "ETA" not in bar.line()
        bar.set_completed(70)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[compare] losses/ce seed 0: 0/100 (0 %), elapsed ")
    assert lines[1].startswith("[compare] losses/ce seed 0: 40/100 (40 %), elapsed ")
    assert lines[-1].startswith("[compare] losses/ce seed 0: 70/100 (70 %)") and "ETA" in lines[-1]


def test_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(False, total=10, stream=out) as bar:
        bar.advance(5)
        bar.stage("next", total=None)
    assert out.getvalue() == ""


def test_eta_follows_the_recent_rate_not_the_mean_since_the_start(monkeypatch):
    """A pause (a suspended process, a busy machine) no longer carries into the ETA once the run goes on."""
    from detbalance.analysis import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = Progress(True, total=10_000, stream=io.StringIO(), plain=True, interval=1e9, window=20)
    for step in range(1, 11):  # 10 it/s
        clock[0] += 0.1
        bar.set_completed(step)
    assert abs(bar.rate() - 10.0) < 1e-9
    clock[0] += 3600.0  # an hour's pause, then one step
    bar.set_completed(11)
    assert bar.rate() < 0.01  # the pause is in the window ...
    for step in range(12, 32):  # ... until 20 more steps at 10 it/s have pushed it out
        clock[0] += 0.1
        bar.set_completed(step)
    assert abs(bar.rate() - 10.0) < 1e-6
    # mean since start would say (10000 - 31) / (31 / 3603 s) = 13 days; the recent rate says 16m36s
    assert bar.line().endswith("ETA 16m36s")
