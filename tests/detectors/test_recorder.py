"""BalanceRecorder: aggregation per step, closed-form histogram bins, class sums vs a loop, round trips."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from detbalance.detectors import BalanceRecorder


def test_counts_accumulate_within_a_step_and_split_across_steps():
    rec = BalanceRecorder()
    rec.start_step(0)
    rec.record_counts("a", torch.tensor([1, 2]), torch.tensor([10, 20]), torch.tensor([0, 1]))
    rec.record_counts("a", torch.tensor([3, 4]), torch.tensor([30, 40]), torch.tensor([5, 6]))
    rec.start_step(0)  # same step: keeps accumulating (gradient accumulation)
    rec.record_counts("a", torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([1, 1]))
    rec.start_step(7)
    rec.record_counts("b", torch.tensor(5), torch.tensor(6))
    records = rec.to_records()
    assert [r["step"] for r in records] == [0, 7]
    assert records[0]["counts"]["a"] == {"positives": [5, 7], "negatives": [41, 61], "ignored": [6, 8]}
    assert records[1]["counts"] == {"b": {"positives": 5, "negatives": 6, "ignored": None}}
    assert rec.num_steps == 2


def test_record_before_start_step_opens_step_zero():
    rec = BalanceRecorder()
    rec.record_counts("x", 1, 2)
    assert rec.to_records()[0]["step"] == 0


@pytest.mark.parametrize(
    ("value", "expected_bin"),
    [(0.0, 0), (1e-9, 0), (1e-6, 0), (1.0, 24), (0.999, 23), (10.0, 28), (100.0, 31), (1e6, 31)],
)
def test_loss_histogram_bins_are_closed_form(value, expected_bin):
    # 32 log-spaced bins on [1e-6, 1e2]: 8 decades, 4 bins per decade; bin = floor(4 (log10 x + 6)).
    rec = BalanceRecorder()
    rec.record_losses("l", torch.tensor([value]))
    hist = rec.to_records()[0]["losses"]["l"]["histogram"]
    assert hist == [1 if i == expected_bin else 0 for i in range(32)]
    edges = rec.loss_bin_edges
    assert len(edges) == 33 and math.isclose(edges[24], 1.0) and math.isclose(edges[0], 1e-6)


def test_loss_summary_with_mask_matches_boolean_indexing():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(200, generator=g) * 3
    mask = torch.rand(200, generator=g) < 0.3
    a, b = BalanceRecorder(), BalanceRecorder()
    a.record_losses("l", losses, mask=mask)
    b.record_losses("l", losses[mask])
    ra, rb = a.to_records()[0]["losses"]["l"], b.to_records()[0]["losses"]["l"]
    assert ra["count"] == int(mask.sum()) == rb["count"]
    assert ra["histogram"] == rb["histogram"] and sum(ra["histogram"]) == ra["count"]
    assert math.isclose(ra["sum"], float(losses[mask].double().sum()), rel_tol=1e-12)
    assert ra["max"] == rb["max"] == float(losses[mask].max())
    a.record_losses("l", losses, mask=mask)  # second call in the same step adds up
    assert a.to_records()[0]["losses"]["l"]["count"] == 2 * ra["count"]


def test_class_losses_equal_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 5, (300,), generator=g)  # -1..4 with K = 3: label 4 is out of range
    losses = torch.rand(300, generator=g)
    rec = BalanceRecorder()
    rec.record_class_losses("c", labels, losses, 3)
    out = rec.to_records()[0]["class_losses"]["c"]
    for k in range(4):
        sel = [float(v) for v, lab in zip(losses, labels.tolist()) if lab == k]
        assert out["count"][k] == len(sel)
        assert math.isclose(out["sum"][k], sum(sel), rel_tol=1e-6)
    assert len(out["sum"]) == 4  # ignored (-1) and out-of-range labels are dropped, not folded in


def test_ghm_density_is_summed_within_a_step():
    rec = BalanceRecorder()
    rec.record_ghm_density("g", torch.arange(4.0))
    rec.record_ghm_density("g", torch.ones(4))
    assert rec.to_records()[0]["ghm_density"]["g"] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="bins"):
        rec.record_ghm_density("g", torch.ones(5))


def test_records_do_not_keep_autograd_graphs_and_are_json():
    x = torch.rand(10, requires_grad=True)
    rec = BalanceRecorder()
    rec.record_losses("l", x * 2)
    rec.record_class_losses("c", torch.zeros(10, dtype=torch.int64), x * 2, 1)
    rec.record_counts("n", (x > 0.5).sum(), (x <= 0.5).sum())
    entry = rec._steps[0]
    assert not entry["losses"]["l"]["sum"].requires_grad
    assert not entry["class_losses"]["c"]["sum"].requires_grad
    records = rec.to_records()
    assert json.loads(json.dumps(records)) == records
    assert records[0]["counts"]["n"]["positives"] + records[0]["counts"]["n"]["negatives"] == 10


def test_state_dict_round_trip_through_weights_only_load():
    rec = BalanceRecorder(loss_bins=8, loss_range=(1e-3, 1e1))
    rec.start_step(3)
    rec.record_counts("a", torch.tensor([1, 2]), torch.tensor([3, 4]))
    rec.record_losses("l", torch.tensor([0.01, 0.5, 2.0]))
    rec.record_ghm_density("g", torch.ones(3))
    rec.record_class_losses("c", torch.tensor([0, 1]), torch.tensor([0.5, 1.5]), 1)
    buf = io.BytesIO()
    torch.save(rec.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = BalanceRecorder(loss_bins=8, loss_range=(1e-3, 1e1))
    other.load_state_dict(state)
    assert other.to_records() == rec.to_records()
    other.start_step(3)  # continuing the restored step accumulates into it
    other.record_counts("a", torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert other.to_records()[0]["counts"]["a"]["positives"] == [2, 3]
    with pytest.raises(ValueError, match="loss_bins"):
        BalanceRecorder().load_state_dict(state)


def test_clear_forgets_everything():
    rec = BalanceRecorder()
    rec.record_counts("a", 1, 1)
    rec.clear()
    assert rec.to_records() == [] and rec.num_steps == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"loss_bins": 0}, "loss_bins"), ({"loss_range": (0.0, 1.0)}, "loss_range"), ({"loss_range": (2.0, 1.0)}, "loss_range")],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalanceRecorder(**kwargs)


def test_bad_records_raise():
    rec = BalanceRecorder()
    with pytest.raises(ValueError, match="step"):
        rec.start_step(1.5)
    with pytest.raises(ValueError, match="negatives shape"):
        rec.record_counts("a", torch.tensor([1, 2]), torch.tensor(3))
    with pytest.raises(ValueError, match="0-d or 1-d"):
        rec.record_counts("a", torch.ones(2, 2), torch.ones(2, 2))
    rec.record_counts("b", torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        rec.record_counts("b", torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        rec.record_class_losses("c", torch.zeros(2, dtype=torch.int64), torch.zeros(2), 0)
    with pytest.raises(ValueError, match="mask shape"):
        rec.record_losses("l", torch.zeros(3), mask=torch.ones(2, dtype=torch.bool))
