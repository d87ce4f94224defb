"""Predicted vs measured on one GPU for targets the validation matrix never listed: tied-embedding
Llamas and the families that became trainable (qwen2 without head_dim, Gemma 2 soft-capping and
sliding window, Gemma 3's text decoder, Mistral).

Each job is a fresh `fitplan train --random-weights --synthetic-data` process (a clean CUDA
context and allocator). The script stops starting jobs before `--budget` seconds run out. Every
report lands in OUT/reports/ as it finishes; OUT/profiles.jsonl holds one line per job with the
per-phase comparison (steady state, step >= 2) and the allocator's retries.

    PYTHONUNBUFFERED=1 python -m fitplan.validation.profile_runs --out $OUT --budget 480
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fitplan.records import read_measurement
from fitplan.units import GIB

# (model, seq): none of these models is a row of the validation matrix.
JOBS = (
    ("llama-3.2-3b", 2048),
    ("llama-3.2-1b", 4096),
    ("qwen2.5-7b", 2048),
    ("mistral-7b-v0.3", 2048),
    ("gemma-2-9b", 2048),
    ("gemma-3-12b", 2048),
)
JOB_TIMEOUT_S = 240
MIN_LEFT_S = 75  # a job (load, compile, 3 steps) takes about a minute


def run_job(model: str, seq: int, out: Path) -> dict:
    folder = out / "reports" / f"{model}-s{seq}"
    cmd = [sys.executable, "-m", "fitplan.cli", "train", "--model", model, "--seq", str(seq), "--gpus", "1xH200",
           "--random-weights", "--synthetic-data", "--steps", "3", "--output", str(folder), "--json"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    line = {"model": model, "seq": seq, "exit": proc.returncode, "wall_s": round(time.time() - start, 1)}
    measurement = read_measurement(folder / "report.json") if (folder / "report.json").is_file() else None
    if measurement is None:
        return {**line, "error": proc.stderr[-1500:]}
    rows = [r for r in measurement.raw["comparison"] if r["when"] == "steady" or r["phase"] == "load"]
    return {**line, "comparison": rows, "alloc_retries": measurement.alloc_retries, "ooms": measurement.ooms}


def table(results: list[dict]) -> str:
    lines = ["| model | seq | phase | predicted GiB | measured GiB | error |", "|---|---|---|---|---|---|"]
    for r in results:
        if "comparison" not in r:
            lines.append(f"| {r['model']} | {r['seq']} | failed (exit {r['exit']}) | | | |")
            continue
        for row in r["comparison"]:
            pred = "-" if row["predicted"] is None else f"{row['predicted'] / GIB:.2f}"
            err = "-" if row["error_pct"] is None else f"{row['error_pct']:+.1f}%"
            lines.append(f"| {r['model']} | {r['seq']} | {row['phase']} | {pred} | {row['measured'] / GIB:.2f} | {err} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; no job starts with less than 75 left")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    results = []
    for model, seq in JOBS:
        if deadline - time.time() < MIN_LEFT_S:
            print(f"skipped {model} s{seq}: budget", flush=True)
            continue
        try:
            result = run_job(model, seq, args.out)
        except subprocess.TimeoutExpired:
            result = {"model": model, "seq": seq, "exit": "timeout"}
        results.append(result)
        with (args.out / "profiles.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{model} s{seq}: exit {result['exit']}", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
