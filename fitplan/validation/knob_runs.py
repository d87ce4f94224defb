"""Predicted vs measured on one GPU for the optimizer knobs the planner can choose: the AdamW
baseline, `optimizer: adamw-8bit` (torchao's AdamW8bit) and `offload: optimizer`, on the same job.

Each job is a fresh `fitplan train --random-weights --synthetic-data --steps 3` process (as in
fitplan/validation/profile_runs.py); its training output goes to a scratch folder and only its
measurement report is kept: OUT/h200x1-<job>.report.json, re-predicted like
tests/data/gpu/profiles/*.report.json. OUT/knobs.jsonl has one line per job (the per-phase
comparison at steady state and the allocator's retries); the table is printed at the end.
torchao is installed from .whl/ (pip download --no-deps torchao==0.18.0 -d .whl/) when missing.

    PYTHONUNBUFFERED=1 python -m fitplan.validation.knob_runs --out $OUT --budget 230
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fitplan.validation.profile_runs import MIN_LEFT_S, Job, run_job, table

ROOT = Path(__file__).resolve().parents[2]
# The baseline first: the knobs' savings are read against it, measured in the same call. The
# 8-bit job last: its first step also compiles torchao's step once per tensor shape.
DEFAULT_JOBS = (
    "llama-3.2-1b:4096",
    "llama-3.2-1b:4096:offload=optimizer",
    "llama-3.2-1b:4096:optimizer=adamw-8bit",
)


def ensure_wheel(module: str, pattern: str) -> str | None:
    """Install the wheel in .whl/ matching `pattern` (no dependencies, no index) unless `module`
    imports; None when ready, else why not."""
    if importlib.util.find_spec(module) is not None:
        return None
    wheels = sorted((ROOT / ".whl").glob(pattern))
    if not wheels:
        return f"{module} is not installed and no .whl/{pattern} is there to install it from"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheels[-1])],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return f"pip install {wheels[-1].name} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


def keep_report(job: Job, scratch: Path, out: Path) -> Path | None:
    """Copy the job's report.json to OUT under the name the profile reports have."""
    report = scratch / "reports" / job.name / "report.json"
    if not report.is_file():
        return None
    kept = out / f"h200x1-{job.name}.report.json"
    shutil.copyfile(report, kept)
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=230.0, help=f"seconds; no job starts with less than {MIN_LEFT_S} left")
    parser.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help="comma-separated MODEL[@LAYERS]:SEQ[:flag=value...]")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    problem = ensure_wheel("torchao", "torchao-*.whl")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="knob_runs-") as scratch:
        for job in map(Job.parse, args.jobs.split(",")):
            if deadline - time.time() < MIN_LEFT_S:
                print(f"skipped {job.name}: budget", flush=True)
                continue
            try:
                result = run_job(job, Path(scratch))
            except subprocess.TimeoutExpired:
                result = {"model": job.name, "seq": job.seq, "exit": "timeout"}
            kept = keep_report(job, Path(scratch), args.out)
            result["report"] = kept.name if kept else None
            results.append(result)
            with (args.out / "knobs.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{job.name}: exit {result['exit']} in {result.get('wall_s', '-')} s", flush=True)
            shutil.rmtree(Path(scratch) / "reports" / job.name, ignore_errors=True)  # checkpoints: GBs
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
