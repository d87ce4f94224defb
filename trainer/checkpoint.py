"""Checkpoints in the layout SGLang and vLLM load for Eagle3 drafts, plus the training state.

    OUTPUT/step-000050/config.json          architectures ["LlamaForCausalLMEagle3"], draft_vocab_size
    OUTPUT/step-000050/model.safetensors    draft weights (bf16), embed_tokens, d2t, t2d
    OUTPUT/step-000050/training_state.pt    optimizer, scheduler, data position, RNG, fingerprint

A checkpoint is written into a temporary folder and renamed into place, so a crash never
leaves a half-written step folder; `--resume` takes the newest complete one.

Several ranks (FSDP2-sharded draft): the exported weights are gathered whole onto rank 0's
host, and each rank writes its own shards of the params and optimizer state
(training_state-rankN.pt besides rank 0's training_state.pt) into the same folder, so the
output folder must be shared by all ranks (one node, or a shared file system). A resume needs
the same number of ranks, which the fingerprint (the plan's GPUs) enforces.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from fitplan.errors import FitplanError

STATE = "training_state.pt"


def step_dir(output: Path, step: int) -> Path:
    return output / f"step-{step:06d}"


def export_tensors(draft: torch.nn.Module, distributed: bool = False) -> dict[str, torch.Tensor]:
    """The draft's weights for the export; with several ranks a collective, whole on rank 0 only."""
    out = {}
    for name, t in _full_state_dict(draft, distributed).items():
        t = t.detach().cpu()  # cast on the host: no bf16 copy of fp32 weights on the GPU
        out[name] = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
    return out


def _full_state_dict(draft: torch.nn.Module, distributed: bool) -> dict[str, torch.Tensor]:
    if not distributed:
        return draft.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # gathered one tensor at a time straight to the host: no whole copy of the draft on any GPU
    return get_model_state_dict(draft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@dataclass
class LocalShard:
    """A DTensor as saved: this rank's piece and how to rebuild the DTensor from it."""

    local: torch.Tensor
    placements: tuple
    shape: torch.Size
    stride: tuple


def to_host(value):
    """Nested state with every tensor on the host; DTensors become LocalShards."""
    if isinstance(value, DTensor):
        return LocalShard(value.to_local().detach().cpu(), tuple(value.placements), value.shape, value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def from_host(value, ctx):
    """Undo `to_host`: LocalShards become DTensors on ctx's draft mesh again."""
    if isinstance(value, LocalShard):
        return DTensor.from_local(value.local.to(ctx.device), ctx.draft_mesh, value.placements, run_check=False,
                                  shape=value.shape, stride=value.stride)
    if isinstance(value, dict):
        return {k: from_host(v, ctx) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_host(v, ctx) for v in value)
    return value


def state_file(ctx) -> str:
    rank = ctx.rank if ctx is not None else 0
    return STATE if rank == 0 else f"training_state-rank{rank}.pt"


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output: Path, step: int, draft, optimizer, scheduler, data_position: int, fingerprint: dict,
         ctx=None) -> Path:
    """Write step `step`; with several ranks every rank must call it (collectives inside)."""
    distributed = ctx is not None and ctx.distributed
    lead = not distributed or ctx.rank == 0
    final = step_dir(output, step)
    tmp = output / f".tmp-{final.name}"
    weights = export_tensors(draft, distributed)
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(draft.cfg.to_hf(), indent=2))
        save_file(weights, tmp / "model.safetensors")
    _barrier(distributed)  # the folder exists before the other ranks write into it
    torch.save(
        to_host({
            "step": step,
            "fingerprint": fingerprint,
            "params": {n: p for n, p in draft.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data_position": data_position,
            "rng": rng_state(),
        }),
        tmp / state_file(ctx),
    )
    _barrier(distributed)  # every rank's state is written before the folder counts as complete
    if lead:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    _barrier(distributed)
    return final


def latest(output: Path) -> Path | None:
    done = sorted(p for p in output.glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def resume(output: Path, draft, optimizer, scheduler, fingerprint: dict, ctx=None) -> tuple[int, int]:
    """Restore the newest checkpoint under `output` (this rank's shards); returns (step done, data position)."""
    path = latest(output)
    if path is None:
        raise FitplanError(f"--resume: no checkpoint under {output}")
    own = path / state_file(ctx)
    if not own.is_file():
        raise FitplanError(f"--resume: {own} is missing; the checkpoint was written by fewer ranks")
    state = torch.load(own, weights_only=False)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise FitplanError(f"--resume: {path} was trained with a different config ({', '.join(changed)} differ)")
    if ctx is not None and ctx.distributed:
        state = from_host(state, ctx)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if p.requires_grad:
                p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["data_position"]


def load_export(path: Path, draft: torch.nn.Module) -> None:
    """Load an exported model.safetensors into a draft of the same config (for checks and reuse)."""
    draft.load_state_dict(load_file(path / "model.safetensors"))
