"""The bf16-master optimizer step three ways on the tensors of a real job: whole fp32 masters all
at once, whole masters a parameter at a time (RunSpec optimizer_per_param), and split masters
(RunSpec split_master, trainer/split_master.py): time per step and the step's peak memory.

The step a parameter at a time holds one fp32 gradient copy instead of all of them, at the cost
of one inner optimizer call (and one fused kernel launch) per tensor: nothing for a draft's
dozen tensors, more for an sft model's hundreds. Split masters make no copy at all and step each
tensor in one kernel reading the bf16 gradient. This measures all three on the local device.

    python benchmarks/bench_optimizer_step.py                       # CUDA if present, else CPU
    python benchmarks/bench_optimizer_step.py --jobs llama-3.2-1b:sft,llama-3.1-8b:eagle3 --steps 10
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's fitplan and trainer
    sys.path.insert(0, str(ROOT))

DEFAULT_JOBS = "llama-3.2-1b:sft,llama-3.1-8b:eagle3"


def tensors(model: str, workload: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the tensors fitplan's trainer steps for the job: an sft model's as
    transformers builds it (on the meta device: no memory), the Eagle3 draft's as the
    estimator lists them (trainer/draft.py's thirteen)."""
    import torch

    from fitplan.config import RunSpec
    from fitplan.estimator.eagle3 import draft_parameters
    from fitplan.layout import resolve

    if workload == "sft":
        from transformers import AutoModelForCausalLM

        from trainer.target import hf_config

        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(hf_config(model))
        return [(name, tuple(p.shape)) for name, p in built.named_parameters()]
    job = resolve(RunSpec(model=model, gpus="1xH200", workload=workload, seq=2048))
    return [(name, (numel,)) for name, numel in draft_parameters(job)]


MODES = ("all at once", "per parameter", "split")


def time_steps(shapes, mode: str, steps: int, device) -> tuple[float, int]:
    """(median seconds per step, peak bytes allocated during a step) over `steps` steps of the
    optimizer of `mode` (MODES)."""
    import torch

    from trainer.optim import build_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16, device=device) * 0.02)
              for _, shape in shapes]
    opt = build_optimizer(params, "bf16-master", 1e-4, per_param=mode == "per parameter", split_master=mode == "split")
    seconds = []
    peak = 0
    for i in range(steps + 1):  # the first step makes the masters and moments: not timed
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        if i:
            seconds.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    del opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(seconds)[len(seconds) // 2], peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=DEFAULT_JOBS, help=f"MODEL:WORKLOAD list ({DEFAULT_JOBS})")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (10)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    args = parser.parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"bf16-master optimizer step on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"median of {args.steps} steps")
    print("| job | tensors | parameters | ms all at once / per parameter / split | split / all at once "
          "| peak GiB all at once / per parameter / split |")
    print("|---|---|---|---|---|---|")
    for item in args.jobs.split(","):
        model, _, workload = item.partition(":")
        shapes = tensors(model, workload or "eagle3")
        numel = sum(math.prod(s) for _, s in shapes)
        measured = [time_steps(shapes, mode, args.steps, device) for mode in MODES]
        times = " / ".join(f"{seconds * 1e3:.1f}" for seconds, _ in measured)
        peaks = " / ".join(f"{peak / 2**30:.2f}" for _, peak in measured) if device.type == "cuda" else "-"
        print(f"| {model} {workload} | {len(shapes)} | {numel / 1e9:.2f} B | {times} "
              f"| {measured[2][0] / measured[0][0]:.2f}x | {peaks} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
