"""The draft's FSDP2 data parallelism as ordered allocations (step_events.py, draft_events.py call it).

trainer/parallel/draft_sharding.py makes each child of the draft that holds parameters an FSDP2
unit (`embed_tokens`, `fc`, `midlayer`, `norm`, `lm_head`; with fused norms `norm` and `lm_head`
are one unit, named `lm_head` here), sharded over every rank. Read off
torch/distributed/fsdp/_fully_shard (FSDPParamGroup.unshard / post_backward, foreach_all_gather,
foreach_reduce), zero2 (reshard_after_forward=False):

- each rank stores a dim-0 shard of every parameter (the estimator counts ceil(n / world) of
  each; FSDP pads dim 0 to a multiple of the world, under 0.1% more for the draft's shapes);
- a unit's first use in forward all-gathers it: the output buffer of the whole unit is made on
  the all-gather copy-in stream (its own pool in the caching allocator), each parameter's
  unsharded tensor on the compute stream (foreach_all_gather_copy_out); zero2 keeps the unit
  gathered through forward. In forward the buffer is not freed once copied out: the comm
  context keeps it (all_gather_state) until the next unit's all-gather has made its own buffer
  (FSDPParamGroup.wait_for_unshard), and the root's post-forward frees the last one. In
  backward (pre_backward) the buffer goes as soon as it is copied out;
- in backward each call of a unit ends in its post_backward: the unit is resharded (its
  unsharded tensors freed), the reduce-scatter input kept since the last post_backward goes,
  this call's unsharded grads are copied into a new reduce-scatter input of the whole unit,
  made on the compute stream (foreach_reduce allocates it before entering the reduce-scatter
  stream), and the reduced shard is made on the reduce-scatter stream: the first one becomes
  the unit's sharded grad, later ones are added to it and go. A unit called again
  (the TTT unroll calls `midlayer`, `norm` and `lm_head` once per step) is gathered again in its
  pre_backward. `fc` (its input needs no grad) and `embed_tokens` (frozen) have no
  post_backward of their own: the root's end-of-backward callback reduces `fc` and reshards
  both;
- the sharded grads live on the reduce-scatter stream until zero_grad.

Left out: prefetching (it moves an all-gather earlier, not its size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitplan.estimator.eagle3 import draft_unit_of as unit_of
from fitplan.estimator.step_trace import State, Trace

ALL_GATHER_STREAM = 1
REDUCE_SCATTER_STREAM = 2

FROZEN_UNIT = "embed_tokens"
# units called once per TTT step, so reduced (and gathered again) once per step in backward
PER_STEP_UNITS = ("lm_head", "norm", "midlayer")


def shard(n: int, world: int) -> int:
    return -(-n // world)


@dataclass
class Sharded:
    """One rank's view of the FSDP draft while the trace is written."""

    world: int
    shards: list[tuple[str, int]]  # trained parameters: (name, elements of this rank's shard)
    gathered: dict[str, list[int]] = field(default_factory=dict)  # unit -> its unsharded tensors
    grads: dict[str, int] = field(default_factory=dict)  # unit -> its sharded grad (reduce-scatter stream)
    rs_input: int | None = None  # the last reduce-scatter input, held until the next one
    kept_buffer: int | None = None  # forward's last all-gather buffer, held by the comm context

    @classmethod
    def of(cls, params: list[tuple[str, int]], world: int) -> Sharded:
        return cls(world, [(name, shard(n, world)) for name, n in params])


def units(state: State) -> dict[str, list[tuple[str, int, int]]]:
    """Unit -> its parameters (name, elements, bytes per element), in module order."""
    out: dict[str, list[tuple[str, int, int]]] = {"fc": [], FROZEN_UNIT: [], "midlayer": [], "norm": [], "lm_head": []}
    if state.trained.frozen:  # a frozen embedding shared with the target is no unit
        out[FROZEN_UNIT].append((FROZEN_UNIT, state.trained.frozen, state.trained.frozen_bytes_per_param))
    for name, n in state.params:
        out[unit_of(name, state.job)].append((name, n, state.recipe.param))
    return out


def gather(t: Trace, state: State, unit: str) -> None:
    """A unit's pre_backward: gathered again unless still unsharded, its buffer freed once copied
    out. The root's post-forward has freed the buffer forward kept."""
    release_forward_buffer(t, state)
    _unshard(t, state, unit, keep_buffer=False)


def _unshard(t: Trace, state: State, unit: str, keep_buffer: bool) -> None:
    """FSDPParamGroup.unshard and wait_for_unshard of one unit: its all-gather buffer, the buffer
    forward kept before it freed, the unsharded tensors; this buffer kept (forward) or freed."""
    sharded = state.sharded
    if unit in sharded.gathered:
        return
    members = units(state)[unit]
    if not members:  # the final norm grouped with the head, or a shared embedding
        return
    buffer = t.alloc(sum(sharded.world * shard(n, sharded.world) * size for _, n, size in members),
                     f"FSDP all-gather {unit}", ALL_GATHER_STREAM)
    if keep_buffer:
        release_forward_buffer(t, state)
    sharded.gathered[unit] = [t.alloc(n * size, f"unsharded {name}") for name, n, size in members]
    if keep_buffer:
        sharded.kept_buffer = buffer
    else:
        t.free(buffer)


def release_forward_buffer(t: Trace, state: State) -> None:
    t.free(state.sharded.kept_buffer)
    state.sharded.kept_buffer = None


def gather_all(t: Trace, state: State) -> None:
    """zero2's forward: each unit gathered at its first use (fc, the embedding, then the layer,
    the final norm and the head of step 0) and kept; the last buffer stays to the forward's end."""
    for unit in ("fc", FROZEN_UNIT, "midlayer", "norm", "lm_head"):
        _unshard(t, state, unit, keep_buffer=True)


def reshard(t: Trace, state: State, unit: str) -> None:
    t.free(*state.sharded.gathered.pop(unit, []))


def post_backward(t: Trace, state: State, unit: str) -> None:
    """FSDPParamGroup.post_backward: reshard, then reduce-scatter this call's unsharded grads."""
    sharded = state.sharded
    names = [name for name, _, _ in units(state)[unit] if name in state.grads]
    reshard(t, state, unit)
    if not names:
        return
    t.free(sharded.rs_input)
    numel = dict(state.params)
    grad = state.recipe.grad
    sharded.rs_input = t.alloc(sum(sharded.world * shard(numel[n], sharded.world) for n in names) * grad,
                               f"FSDP reduce-scatter input {unit}")
    t.free(*(state.grads.pop(n) for n in names))
    reduced = t.alloc(sum(shard(numel[n], sharded.world) for n in names) * grad, f"sharded grad {unit}",
                      REDUCE_SCATTER_STREAM)
    if unit in sharded.grads:
        t.free(reduced)  # added into the unit's sharded grad
    else:
        sharded.grads[unit] = reduced


def end_backward(t: Trace, state: State) -> None:
    """The root's end-of-backward callback: `fc` reduced, every unit still gathered resharded,
    the last reduce-scatter input freed."""
    release_forward_buffer(t, state)
    post_backward(t, state, "fc")
    for unit in list(state.sharded.gathered):
        reshard(t, state, unit)
    t.free(state.sharded.rs_input)
    state.sharded.rs_input = None


def free_grads(t: Trace, state: State) -> None:
    """zero_grad(set_to_none=True): the sharded grads go."""
    t.free(*state.sharded.grads.values())
    state.sharded.grads.clear()
