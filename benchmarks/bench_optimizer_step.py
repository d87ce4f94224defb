"""The bf16-master optimizer step all at once against a parameter at a time (RunSpec
optimizer_per_param), on the tensors of a real job: time per step and the step's peak memory.

The step a parameter at a time holds one fp32 gradient copy instead of all of them, at the cost
of one inner optimizer call (and one fused kernel launch) per tensor: nothing for a draft's
dozen tensors, more for an sft model's hundreds. This measures both on the local device.

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


def time_steps(shapes, per_param: bool, steps: int, device) -> tuple[float, int]:
    """(median seconds per step, peak bytes allocated during a step) over `steps` steps."""
    import torch

    from trainer.optim import MasterWeightAdamW

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16, device=device) * 0.02)
              for _, shape in shapes]
    opt = MasterWeightAdamW(params, 1e-4, per_param=per_param)
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
    print("| job | tensors | parameters | all at once ms | per parameter ms | ratio | peak GiB all / per parameter |")
    print("|---|---|---|---|---|---|---|")
    for item in args.jobs.split(","):
        model, _, workload = item.partition(":")
        shapes = tensors(model, workload or "eagle3")
        numel = sum(math.prod(s) for _, s in shapes)
        together, peak_all = time_steps(shapes, False, args.steps, device)
        each, peak_each = time_steps(shapes, True, args.steps, device)
        peaks = f"{peak_all / 2**30:.2f} / {peak_each / 2**30:.2f}" if device.type == "cuda" else "-"
        print(f"| {model} {workload} | {len(shapes)} | {numel / 1e9:.2f} B | {together * 1e3:.1f} | {each * 1e3:.1f} "
              f"| {each / together:.2f}x | {peaks} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
