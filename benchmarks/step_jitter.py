"""Why one step of fitplan's trainer takes longer than the next: per step and phase, on one CUDA
GPU, the GPU time, the host time, Python's garbage collections and the SM clock and power.

Builds the same offline step as benchmarks/vs_specforge.py (its fitplan tool: the trainer's own
objects on random inputs) and runs `--steps` metered steps after `--warmup`, then as many again
with Python's collector frozen (`gc.freeze()`: every object alive so far left out of later
collections), so both halves run in one process on one GPU. For each step: each phase's seconds
by CUDA events, its host seconds, the collections that ran in it (generation, milliseconds), and
the SM clock (MHz) and board power (W) read through NVML at each phase's end.

    python benchmarks/step_jitter.py --shape 1x16384 --steps 8 --out step_jitter.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's trainer and benchmarks
    sys.path.insert(0, str(ROOT))

from benchmarks import vs_specforge  # noqa: E402


class Collections:
    """Python's garbage collections as they happen: (generation, milliseconds) since the last take."""

    def __init__(self):
        self.done, self.started = [], None
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.done.append((info["generation"], (time.perf_counter() - self.started) * 1e3))
            self.started = None

    def take(self) -> list[tuple[int, float]]:
        done, self.done = self.done, []
        return done


def run_steps(step_fn, device, count: int, collections: Collections) -> list[dict]:
    import torch

    records = []
    for _ in range(count):
        phases = {}

        def phase(name, phases=phases):
            return _Phase(name, phases, device, collections)

        torch.cuda.synchronize(device)
        collections.take()
        step_fn(phase)
        torch.cuda.synchronize(device)
        records.append({"phases": phases, "seconds": sum(p["gpu_s"] for p in phases.values())})
    return records


class _Phase:
    """A context manager timing one phase (GPU by events after a synchronization, host by clock)."""

    def __init__(self, name, phases, device, collections):
        self.name, self.phases, self.device, self.collections = name, phases, device, collections

    def __enter__(self):
        import torch

        torch.cuda.synchronize(self.device)
        self.collections.take()
        self.host = time.perf_counter()
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record()

    def __exit__(self, *exc):
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record()
        host = time.perf_counter() - self.host
        reading = vs_specforge.gpu_reading(self.device)  # before the sync: the GPU still busy
        torch.cuda.synchronize(self.device)
        self.phases[self.name] = {"gpu_s": self.start.elapsed_time(end) / 1e3, "host_s": host,
                                  "gc": self.collections.take(), **reading}
        return False


def table(halves: dict[str, list[dict]]) -> str:
    names = list(next(iter(halves.values()))[0]["phases"])
    lines = ["| collector | step | step s | " + " | ".join(f"{n} s" for n in names) + " | collections (gen: ms) | SM MHz | W |",
             "|---" * (len(names) + 6) + "|"]
    for label, records in halves.items():
        for i, r in enumerate(records):
            ph = r["phases"].values()
            gcs = ", ".join(f"{g}: {ms:.1f}" for p in ph for g, ms in p["gc"]) or "-"
            mhz = "/".join(str(p.get("sm_mhz", "-")) for p in ph)
            watts = "/".join(f"{p['watts']:.0f}" if "watts" in p else "-" for p in ph)
            cells = " | ".join(f"{p['gpu_s']:.4f}" for p in ph)
            lines.append(f"| {label} | {i} | {r['seconds']:.4f} | {cells} | {gcs} | {mhz} | {watts} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1x16384", help="BxS")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="metered steps per half (collector as is, then frozen)")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("step_jitter: needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    # the schedule spans both halves, as vs_specforge.py's spans its warm-up and timed steps
    bench = vs_specforge.parser().parse_args(["--shapes", args.shape, "--warmup", str(args.warmup),
                                              "--steps", str(2 * args.steps)])
    (batch, seq), device = bench.shapes[0], torch.device("cuda")
    job = vs_specforge.bench_job(bench, batch, seq)
    torch.manual_seed(bench.seed)
    frozen, inputs = vs_specforge.make_tensors(job, device, bench.seed, bench.assistant_fraction)
    step, _, _ = vs_specforge.build_fitplan(job, frozen, inputs, device, bench)
    frozen.clear()
    collections = Collections()
    run_steps(step, device, args.warmup, collections)
    halves = {"as is": run_steps(step, device, args.steps, collections)}
    gc.freeze()
    halves["frozen"] = run_steps(step, device, args.steps, collections)
    print(table(halves))
    for label, records in halves.items():
        print(f"{label}: median step {statistics.median(r['seconds'] for r in records):.4f} s")
    if args.out:
        args.out.write_text(json.dumps({"shape": args.shape, "device": torch.cuda.get_device_name(),
                                        "torch": torch.__version__, "halves": halves}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
