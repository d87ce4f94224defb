"""Feeding the TP target and handing its outputs back to each rank's draft.

A TP group runs the target once on the micro-batches of all its ranks (as SpecForge does):
`group_batch` stacks them, in tp-rank order, into [tp*B, S]. The target then leaves on every
rank its vocabulary shard of the logits for all tp*B*S rows, [tp*B, S, V/tp], and the aux
hidden states of all rows (replicated: the last row-parallel all-reduce made them whole).
`collect_target_outputs` turns that into this rank's own rows with the full vocabulary:

- "gather": all-gather the vocabulary shards, so every rank holds the full [tp*B*S, V], then
  keep its own rows. This is the tp-fold blowup users run today, kept on purpose as the
  baseline: the returned rows are a view, so the whole gathered tensor stays alive.
  Transient peak: the gathered shards plus their concatenation, 2 * tp*B*S*V elements.
- "all-to-all": one all_to_all_single sends row block j of the local shard to rank j, so each
  rank receives every vocabulary shard of its own B*S rows; peak 2 * B*S*V elements.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fitplan.errors import FitplanError
from trainer.parallel.context import DistContext

MODES = ("gather", "all-to-all")

# torch 2.13 renamed all_gather_into_tensor (now a warning-emitting alias); 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def group_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, ctx: DistContext):
    """[B, S] per rank -> [tp*B, S] per TP group, rank r's samples at rows r*B .. r*B+B-1.

    Every rank of the group must pass the same [B, S] (the data loader pads to one length).
    """
    if ctx.tp == 1:
        return input_ids, attention_mask
    return _all_gather_rows(input_ids, ctx), _all_gather_rows(attention_mask, ctx)


def _all_gather_rows(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    out = tensor.new_empty((ctx.tp * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor.contiguous(), group=ctx.tp_group)
    return out


def collect_target_outputs(
    logits_local: torch.Tensor, aux_hidden: torch.Tensor, ctx: DistContext, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """([tp*B, S, V/tp], [tp*B, S, D]) -> this rank's ([B, S, V], [B, S, D])."""
    if mode not in MODES:
        raise FitplanError(f"output mode {mode!r} is unknown; accepted: {', '.join(MODES)}")
    if ctx.tp == 1:
        return logits_local, aux_hidden
    rows, seq, shard = logits_local.shape
    if rows % ctx.tp:
        raise FitplanError(f"{rows} target rows do not split over tp {ctx.tp}; pass the output of group_batch")
    batch = rows // ctx.tp
    flat = logits_local.reshape(ctx.tp, batch * seq, shard)
    if mode == "gather":
        logits = _gather_then_keep_own_rows(flat, ctx)
    else:
        logits = _all_to_all_own_rows(flat, ctx)
    own_aux = aux_hidden[ctx.tp_rank * batch : (ctx.tp_rank + 1) * batch].clone()
    return logits.view(batch, seq, ctx.tp * shard), own_aux


def _gather_then_keep_own_rows(flat: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    tp, n, shard = flat.shape
    shards = flat.new_empty((tp * tp * n, shard))  # rows j*tp*n.. = vocab shard j of all rows
    _all_gather_single(shards, flat.reshape(tp * n, shard).contiguous(), group=ctx.tp_group)
    full = shards.view(tp, tp * n, shard).permute(1, 0, 2).reshape(tp * n, tp * shard)  # [tp*B*S, V]
    return full[ctx.tp_rank * n : (ctx.tp_rank + 1) * n]


def _all_to_all_own_rows(flat: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    tp, n, shard = flat.shape
    received = torch.empty_like(flat)  # received[j] = vocab shard j of my rows
    dist.all_to_all_single(received, flat.contiguous(), group=ctx.tp_group)
    return received.permute(1, 0, 2).reshape(n, tp * shard)
