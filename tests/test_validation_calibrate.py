"""Calibration fits known constants back from rows generated with them, and checks on held-out rows."""

from __future__ import annotations

import pandas as pd
import pytest

from fitplan.errors import FitplanError
from fitplan.validation.calibrate import RuntimeConstants, check, fit, markdown

GIB = 1 << 30
MIB = 1 << 20
# The constants the synthetic measurements are generated with.
CONTEXT, NCCL, RESERVE = 600 * MIB, 840 * MIB, 0.04


def _measured_device(allocated_gib: float, world: int) -> float:
    return allocated_gib * GIB * (1 + RESERVE) + CONTEXT + (NCCL if world > 1 else 0)


def _frame() -> pd.DataFrame:
    rows = []
    # calibration rows: (measured allocated GiB, world)
    for alloc, world in ((10, 1), (30, 1), (20, 2), (50, 4)):
        rows.append({"name": f"fit-{alloc}-{world}", "calibration": True, "status": "ran", "world": world,
                     "meas_alloc": alloc * GIB, "meas_device": _measured_device(alloc, world),
                     "pred_alloc": alloc * GIB, "device_err_pct": None})  # fmt: skip
    # check rows: the estimator over-predicts the first one's allocated bytes by 2%
    rows.append({"name": "check-40", "calibration": False, "status": "ran", "world": 1, "meas_alloc": 40 * GIB,
                 "meas_device": _measured_device(40, 1), "pred_alloc": 40.8 * GIB, "device_err_pct": 1.0})  # fmt: skip
    rows.append({"name": "check-25", "calibration": False, "status": "ran", "world": 2, "meas_alloc": 25 * GIB,
                 "meas_device": _measured_device(25, 2), "pred_alloc": 25 * GIB, "device_err_pct": -2.0})  # fmt: skip
    rows.append({"name": "skipped", "calibration": True, "status": "skipped", "world": 4, "meas_alloc": None,
                 "meas_device": None, "pred_alloc": None, "device_err_pct": None})  # fmt: skip
    return pd.DataFrame(rows)


def test_fit_recovers_the_generating_constants():
    # e.g. the (10 GiB, 1 GPU) row: 10 * 1.04 GiB + 600 MiB = 10.4 GiB + 0.5859 GiB above nothing else;
    # four exact equations in three unknowns: least squares must land on the generating values
    constants = fit(_frame())
    assert constants.context_bytes == pytest.approx(CONTEXT, rel=1e-6)
    assert constants.nccl_bytes == pytest.approx(NCCL, rel=1e-6)
    assert constants.reserve_fraction == pytest.approx(RESERVE, rel=1e-6)


def test_check_rows_by_hand():
    checked = check(_frame(), RuntimeConstants(CONTEXT, NCCL, RESERVE)).set_index("name")
    assert list(checked.index) == ["check-40", "check-25"]
    # check-40: predicted 40.8 * 1.04 + 600/1024 = 42.432 + 0.5859 GiB; measured 41.6 + 0.5859 GiB
    #           -> (42.432 - 41.6) / 42.1859375 = 0.832 / 42.1859375 = +1.9722%
    assert checked.loc["check-40", "calibrated_err_pct"] == pytest.approx(100 * 0.832 / 42.1859375, rel=1e-9)
    assert checked.loc["check-40", "constants_err_pct"] == pytest.approx(0.0, abs=1e-9)
    # check-25: exact allocated -> exact device-level peak
    assert checked.loc["check-25", "calibrated_err_pct"] == pytest.approx(0.0, abs=1e-9)


def test_markdown_states_constants_and_held_out_accuracy():
    frame = _frame()
    constants = fit(frame)
    text = markdown(constants, check(frame, constants), fitted_on=4)
    assert "600 MiB per process" in text and "840 MiB per process" in text and "4.00% of peak allocated" in text
    assert "max 2.0%" in text  # the estimator's own device errors of the check rows: |1.0|, |-2.0|


def test_too_few_calibration_rows_is_a_clean_error():
    single_gpu_only = _frame().query("world == 1")
    with pytest.raises(FitplanError, match="both one and several GPUs"):
        fit(single_gpu_only)
