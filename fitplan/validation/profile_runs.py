"""Predicted vs measured on one GPU for targets the validation matrix never listed: tied-embedding
Llamas and the families that became trainable (qwen2 without head_dim, Gemma 2 soft-capping and
sliding window, Gemma 3's text decoder, Mistral), and every other profile at a layer count that
fits one GPU (a copy of its profile with fewer layers, aux layers first, middle and last).

Each job is a fresh `fitplan train --random-weights --synthetic-data` process (a clean CUDA
context and allocator). The script stops starting jobs before `--budget` seconds run out. Every
report lands in OUT/reports/ as it finishes; OUT/profiles.jsonl holds one line per job with the
per-phase comparison (steady state, step >= 2) and the allocator's retries.

    PYTHONUNBUFFERED=1 python -m fitplan.validation.profile_runs --out $OUT --budget 480
    python -m fitplan.validation.profile_runs --out $OUT --jobs "llama-3.1-8b:16384,deepseek-v3@4:2048"

A job is MODEL[@LAYERS]:SEQ[:flag=value...] (flags of `fitplan train`, e.g. micro_batch=2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fitplan.profiles import _packaged_profiles
from fitplan.records import read_measurement
from fitplan.units import GIB

# none of these models is a row of the validation matrix
DEFAULT_JOBS = (
    "llama-3.2-3b:2048", "llama-3.2-1b:4096", "qwen2.5-7b:2048", "mistral-7b-v0.3:2048", "gemma-2-9b:2048",
    "gemma-3-12b:2048",
)
JOB_TIMEOUT_S = 240
MIN_LEFT_S = 75  # a job (load, compile, 3 steps) takes about a minute


@dataclass(frozen=True)
class Job:
    model: str
    layers: int | None
    seq: int
    flags: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> "Job":
        model_part, seq, *flags = text.split(":")
        model, _, layers = model_part.partition("@")
        return cls(model, int(layers) if layers else None, int(seq), tuple(tuple(f.split("=", 1)) for f in flags))

    @property
    def name(self) -> str:
        scaled = f"-l{self.layers}" if self.layers else ""
        extra = "".join(f"-{k}{v}" for k, v in self.flags)
        return f"{self.model}{scaled}-s{self.seq}{extra}"


def scaled_profile(model: str, layers: int, folder: Path) -> Path:
    """A copy of the profile with `layers` decoder layers (per-layer lists cut to match)."""
    values = json.loads((_packaged_profiles() / "models" / f"{model}.json").read_text())
    values["num_hidden_layers"] = layers
    for key, value in values.items():
        if isinstance(value, list) and len(value) > layers and key.endswith("layer_types"):
            values[key] = value[:layers]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}-l{layers}.json"
    path.write_text(json.dumps(values, indent=1))
    return path


def command(job: Job, out: Path, folder: Path) -> list[str]:
    model, extra = job.model, []
    if job.layers:
        model = str(scaled_profile(job.model, job.layers, out / "configs"))
        extra = ["--aux-layers", f"0,{job.layers // 2},{job.layers - 1}"]
    for key, value in job.flags:
        flag = key.replace("_", "-")
        # a switch (--recompute-mlp / --no-recompute-mlp) takes no value
        extra += {"true": [f"--{flag}"], "false": [f"--no-{flag}"]}.get(value.lower(), [f"--{flag}", value])
    return [sys.executable, "-m", "fitplan.cli", "train", "--model", model, "--seq", str(job.seq), "--gpus", "1xH200",
            "--random-weights", "--synthetic-data", "--steps", "3", "--output", str(folder), "--json", *extra]


def run_job(job: Job, out: Path) -> dict:
    folder = out / "reports" / job.name
    start = time.time()
    proc = subprocess.run(command(job, out, folder), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    line = {"model": job.name, "seq": job.seq, "exit": proc.returncode, "wall_s": round(time.time() - start, 1)}
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
    parser.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help="comma-separated MODEL[@LAYERS]:SEQ[:flag=value...]")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    results = []
    for job in map(Job.parse, args.jobs.split(",")):
        if deadline - time.time() < MIN_LEFT_S:
            print(f"skipped {job.name}: budget", flush=True)
            continue
        try:
            result = run_job(job, args.out)
        except subprocess.TimeoutExpired:
            result = {"model": job.name, "seq": job.seq, "exit": "timeout"}
        results.append(result)
        with (args.out / "profiles.jsonl").open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{job.name}: exit {result['exit']}", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
