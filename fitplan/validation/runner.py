"""Run matrix rows on the local GPUs, each in a fresh process, and collect one result row each.

    python -m fitplan.validation.runner --kind nvidia-h200 --out $OUT [--rows 'h200x1-sft-*']
    python -m fitplan.validation.runner --rows 'h200x*' --parallel --out $OUT   # on 4 H200s

With --parallel, rows share the machine: a 4-GPU machine runs four 1-GPU rows, or two 2-GPU rows,
side by side, each child seeing only its GPUs (CUDA_VISIBLE_DEVICES).

A row that needs GPUs this machine lacks (none, another kind, fewer) is skipped with the reason.
Results are appended to OUT/rows.jsonl as each row ends, so a run cut short keeps what it
measured; the tables and the plot are rebuilt from that file at the end (fitplan.validation.report).
Eagle3 rows run `fitplan train --plan ... --random-weights --synthetic-data --output DIR`, sft rows
`python -m trainer.sft_step`; rows over several GPUs go through torchrun. This module never
imports torch: the measuring happens in the child processes.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fitplan import records
from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.estimator import estimate_spec
from fitplan.profiles import load_gpu
from fitplan.validation.figures import IDLE_GPU_MIB, measured, predict
from fitplan.validation.matrix import MATRIX, Row, resolve_row, select

STEPS = 3  # steps 1-3: step 1 has no optimizer state yet, steps >= 2 are steady state
ROW_TIMEOUT_S = 300
RESULTS_FILE = "rows.jsonl"


@dataclass(frozen=True)
class LocalGpus:
    name: str  # as the driver names it, e.g. "NVIDIA H100 80GB HBM3"
    count: int


def query_gpus(fields: str) -> list[list[str]]:
    """One row of `fields` per GPU from nvidia-smi (no CUDA context is created); empty without it."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        return []
    return [[value.strip() for value in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def local_gpus() -> LocalGpus:
    """The GPUs of this machine."""
    names = [row[0] for row in query_gpus("name")]
    return LocalGpus(names[0] if names else "", len(names))


IDLE_WAIT_S = 120


def gpu_memory_used_mib() -> dict[int, int]:
    """Memory in use on each GPU by index (empty without nvidia-smi)."""
    return {int(index): int(used) for index, used in query_gpus("index,memory.used")}


def wait_until_idle(gpu_ids: tuple[int, ...] | None, timeout_s: float = IDLE_WAIT_S) -> int:
    """Wait for the row's GPUs to be free of other processes' memory (a previous row's workers can
    still be exiting); returns the most MiB in use on one of them when the row starts, which goes
    into its result: device-level readings are per GPU, so anything left there counts against it."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = gpu_memory_used_mib()
        busiest = max((mib for index, mib in used.items() if gpu_ids is None or index in gpu_ids), default=0)
        if busiest <= IDLE_GPU_MIB or time.monotonic() > deadline:
            return busiest
        time.sleep(2)


def skip_reason(row: Row, gpus: LocalGpus) -> str | None:
    if gpus.count == 0:
        return "no GPU on this machine"
    wanted = load_gpu(row.gpu)
    try:
        here = load_gpu(gpus.name).id
    except FitplanError:
        here = gpus.name
    if here != wanted.id:
        return f"needs {wanted.id}; this machine has {gpus.name}"
    if gpus.count < row.world:
        return f"needs {row.world} GPUs; this machine has {gpus.count}"
    return None


def command(spec: RunSpec, world: int, plan: Path, report: Path) -> list[str]:
    """The child command line: our trainer for eagle3, the plain transformers job for sft."""
    if spec.workload == "sft":
        job = ["-m", "trainer.sft_step", "--config", str(plan), "--steps", str(STEPS), "--report", str(report)]
    else:
        # the trainer writes OUTPUT/report.json (trainer/loop.py), OUTPUT being the row's folder
        job = ["-m", "fitplan.cli", "train", "--plan", str(plan), "--random-weights", "--synthetic-data",
               "--steps", str(STEPS), "--output", str(report.parent)]  # fmt: skip
    if world == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *job]


def write_plan(spec: RunSpec, prediction: dict[str, Any], path: Path) -> None:
    """The plan file of docs/architecture.md: the complete config and what was predicted."""
    records.write_plan(records.Plan(spec, prediction.get("estimate", {})), path)


def child_env(spec: RunSpec) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if spec.expandable_segments:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


@dataclass
class Launched:
    """A row whose child process is running on some of this machine's GPUs."""

    row: Row
    result: dict[str, Any]
    workdir: Path
    child: subprocess.Popen
    gpu_ids: tuple[int, ...]
    started: float


def run_row(row: Row, gpus: LocalGpus, out: Path, timeout_s: float = ROW_TIMEOUT_S) -> dict[str, Any]:
    """One row, start to end, on this machine's GPUs as they are visible."""
    launched = launch(row, gpus, out, gpu_ids=None)
    if isinstance(launched, dict):
        return launched
    try:
        launched.child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    return finish(launched, timeout_s)


def launch(row: Row, gpus: LocalGpus, out: Path, gpu_ids: tuple[int, ...] | None) -> Launched | dict[str, Any]:
    """Start the row's child (on `gpu_ids` only, when given); a skipped row's result instead."""
    result = describe(row)
    reason = skip_reason(row, gpus)
    if reason is not None:
        return {**result, "status": "skipped", "reason": reason}
    try:
        spec = resolve_row(row, estimate_spec)
        result.update(seq=spec.seq, micro_batch=spec.micro_batch, **predict(spec))
    except FitplanError as exc:  # the estimator refuses the row: nothing to compare it with
        return {**result, "status": "skipped", "reason": str(exc)}
    workdir = out / "runs" / row.name
    workdir.mkdir(parents=True, exist_ok=True)
    plan, report = workdir / "plan.yaml", workdir / "report.json"
    write_plan(spec, result, plan)
    env = child_env(spec)
    if gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
        result["gpu_ids"] = list(gpu_ids)
    result["gpu_used_at_start_mib"] = wait_until_idle(gpu_ids)
    child = start_child(command(spec, row.world, plan, report), env, workdir)
    return Launched(row, result, workdir, child, gpu_ids or (), time.monotonic())


def start_child(cmd: list[str], env: dict[str, str], workdir: Path) -> subprocess.Popen:
    """The child writes to workdir/stdout.txt and stderr.txt; it gets its own process group so a
    timeout also ends torchrun's workers."""
    with (workdir / "stdout.txt").open("w") as stdout, (workdir / "stderr.txt").open("w") as stderr:
        return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a child and every process below it. torchrun starts its workers in sessions of
    their own, so killing its process group leaves them alive, holding GPU memory (seen on 4
    H200s: a hung rank kept 81 GiB and spoiled every later row on its GPUs)."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """PIDs below `pid`, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def finish(launched: Launched, timeout_s: float) -> dict[str, Any]:
    """The row's result once its child ended, or after killing it when it ran out of time."""
    timed_out = launched.child.poll() is None
    if timed_out:
        kill_tree(launched.child.pid)
        launched.child.wait()
    result = {**launched.result, "wall_s": round(time.monotonic() - launched.started, 1)}
    prune(launched.workdir)
    stderr = (launched.workdir / "stderr.txt").read_text(errors="replace")
    got = outcome(launched.child.returncode, stderr, launched.workdir)
    if timed_out and got["status"] != "oom":  # a rank that ran out of memory can leave the others hanging
        return {**result, "status": "timeout", "reason": f"no result within {timeout_s:.0f} s"}
    return {**result, **got}


def describe(row: Row) -> dict[str, Any]:
    """The row's identity; a near-limit row's searched knob stays empty until the estimator sets it."""
    s = row.base_spec()
    return {
        "name": row.name, "kind": row.kind, "gpu": row.gpu, "world": row.world, "workload": s.workload,
        "model": s.model, "seq": s.seq, "micro_batch": s.micro_batch, "ac": s.ac, "precision": s.precision,
        "sharding": s.sharding, "output_sharding": s.output_sharding, "tp": s.tp, "intent": row.intent,
        "calibration": row.calibration, **({row.search: None} if row.search else {}),
    }  # fmt: skip


KEEP = ("plan.yaml", "report*.json", "stdout.txt", "stderr.txt")


def prune(workdir: Path) -> None:
    """Drop what a row leaves besides its plan, reports and output (draft checkpoints, memory
    snapshots): gigabytes per row on a machine with a small disk, and OUT travels back."""
    for path in workdir.iterdir():
        if not any(path.match(pattern) for pattern in KEEP):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---------------------------------------------------------------- reading what a child left


def outcome(returncode: int, stderr: str, workdir: Path) -> dict[str, Any]:
    """status ran / oom / failed, and the measured figures at steps >= 2 from the report(s)."""
    reports = [m.raw for p in sorted(workdir.glob("report*.json")) if (m := records.read_measurement(p)) is not None]
    oom = next((r["oom"] for r in reports if r.get("oom")), None)
    if oom is None and "out of memory" in stderr.lower():
        oom = {"message": _last_line(stderr, "out of memory")}
    if oom is not None:
        return {"status": "oom", "observed_fits": False, "reason": f"OOM: {oom.get('message', '')}"[:300]}
    main = next((r for r in reports if r.get("steps")), None)
    if returncode != 0 or main is None:
        return {"status": "failed", "reason": f"exit {returncode}: {_last_line(stderr)}"[:300]}
    return {"status": "ran", "observed_fits": True, "device_name": main.get("device"), **measured(main)}


def _last_line(text: str, containing: str = "") -> str:
    lines = [line.strip() for line in text.splitlines() if containing in line.lower() and line.strip()]
    return lines[-1] if lines else "(no output)"


# ---------------------------------------------------------------- the whole run


def run(rows: list[Row], out: Path, gpus: LocalGpus | None = None, timeout_s: float = ROW_TIMEOUT_S,
        progress: Callable[[dict[str, Any]], None] = lambda result: None, parallel: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Run (or skip) every row, appending each result to OUT/rows.jsonl, then write the report.

    parallel: rows share the machine, each on its own GPUs (CUDA_VISIBLE_DEVICES), widest first
    as GPUs come free; otherwise one row at a time in the order given, on every GPU.
    """
    from fitplan.validation.report import load_results, write_report

    gpus = local_gpus() if gpus is None else gpus
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []

    def record(result: dict[str, Any]) -> None:
        result = {**result, "finished": time.time()}
        with (out / RESULTS_FILE).open("a") as f:
            f.write(json.dumps(result) + "\n")
        progress(result)
        results.append(result)

    if parallel:
        run_packed(rows, out, gpus, timeout_s, record)
    else:
        for row in rows:
            record(run_row(row, gpus, out, timeout_s))
    write_report(load_results(out), out)
    return results


def run_packed(rows: list[Row], out: Path, gpus: LocalGpus, timeout_s: float,
               record: Callable[[dict[str, Any]], None], poll_s: float = 1.0) -> None:  # fmt: skip
    """Start rows, widest first, whenever enough GPUs are free; the next row waits for its GPUs
    (no overtaking, so a 4-GPU row is never starved by 1-GPU rows behind it)."""
    free = list(range(gpus.count))
    pending, running = sorted(rows, key=lambda row: -row.world), []  # stable: given order within a width
    while pending or running:
        while pending and pending[0].world <= len(free):
            row = pending.pop(0)
            gpu_ids, rest = tuple(free[: row.world]), free[row.world :]
            launched = launch(row, gpus, out, gpu_ids)
            if isinstance(launched, dict):
                record(launched)
                continue
            free = rest
            running.append(launched)
        if pending and not running and pending[0].world > len(free):  # more GPUs than the machine has
            record(run_row(pending.pop(0), gpus, out, timeout_s))  # skipped with the reason
            continue
        time.sleep(poll_s)
        for launched in [r for r in running if r.child.poll() is not None or time.monotonic() - r.started > timeout_s]:
            running.remove(launched)
            record(finish(launched, timeout_s))
            free = sorted(free + list(launched.gpu_ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fitplan.validation.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rows.jsonl, runs/ and the report")
    parser.add_argument("--kind", help="only the rows of this device kind, e.g. nvidia-h200-x2")
    parser.add_argument("--rows", help="comma-separated row names or glob patterns")
    parser.add_argument("--timeout", type=float, default=ROW_TIMEOUT_S, help="seconds per row")
    parser.add_argument("--parallel", action="store_true",
                        help="run rows side by side, each on its own GPUs, widest rows first")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        rows = select(MATRIX, args.kind, args.rows.split(",") if args.rows else None)
    except FitplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(rows, args.out, timeout_s=args.timeout, parallel=args.parallel,
        progress=lambda r: print(f"{r['status']:8} {r['name']}  {r.get('reason', '')}", flush=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
