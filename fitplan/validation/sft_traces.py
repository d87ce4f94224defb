"""Record the caching allocator's trace of one-GPU sft runs (trainer/sft_step.py), to set beside
the sequence the estimator writes for them (fitplan/estimator/sft_events.py).

On the device, each job runs two steps in its own process (an empty allocator) with
torch.cuda.memory._record_memory_history on (no stacks); OUT gets <job>.pickle.gz per job:

    PYTHONUNBUFFERED=1 python -m fitplan.validation.sft_traces --out $OUT

Here (CPU), for each recorded trace: its own peak reserved and the model's replay of it (does the
allocator model reproduce the real segments?), and the estimator's written sequence replayed
(where the two sequences part ways is what sft_events.py gets wrong):

    python -m fitplan.validation.sft_traces --compare DIR
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fitplan.config import RunSpec
from fitplan.units import GIB

# The matrix's one-GPU sft rows whose replayed device level missed by more than 3%, and one it
# got within 1% (docs/allocator.md, "sft"); two steps cover step 1 and the first steady step.
JOBS = {
    "llama-3.1-8b-s4k-b2-ac": RunSpec(model="llama-3.1-8b", gpus="1xH200", workload="sft", seq=4096, micro_batch=2,
                                      ac=True, precision="bf16"),
    "qwen3-8b-s6400-b4-ac": RunSpec(model="qwen3-8b", gpus="1xH200", workload="sft", seq=6400, micro_batch=4,
                                    ac=True, precision="bf16"),
    "qwen3-8b-s8k-b1-ac": RunSpec(model="qwen3-8b", gpus="1xH200", workload="sft", seq=8192, micro_batch=1,
                                  ac=True, precision="bf16"),
    # bf16-master with whole fp32 masters (recorded before masters were split): the optimizer
    # steps a parameter at a time (RunSpec optimizer_per_param), each fp32 gradient copy of its
    # own size; measured after the sequence was written
    "llama-3.2-1b-s4k-b1-master": RunSpec(model="llama-3.2-1b", gpus="1xH200", workload="sft", seq=4096,
                                          micro_batch=1, precision="bf16-master", optimizer_per_param=True,
                                          split_master=False),
}
MAX_ENTRIES = 2_000_000


def record(name: str, out: Path) -> None:
    """One job's two steps with the allocator's history recorded, dumped gzipped."""
    import gzip
    import shutil

    import torch

    from trainer.parallel import init_distributed
    from trainer.sft_step import run

    torch.cuda.init()
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=MAX_ENTRIES)
    report = run(JOBS[name], 2, init_distributed(1, cpu=False))
    raw = out / f".{name}.pickle"
    torch.cuda.memory._dump_snapshot(str(raw))
    with open(raw, "rb") as src, gzip.open(out / f"{name}.pickle.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    print(name, "oom" if "oom" in report else "ran", f"peak reserved {torch.cuda.max_memory_reserved() / GIB:.2f} GiB")


def compare(folder: Path) -> None:
    from fitplan.allocator.compare import differences, replay_recorded
    from fitplan.allocator.trace import load_snapshot, read_trace
    from fitplan.estimator import replayed
    from fitplan.layout import resolve

    for name, spec in JOBS.items():
        path = folder / f"{name}.pickle.gz"
        if not path.exists():
            continue
        job = resolve(spec)
        trace = read_trace(load_snapshot(path))
        model = replay_recorded(trace, replayed.capacity_bytes(job), device_total_bytes=job.cluster.gpu.total_bytes)
        written = replayed.replay_step(job)
        print(f"{name}: recorded peak reserved {trace.peak_reserved / GIB:.2f} GiB; model on the recorded events "
              f"{model.peak_reserved / GIB:.2f} GiB ({'; '.join(differences(trace, model)) or 'same segments'}); "
              f"model on the written events {written.peak_reserved / GIB:.2f} GiB, per phase "
              + ", ".join(f"{label} {peak / GIB:.2f}" for label, _, _, peak in written.phases))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fitplan.validation.sft_traces", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="record every job's trace into this folder (needs a GPU)")
    parser.add_argument("--compare", type=Path, help="a folder of recorded traces to compare with the written ones")
    parser.add_argument("--child", choices=sorted(JOBS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare)
        return 0
    if args.out is None:
        parser.error("give --out (record) or --compare (compare)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        record(args.child, args.out)
        return 0
    for name in JOBS:
        subprocess.run([sys.executable, "-m", "fitplan.validation.sft_traces", "--out", str(args.out), "--child", name],
                       check=False, timeout=900)
    return 0


if __name__ == "__main__":
    sys.exit(main())
