"""Weight gradients summed across the TTT steps in one buffer per weight (RunSpec.sum_step_grads).

Every TTT step calls the same draft weights. Autograd gives each call's backward a gradient of
its own and adds it into a running sum it keeps for the weight, so from the second step's
backward on a whole [out, in] gradient exists beside that sum until it is added: the draft's
lm_head, 250 MiB for a 4096 x 32000 head, at every step's head backward; gate and up together at
every MLP backward. Here the fused functions of the lean draft (head_loss, norm_project,
lean_ops) add each step's gradient straight into one buffer per weight, and the last of the
steps' backward calls hands it to autograd (the others return None, a zero gradient), so the
weight's gradient arrives once, whole, and nothing weight-sized is made per step.

A `StepGrads` is made for one micro-step's unroll and held by its graph, so an abandoned graph
leaves nothing behind. It counts backward calls, not forward ones: activation checkpointing runs
each step's forward twice (the second to recompute what backward needs) but its backward once.
"""

from __future__ import annotations

import torch


class StepGrads:
    """Per weight name, the sum of its gradient over the `steps` backward calls of one unroll."""

    def __init__(self, steps: int):
        self.steps = steps
        self._totals: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}

    def total(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The running sum to add this call's gradient into (zeros at the first call)."""
        if name not in self._totals:
            self._totals[name] = torch.zeros_like(like)
        return self._totals[name]

    def done(self, name: str) -> torch.Tensor | None:
        """Count this call; the whole sum at the last one, None (no gradient yet) before."""
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] < self.steps:
            return None
        return self._totals.pop(name)


def grad_total(grads: StepGrads | None, name: str, like: torch.Tensor) -> torch.Tensor:
    """Where a call's weight gradient goes: the unroll's sum, or (without one) a tensor of its own."""
    return torch.zeros_like(like) if grads is None else grads.total(name, like)


def grad_result(grads: StepGrads | None, name: str, total: torch.Tensor) -> torch.Tensor | None:
    """What the call returns for the weight: its own gradient, or the sum once every step added."""
    return total if grads is None else grads.done(name)


def add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, in one GEMM when the dtypes agree (fp32 weights under autocast: cast)."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    else:
        total.add_((a @ b).to(total.dtype))
