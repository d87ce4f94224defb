"""Precision recipes (RunSpec.precision), AdamW, clipping and the cosine schedule.

| recipe        | draft params | grads | optimizer state                                   | B/param |
| mixed         | bf16         | fp32  | fp32 master + fp32 moments, made at the start     | 18 |
| fp32-autocast | fp32         | fp32  | fp32 moments; autocast caches one bf16 weight copy through forward and backward | 16 + 2 |
| bf16-master   | bf16         | bf16  | fp32 master + fp32 moments made in the first step, an fp32 grad copy during it | 16 + 4 |
| bf16          | bf16         | bf16  | bf16 moments (torch AdamW takes the param dtype)  | 8 |

In `mixed` each bf16 gradient is added to its master's fp32 gradient as soon as autograd has
accumulated it, and freed: the fp32 gradients are the only ones that stay.

In `bf16-master` the grad copy is made one parameter at a time (RunSpec optimizer_per_param,
the default): each bf16 gradient is freed as its fp32 copy is made, so the step holds one copy
beside the gradients not yet stepped instead of every copy beside every gradient. Off, all the
copies are made at once (the "+ 4" of the table).

`optimizer: adamw-8bit` replaces the AdamW (the inner one over the masters in the master
recipes) with torchao's AdamW8bit: 8-bit block-quantized moments, about 2 B/param instead of 8.
`offload: optimizer` keeps the masters and moments in host memory (trainer/offload.py).

`split_master` (bf16-master, AdamW on the GPU; the default there) holds each master as its
bf16 parameter and 16 low bits, stepped from the bf16 gradient by one fused kernel
(trainer/split_master.py): 14 B/param and no grad copy, the master's arithmetic unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from collections.abc import Callable

import torch

from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.layout import splits_master, steps_per_param
from trainer.offload import HostAdamW
from trainer.split_master import SplitMasterAdamW

BF16_PARAM_RECIPES = ("mixed", "bf16-master", "bf16")
MASTER_RECIPES = ("mixed", "bf16-master")
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.0

# (params, lr) -> the optimizer that updates them
InnerFactory = Callable[[list, float], torch.optim.Optimizer]


def adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)


def check_available(optimizer: str) -> None:
    """Refuse, before anything loads, an optimizer whose library this install lacks."""
    if optimizer == "adamw-8bit" and importlib.util.find_spec("torchao") is None:
        raise FitplanError("optimizer adamw-8bit needs torchao, which is not installed "
                           "(pip install 'torchao>=0.18', part of fitplan's train extra)")


def adamw_8bit(params, lr: float) -> torch.optim.Optimizer:
    """torchao's AdamW8bit with the trainer's betas and decay (its defaults differ)."""
    return _float_lr_adamw_8bit()(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)


@functools.cache
def _float_lr_adamw_8bit() -> type:
    # Its optimizer needs none of torchao's C++ extensions, which a CPU torch cannot load (and says so).
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    from torchao.optim import AdamW8bit

    class FloatLRAdamW8bit(AdamW8bit):
        """AdamW8bit keeps lr as a tensor so its compiled step does not recompile at every new
        rate; the scheduler and checkpoint restore write floats. The float stays in
        param_groups and becomes a tensor for the step only.

        Off the GPU the step runs eagerly: the trainer's CPU memory meter is a dispatch mode,
        under which torch.compile cannot trace, and compiling takes seconds per tensor shape."""

        def add_param_group(self, param_group: dict) -> None:
            torch.optim.Optimizer.add_param_group(self, param_group)

        @torch.no_grad()
        def step(self, closure=None):
            rates = [group["lr"] for group in self.param_groups]
            on_gpu = all(p.is_cuda for group in self.param_groups for p in group["params"])
            for group in self.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            try:
                with contextlib.nullcontext() if on_gpu else torch.compiler.set_stance("force_eager"):
                    return super().step(closure)
            finally:
                for group, rate in zip(self.param_groups, rates):
                    group["lr"] = rate

    return FloatLRAdamW8bit


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
    updated, and the result is rounded back into the bf16 parameters: all at once, or with
    `per_param` one parameter at a time (`_step_each`).
    """

    def __init__(self, params, lr: float, fp32_grads: bool = False, inner: InnerFactory = adamw,
                 per_param: bool = False):
        self.model_params = list(params)
        super().__init__(self.model_params, {"lr": lr})
        self.masters: list[torch.Tensor] = []
        self.make_inner = inner
        self.inner: torch.optim.Optimizer | None = None
        self.fp32_grads = fp32_grads
        self.per_param = per_param and not fp32_grads  # `mixed` has no copy to make: its fp32 grads are kept
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
        self.inner = self.make_inner(self.masters, self.param_groups[0]["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        if self.inner is None:
            self._make_masters()
        self.inner.param_groups[0]["lr"] = self.param_groups[0]["lr"]  # the scheduler sets the outer lr
        if self.per_param:
            self._step_each()
        else:
            self._step_all()

    def _step_all(self) -> None:
        if not self.fp32_grads:
            for p, master in zip(self.model_params, self.masters):
                master.grad = p.grad.float() if p.grad is not None else None
        self.inner.step()
        for p, master in zip(self.model_params, self.masters):
            master.grad = None
            p.copy_(master)

    def _step_each(self) -> None:
        """One parameter at a time, smallest first: its fp32 grad copy, its bf16 grad dropped, the
        inner optimizer's step, which takes only the master that has a grad (torch's AdamW and
        torchao's AdamW8bit skip the others, their state and step counts untouched; a master's
        moments are made at its first step, as in one step over all), the copy dropped.

        At the instant of a copy every grad not yet stepped is alive, its own included: 2 R + 4 n
        bytes for a parameter of n elements with R not yet stepped. Smallest first minimises the
        largest of these: of two neighbours a < b, stepping b first gives 2 R + 4 b, above both of
        the instants of a first (2 R + 4 a, then 2 (R - a) + 4 b). fitplan/estimator/param_steps.py
        follows the same order. The bf16 grads are dropped here, before zero_grad.

        The inner group holds the one master while it steps, so a step walks one parameter, not
        all of them for each (an sft model has hundreds)."""
        group = self.inner.param_groups[0]
        everything = group["params"]
        try:
            for i in self._order:
                p, master = self.model_params[i], self.masters[i]
                if p.grad is None:
                    continue
                master.grad = p.grad.float()
                p.grad = None
                group["params"] = [master]
                self.inner.step()
                master.grad = None
                p.copy_(master)
        finally:
            group["params"] = everything

    @functools.cached_property
    def _order(self) -> list[int]:
        # numel of an FSDP2 shard (a DTensor) is the whole parameter's: the same order on every rank
        return sorted(range(len(self.model_params)), key=lambda i: self.model_params[i].numel())

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


def build_optimizer(params, precision: str, lr: float, optimizer: str = "adamw",
                    offload: str = "none", per_param: bool = False, split_master: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer (RunSpec.precision, .optimizer, .offload; `per_param`:
    fitplan.layout.steps_per_param; `split_master`: fitplan.layout.splits_master); fitplan.layout
    refuses the combinations this does not build before anything is loaded."""
    if split_master:
        return SplitMasterAdamW(params, lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    inner = adamw_8bit if optimizer == "adamw-8bit" else adamw
    if offload == "optimizer":
        return HostAdamW(params, lr, inner, master=precision in MASTER_RECIPES, fp32_grads=precision == "mixed")
    if offload != "none":
        raise ValueError(f"offload {offload}: the trainer offloads the optimizer only")
    if precision in MASTER_RECIPES:
        return MasterWeightAdamW(params, lr, fp32_grads=precision == "mixed", inner=inner, per_param=per_param)
    return inner(params, lr)


def job_optimizer(params, spec: RunSpec, lr: float) -> torch.optim.Optimizer:
    """build_optimizer for the job's recipe, optimizer and offload, with the layout's
    resolution of its optimizer switches (one parameter at a time, split masters)."""
    return build_optimizer(params, spec.precision, lr, spec.optimizer, spec.offload,
                           per_param=steps_per_param(spec), split_master=splits_master(spec))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the gradients the optimizer will step with (the fp32 masters' in `mixed`); returns
    the norm before clipping as a device scalar, read after the step is launched so the host does
    not wait for backward to end before launching the optimizer's kernels."""
    if isinstance(optimizer, HostAdamW):  # `mixed`'s fp32 gradients have no tensor on the GPU to hang on
        return optimizer.clip(max_norm)
    holders = optimizer.grad_tensors() if isinstance(optimizer, MasterWeightAdamW) else [
        p for group in optimizer.param_groups for p in group["params"]]
    return torch.nn.utils.clip_grad_norm_(holders, max_norm)
