"""Stored rows re-predicted with the current estimator, and trainer reports read as rows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.estimator import estimate_spec
from fitplan.validation.report import load_results
from fitplan.validation.trainer_reports import load_reports, result_row

GIB = 1 << 30

# A matrix near-limit row as the runner stored it: seq 8960 chosen at run time, the prediction
# of that time (made-up values here, so a re-prediction must replace them).
STORED = {
    "name": "h200x1-sft-qwen3-8b-sX-b4-ac-bf16-near-fit", "kind": "nvidia-h200", "world": 1, "workload": "sft",
    "seq": 8960, "micro_batch": 4, "calibration": False, "status": "oom", "observed_fits": False,
    "pred_alloc": 1 * GIB, "pred_device": 2 * GIB, "pred_fits": True, "pred_step_s": 1.0,
}  # fmt: skip
UNKNOWN = {**STORED, "name": "not-a-matrix-row"}


def _phase(allocated_gib: float, reserved_gib: float, device_gib: float) -> dict:
    return {"allocated": int(allocated_gib * GIB), "reserved": int(reserved_gib * GIB), "device_used": int(device_gib * GIB)}


REPORT = {
    "config": {"model": "llama-3.2-1b", "gpus": "1xH100", "seq": 1024},
    "world": 1,
    "device": "NVIDIA H100 80GB HBM3",
    "prediction": {"peak_allocated_bytes": 9 * GIB, "peak_reserved_bytes": 11 * GIB, "fits": True},
    "steps": [
        {"step": 1, "seconds": 3.0, "phases": {"backward": _phase(20, 21, 22)}},
        {"step": 2, "seconds": 0.5, "phases": {"backward": _phase(10, 12, 12.5), "optimizer_step": _phase(11, 12, 12.5)}},
    ],
}  # fmt: skip


@pytest.fixture
def folders(tmp_path):
    rows, reports = tmp_path / "rows", tmp_path / "reports"
    rows.mkdir(), reports.mkdir()
    (rows / "h200_rows.jsonl").write_text(json.dumps(STORED) + "\n" + json.dumps(UNKNOWN) + "\n")
    (reports / "llama-1k.json").write_text(json.dumps(REPORT))
    (reports / "collect.json").write_text(json.dumps({"mode": "gather"}))  # not a trainer report
    return rows, reports


def test_trainer_report_is_a_steady_state_row(folders):
    (row,) = load_reports(folders[1])
    assert row["name"] == "h100x1-eagle3-llama-1k" and row["kind"] == "nvidia-h100-x1"
    # step 2 only: max allocated 11, max device 12.5; step 1's 20-22 GiB is not steady state
    assert (row["meas_alloc"], row["meas_device"], row["meas_step_s"]) == (11 * GIB, int(12.5 * GIB), 0.5)
    assert row["status"] == "ran" and row["calibration"] and row["pred_alloc"] == 9 * GIB


def test_oom_report_and_unknown_device(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**REPORT, "oom": {"message": "CUDA out of memory. Tried to allocate 2.00 GiB"}}))
    assert result_row(path)["status"] == "oom" and result_row(path)["observed_fits"] is False
    path.write_text(json.dumps({**REPORT, "world": 3}))
    with pytest.raises(FitplanError, match="no device kind for 3 x NVIDIA H100"):
        result_row(path)


def test_repredict_rebuilds_the_row_as_it_ran(folders):
    frame = load_results(folders[0], repredict=True).set_index("name")
    # the row's own spec, written out from its name and stored seq
    spec = RunSpec(model="qwen3-8b", gpus="1xH200", workload="sft", seq=8960, micro_batch=4, ac=True, precision="bf16")
    est = estimate_spec(spec)
    near = frame.loc[STORED["name"]]
    assert (near["pred_alloc"], near["pred_device"], near["pred_fits"]) == (
        est.peak_allocated_bytes, est.peak_reserved_bytes, est.fits)
    assert near["prediction"] == "current"
    # a row it cannot rebuild keeps what was predicted at run time, and says so
    assert frame.loc["not-a-matrix-row", "pred_alloc"] == GIB
    assert frame.loc["not-a-matrix-row", "prediction"] == "run time"
    assert load_results(folders[0]).set_index("name").loc[STORED["name"], "pred_alloc"] == GIB


def test_near_limit_rows_at_the_current_placement_are_marked(tmp_path):
    from fitplan.validation.matrix import MATRIX, resolve_row
    from fitplan.validation.report import placed_now_markdown

    row = next(r for r in MATRIX if r.name == STORED["name"])
    now = resolve_row(row, estimate_spec).seq
    stored = [{**STORED, "name": f"{row.name}-s{seq}", "seq": seq, "intent": "near-fit", "config": None,
               "status": "ran", "observed_fits": True} for seq in (now, now + 256)]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in stored) + "\n")
    frame = load_results(tmp_path, repredict=True).set_index("name", drop=False)
    assert frame.loc[f"{row.name}-s{now}", "placed_now"]
    assert not frame.loc[f"{row.name}-s{now + 256}", "placed_now"]  # an earlier estimator's choice
    text = "\n".join(placed_now_markdown(frame))
    assert "1 measured, verdict right on 1" in text and f"-s{now + 256}" not in text


def test_cli_from_results_with_trainer_reports(folders, tmp_path):
    out = tmp_path / "out"
    args = ["validate", "--from-results", str(folders[0]), "--trainer-reports", str(folders[1]), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (out / "validation-matrix.md").read_text()
    assert "h100x1-eagle3-llama-1k" in text and STORED["name"] in text
    assert "current estimator 2 rows" in text and "run time estimator 1 rows" in text
    bad = CliRunner().invoke(app, ["validate", "--trainer-reports", str(tmp_path / "missing"), "--out", str(out)])
    assert bad.exit_code == 2 and "no trainer report" in bad.output
