"""How fast is `fitplan estimate`? Whole process (target < 0.5 s) and estimate() (target < 5 ms).

Run: python benchmarks/bench_estimate.py   (results go in docs/benchmarks.md by hand)
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from fitplan.config import RunSpec
from fitplan.estimator import estimate
from fitplan.layout import resolve

CASES = {
    "gpt-oss-120b on 8xH100 (eagle3)": ["--model", "gpt-oss-120b", "--gpus", "8xH100"],
    "llama-3.1-8b sft on 1xH200": ["--model", "llama-3.1-8b", "--gpus", "1xH200", "--workload", "sft",
                                   "--seq", "8192", "--ac", "--precision", "bf16"],
    "qwen3-8b specforge tp 8 (--json)": ["--model", "qwen3-8b", "--gpus", "8xH100", "--tp", "8",
                                         "--runtime", "specforge", "--json"],
    # one GPU with fitplan's trainer: the step is replayed through the allocator model
    "llama-3.1-8b on 1xH200 seq 16384 (replayed)": ["--model", "llama-3.1-8b", "--gpus", "1xH200", "--seq", "16384"],
}
PROCESS_RUNS = 7
FUNCTION_RUNS = 2000


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_seconds(args: list[str]) -> tuple[float, float]:
    """Median (wall, CPU) seconds of the installed console script (python -m as a fallback).

    CPU time (user + sys) is reported beside wall time because wall time on a shared 2-core
    machine moves with whatever else runs."""
    exe = shutil.which("fitplan")
    cmd = [exe, "estimate", *args] if exe else [sys.executable, "-m", "fitplan.cli", "estimate", *args]
    walls, cpus = [], []
    for _ in range(PROCESS_RUNS):
        start, cpu = time.perf_counter(), _children_cpu()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
        cpus.append(_children_cpu() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def function_seconds(args: list[str]) -> tuple[float, float]:
    """(estimate(job) median, resolve + estimate median): the math alone, and with profile lookup."""
    flags = {a[2:].replace("-", "_"): b for a, b in zip(args, args[1:]) if a.startswith("--") and not b.startswith("--")}
    spec = RunSpec(**{k: int(v) if k in ("seq", "tp") else v for k, v in flags.items()},
                   ac="--ac" in args)
    job = resolve(spec)
    times, with_resolve = [], []
    for _ in range(FUNCTION_RUNS):
        start = time.perf_counter()
        estimate(job)
        mid = time.perf_counter()
        estimate(resolve(spec))
        end = time.perf_counter()
        times.append(mid - start)
        with_resolve.append(end - mid)
    return statistics.median(times), statistics.median(with_resolve)


def main() -> None:
    table = Table(title="fitplan estimate timings (median)")
    for col in ("case", "whole process wall (s)", "whole process CPU (s)", "estimate(job) (ms)",
                "resolve + estimate (ms)"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, args in CASES.items():
        fn, fn_resolve = function_seconds(args)
        wall, cpu = process_seconds(args)
        table.add_row(name, f"{wall:.3f}", f"{cpu:.3f}", f"{fn * 1e3:.3f}", f"{fn_resolve * 1e3:.3f}")
    Console().print(table)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    Console().print(f"targets: whole process < 0.5 s, estimate() < 5 ms; python {sys.version.split()[0]}, "
                    f"{os.cpu_count()} CPUs, load average {load}")


if __name__ == "__main__":
    main()
