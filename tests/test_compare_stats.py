"""Paired statistics of compare: hand-computed t-intervals, verdicts, findings built from them."""

from __future__ import annotations

import math

import pytest

from detbalance.compare.stats import (
    MIN_SEEDS,
    clean_twins,
    findings,
    noise_cost,
    paired_difference,
    plateau,
    rare_classes,
    robustness_difference,
    t_quantile_975,
)


def test_paired_interval_by_hand():
    # arm - baseline per seed: 0.01, 0.03, 0.02 -> mean 0.02, sd 0.01, t_{0.975, 2} = 4.3027
    # half width = 4.3027 * 0.01 / sqrt(3) = 0.024841
    d = paired_difference({0: 0.31, 1: 0.33, 2: 0.32}, {0: 0.30, 1: 0.30, 2: 0.30})
    assert d.seeds == [0, 1, 2] and d.diffs == pytest.approx([0.01, 0.03, 0.02])
    assert d.mean == pytest.approx(0.02)
    assert (d.low, d.high) == (pytest.approx(0.02 - 0.0248414, abs=1e-6), pytest.approx(0.02 + 0.0248414, abs=1e-6))
    assert d.verdict == "no measurable difference"
    better = paired_difference({0: 0.35, 1: 0.36, 2: 0.37}, {0: 0.30, 1: 0.30, 2: 0.30})
    assert better.low == pytest.approx(0.06 - 0.0248414, abs=1e-6) and better.verdict == "better"
    worse = paired_difference({0: 0.30, 1: 0.30, 2: 0.30}, {0: 0.35, 1: 0.36, 2: 0.37})
    assert worse.high == pytest.approx(-0.06 + 0.0248414, abs=1e-6) and worse.verdict == "worse"


def test_pairing_removes_the_seed_effect():
    # a large seed effect shared by both arms: unpaired spreads overlap, the paired difference is exact
    base = {0: 0.10, 1: 0.30, 2: 0.50}
    arm = {s: v + 0.01 for s, v in base.items()}
    d = paired_difference(arm, base)
    assert d.mean == pytest.approx(0.01) and d.high - d.low == pytest.approx(0.0, abs=1e-9)
    assert d.verdict == "better"


def test_too_few_seeds_give_no_verdict():
    one = paired_difference({0: 0.4}, {0: 0.3})
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and one.verdict == "needs seeds"
    two = paired_difference({0: 0.4, 1: 0.5}, {0: 0.3, 1: 0.3})
    assert not math.isnan(two.low) and two.verdict == "needs seeds" and MIN_SEEDS == 3
    # unpaired seeds and nan values are left out
    d = paired_difference({0: 0.4, 1: math.nan, 5: 0.1}, {0: 0.3, 1: 0.3, 2: 0.3})
    assert d.seeds == [0]


def test_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    # beyond the table: Cornish-Fisher, against the textbook values
    for df, t in ((40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert t_quantile_975(df) == pytest.approx(t, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 9, 29, 30, 31, 50, 200):
        assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-4)
    with pytest.raises(ValueError, match="df"):
        t_quantile_975(0)


def _suite(base, arms, *, primary="AP", rare=None):
    def runs(values):
        return [{"seed": s, "metrics": {"AP": v, "rare_AP": v / 2}} for s, v in enumerate(values)]

    methods = [{"key": "base", "label": "Base", "runs": runs(base)}]
    methods += [{"key": k, "label": k.upper(), "runs": runs(v)} for k, v in arms.items()]
    return {"baseline": "base", "primary": primary, "rare_classes": rare or [], "methods": methods}


def test_findings_are_built_from_verdicts():
    text = findings(_suite([0.30, 0.30, 0.30], {"a": [0.35, 0.36, 0.37], "b": [0.31, 0.33, 0.32]}))[0]
    assert text.startswith("**Findings.** ")
    assert "Better AP than Base: A (+6.0 [+3.5, +8.5])" in text
    assert "No measurable difference in AP from Base: B (+2.0 [-0.5, +4.5])" in text
    assert "cannot decide" not in text
    low = findings(_suite([0.10, 0.11, 0.12], {"a": [0.15, 0.16, 0.17]}))[0]
    assert "Base reaches only 11.0 AP (< 25)" in low and "cannot decide" in low


def test_findings_with_one_seed_say_the_verdict_needs_seeds():
    text = findings(_suite([0.30], {"a": [0.40]}))[0]
    assert "With 1 seed there is no verdict" in text and "--seeds 3" in text and "Better" not in text


def test_classes_findings_speak_to_rare_class_ap():
    text = findings(_suite([0.30, 0.30, 0.30], {"a": [0.35, 0.36, 0.37]}, primary="rare_AP", rare=["3", "4"]))[0]
    assert "Rare classes (fewer than 10% of the most frequent class's training instances): 3, 4." in text
    assert "Better rare-class AP than Base: A (+3.0" in text


def test_rare_is_below_a_tenth_of_the_most_frequent():
    assert rare_classes({"0": 1000, "1": 120, "2": 99, "3": 5}) == ["2", "3"]
    assert rare_classes({}) == []


def test_study_table_rows_come_from_the_paired_verdicts(tmp_path):
    from detbalance.compare.study import CLAIMS, claim_rows, write_study_readme

    def method(key, values):
        return {"key": key, "label": key, "runs": [{"seed": s, "metrics": {"AP": v}} for s, v in enumerate(values)]}

    losses = {"methods": [method("ce", [0.30, 0.31, 0.32]), method("alpha_ce", [0.40, 0.40, 0.41]),
                          method("focal", [0.35, 0.36, 0.37]), method("ghm_c", [0.2, 0.2, 0.21]),
                          method("ghm_c_r", [0.2, 0.21, 0.2])], "baseline": "ce", "title": "RetinaNet"}
    rows = claim_rows({"suites": {"losses": losses}})
    assert len(rows) == len(CLAIMS)
    assert rows[0][1].startswith("focal − ce: +5.0 [+5.0, +5.0] AP (better, 3 seeds)") and rows[0][2] == "yes"
    assert rows[1][2] == "no" and "worse" in rows[1][1]  # focal below alpha-CE here
    assert rows[3][2] == "not reproduced" and "no measurable difference" in rows[3][1]  # GHM-R: +0.0 [-2.5, +2.5]
    row_of = {(c.suite, c.arm, c.reference): i for i, c in enumerate(CLAIMS)}
    assert rows[row_of[("samplers", "ohem", "fixed")]][1:] == ["not run", "–"]
    assert rows[row_of[("losses", "vfl", "focal")]][1:] == ["an arm has no finished run", "–"]
    setup = {"command": "detbalance compare --study", "trained on": "CPU (4 runs), CUDA NVIDIA H200 then CPU (2 runs)"}
    readme = write_study_readme({"setup": setup, "suites": {"losses": losses}}, tmp_path)
    text = readme.read_text()
    assert "| paper's claim | our result" in text and "detbalance compare --study" in text
    assert "trained on: CPU (4 runs), CUDA NVIDIA H200 then CPU (2 runs);" in text
    # the per-suite table: mean ± std over seeds and the paired difference to the baseline with its verdict
    assert "| focal | 3 | 36.0 ± 1.0 | – | +5.0 [+5.0, +5.0] | better |" in text
    assert "| ce | 3 | 31.0 ± 1.0 | – | baseline | – |" in text


def test_study_suite_table_uses_the_suites_primary_metric():
    from detbalance.compare.study import suite_tables

    suite = {**_suite([0.30, 0.30, 0.30], {"a": [0.34, 0.36, 0.38]}, primary="rare_AP"), "title": "classes"}
    suite["methods"].append({"key": "b", "label": "B", "runs": []})
    text = "\n".join(suite_tables({"suites": {"classes": suite}}))
    assert "verdicts on rare-class AP" in text and "ΔRare-class AP" not in text
    assert "| A | 3 | 36.0 ± 2.0 | 18.0 ± 1.0 | +3.0 [+0.5, +5.5] | better |" in text
    assert "| B | 0 | not run | – | – | – |" in text


def _curve_run(seed, aps, iters=800):
    step = iters // len(aps)
    return {"seed": seed, "metrics": {"AP": aps[-1]}, "curve": [{"iter": step * (i + 1), "AP": a} for i, a in enumerate(aps)]}


def test_plateau_reads_the_best_arms_last_quarter_over_seeds():
    suite = {
        "baseline": "a",
        "clean": {"a": "c"},
        "methods": [
            {"key": "a", "label": "A", "runs": [_curve_run(0, [0.1] * 8), _curve_run(1, [0.1] * 8)]},
            # best arm: last quarter from iteration 600 (0.30, 0.32) to 800 (0.34, 0.33): +2.5 AP on average
            {"key": "b", "label": "B", "runs": [_curve_run(0, [0.1] * 5 + [0.30, 0.32, 0.34]),
                                                _curve_run(1, [0.1] * 5 + [0.32, 0.33, 0.33])]},
            {"key": "c", "label": "clean", "runs": [_curve_run(0, [0.9] * 8)]},  # never the "best arm"
        ],
    }
    p = plateau(suite)
    assert (p.arm, p.start_iter, p.end_iter, p.seeds) == ("B", 600, 800, 2)
    assert p.change == pytest.approx(0.025)
    assert not p.reached
    assert "not a plateau" in p.sentence()
    flat = {**suite, "methods": [suite["methods"][0]]}
    assert plateau(flat).reached and "a plateau by the < 1 AP rule" in plateau(flat).sentence()
    assert "Plateau check: the best arm, B," in findings(suite)[0]


def test_study_readme_has_a_plateau_row_per_suite(tmp_path):
    from detbalance.compare.study import write_study_readme

    losses = {"title": "L", "optim": "sgd", "iterations": 800, "baseline": "a",
              "methods": [{"key": "a", "label": "A", "runs": [_curve_run(0, [0.1] * 5 + [0.30, 0.32, 0.305])]}]}
    ssd = {"title": "S", "optim": "adamw", "iterations": 800, "baseline": "m",
           "methods": [{"key": "m", "label": "M", "runs": [{"seed": 0, "metrics": {"AP": 0.2}}]}]}
    text = write_study_readme({"setup": {}, "suites": {"losses": losses, "ssd": ssd}}, tmp_path).read_text()
    assert "| losses | sgd | 800 | A | 30.0 -> 30.5 (600 -> 800, 1 seed) | +0.5 | yes |" in text
    assert "| ssd | adamw | 800 | – | – | – | no curves yet |" in text


def test_study_readme_of_a_study_in_progress_names_what_is_missing(tmp_path):
    from detbalance.compare.study import write_study_readme

    setup = {"command": "detbalance compare --suite all --seeds 3 --budget full --study --finished-only",
             "runs not finished (not in this report)": "1: losses/ce seed 2"}
    text = write_study_readme({"setup": setup, "suites": {}}, tmp_path).read_text()
    assert "**In progress.**" in text and "not finished: 1: losses/ce seed 2" in text
    assert "detbalance compare --suite all --seeds 3 --budget full --study\n```" in text  # the study's command


def test_study_readme_keeps_the_hand_written_evidence(tmp_path):
    from detbalance.compare.study import EVIDENCE_FILE, write_study_readme

    assert "stays unexplained" in write_study_readme({"setup": {}, "suites": {}}, tmp_path).read_text()
    (tmp_path / EVIDENCE_FILE).write_text("GHM-C vs FL: measured under SGD too.\n")
    text = write_study_readme({"setup": {}, "suites": {}}, tmp_path).read_text()
    assert "## Where we disagree, and why\n\nGHM-C vs FL: measured under SGD too.\n" in text
    assert "stays unexplained" not in text


def _noise_suite():
    def method(key, values):
        return {"key": key, "label": key, "runs": [{"seed": s, "metrics": {"AP": v}} for s, v in enumerate(values)]}

    return {
        "baseline": "focal",
        "clean": {"focal": "focal_clean", "ghm_c": "ghm_c_clean"},
        "methods": [method("focal", [0.60, 0.58, 0.61]), method("ghm_c", [0.47, 0.44, 0.49]),
                    method("focal_clean", [0.66, 0.64, 0.65]), method("ghm_c_clean", [0.50, 0.49, 0.51])],
    }


def test_noise_cost_and_robustness_are_paired_per_seed_by_hand():
    suite = _noise_suite()
    # focal: 0.60-0.66, 0.58-0.64, 0.61-0.65 = -0.06, -0.06, -0.04; GHM-C: -0.03, -0.05, -0.02
    focal, ghm = noise_cost(suite, "focal"), noise_cost(suite, "ghm_c")
    assert focal.diffs == pytest.approx([-0.06, -0.06, -0.04]) and ghm.diffs == pytest.approx([-0.03, -0.05, -0.02])
    # GHM-C's drop minus focal's: +0.03, +0.01, +0.02 -> mean 0.02, sd 0.01: the interval of the first test
    r = robustness_difference(suite, "ghm_c", "focal")
    assert r.diffs == pytest.approx([0.03, 0.01, 0.02]) and r.mean == pytest.approx(0.02)
    assert r.low == pytest.approx(0.02 - 0.0248414, abs=1e-6) and r.verdict == "no measurable difference"
    text = findings(suite)[0]
    assert "What the noise costs each loss (AP, noisy minus clean labels): focal -5.3 [" in text
    assert "Robustness: ghm_c's drop minus focal's = +2.0 [-0.5, +4.5] AP points" in text
    assert "no measurable difference in robustness" in text
    # clean arms are neither verdict rows nor the plateau's best arm
    assert "focal_clean (" not in text.split("What the noise costs")[0]


def test_a_suite_without_clean_twins_has_none():
    assert clean_twins({"baseline": "ce"}) == {} and clean_twins({"baseline": "ce", "clean": {}}) == {}


def test_the_robustness_claim_row(tmp_path):
    from detbalance.compare.study import CLAIMS, claim_rows

    (i, claim), = [(i, c) for i, c in enumerate(CLAIMS) if c.robustness]
    row = claim_rows({"suites": {"noise": _noise_suite()}})[i]
    assert row[1] == "(ghm_c − ghm_c_clean) − (focal − focal_clean): +2.0 [-0.5, +4.5] AP (no measurable difference, 3 seeds)"
    assert row[2] == "not reproduced"
    without_twin = _noise_suite()
    without_twin["methods"] = without_twin["methods"][:3]
    without_twin["clean"] = {"focal": "focal_clean"}
    assert claim_rows({"suites": {"noise": without_twin}})[i][1:] == ["an arm has no finished run", "–"]
    one_seed = _noise_suite()
    for m in one_seed["methods"]:
        m["runs"] = m["runs"][:1]
    assert claim_rows({"suites": {"noise": one_seed}})[i][1:] == [
        "(ghm_c − ghm_c_clean) − (focal − focal_clean): +3.0 (1 seed) AP", "undecided (needs 3 seeds)"]


def test_a_clean_twin_gets_no_verdict_in_the_tables(tmp_path):
    from detbalance.analysis.report import write_report
    from detbalance.compare.study import suite_tables

    suite = {**_noise_suite(), "title": "noise"}
    text = "\n".join(suite_tables({"suites": {"noise": suite}}))
    assert "| ghm_c_clean | 3 | 50.0 ± 1.0 | – | clean-label twin of ghm_c | – |" in text
    assert "| ghm_c | 3 | 46.7 ± 2.5 | – | -13.0 [-15.5, -10.5] | worse |" in text
    path = write_report({"setup": {}, "suites": {"noise": suite}}, tmp_path)
    assert "| ghm_c_clean |" in path.read_text() and "clean-label twin of ghm_c (findings: the noise cost)" in path.read_text()


def test_a_can_replace_claim_needs_an_interval_that_excludes_a_loss_over_one_ap():
    from detbalance.compare.study import CLAIMS, claim_rows

    def method(key, values):
        return {"key": key, "label": key, "runs": [{"seed": s, "metrics": {"AP": v}} for s, v in enumerate(values)]}

    i = next(k for k, c in enumerate(CLAIMS) if c.suite == "ssd" and c.expected == "not worse")

    def agrees(focal):
        ssd = {"methods": [method("mining", [0.50, 0.52, 0.48]), method("all", [0.49, 0.51, 0.47]),
                           method("focal", focal)], "baseline": "mining", "title": "SSD"}
        return claim_rows({"suites": {"ssd": ssd}})[i][2]

    # differences -0.2, -0.3, -0.1 AP: interval [-0.45, +0.05] lies above -1 AP
    assert agrees([0.498, 0.517, 0.479]) == "yes"
    # differences -2.1, -5.8, -1.9 (the SSD study's seeds): interval [-8.7, +2.2], no verdict either way
    assert agrees([0.479, 0.462, 0.461]) == "not shown (the interval allows a loss of 8.7 AP)"
    # differences -3, -3.2, -2.8: worse
    assert agrees([0.47, 0.488, 0.452]) == "no"
    assert agrees([0.47]) == "undecided (needs 3 seeds)"


def test_no_plateau_line_for_arms_that_did_not_learn(tmp_path):
    """Curves stuck near 0 AP are flat without having converged: the check says no arm learnt instead."""
    from detbalance.compare.study import plateau_rows

    stuck = {"baseline": "a", "optim": "adamw", "iterations": 800, "methods": [
        {"key": "a", "label": "A", "runs": [_curve_run(0, [0.0] * 8)]},
        {"key": "b", "label": "B", "runs": [_curve_run(0, [0.0] * 7 + [0.004])]},
    ]}
    p = plateau(stuck)
    assert p.arm == "B" and not p.learned and not p.reached
    text = findings(stuck)[0]
    assert "a plateau by" not in text and "not a plateau" not in text
    assert ("Plateau check: none. The best arm, B, ends at 0.4 AP (mean of 1 seed), below 5 AP: no arm has learnt "
            "to detect at this budget") in text
    assert plateau_rows({"suites": {"ssd": stuck}}) == [
        "| ssd | adamw | 800 | B | 0.0 -> 0.4 (600 -> 800, 1 seed) | +0.4 | no arm learnt (below 5 AP) |"]


def test_an_arm_equal_to_another_is_reported_with_the_reason():
    from detbalance.compare.stats import identical_arms

    def runs(aps, mined=None):
        out = []
        for seed, ap in enumerate(aps):
            run = {"seed": seed, "metrics": {"AP": ap, "per_class": {"0": ap}}}
            if mined is not None:
                run["hooks"] = [{"type": "bootstrap", "step": 350, "round": 1, "hard_negatives": mined, "images": 0}]
            out.append(run)
        return out

    suite = {"baseline": "fixed", "methods": [
        {"key": "fixed", "label": "fixed 1:3", "runs": runs([0.30, 0.31, 0.32])},
        {"key": "ohem", "label": "OHEM", "runs": runs([0.30, 0.31, 0.33])},  # differs in one seed
        {"key": "bootstrap", "label": "fixed 1:3 + bootstrapping", "runs": runs([0.30, 0.31, 0.32], mined=0)},
    ]}
    assert identical_arms(suite) == [("bootstrap", "fixed")]
    assert ("fixed 1:3 + bootstrapping equals fixed 1:3 exactly in every seed (3): no false positives were mined "
            "(0 hard negatives in each of its 3 bootstrapping rounds, at iteration 350), so its sampler had nothing "
            "to put first and drew exactly what the fixed ratio draws.") in findings(suite)[0]
    # mined negatives but the same numbers: reported, without a made-up reason
    suite["methods"][2]["runs"] = runs([0.30, 0.31, 0.32], mined=5)
    assert ("fixed 1:3 + bootstrapping equals fixed 1:3 exactly in every seed (3): the runs record no reason"
            in findings(suite)[0])
    # the per-class APs count: equal AP alone is not equality
    suite["methods"][2]["runs"][0]["metrics"]["per_class"] = {"0": 0.1}
    assert identical_arms(suite) == []
