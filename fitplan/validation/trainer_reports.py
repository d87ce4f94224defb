"""Reports of `fitplan train` (fitplan/validation/single_gpu_runs.py, tests/data/gpu/*.json) as validation rows.

The single-GPU runs of the trainer issues were measured before the matrix runner existed; their
report.json has the same per-step, per-phase readings, the RunSpec (`config`) and the prediction
made at run time. Read as result rows they join the matrix's table and plot. They are marked as
calibration rows: the trainer's allocator reserve and compiled-kernel bytes in
fitplan/estimator/runtime.py were read off these reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fitplan.errors import FitplanError
from fitplan.profiles import load_gpu
from fitplan.records import read_measurement
from fitplan.validation.figures import measured
from fitplan.validation.matrix import KINDS


def kind_of(device: str, world: int) -> str:
    """The matrix device kind of a GPU named as the driver names it, e.g. NVIDIA H100 80GB HBM3."""
    gpu_id = load_gpu(device).id
    for kind, (alias, count) in KINDS.items():
        if load_gpu(alias).id == gpu_id and count == world:
            return kind
    raise FitplanError(f"no device kind for {world} x {device}; known kinds: {', '.join(KINDS)}")


def result_row(path: Path) -> dict[str, Any] | None:
    """One report as a result row; None for a JSON file that is not a trainer report."""
    measurement = read_measurement(path)
    if measurement is None:
        return None
    report, spec, world = measurement.raw, measurement.config, measurement.world
    kind = kind_of(measurement.device, world)
    predicted = measurement.prediction or {}
    row = {
        "name": f"{KINDS[kind][0].lower()}x{world}-{spec.workload}-{path.stem}", "kind": kind,
        "gpu": KINDS[kind][0], "world": world, "workload": spec.workload, "model": spec.model, "seq": spec.seq,
        "micro_batch": spec.micro_batch, "ac": spec.ac, "precision": spec.precision, "sharding": spec.sharding,
        "output_sharding": spec.output_sharding, "tp": spec.tp, "intent": "measure", "calibration": True,
        "config": report["config"], "source": str(path),
        "pred_alloc": predicted.get("peak_allocated_bytes"), "pred_device": predicted.get("peak_reserved_bytes"),
        "pred_fits": predicted.get("fits"), "device_name": report["device"],
    }  # fmt: skip
    if report.get("oom"):
        return {**row, "status": "oom", "observed_fits": False, "reason": f"OOM: {report['oom'].get('message', '')}"[:300]}
    return {**row, "status": "ran", "observed_fits": True, **measured(report)}


def load_reports(folder: Path) -> list[dict[str, Any]]:
    """The trainer reports directly in `folder` (other JSON files there are left out)."""
    paths = sorted(Path(folder).glob("*.json"))
    if not paths:
        raise FitplanError(f"{folder}: no trainer report (*.json of `fitplan train`)")
    return [row for row in map(result_row, paths) if row is not None]
