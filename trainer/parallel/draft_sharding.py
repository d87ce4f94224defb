"""The draft is data parallel over every rank, its parameters sharded with FSDP2 `fully_shard`.

"zero2": parameters stay gathered from forward to backward (reshard_after_forward=False),
gradients and optimizer state are sharded. "zero3": parameters are resharded after forward
and gathered again in backward. An optimizer built on the sharded module holds DTensor state,
so its moments are sharded with the parameters: build the optimizer after `shard_draft`.

Each child that holds parameters (each element of a ModuleList) is its own FSDP unit, so
zero3 frees one block's gathered weights before the next is gathered; the root unit takes
whatever parameters remain, except a frozen embedding shared with the target (left whole).
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fitplan.errors import FitplanError
from trainer.parallel.context import DistContext

RESHARD_AFTER_FORWARD = {"zero2": False, "zero3": True}
FSDP_SHARDINGS = tuple(RESHARD_AFTER_FORWARD)


def shard_draft(
    draft: nn.Module, ctx: DistContext, sharding: str, mp_policy: Optional[MixedPrecisionPolicy] = None
) -> nn.Module:
    if sharding not in RESHARD_AFTER_FORWARD:
        raise FitplanError(
            f"draft sharding {sharding!r} is not available with FSDP2; accepted: {', '.join(RESHARD_AFTER_FORWARD)}"
        )
    if not ctx.distributed:
        return draft
    options = dict(mesh=ctx.draft_mesh, reshard_after_forward=RESHARD_AFTER_FORWARD[sharding])
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for unit in _units(draft):
        fully_shard(unit, **options)
    fully_shard(draft, ignored_params=_shared(draft), **options)
    return draft


def _shared(draft: nn.Module) -> set[nn.Parameter]:
    """A frozen embedding that is the target's own tensor stays whole and out of FSDP's hands:
    sharding it would add a shard beside the target's full copy, not remove one."""
    return {draft.embed_tokens.weight} if getattr(draft, "shares_embedding", False) else set()


def _units(draft: nn.Module) -> list:
    """Each child with parameters is a unit. With fused norms the final norm and the lm_head are
    one: the fused head uses the norm's weight inside the lm_head's call, where only that unit's
    parameters are gathered (and its gradient reduced)."""
    units = []
    shared = _shared(draft)
    for child in draft.children():
        members = list(child) if isinstance(child, nn.ModuleList) else [child]
        units.extend(m for m in members if any(p not in shared for p in m.parameters()))
    if getattr(draft, "fused_norms", False):
        units = [u for u in units if u is not draft.norm and u is not draft.lm_head] + [[draft.norm, draft.lm_head]]
    return units


def set_micro_step(draft: nn.Module, final: bool) -> None:
    """Gradient accumulation: reduce-scatter gradients only on the last micro-step of a step."""
    if hasattr(draft, "set_requires_gradient_sync"):
        draft.set_requires_gradient_sync(final)
