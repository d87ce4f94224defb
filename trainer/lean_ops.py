"""Autograd functions that keep less for backward than torch's own composition of the same ops.

The draft's activations are kept for every TTT step, so each tensor saved per token is paid
seven times over; these recompute cheap elementwise results in backward instead of keeping them.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch
import torch.nn.functional as F

from trainer.step_grads import add_product, grad_result, grad_total


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's (the fp32-parameter recipes), else the input's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _swiglu_backward(grad_product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(silu(gate) * up, d gate, d up) for the product's gradient: the product made again (for
    down's weight gradient) with both input gradients, d gate over `grad_product` (in place, as
    the CUDA kernel writes it, so the same tensors are alive on every device)."""
    product = F.silu(gate)
    grad_up = grad_product * product
    product.mul_(up)
    grad_silu = grad_product.mul_(up)
    return product, grad_product.copy_(torch.ops.aten.silu_backward(grad_silu, gate)), grad_up


@lru_cache(maxsize=None)
def compiled_on_cuda(device_type: str, *functions):
    """The functions compiled (dynamic shapes: one graph for every length) on CUDA, where their
    elementwise passes fuse into a kernel or two; as they are elsewhere (CPU has no fused path)."""
    if device_type != "cuda":
        return functions
    return tuple(torch.compile(f, dynamic=True) for f in functions)


@lru_cache(maxsize=None)
def triton_module(name: str):
    """trainer.<name>, a module of Triton kernels, or None where triton does not import: the CUDA
    paths then keep their compiled torch functions. Imported only when asked for, so CPU runs
    never import triton."""
    try:
        return importlib.import_module(f"trainer.{name}")
    except ImportError:
        return None


def swiglu_kernels(device_type: str):
    """SwiGLU's elementwise passes: (silu(gate) * up, its backward (product, d gate, d up)). On
    CUDA the Triton kernels of trainer/swiglu_kernel.py (the backward in one pass, d gate written
    over the product's gradient) where triton imports, else the torch functions compiled."""
    kernels = triton_module("swiglu_kernel") if device_type == "cuda" else None
    if kernels:
        return kernels.swiglu, kernels.swiglu_backward
    return compiled_on_cuda(device_type, _swiglu, _swiglu_backward)


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) keeping only gate and up [.., I] for backward.

    torch's composition keeps gate (silu's input), silu(gate) and up (the product's inputs) and
    the product (down_proj's input): 8I bytes per token in bf16. This keeps 4I and makes the
    product again in backward, in the pass that makes the gradients of gate and up.
    """

    @staticmethod
    def forward(ctx, gate, up, w_down, *summed):
        """`summed`: (StepGrads, the weight's name) to sum down's gradient across the TTT steps
        (trainer/step_grads.py), or nothing."""
        dtype = compute_dtype(gate)
        ctx.save_for_backward(gate, up, w_down)
        ctx.dtype, ctx.extra = dtype, len(summed)
        ctx.grads, ctx.name = summed if summed else (None, "down_proj")
        swiglu, _ = swiglu_kernels(gate.device.type)
        return swiglu(gate, up).to(dtype) @ w_down.to(dtype).T

    @staticmethod
    def backward(ctx, grad):
        gate, up, w_down = ctx.saved_tensors
        grad_w = grad_total(ctx.grads, ctx.name, w_down)
        grad_gate, grad_up = swiglu_down_backward(grad.to(ctx.dtype), gate, up, w_down, grad_w)
        return grad_gate, grad_up, grad_result(ctx.grads, ctx.name, grad_w), *[None] * ctx.extra


def swiglu_down_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, w_down: torch.Tensor,
                         grad_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """down_proj(silu(gate) * up)'s backward for `grad` (in the compute dtype): the product's
    gradient, then in one pass the product made again and the gradients of gate and up (d gate
    over the product's gradient), then down's weight gradient added into `grad_w` from the
    product, which is freed. Returns (d gate, d up)."""
    _, swiglu_backward = swiglu_kernels(gate.device.type)
    product, grad_gate, grad_up = swiglu_backward((grad @ w_down.to(grad.dtype)).to(gate.dtype), gate, up)
    add_product(grad_w, grad.reshape(-1, grad.shape[-1]).T, product.reshape(-1, product.shape[-1]).to(grad.dtype))
    return grad_gate, grad_up
