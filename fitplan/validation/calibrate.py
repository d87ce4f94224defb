"""Fit the runtime constants that cannot be derived, on the calibration rows; check them on the rest.

Device-level peak = allocated + allocator reserve + memory outside the allocator. The part above
the allocated bytes is modelled with three constants:

    measured device peak - measured peak allocated
        = context                   (per process: CUDA context, cuBLAS handles, loaded kernels)
        + nccl * [world > 1]        (NCCL communicators and their buffers)
        + reserve_fraction * allocated   (caching-allocator rounding and fragmentation)

Fitting on *measured* allocated bytes keeps the estimator's allocator-level errors out of the
constants. The check uses what a user gets: the estimator's predicted allocated bytes plus these
constants, against the measured device-level peak, on rows the fit never saw
(`calibration: False` in fitplan/validation/matrix.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fitplan.errors import FitplanError
from fitplan.units import GIB, MIB


@dataclass(frozen=True)
class RuntimeConstants:
    context_bytes: float
    nccl_bytes: float
    reserve_fraction: float

    def device_peak(self, allocated: pd.Series, world: pd.Series) -> pd.Series:
        multi = (world.astype(int) > 1).astype(float)
        return allocated * (1 + self.reserve_fraction) + self.context_bytes + self.nccl_bytes * multi


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    ran = frame[frame["status"] == "ran"]
    return ran.dropna(subset=["meas_alloc", "meas_device"])


def fit(frame: pd.DataFrame) -> RuntimeConstants:
    """Least squares over the calibration rows that ran (they must include one and several GPUs)."""
    rows = _measured(frame[frame["calibration"].astype(bool)])
    multi = (rows["world"].astype(int) > 1).astype(float)
    if len(rows) < 3 or multi.nunique() < 2:
        raise FitplanError(
            f"calibration needs at least 3 measured calibration rows on both one and several GPUs; "
            f"got {len(rows)} ({int(multi.sum())} multi-GPU)"
        )
    # in GiB, so the three columns have comparable scales (bytes would ill-condition the solve)
    allocated = rows["meas_alloc"].astype(float) / GIB
    design = np.column_stack([np.ones(len(rows)), multi, allocated])
    above = rows["meas_device"].astype(float) / GIB - allocated
    (context, nccl, fraction), *_ = np.linalg.lstsq(design, above.to_numpy(), rcond=None)
    return RuntimeConstants(float(context) * GIB, float(nccl) * GIB, float(fraction))


def check(frame: pd.DataFrame, constants: RuntimeConstants) -> pd.DataFrame:
    """Check rows that ran, with the calibrated device-level prediction and its signed % error.

    `calibrated_err_pct` uses the estimator's allocated bytes (what a user would be told);
    `constants_err_pct` uses the measured allocated bytes (the constants' own accuracy).
    """
    rows = _measured(frame[~frame["calibration"].astype(bool)]).copy()
    measured = rows["meas_device"].astype(float)
    for column, allocated in (("calibrated", "pred_alloc"), ("constants", "meas_alloc")):
        predicted = constants.device_peak(pd.to_numeric(rows[allocated], errors="coerce"), rows["world"])
        rows[f"{column}_device"] = predicted
        rows[f"{column}_err_pct"] = 100.0 * (predicted - measured) / measured
    return rows


def markdown(constants: RuntimeConstants, checked: pd.DataFrame, fitted_on: int) -> str:
    def stats(column: str) -> str:
        values = checked[column].dropna()
        if values.empty:
            return "no data"
        under = max(0.0, -values.min())
        return f"median {values.abs().median():.1f}%, max {values.abs().max():.1f}%, max under-prediction {under:.1f}%"

    return "\n".join([
        f"## Runtime constants, fitted on {fitted_on} calibration rows",
        "",
        f"- CUDA context and runtime outside the allocator: {constants.context_bytes / MIB:.0f} MiB per process",
        f"- NCCL communicators and buffers (world > 1): {constants.nccl_bytes / MIB:.0f} MiB per process",
        f"- allocator reserve: {100 * constants.reserve_fraction:.2f}% of peak allocated",
        "",
        f"## Accuracy on {len(checked)} check rows (not used in the fit)",
        "",
        f"- device-level peak, estimator's allocated + fitted constants: {stats('calibrated_err_pct')}",
        f"- device-level peak, measured allocated + fitted constants: {stats('constants_err_pct')}",
        f"- device-level peak, the estimator as it stands: {stats('device_err_pct')}",
    ]) + "\n"  # fmt: skip
