"""Tensor parallelism for a frozen HF causal LM (Llama, Qwen3, Qwen3-MoE, gpt-oss).

Megatron-style split inside each decoder layer: q/k/v and the MLP's gate/up projections are
column parallel (each rank owns whole heads and a slice of the intermediate size), o_proj and
down_proj row parallel (one all-reduce per block). HF attention infers the head count from the
projection width (`view(..., -1, head_dim)`), so it runs unchanged on num_heads / tp local heads.

The embedding is split over the vocabulary (a masked lookup plus all-reduce); lm_head is split
over the vocabulary and its output stays LOCAL, [..., V / tp] per rank: collecting the logits
is the caller's choice (trainer.parallel.outputs).

MoE experts are stored by transformers as fused 3-D parameters, which DTensor's Linear styles
cannot split, so each rank keeps its slice of every expert's intermediate size as a plain
tensor and the experts' output is summed over the TP group. The router stays replicated, so
every rank routes each token to the same experts.

Works on a meta-device model too (parallelize first, then `to_empty` and initialize), which is
how a target larger than one GPU is built with random weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from trainer.parallel.context import DistContext, check_tp_for_model

_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROWWISE = ("o_proj", "down_proj")


def parallelize_target(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Split `model` (an HF *ForCausalLM) over ctx's TP group in place; returns it."""
    if ctx.tp == 1:
        return model
    check_tp_for_model(model.config, ctx.tp)
    for layer in model.model.layers:
        parallelize_layer(layer, ctx)
    return parallelize_root(model, ctx)


def parallelize_layer(layer: nn.Module, ctx: DistContext) -> None:
    """Split one decoder layer (a target can be materialized and split layer by layer)."""
    if ctx.tp == 1:
        return
    _parallelize_attention(layer.self_attn, ctx)
    _parallelize_mlp(layer.mlp, ctx)


def parallelize_root(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Split the embedding and lm_head over the vocabulary (after the layers)."""
    if ctx.tp == 1:
        return model
    parallelize_module(
        model,
        ctx.tp_mesh,
        {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=True),
        },
    )
    if getattr(model.config, "tie_word_embeddings", False):
        # Both styles shard the [V, h] weight over the vocabulary (dim 0) alike, but each made its
        # own DTensor: share one again, so a tied target holds its embedding once, as before.
        model.lm_head.weight = model.get_input_embeddings().weight
    return model


def _linear_plan(module: nn.Module) -> dict:
    plan = {}
    for name in _COLWISE + _ROWWISE:
        if isinstance(getattr(module, name, None), nn.Linear):
            plan[name] = ColwiseParallel() if name in _COLWISE else RowwiseParallel()
    return plan


def _parallelize_attention(attn: nn.Module, ctx: DistContext) -> None:
    parallelize_module(attn, ctx.tp_mesh, _linear_plan(attn))
    if isinstance(getattr(attn, "sinks", None), nn.Parameter):  # gpt-oss: one sink logit per head
        _keep_slice(attn, "sinks", 0, ctx)


def _parallelize_mlp(mlp: nn.Module, ctx: DistContext) -> None:
    experts = getattr(mlp, "experts", None)
    if experts is None:
        parallelize_module(mlp, ctx.tp_mesh, _linear_plan(mlp))
        return
    _shard_experts(experts, ctx)


def _shard_experts(experts: nn.Module, ctx: DistContext) -> None:
    """Keep this rank's slice of every expert's intermediate dimension; sum outputs over TP."""
    kind = type(experts).__name__
    if kind == "GptOssExperts":
        # gate_up_proj [E, H, 2I] interleaves gate and up columns: contiguous chunks keep the pairs.
        _keep_slice(experts, "gate_up_proj", -1, ctx)
        _keep_slice(experts, "gate_up_proj_bias", -1, ctx)
        _keep_slice(experts, "down_proj", 1, ctx)
        if ctx.tp_rank != 0:
            experts.register_forward_pre_hook(_drop_down_bias)
    else:
        # Qwen3-MoE layout: gate_up_proj [E, 2I, H] = gate rows then up rows; down_proj [E, H, I].
        _keep_packed_slice(experts, "gate_up_proj", -2, ctx)
        _keep_slice(experts, "down_proj", -1, ctx)
    experts.register_forward_hook(_sum_over_tp(ctx))


def _drop_down_bias(module: nn.Module, args) -> None:
    """Each rank adds down_proj_bias before the TP sum; only rank 0 may, or it counts tp times.

    Zeroed at every forward (it is [E, H], cheap) so that weights initialized or loaded after
    parallelize_target are handled too.
    """
    module.down_proj_bias.data.zero_()


def _sum_over_tp(ctx: DistContext):
    group = ctx.tp_group

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    return hook


def _slice(tensor: torch.Tensor, dim: int, ctx: DistContext) -> torch.Tensor:
    return tensor.chunk(ctx.tp, dim=dim)[ctx.tp_rank]


def _keep_slice(module: nn.Module, name: str, dim: int, ctx: DistContext) -> None:
    full = getattr(module, name)
    setattr(module, name, nn.Parameter(_slice(full.data, dim, ctx).clone(), requires_grad=full.requires_grad))


def _keep_packed_slice(module: nn.Module, name: str, dim: int, ctx: DistContext) -> None:
    """[gate; up] packed along `dim`: slice each half, then pack the slices again."""
    full = getattr(module, name)
    gate, up = full.data.chunk(2, dim=dim)
    local = torch.cat([_slice(gate, dim, ctx), _slice(up, dim, ctx)], dim=dim)
    setattr(module, name, nn.Parameter(local, requires_grad=full.requires_grad))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a TP-split parameter (a collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
