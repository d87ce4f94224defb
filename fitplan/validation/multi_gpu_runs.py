"""Multi-GPU validation of the trainer: predicted vs measured memory of `fitplan train` under torchrun.

Each config is a fresh `fitplan train --random-weights --synthetic-data` (which launches its own
torchrun workers), so every run starts with a clean CUDA context and allocator. The script
stops itself before `--budget` seconds: a config is skipped when less than 60 s remain. One
JSON line per config goes to OUT/multi.jsonl as soon as it finishes (partial results survive
a timeout): the report's numbers (max over ranks), the estimate, and the step-time model.

    PYTHONUNBUFFERED=1 python -m fitplan.validation.multi_gpu_runs --out $OUT --set x2 --budget 320
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# same columns as the single-GPU table
from fitplan.validation.single_gpu_runs import summary

MIN_LEFT_S = 60
# name: (model, gpus, tp, seq, micro_batch, output_sharding), in priority order
SETS = {
    "x2": [
        (f"qwen3-8b-tp2-b{b}-s{s}-{m}", "qwen3-8b", "2xH200", 2, s, b, m)
        for b, s in ((1, 4096), (1, 8192), (2, 4096)) for m in ("gather", "all-to-all")
    ],
    "x4": [
        (f"gpt-oss-120b-tp4-b1-s4096-{m}", "gpt-oss-120b", "4xH200", 4, 4096, 1, m) for m in ("gather", "all-to-all")
    ] + [(f"qwen3-8b-tp4-b1-s8192-{m}", "qwen3-8b", "4xH200", 4, 8192, 1, m) for m in ("gather", "all-to-all")],
}


def command(model, gpus, tp, seq, micro_batch, mode, steps, folder, extra) -> list[str]:
    return [sys.executable, "-m", "fitplan.cli", "train", "--model", model, "--gpus", gpus, "--tp", str(tp),
            "--seq", str(seq), "--micro-batch", str(micro_batch), "--output-sharding", mode, "--random-weights",
            "--synthetic-data", "--steps", str(steps), "--output", str(folder), "--json", *extra]


def run_one(cmd: list[str], timeout: float) -> tuple[int, float, str]:
    """Run in its own session so a timeout kills torchrun and every worker with it."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, time.time() - start, out
    return proc.returncode, time.time() - start, out


def reports(folder: Path) -> list[dict]:
    """report.json (rank 0, all ranks folded) or, after an OOM, each failing rank's own report."""
    paths = [folder / "report.json"] if (folder / "report.json").is_file() else sorted(folder.glob("report-rank*.json"))
    return [json.loads(p.read_text()) for p in paths]


def step_time_prediction(config: dict) -> dict:
    from fitplan.config import spec_from_mapping
    from fitplan.layout import resolve
    from fitplan.steptime import step_time

    return step_time(resolve(spec_from_mapping(config))).to_json()


def row(name: str, report: dict) -> dict:
    steps = report["steps"]
    out = {"run": name, **summary(name, report), "oom": report.get("oom"), "imbalanced": report.get("imbalanced"),
           "first_step_s": steps[0]["seconds"] if steps else None, "world": report.get("world")}
    steady = steps[1:]
    if steady:
        out["steady_step_s"] = sum(s["seconds"] for s in steady) / len(steady)
    out["steptime_pred"] = step_time_prediction(report["config"])
    if steady:
        out["steptime_err_pct"] = 100 * (out["steady_step_s"] - out["steptime_pred"]["step_time_s"]) / out["steptime_pred"]["step_time_s"]
    pred = report.get("prediction") or {}
    out["pred_fits"] = pred.get("fits")
    out["pred_largest"] = [pred.get("largest_allocation"), pred.get("largest_allocation_bytes")]
    out["pred_peak_phase"] = pred.get("peak_phase")
    out["comparison"] = report.get("comparison")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", choices=list(SETS), required=True)
    ap.add_argument("--budget", type=float, default=320, help="seconds for the whole script")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/fitplan-multi-runs"))
    ap.add_argument("--model", help="replace every config's model (a CPU dry run with a tiny config)")
    ap.add_argument("--extra", default="", help="more `fitplan train` flags, space separated; later flags win")
    args = ap.parse_args()
    deadline = time.time() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "multi.jsonl"
    for name, model, gpus, tp, seq, micro_batch, mode in SETS[args.set]:
        left = deadline - time.time()
        if left < MIN_LEFT_S:
            print(f"{name}: skipped, {left:.0f}s left", flush=True)
            continue
        folder = args.scratch / name
        shutil.rmtree(folder, ignore_errors=True)
        cmd = command(args.model or model, gpus, tp, seq, micro_batch, mode, args.steps, folder, args.extra.split())
        rc, seconds, log = run_one(cmd, left - 10)
        print(f"{name}: exit {rc} in {seconds:.0f}s", flush=True)
        found = reports(folder)
        record = {"run": name, "exit": rc, "wall_s": seconds, "command": " ".join(cmd[1:])}
        if found:
            record.update(row(name, found[0]), ranks_reporting=len(found))
        else:
            record["log_tail"] = log[-4000:]
            print(log[-2000:], flush=True)
        with results.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


if __name__ == "__main__":
    main()
