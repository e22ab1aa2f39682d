"""The compare report: summaries are the right numbers, notes say when a difference is noise, files exist."""

from __future__ import annotations

import math

import pytest

from detbalance.analysis.report import summarize_method, write_report


def _run(seed: int, ap: float, rare: float = 0.1) -> dict:
    return {
        "seed": seed,
        "metrics": {
            "AP": ap,
            "AP50": ap + 0.2,
            "AP75": ap - 0.05,
            "APs": ap - 0.1,
            "rare_AP": rare,
            "per_class": {"0": ap + 0.1, "4": rare},
        },
        "images_per_s": 100.0 + seed,
        "curve": [
            {"iter": 10, "loss": 1.0},
            {"iter": 20, "loss": 0.5, "AP": ap / 2},
            {"iter": 30, "loss": 0.3, "AP": ap},
        ],
        "grad_density": {"counts": [1000.0, 10.0, 1.0, 5.0]},
    }


def _results(aps_base, aps_other) -> dict:
    return {
        "setup": {"command": "detbalance compare --iters 30", "preset": "tiny", "data": {"pos:neg": "1:900"}},
        "suites": {
            "losses": {
                "title": "RetinaNet losses",
                "baseline": "ce",
                "train_class_frequency": {"0": 100, "4": 1},
                "methods": [
                    {"key": "ce", "label": "CE", "runs": [_run(i, ap) for i, ap in enumerate(aps_base)]},
                    {
                        "key": "focal",
                        "label": "focal",
                        "runs": [_run(i, ap) for i, ap in enumerate(aps_other)],
                    },
                ],
            }
        },
    }


def test_summary_is_mean_and_sample_std():
    method = _results([0.1, 0.2, 0.3], [0.1])["suites"]["losses"]["methods"][0]
    s = summarize_method(method)
    assert s.num_seeds == 3
    assert s.mean["AP"] == pytest.approx(0.2)
    assert s.std["AP"] == pytest.approx(0.1)  # sample std of 0.1, 0.2, 0.3
    assert s.images_per_s == pytest.approx(101.0)


def test_single_seed_std_is_nan():
    s = summarize_method(_results([0.3], [0.1])["suites"]["losses"]["methods"][0])
    assert math.isnan(s.std["AP"])


def test_report_gives_paired_intervals_and_writes_files(tmp_path):
    # focal - CE per seed: +6, -4, +1 AP points: mean +1.0, no measurable difference.
    path = write_report(_results([0.20, 0.25, 0.30], [0.26, 0.21, 0.31]), tmp_path)
    text = path.read_text()
    assert "| focal | 26.0 ± 5.0 |" in text
    assert "| +1.0 [-11.4, +13.4] | no measurable difference |" in text
    html = (tmp_path / "report.html").read_text()
    assert html.count("<table>") == 2 and "<strong>Findings.</strong>" in html and "**" not in html
    for suffix in ("ap", "curves", "per_class", "grad_density"):
        png = tmp_path / f"losses_{suffix}.png"
        assert png.stat().st_size > 5000
        assert f"]({png.name})" in text


def test_report_does_not_hide_a_clear_difference(tmp_path):
    text = write_report(_results([0.20, 0.21, 0.22], [0.40, 0.41, 0.42]), tmp_path).read_text()
    assert "| +20.0 [+20.0, +20.0] | better |" in text and "Better AP than CE: focal" in text


def test_one_seed_says_the_verdict_needs_seeds(tmp_path):
    text = write_report(_results([0.2], [0.3]), tmp_path).read_text()
    assert "| +10.0 (1 seed) | needs seeds |" in text and "With 1 seed there is no verdict" in text


def test_inline_markdown_renders_to_escaped_html():
    from detbalance.analysis.report import inline_html

    assert inline_html("**Findings.** a <b> `x*y` *it*") == (
        "<strong>Findings.</strong> a &lt;b&gt; <code>x*y</code> <em>it</em>"
    )
    assert inline_html("[report](report.md) and [study](https://x.org/a)") == (
        '<a href="report.md">report</a> and <a href="https://x.org/a">study</a>'
    )
    assert inline_html("[x](javascript:alert(1)) 3 * 4") == "[x](javascript:alert(1)) 3 * 4"
