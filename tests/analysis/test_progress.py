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
