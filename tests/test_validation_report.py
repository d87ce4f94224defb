"""Report maths on a small results set written by hand: errors, summary figures, flags, files."""

from __future__ import annotations

import json

import pytest

from fitplan.errors import FitplanError
from fitplan.validation.report import load_results, missed_targets, summary, write_report

GIB = 1 << 30


def _row(name, calibration=False, **values):
    base = {"name": name, "kind": "nvidia-h100-x1", "world": 1, "calibration": calibration, "status": "ran",
            "seq": 4096, "pred_fits": True, "observed_fits": True}  # fmt: skip
    return {**base, **values}


# Signed errors by hand, (predicted - measured) / measured:
#   A: allocated 10.0 vs 10 -> 0%,    device 12.0 vs 12 -> 0%,    step 1.0 vs 1.0 -> 0%
#   B: allocated 10.2 vs 10 -> +2%,   device 11.4 vs 12 -> -5%,   step 1.1 vs 1.0 -> +10%
#   C: allocated  9.0 vs 10 -> -10%,  device 13.2 vs 12 -> +10%,  step 0.8 vs 1.0 -> -20%
#   D: predicted to fit, ran out of memory -> verdict wrong; E: skipped (counts nowhere)
ROWS = [
    _row("A", calibration=True, pred_alloc=10.0 * GIB, meas_alloc=10 * GIB, pred_device=12.0 * GIB,
         meas_device=12 * GIB, pred_step_s=1.0, meas_step_s=1.0),
    _row("B", pred_alloc=10.2 * GIB, meas_alloc=10 * GIB, pred_device=11.4 * GIB, meas_device=12 * GIB,
         pred_step_s=1.1, meas_step_s=1.0),
    _row("C", pred_alloc=9.0 * GIB, meas_alloc=10 * GIB, pred_device=13.2 * GIB, meas_device=12 * GIB,
         pred_step_s=0.8, meas_step_s=1.0),
    _row("D", status="oom", observed_fits=False, pred_alloc=70 * GIB, pred_device=78 * GIB, reason="OOM: CUDA out of memory."),
    _row("E", status="skipped", observed_fits=None, pred_fits=None, reason="no GPU on this machine"),
]  # fmt: skip


@pytest.fixture
def results(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def test_summary_figures_by_hand(results):
    figures = {f.target.label: f for f in summary(load_results(results))}
    expect = {
        # |0|, |2|, |10| -> median 2, max 10
        "peak allocated error, median abs %": (2.0, True),
        "peak allocated error, max abs %": (10.0, False),
        # |0|, |-5|, |10| -> median 5, max 10; worst under-prediction is B's 5%
        "device-level peak error, median abs %": (5.0, True),
        "device-level peak error, max abs %": (10.0, True),
        "device-level under-prediction, max %": (5.0, False),
        # A, B, C right, D wrong -> 3 of 4
        "fit/OOM verdict right, % of rows": (75.0, False),
        # D was told it fits and ran out of memory: 1 of 4
        "told it fits, then OOMed, % of rows": (25.0, False),
        # |0|, |10|, |-20| -> median 10
        "step-time error, median abs %": (10.0, True),
    }
    for label, (value, met) in expect.items():
        assert figures[label].value == pytest.approx(value), label
        assert figures[label].met is met, label
    assert figures["fit/OOM verdict right, % of rows"].rows == 4


def test_check_rows_only_leave_out_the_calibration_rows(results):
    frame = load_results(results)
    held_out = {f.target.label: f for f in summary(frame[~frame["calibration"]])}
    # B and C only: allocated |2|, |10| -> median 6
    assert held_out["peak allocated error, median abs %"].value == pytest.approx(6.0)


def test_each_missed_target_is_flagged_on_its_row(results):
    frame = load_results(results).set_index("name", drop=False)
    assert missed_targets(frame.loc["A"]) == []
    assert missed_targets(frame.loc["B"]) == ["device under-predicted > 3%"]
    assert missed_targets(frame.loc["C"]) == ["allocated > 8%"]
    assert missed_targets(frame.loc["D"]) == ["verdict wrong: OOM after 'fits'"]
    assert missed_targets(frame.loc["E"]) == []


def test_files_are_written(results, tmp_path):
    paths = write_report(load_results(results), tmp_path / "out", caveats=("measured before the fix",))
    text = paths["markdown"].read_text()
    assert "**MISSED**" in text and "verdict wrong" in text and "no GPU on this machine" in text
    assert text.index("measured before the fix") < text.index("## Summary")
    assert len(paths["csv"].read_text().splitlines()) == 1 + len(ROWS)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_latest_result_of_a_row_wins(results):
    # a second device call's file, whose name sorts first but whose time stamp is later
    rows = [{**r, "finished": 100.0} for r in ROWS]
    (results / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rerun = _row("E", status="failed", reason="exit 1", finished=200.0)
    (results / "rows-rerun.jsonl").write_text(json.dumps(rerun) + "\n")
    frame = load_results(results).set_index("name")
    assert frame.loc["E", "status"] == "failed" and len(frame) == len(ROWS)


def test_bad_results_are_clean_errors(tmp_path):
    with pytest.raises(FitplanError, match=r"no \*rows\*.jsonl"):
        load_results(tmp_path)
    (tmp_path / "rows.jsonl").write_text("{not json\n")
    with pytest.raises(FitplanError, match="rows.jsonl:1: not a JSON line"):
        load_results(tmp_path)


def test_a_row_started_on_a_busy_gpu_is_set_aside(tmp_path):
    # F measured 43 GiB of someone else's memory on its GPU: no figures, no verdict from it
    busy = _row("F", pred_alloc=50 * GIB, meas_alloc=50 * GIB, pred_device=60 * GIB, meas_device=103 * GIB,
                pred_step_s=1.0, meas_step_s=1.0, gpu_used_at_start_mib=44_150)  # fmt: skip
    idle = _row("G", pred_alloc=50 * GIB, meas_alloc=50 * GIB, pred_device=60 * GIB, meas_device=60 * GIB,
                pred_step_s=1.0, meas_step_s=1.0, gpu_used_at_start_mib=52)  # fmt: skip
    (tmp_path / "rows.jsonl").write_text(json.dumps(busy) + "\n" + json.dumps(idle) + "\n")
    frame = load_results(tmp_path).set_index("name")
    assert frame.loc["F", "status"] == "spoiled" and "44150 MiB" in frame.loc["F", "reason"]
    assert frame.loc["F", ["meas_device", "observed_fits"]].isna().all()
    assert frame.loc["G", "status"] == "ran" and frame.loc["G", "meas_device"] == 60 * GIB
