"""Record real traces of PyTorch's CUDA caching allocator, for the allocator model's replay test.

Each workload runs in its own process, so it starts with an empty allocator and its
PYTORCH_CUDA_ALLOC_CONF is read at CUDA start: a fixed sequence of mixed small / mid / large
tensors under a per-process memory cap (set_per_process_memory_fraction) that forces cache flushes,
retries and an OOM (caught), with default settings, expandable segments and max_split_size; and a
few steps of a tiny bf16 MLP with AdamW, with and without expandable segments. Recording keeps no
stack traces, so each gzipped snapshot stays small.

OUT gets one <workload>.pickle.gz per workload (torch.cuda.memory._dump_snapshot, gzipped) and
manifest.json (per trace: the cap, device memory, torch version, memory_stats at the end). Each
trace is then replayed through fitplan's allocator model and the differences are printed. Copy
the files to tests/data/allocator/ for tests/test_allocator.py.

    PYTHONUNBUFFERED=1 python -m fitplan.validation.allocator_traces --out $OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from fitplan.allocator.replay import Event
from fitplan.units import MIB

# The cap for the mixed workloads: an odd number of MiB, so no sum of 2 MiB-multiple segments
# lands exactly on it and the byte the fraction's rounding may shave off never matters.
MIXED_CAP = 513 * MIB
MARK = "ALLOCATOR_TRACE_RESULT "
STATS = ("num_alloc_retries", "num_ooms", "reserved_bytes.all.peak", "allocated_bytes.all.peak",
         "reserved_bytes.all.current", "allocated_bytes.all.current", "num_device_alloc", "num_device_free")


class Workload(NamedTuple):
    kind: str  # "mixed" or "train"
    alloc_conf: str
    cap: int | None  # bytes allowed by set_per_process_memory_fraction; None: no cap


WORKLOADS = {
    "a_mixed": Workload("mixed", "", MIXED_CAP),
    "b_mixed_expandable": Workload("mixed", "expandable_segments:True", MIXED_CAP),
    "c_train_step": Workload("train", "", None),
    "d_mixed_max_split": Workload("mixed", "max_split_size_mb:64", MIXED_CAP),
    "e_train_step_expandable": Workload("train", "expandable_segments:True", None),
}


# --- the mixed workload, as plain events (the CPU tests replay the same list) -----------------

class _Plan:
    def __init__(self):
        self.events: list[Event] = []
        self.next_key = 0

    def alloc(self, size: int, stream: int = 0) -> int:
        key, self.next_key = self.next_key, self.next_key + 1
        self.events.append(Event("alloc", key, size, stream))
        return key

    def free(self, *keys: int) -> None:
        self.events.extend(Event("free", key) for key in keys)


def mixed_plan(seed: int = 0) -> list[Event]:
    """Allocations and frees that exercise splitting, the cap, retries, an OOM, two streams and both pools."""
    plan = _Plan()
    plan.free(*[plan.alloc(6 * MIB) for _ in range(12)])  # 4 segments of 20 MiB, 3 blocks each, then all cached
    larges = [plan.alloc(100 * MIB) for _ in range(5)]  # the 5th only fits once the cache is freed
    plan.alloc(600 * MIB)  # more than the cap: an OOM
    plan.free(*larges)
    reuse = plan.alloc(90 * MIB)  # a cached 100 MiB block (split, unless max_split_size forbids it)
    beyond = plan.alloc(150 * MIB)  # frees cached oversize blocks (max_split_size) or the whole cache
    plan.free(reuse, beyond)
    side = [plan.alloc(6 * MIB, stream=1) for _ in range(3)] + [plan.alloc(4000, stream=1) for _ in range(10)]
    plan.free(*side)
    plan.free(*[plan.alloc(6 * MIB) for _ in range(3)])  # the side stream's cached blocks are not reused
    _random_phase(plan, random.Random(seed), small_only=True, steps=300, budget=6 * MIB)
    _random_phase(plan, random.Random(seed + 1), small_only=False, steps=400, budget=350 * MIB)
    return plan.events


def _random_phase(plan: _Plan, rng: random.Random, small_only: bool, steps: int, budget: int) -> None:
    live: dict[int, int] = {}
    for _ in range(steps):
        if live and (rng.random() < 0.4 or sum(live.values()) > budget):
            key = rng.choice(list(live))
            del live[key]
            plan.free(key)
        else:
            size = _random_size(rng, small_only)
            live[plan.alloc(size, stream=int(rng.random() < 0.1))] = size
    plan.free(*live)


def _random_size(rng: random.Random, small_only: bool) -> int:
    draw = 0.0 if small_only else rng.random()
    if draw < 0.4:
        return rng.randint(1, MIB)
    if draw < 0.75:
        return rng.randint(MIB + 1, 10 * MIB)
    return rng.randint(10 * MIB, 120 * MIB)


# --- running a workload on the device (child process) -----------------------------------------

def run_plan(torch, events: list[Event]) -> tuple[int, str]:
    """Allocate uint8 tensors of exactly the planned sizes; the OOMs caught and the first one's message."""
    streams = {0: torch.cuda.current_stream(), 1: torch.cuda.Stream()}
    live, ooms, first = {}, 0, ""
    for event in events:
        if event.op == "alloc":
            try:
                with torch.cuda.stream(streams[event.stream]):
                    live[event.key] = torch.empty(event.size, dtype=torch.uint8, device="cuda")
            except torch.cuda.OutOfMemoryError as exc:
                ooms, first = ooms + 1, first or str(exc)  # its "... allowed" shows the cap torch applied
        else:
            live.pop(event.key, None)  # dropping the last reference frees the block
    return ooms, first


def run_train(torch, steps: int = 3) -> tuple[int, str]:
    """A few steps of a small bf16 MLP stack with AdamW."""
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)]
    model = torch.nn.Sequential(*layers).to(device="cuda", dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        x = torch.randn(8, 512, 1024, device="cuda", dtype=torch.bfloat16)
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return 0, ""


def record(name: str, out: Path, max_entries: int) -> dict:
    import torch

    workload = WORKLOADS[name]
    torch.cuda.init()
    total = torch.cuda.get_device_properties(0).total_memory
    free_at_start, info_total = torch.cuda.mem_get_info()
    row = {"workload": workload.kind, "alloc_conf": workload.alloc_conf, "total_memory": total,
           "mem_get_info_total": info_total, "free_at_start": free_at_start,
           "reserved_before": torch.cuda.memory_reserved(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0), "max_entries": max_entries}
    if workload.cap is not None:
        fraction = workload.cap / total
        torch.cuda.set_per_process_memory_fraction(fraction)
        row.update(fraction=fraction, allowed_bytes=int(fraction * total))  # as setMemoryFraction computes it
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.reset_accumulated_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=max_entries)
    row["ooms_caught"], row["first_oom_message"] = (run_plan(torch, mixed_plan()) if workload.kind == "mixed"
                                                    else run_train(torch))
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    row["memory_stats"] = {key: stats.get(key) for key in STATS}
    row.update(_dump(torch, out, name, max_entries))
    torch.cuda.memory._record_memory_history(enabled=None)
    return row


def _dump(torch, out: Path, name: str, max_entries: int) -> dict:
    raw = out / f".{name}.pickle"
    torch.cuda.memory._dump_snapshot(str(raw))
    snapshot = torch.cuda.memory._snapshot()
    target = out / f"{name}.pickle.gz"
    with open(raw, "rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    entries = sum(len(trace) for trace in snapshot["device_traces"])
    return {"file": target.name, "file_bytes": target.stat().st_size, "entries": entries,
            "ring_buffer_full": entries >= max_entries,
            "allocator_settings": {k: v for k, v in snapshot.get("allocator_settings", {}).items()
                                   if isinstance(v, (bool, int, float, str))}}


# --- the parent: one child per workload, the manifest, the model's replay ---------------------

def run_child(name: str, out: Path, max_entries: int, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    conf = WORKLOADS[name].alloc_conf
    if conf:  # torch < 2.9 reads the first, newer ones prefer the second
        env["PYTORCH_CUDA_ALLOC_CONF"] = env["PYTORCH_ALLOC_CONF"] = conf
    cmd = [sys.executable, "-m", "fitplan.validation.allocator_traces", "--child", name, "--out", str(out),
           "--max-entries", str(max_entries)]
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    print(f"{name}: exit {proc.returncode} in {time.time() - start:.0f}s", flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def check_with_model(out: Path, row: dict) -> None:
    """Print how the allocator model's replay of this trace compares (the CPU test asserts it)."""
    from fitplan.allocator.compare import differences, replay_recorded
    from fitplan.allocator.trace import load_snapshot, read_trace

    trace = read_trace(load_snapshot(out / row["file"]))
    model = replay_recorded(trace, row["free_at_start"] + row["reserved_before"], row.get("allowed_bytes"),
                            row["total_memory"])
    stats = row["memory_stats"]
    print(f"  entries {row['entries']}, {row['file_bytes'] / MIB:.2f} MiB gz, complete {trace.complete}; "
          f"retries {stats['num_alloc_retries']} (model {model.num_alloc_retries}), "
          f"ooms {stats['num_ooms']} (model {model.num_ooms}), peak reserved "
          f"{stats['reserved_bytes.all.peak'] / MIB:.0f} MiB (model {model.peak_reserved / MIB:.0f})", flush=True)
    for line in differences(trace, model) or ["  the model reproduces every segment event"]:
        print(f"  {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the snapshots and manifest.json")
    parser.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), help="record only these workloads")
    parser.add_argument("--max-entries", type=int, default=100_000, help="trace entries kept per workload")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per workload")
    parser.add_argument("--child", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(MARK + json.dumps(record(args.child, args.out, args.max_entries)), flush=True)
        return 0
    return _record_all(args)


def _record_all(args) -> int:
    manifest = {"traces": {}}
    for name in args.only or sorted(WORKLOADS):
        row = run_child(name, args.out, args.max_entries, args.timeout)
        manifest["traces"][f"{name}.pickle.gz"] = row
        (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if "error" in row:
            print(f"  failed: {row['error']}", flush=True)
            continue
        try:
            check_with_model(args.out, row)
        except Exception as exc:  # noqa: BLE001 - the recording is what this run is for; a model bug must not lose it
            print(f"  model replay failed: {exc!r}", flush=True)
    return 0 if all("error" not in row for row in manifest["traces"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
