"""A validation row's figures: what the estimator predicts for its job, what a trainer report
measured. The runner, the report and the re-prediction of committed rows all read them here."""

from __future__ import annotations

import statistics
from typing import Any

from fitplan.config import RunSpec
from fitplan.estimator import estimate_spec
from fitplan.layout import resolve
from fitplan.steptime import step_time

IDLE_GPU_MIB = 1024  # a GPU using more than this before a row starts still holds someone's memory


def predict(spec: RunSpec) -> dict[str, Any]:
    """Predicted figures of one row."""
    est = estimate_spec(spec)
    out = {
        "pred_alloc": est.peak_allocated_bytes,
        "pred_device": est.peak_reserved_bytes,
        "pred_reserve": est.allocator_reserve_bytes,
        "pred_outside": est.outside_allocator_bytes,
        "gpu_total": est.gpu_total_bytes,
        "pred_fits": est.fits,
        "pred_verdict": est.verdict.value,
        "estimate": est.to_json(),
    }
    out["pred_step_s"] = step_time(resolve(spec)).step_s
    return out


def measured(report: dict[str, Any]) -> dict[str, Any]:
    """Peaks over every phase of steps >= 2 (steady state) and the median step time."""
    steady = [s for s in report["steps"] if s["step"] >= 2] or report["steps"]
    phases = [p for s in steady for p in s["phases"].values()]
    times = [s["seconds"] for s in steady if s.get("seconds") is not None]
    return {
        "meas_alloc": max(p["allocated"] for p in phases),
        "meas_reserved": max(p["reserved"] for p in phases),
        # device_used at each phase end: the allocator only grows within a run, so the largest
        # phase-end reading is the device-level peak (context and NCCL buffers included)
        "meas_device": max(p["device_used"] for p in phases),
        "meas_step_s": statistics.median(times) if times else None,
        "steps_measured": len(report["steps"]),
    }
