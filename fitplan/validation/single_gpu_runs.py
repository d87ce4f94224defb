"""Single-GPU validation: predicted vs measured memory of `fitplan train` on target shapes.

Each run is a fresh `fitplan train --random-weights --synthetic-data` subprocess (a clean CUDA
context and allocator), so device-level numbers are comparable with the estimate. Reports are
copied to OUT/<run>.json and a table is printed: peak allocated and device-level at step >= 2,
predicted and measured, with tokens/s and MFU.

    PYTHONUNBUFFERED=1 python -m fitplan.validation.single_gpu_runs --out $OUT [--only llama-2k-mb1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fitplan.records import read_measurement
from fitplan.units import GIB

# name: (model, seq, micro_batch, ac)
MATRIX = {
    "llama-2k-mb1": ("llama-3.1-8b", 2048, 1, False),
    "llama-2k-mb2": ("llama-3.1-8b", 2048, 2, False),
    "llama-8k-mb1": ("llama-3.1-8b", 8192, 1, False),
    "llama-8k-mb1-ac": ("llama-3.1-8b", 8192, 1, True),
    "qwen3-2k-mb2-ac": ("qwen3-8b", 2048, 2, True),
    "qwen3-8k-mb1": ("qwen3-8b", 8192, 1, False),
    "gptoss-2k-mb1": ("gpt-oss-20b", 2048, 1, False),
}


def run_one(name: str, out: Path, gpus: str, steps: int, scratch: Path) -> dict | None:
    model, seq, micro_batch, ac = MATRIX[name]
    folder = scratch / name
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "fitplan.cli", "train", "--model", model, "--random-weights", "--synthetic-data",
           "--steps", str(steps), "--seq", str(seq), "--micro-batch", str(micro_batch), "--ac" if ac else "--no-ac",
           "--gpus", gpus, "--tp", "1", "--output", str(folder), "--json"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(f"{name}: exit {proc.returncode} in {time.time() - start:.0f}s", flush=True)
    report_path = folder / "report.json"
    if not report_path.is_file():
        print(proc.stderr[-3000:], flush=True)
        return None
    shutil.copy(report_path, out / f"{name}.json")
    return read_measurement(report_path).raw


def summary(name: str, report: dict) -> dict:
    steady = report["steps"][1:] or report["steps"]
    pred = report.get("prediction") or {}
    allocated = max((p["allocated"] for s in steady for p in s["phases"].values()), default=0)
    device = max((p["device_used"] for s in steady for p in s["phases"].values()), default=0)
    row = {
        "run": name,
        "pred_alloc": pred.get("peak_allocated_bytes", 0) / GIB,
        "meas_alloc": allocated / GIB,
        "pred_device": pred.get("peak_reserved_bytes", 0) / GIB,
        "meas_device": device / GIB,
        "tokens_per_s": sum(s["tokens_per_s"] for s in steady) / max(1, len(steady)),
        "mfu": sum((s.get("mfu") or 0) for s in steady) / max(1, len(steady)),
        "oom": report.get("oom", {}).get("phase"),
    }
    row["err_alloc"] = 100 * (row["meas_alloc"] - row["pred_alloc"]) / row["pred_alloc"] if row["pred_alloc"] else None
    row["err_device"] = 100 * (row["meas_device"] - row["pred_device"]) / row["pred_device"] if row["pred_device"] else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", default="1xH100")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=list(MATRIX))
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/fitplan-gpu-runs"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only:
        report = run_one(name, args.out, args.gpus, args.steps, args.scratch)
        if report is not None and report["steps"]:
            rows.append(summary(name, report))
            print(json.dumps(rows[-1]), flush=True)
    header = "| run | pred alloc GiB | meas alloc GiB | err | pred device GiB | meas device GiB | err | tokens/s | MFU |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        fmt = lambda e: "-" if e is None else f"{e:+.1f}%"
        lines.append(f"| {r['run']} | {r['pred_alloc']:.2f} | {r['meas_alloc']:.2f} | {fmt(r['err_alloc'])} | "
                     f"{r['pred_device']:.2f} | {r['meas_device']:.2f} | {fmt(r['err_device'])} | "
                     f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
