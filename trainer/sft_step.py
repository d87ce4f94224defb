"""A plain transformers fine-tuning job, measured phase by phase: the sft rows of `fitplan validate`.

This is deliberately NOT our trainer: it is the job most users run (AutoModelForCausalLM with
random weights, SDPA or flex attention where the model has no SDPA path, the model's own loss on
`labels`, torch.optim.AdamW), so that comparing it with `fitplan.estimator` shows whether the
memory anatomy holds for code we did not write. The precision recipes, `optimizer: adamw-8bit`
and `offload: optimizer` are the trainer's own (trainer/optim.py).

    python -m trainer.sft_step --config row.yaml --steps 3 --report report.json
    torchrun --nproc-per-node 4 -m trainer.sft_step --config row.yaml --report report.json

`--config` is a RunSpec YAML (or a plan file). Under torchrun, sharding zero2/zero3 applies FSDP2
`fully_shard` to every decoder layer and then the root (zero3 reshards after forward).
Each phase (load, forward, backward, optimizer_step) of steps 1..N is measured on CUDA with
max_memory_allocated / max_memory_reserved after reset_peak_memory_stats at the phase start, and
`device_used` = total - free at the phase end; on CPU only wall times and the loss are reported.
The report is fitplan's measurement record (fitplan/records.py) plus the estimator's prediction;
the job's rules and the distributed setup are the trainer's (fitplan.layout, trainer.parallel).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fitplan.config import RunSpec, load_spec
from fitplan.errors import FitplanError
from fitplan.layout import resolve
from fitplan.records import write_measurement
from trainer.measure import Meter
from trainer.parallel import DistContext, init_distributed
from trainer.target import hf_config
from trainer.optim import MASTER_RECIPES, autocast, job_optimizer, param_dtype

# ---------------------------------------------------------------- model, sharding, optimizer


def build_model(spec: RunSpec, device: torch.device) -> torch.nn.Module:
    """Random weights created directly on the device (no CPU copy, no download)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(spec.model)
    with device:
        model = AutoModelForCausalLM.from_config(
            config, dtype=param_dtype(spec.precision), attn_implementation=attention_kernel(config, device)
        )
    if spec.ac:
        enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    return model


def attention_kernel(config, device: torch.device) -> str:
    """SDPA where the model class takes it; otherwise (gpt-oss: its attention sinks) flex attention.

    Both are fused (no [S, S] scores kept for backward), which is what the estimator's sft terms
    assume. torch has no flex backward on CPU, so there those models run eager.
    """
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    if getattr(model_class, "_supports_sdpa", False):
        return "sdpa"
    return "flex_attention" if device.type == "cuda" else "eager"


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every decoder layer (non-reentrant); newer transformers renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard(model: torch.nn.Module, spec: RunSpec, ranks: DistContext) -> None:
    """FSDP2 per decoder layer, then the root (embedding, final norm, lm_head) as its own unit."""
    if ranks.world == 1:
        return
    from torch.distributed.fsdp import fully_shard

    reshard = spec.sharding == "zero3"
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)


def build_optimizer(model: torch.nn.Module, spec: RunSpec, device: torch.device, lr: float = 1e-5):
    """The recipes of trainer/optim.py with the job's optimizer and offload; plain AdamW is the
    fused kernel users run on GPUs (torch's defaults otherwise, as users call it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.precision in MASTER_RECIPES or spec.optimizer != "adamw" or spec.offload != "none":
        return job_optimizer(params, spec, lr)
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")


def max_over_ranks(phases: dict[str, dict[str, Any]], ranks: DistContext) -> dict[str, dict[str, Any]]:
    """The busiest rank's figure for each phase and field (what decides an OOM)."""
    if ranks.world == 1:
        return phases
    every: list[dict] = [None] * ranks.world  # type: ignore[list-item]
    torch.distributed.all_gather_object(every, phases)
    return {name: {k: max(r[name][k] for r in every) for k in phases[name]} for name in phases}


def prediction(spec: RunSpec) -> dict[str, Any]:
    from fitplan.estimator import estimate_spec

    return estimate_spec(spec).to_json()


# ---------------------------------------------------------------- the job


def synthetic_batch(spec: RunSpec, vocab: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Random tokens of exactly `seq` per sample: every step has the same, largest shape."""
    return torch.randint(0, vocab, (spec.micro_batch, spec.seq), device=device, generator=generator)


def run(spec: RunSpec, steps: int, ranks: DistContext) -> dict[str, Any]:
    """Train `steps` steps; returns the report. A CUDA OOM ends the run with an `oom` entry."""
    report: dict[str, Any] = {
        "config": spec.to_dict(),
        "workload": "sft",
        "world": ranks.world,
        "device": torch.cuda.get_device_name(ranks.device) if ranks.device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "steps": [],
    }
    where = {"step": 1, "phase": "load"}  # how far the run got, for the OOM entry
    try:
        with Meter(ranks.device) as meter:
            train(spec, steps, ranks, meter, report, where)
    except torch.OutOfMemoryError as exc:
        report["oom"] = {**where, "rank": ranks.rank, "message": str(exc).splitlines()[0]}
    return report


def train(spec: RunSpec, steps: int, ranks: DistContext, meter: Meter, report: dict, where: dict) -> None:
    """The load phase goes to report["load"], each step to report["steps"] (the trainer's layout)."""
    accum = spec.accum or 1
    with meter.phase("load"):
        model = build_model(spec, ranks.device)
        shard(model, spec, ranks)
        optimizer = build_optimizer(model, spec, ranks.device)
        generator = torch.Generator(ranks.device).manual_seed(1234 + ranks.rank)
    report["load"] = max_over_ranks(meter.new_step(), ranks)
    for step in range(1, steps + 1):
        where["step"] = step
        start = time.perf_counter()
        total_loss = 0.0
        for _ in range(accum):
            tokens = synthetic_batch(spec, model.config.vocab_size, ranks.device, generator)
            where["phase"] = "forward"
            with meter.phase("forward"), autocast(spec.precision, ranks.device):
                loss = model(input_ids=tokens, labels=tokens).loss / accum
            where["phase"] = "backward"
            with meter.phase("backward"):
                loss.backward()
            total_loss += float(loss.detach())
            del loss  # its graph is gone after backward; don't carry the scalar into the next phase
        where["phase"] = "optimizer_step"
        with meter.phase("optimizer_step"):
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - start
        report["steps"].append(
            {
                "step": step,
                "phases": max_over_ranks(meter.new_step(), ranks),
                "allocator": meter.allocator_events(),
                "loss": total_loss,
                "seconds": seconds,
                "tokens_per_s": spec.micro_batch * spec.seq * accum * ranks.world / seconds,
            }
        )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def report_path(path: Path, ranks: DistContext, oom: bool) -> Path | None:
    """Rank 0 writes the report; a rank that hit an OOM writes its own (the others may hang)."""
    if oom and ranks.rank != 0:
        return path.with_name(f"{path.stem}.rank{ranks.rank}{path.suffix}")
    return path if ranks.rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.sft_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="RunSpec YAML (workload sft) or a plan file")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to run (>= 2 to see steady state)")
    parser.add_argument("--report", required=True, type=Path, help="where to write the JSON report")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.config)
        if spec.workload != "sft":
            raise FitplanError(f"{args.config}: trainer.sft_step runs workload sft, got {spec.workload}")
        resolve(spec)  # the job's rules, as every fitplan command checks them, before loading
        ranks = init_distributed(1, cpu=not torch.cuda.is_available())
    except FitplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run(spec, args.steps, ranks)
    if ranks.rank == 0:
        report["prediction"] = prediction(spec)
    path = report_path(args.report, ranks, "oom" in report)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_measurement(path, report)
    if "oom" in report and ranks.world > 1:
        # the other ranks wait in a collective that will never complete, and a normal exit waits
        # on them in NCCL's teardown (seen on 4 H200s: the job hung until killed); leave now so
        # torchrun sees the failure and stops them
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)
    return 1 if "oom" in report else 0


if __name__ == "__main__":
    sys.exit(main())
