"""`offload: optimizer`: the optimizer's state in host memory, on one GPU.

The GPU keeps the recipe's parameters and gradients (trainer/optim.py); the host keeps a copy of
each parameter (the fp32 master in the master recipes, the parameter's own dtype otherwise) with
its gradient and the AdamW moments. A step copies the gradients down into pinned buffers, runs
the AdamW on the CPU over the host copies, and copies the updated parameters back up.

torchao's CPUOffloadOptimizer does this for a plain AdamW, but it steps the parameters in their
own dtype (bf16-master would lose its fp32 masters), keeps tensors under 4096 elements and their
state on the GPU, and its param_groups hold the host copies, whose gradients are still in flight
when the trainer clips them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def _host_like(p: Tensor, dtype: torch.dtype) -> Tensor:
    """A host buffer shaped like `p`; pinned when a GPU is there, so copies to and from it are DMA."""
    return torch.empty(p.shape, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())


class HostAdamW(torch.optim.Optimizer):
    """An optimizer over host copies of `params`, built by `inner(host_copies, lr)`.

    master: the host copies are fp32 (the master recipes), else in the parameters' dtype.
    fp32_grads (`mixed`): each bf16 gradient is added to an fp32 gradient on the GPU as soon as
    autograd has accumulated it, and freed, as MasterWeightAdamW does with its masters.
    """

    def __init__(self, params, lr: float, inner: Callable, master: bool, fp32_grads: bool = False):
        self.model_params = list(params)
        super().__init__(self.model_params, {"lr": lr})
        self.fp32_grads = fp32_grads
        self.fp32_device_grads: list[Tensor | None] = [None] * len(self.model_params)
        grad_dtype = (lambda p: torch.float32) if fp32_grads else (lambda p: p.dtype)
        with torch.no_grad():
            self.host = [_host_like(p, torch.float32 if master else p.dtype).copy_(p) for p in self.model_params]
        self.down = [_host_like(p, grad_dtype(p)) for p in self.model_params]  # where the gradients land
        # the host copies' gradients: the landed ones, or their conversion to fp32
        self.host_grads = [d if d.dtype == h.dtype else torch.empty_like(h) for h, d in zip(self.host, self.down)]
        # a parameter in another dtype than its host copy goes up through a staging buffer
        self.up = [h if h.dtype == p.dtype else _host_like(p, p.dtype) for p, h in zip(self.model_params, self.host)]
        self.inner = inner(self.host, lr)
        if fp32_grads:
            for i, p in enumerate(self.model_params):
                p.register_post_accumulate_grad_hook(self._accumulate_fp32(i))

    def _accumulate_fp32(self, i: int):
        def hook(p: Tensor) -> None:
            if self.fp32_device_grads[i] is None:
                self.fp32_device_grads[i] = p.grad.float()
            else:
                self.fp32_device_grads[i].add_(p.grad)
            p.grad = None

        return hook

    def device_grads(self) -> list[Tensor | None]:
        """The gradients on the GPU that the step copies down (None where a parameter got none)."""
        return list(self.fp32_device_grads) if self.fp32_grads else [p.grad for p in self.model_params]

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_ over the GPU gradients; returns the norm before clipping (a
        device scalar, as trainer/optim.py clip)."""
        grads = [g for g in self.device_grads() if g is not None]
        total = torch.nn.utils.get_total_norm(grads)
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device))
        return total

    @torch.no_grad()
    def step(self, closure=None):
        self.inner.param_groups[0]["lr"] = self.param_groups[0]["lr"]  # the scheduler sets the outer lr
        grads = self.device_grads()
        for g, down in zip(grads, self.down):
            if g is not None:
                down.copy_(g, non_blocking=True)
        self._wait_for_copies()
        for g, host, down, grad in zip(grads, self.host, self.down, self.host_grads):
            if g is not None and grad is not down:
                grad.copy_(down)
            host.grad = None if g is None else grad  # AdamW skips a parameter without one, as on the GPU
        self.inner.step()
        for p, host, up in zip(self.model_params, self.host, self.up):
            if up is not host:
                up.copy_(host)
            p.copy_(up, non_blocking=True)  # ordered before the next forward on the same stream
        self.fp32_device_grads = [None] * len(self.model_params)

    def _wait_for_copies(self) -> None:
        """The gradients have landed on the host (and the last step's copies up have finished)."""
        devices = {p.device for p in self.model_params if p.device.type == "cuda"}
        for device in devices:
            torch.cuda.current_stream(device).synchronize()

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "masters": list(self.host), "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state):
        self.param_groups[0]["lr"] = state["lr"]
        with torch.no_grad():
            for host, saved, p in zip(self.host, state["masters"], self.model_params):
                host.copy_(saved)
                p.copy_(saved)
        self.inner.load_state_dict(state["inner"])
