"""Re-predict the committed single-GPU trainer reports with the current estimator.

Reads tests/data/gpu/*.json (reports of `fitplan train`, fitplan/validation/single_gpu_runs.py), rebuilds each
report's RunSpec from its `config`, estimates it again and prints, per run, the error of the
predicted allocated bytes per phase (measured steady state: the last step) and at the peak, and of
the device level (peak allocated + allocator reserve + outside the allocator against the largest
measured device_used). Error = (measured - predicted) / predicted, as in docs/validation.md.

    .venv/bin/python benchmarks/repredict.py [REPORT.json ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fitplan.estimator import estimate_spec
from fitplan.records import read_measurement, spec_as_committed
from fitplan.units import GIB

REPORTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "gpu"
PHASES = ("target_forward", "draft_forward", "backward", "optimizer_step", "checkpoint")


def _measured_device(report: dict) -> int:
    phases = [report["load"]["load"]] + [m for step in report["steps"] for m in step["phases"].values()]
    return max(m["device_used"] for m in phases)


def _error(measured: int, predicted: int) -> str:
    return f"{100 * (measured - predicted) / predicted:+.1f}%"


def repredict(path: Path) -> list[str] | None:
    measurement = read_measurement(path)
    if measurement is None:  # a multi-GPU collection, not a single-GPU trainer report
        return None
    report = measurement.raw
    est = estimate_spec(spec_as_committed(measurement, path))
    steady = {}
    for step in report["steps"]:
        steady.update(step["phases"])  # the last step that ran each phase
    cells = [_error(steady[p]["allocated"], sum(est.phases[p].values())) for p in PHASES]
    peak = max(m["allocated"] for m in steady.values())
    device = _measured_device(report)
    return [
        path.stem, *cells,
        f"{est.peak_allocated_bytes / GIB:.2f} / {peak / GIB:.2f} ({_error(peak, est.peak_allocated_bytes)})",
        f"{est.peak_reserved_bytes / GIB:.2f} / {device / GIB:.2f} ({_error(device, est.peak_reserved_bytes)})",
    ]


def main(paths: list[str]) -> None:
    table = Table(title="allocated error per phase (steady), peak and device level: predicted / measured GiB")
    for column in ("run", *PHASES, "peak alloc", "device"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for path in sorted(Path(p) for p in paths) if paths else sorted(REPORTS.glob("*.json")):
        row = repredict(path)
        if row:
            table.add_row(*row)
    Console(width=200).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
