"""Who this process is in a multi-GPU job: rank, TP group, data-parallel group, device.

`init_distributed` reads the variables torchrun sets, checks the layout against the plan
before anything large is loaded, and builds one DeviceMesh ("dp", "tp"): the tp ranks of a
group are neighbours (ranks 0..tp-1 form the first group), so a TP group stays inside a node.
A single process started without torchrun gets a context with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fitplan.errors import FitplanError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    tp: int
    tp_rank: int
    dp: int  # number of TP groups (the target's data-parallel degree)
    dp_rank: int  # which TP group this rank belongs to
    mesh: Optional[DeviceMesh]  # ("dp", "tp"); None when world == 1
    draft_mesh: Optional[DeviceMesh]  # 1-D over all ranks: the draft is data parallel everywhere

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def tp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("tp") if self.mesh is not None else None

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def tp_mesh(self) -> Optional[DeviceMesh]:
        return self.mesh["tp"] if self.mesh is not None else None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def check_tp_for_model(config: Any, tp: int) -> None:
    """Refuse a TP size the model cannot be split by (HF config: heads, KV heads, vocab, MLP).

    Column-parallel q/k/v give each rank whole heads only when tp divides both head counts;
    replicating KV heads (tp > KV heads) is not supported by this layer.
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if tp < 1:
        raise FitplanError(f"tp {tp} must be a positive integer")
    if heads % tp or kv_heads % tp:
        ok = [t for t in range(1, kv_heads + 1) if heads % t == 0 and kv_heads % t == 0]
        raise FitplanError(
            f"tp {tp} must divide the {heads} attention heads and {kv_heads} KV heads; accepted: "
            + ", ".join(map(str, ok))
        )
    if config.vocab_size % tp:
        raise FitplanError(f"tp {tp} does not divide the vocabulary of {config.vocab_size} tokens")
    for name in ("intermediate_size", "moe_intermediate_size"):
        size = getattr(config, name, None)
        if size and size % tp:
            raise FitplanError(f"tp {tp} does not divide {name} {size}")


def _check_layout(world: int, tp: int, plan_world: Optional[int]) -> None:
    if plan_world is not None and plan_world != world:
        raise FitplanError(f"the plan needs {plan_world} ranks but {world} were launched")
    if tp < 1 or world % tp:
        raise FitplanError(f"tp {tp} does not divide the world size {world}; accepted: divisors of {world}")


def _pick_device(local_rank: int, local_world: int, gpus_per_node: Optional[int], cpu: bool) -> tuple[torch.device, str]:
    """CUDA + NCCL when the plan names GPUs or CUDA is there; CPU + gloo when asked or without CUDA."""
    wants_gpu = gpus_per_node is not None
    if cpu or not torch.cuda.is_available():
        if wants_gpu:
            raise FitplanError(f"the plan needs {gpus_per_node} GPUs per node but no CUDA GPU is visible")
        return torch.device("cpu"), "gloo"
    visible = torch.cuda.device_count()
    needed = max(local_world, gpus_per_node or 0)
    if visible < needed:
        raise FitplanError(f"the plan needs {needed} GPUs on this node but only {visible} are visible")
    if local_world > 1 and not dist.is_nccl_available():
        raise FitplanError("this torch build has no NCCL; multi-GPU training needs a CUDA build with NCCL")
    return torch.device("cuda", local_rank), "nccl"


def init_distributed(
    tp: int,
    *,
    plan_world: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    model_config: Any = None,
    cpu: bool = False,
) -> DistContext:
    """Check the layout, then join the process group (if any) and build the ("dp", "tp") mesh.

    plan_world / gpus_per_node come from the plan's cluster; model_config (an HF config) lets
    the TP size be checked against the heads before any weight is loaded. cpu: gloo on the host
    even where CUDA is visible (`fitplan train --device cpu`).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    _check_layout(world, tp, plan_world)
    if model_config is not None:
        check_tp_for_model(model_config, tp)
    device, backend = _pick_device(local_rank, local_world, gpus_per_node, cpu)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dp = world // tp
    if world == 1:
        return DistContext(rank, world, local_rank, device, tp, 0, dp, 0, None, None)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    draft_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_all",))
    return DistContext(
        rank, world, local_rank, device, tp, mesh["tp"].get_local_rank(), dp, mesh["dp"].get_local_rank(),
        mesh, draft_mesh,
    )


def shutdown_distributed() -> None:
    if dist.is_initialized():
        # Every rank reaches the end before any tears down: a rank that destroys its group (or exits,
        # taking rank 0's store with it) while a peer is still in a collective aborts that peer
        # ("Connection closed by peer", or gloo's "terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
