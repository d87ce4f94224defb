"""The bf16-master step a parameter at a time (RunSpec optimizer_per_param; trainer/optim.py
MasterWeightAdamW._step_each): the order the parameters are stepped in and the highest instant.

For each parameter in turn the trainer makes its fp32 gradient copy, drops its bf16 gradient,
steps its master (in step 1 the master's moments are made there) and drops the copy. At the
instant of a copy every gradient not yet stepped is alive, its own included: `2·R + 4·n` bytes for
a parameter of n elements with R elements not yet stepped. The smallest parameter goes first,
which minimises the largest of these instants: of two neighbours a < b, b first gives
`2·R + 4·b`, above both instants of a first (`2·R + 4·a`, then `2·(R - a) + 4·b`), and the same
holds with any cost per element of the step (torchao's 8-bit step adds fp32 buffers of the
parameter's moments). Largest first would put the largest copy beside every gradient.

With FSDP2 the gradients of one unit on a rank are views of that unit's reduce-scatter output
(foreach_reduce), freed only once the last of the unit's parameters has dropped its gradient: a
parameter's `group` is the storage its gradient lives in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stepped:
    """One parameter as the step sees it on a rank, in bytes."""

    elements: int  # the whole parameter's elements, the trainer's order (an FSDP2 shard's numel is the whole's)
    group: str  # the storage its gradient lives in: its own, or its FSDP unit's
    grad: int  # its gradient on this rank
    copy: int  # its fp32 gradient copy
    moments: int  # its Adam moments
    step: int = 0  # what its step makes beside the copy (torchao's 8-bit step: fp32 moments)


@dataclass(frozen=True)
class Instant:
    grads: int  # gradients not yet dropped
    copy: int  # the copy being stepped with, and its step's buffers
    moments: int  # moments made by then: all of them but in step 1

    @property
    def total(self) -> int:
        return self.grads + self.copy + self.moments


def order(params: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(name, elements) in the order they are stepped: the smallest first, module order among
    equals (the trainer's stable sort of its parameters by numel)."""
    return sorted(params, key=lambda p: p[1])


def last_of_groups(ordered: list[str], group_of) -> set[str]:
    """The parameters whose step drops the last gradient of their group (its storage is freed)."""
    last = {group_of(name): name for name in ordered}
    return set(last.values())


def peak(params: list[Stepped], first: bool) -> Instant:
    """The highest instant of the step: at a parameter's copy (its gradient still alive), or at
    its step (its gradient dropped, its moments made in step 1, the step's own buffers)."""
    ordered = sorted(params, key=lambda p: p.elements)
    left: dict[str, int] = {}
    group_bytes: dict[str, int] = {}
    for p in ordered:
        left[p.group] = left.get(p.group, 0) + 1
        group_bytes[p.group] = group_bytes.get(p.group, 0) + p.grad
    alive = sum(group_bytes.values())
    made = 0 if first else sum(p.moments for p in ordered)
    best = Instant(alive, 0, made)
    for p in ordered:
        best = max(best, Instant(alive, p.copy, made), key=lambda i: i.total)
        left[p.group] -= 1
        if not left[p.group]:
            alive -= group_bytes[p.group]
        if first:
            made += p.moments
        best = max(best, Instant(alive, p.copy + p.step, made), key=lambda i: i.total)
    return best
