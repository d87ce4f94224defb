"""Precision recipes (RunSpec.precision), AdamW, clipping and the cosine schedule.

| recipe        | draft params | grads | optimizer state                                   | B/param |
| mixed         | bf16         | fp32  | fp32 master + fp32 moments, made at the start     | 18 |
| fp32-autocast | fp32         | fp32  | fp32 moments; autocast caches one bf16 weight copy through forward and backward | 16 + 2 |
| bf16-master   | bf16         | bf16  | fp32 master + fp32 moments made in the first step, an fp32 grad copy during it | 16 + 4 |
| bf16          | bf16         | bf16  | bf16 moments (torch AdamW takes the param dtype)  | 8 |

In `mixed` each bf16 gradient is added to its master's fp32 gradient as soon as autograd has
accumulated it, and freed: the fp32 gradients are the only ones that stay.
"""

from __future__ import annotations

import contextlib
import math

import torch

BF16_PARAM_RECIPES = ("mixed", "bf16-master", "bf16")
MASTER_RECIPES = ("mixed", "bf16-master")
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.0


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision in BF16_PARAM_RECIPES else torch.float32


def autocast(precision: str, device: torch.device):
    """The forward's autocast region: on for the fp32-parameter recipes only."""
    if precision in BF16_PARAM_RECIPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master copies of bf16 parameters (SpecForge's BF16Optimizer recipe).

    The masters are made inside the first step (like Adam's moments), so step 1's forward and
    backward run without them. At each step the bf16 grads are copied to fp32, the masters are
    updated, and the result is rounded back into the bf16 parameters.
    """

    def __init__(self, params, lr: float, fp32_grads: bool = False):
        self.model_params = list(params)
        super().__init__(self.model_params, {"lr": lr})
        self.masters: list[torch.Tensor] = []
        self.inner: torch.optim.AdamW | None = None
        self.fp32_grads = fp32_grads
        if fp32_grads:
            self._make_masters()
            for p, master in zip(self.model_params, self.masters):
                p.register_post_accumulate_grad_hook(self._move_grad_to(master))

    @staticmethod
    def _move_grad_to(master: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

    def grad_tensors(self) -> list[torch.Tensor]:
        """The tensors whose .grad the step uses (for clipping)."""
        return self.masters if self.fp32_grads else self.model_params

    def _make_masters(self) -> None:
        self.masters = [p.detach().float() for p in self.model_params]
        self.inner = torch.optim.AdamW(
            self.masters, lr=self.param_groups[0]["lr"], betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True
        )

    @torch.no_grad()
    def step(self, closure=None):
        if self.inner is None:
            self._make_masters()
        self.inner.param_groups[0]["lr"] = self.param_groups[0]["lr"]  # the scheduler sets the outer lr
        if not self.fp32_grads:
            for p, master in zip(self.model_params, self.masters):
                master.grad = p.grad.float() if p.grad is not None else None
        self.inner.step()
        for p, master in zip(self.model_params, self.masters):
            master.grad = None
            p.copy_(master)

    def state_dict(self):
        return {"inner": self.inner.state_dict() if self.inner else None, "masters": list(self.masters),
                "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state):
        self.param_groups[0]["lr"] = state["lr"]
        if state["inner"] is None:
            return
        if self.inner is None:
            self._make_masters()
        with torch.no_grad():
            for master, saved, p in zip(self.masters, state["masters"], self.model_params):
                master.copy_(saved)
                p.copy_(saved)
        self.inner.load_state_dict(state["inner"])


def build_optimizer(params, precision: str, lr: float) -> torch.optim.Optimizer:
    if precision in MASTER_RECIPES:
        return MasterWeightAdamW(params, lr, fp32_grads=precision == "mixed")
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the gradients the optimizer will step with (the fp32 masters' in `mixed`)."""
    holders = optimizer.grad_tensors() if isinstance(optimizer, MasterWeightAdamW) else [
        p for group in optimizer.param_groups for p in group["params"]]
    return float(torch.nn.utils.clip_grad_norm_(holders, max_norm))
