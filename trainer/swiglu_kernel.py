"""SwiGLU's elementwise passes as Triton kernels: the product forward, and in backward the product
made again together with both input gradients in one pass.

The lean MLP (trainer/lean_ops.py SwiGLUDown) keeps gate and up and makes the product
silu(gate) * up again in backward for down's weight gradient. Compiled by torch that is two
kernels over [tokens, I]: the product (reads gate and up, writes it) and then the gradients
(read the product's gradient, gate and up again, write d gate and d up): eight passes. Here one
kernel reads the three once and writes the product, d up, and d gate over the product's gradient
(each element is read before it is written, by the same program): six passes, and no more
[tokens, I] tensors alive at once than before (gate, up, the product's gradient, d up and the
product: the two-kernel order had d gate where the product now is).

All arithmetic in fp32, each output rounded once, as torch.compile does for the same formulas:
silu(g) = g * sigmoid(g), d gate = d(silu) * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
WARPS = 8


@triton.jit
def _product(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    g = tl.load(gate_ptr + offsets, mask=inside).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=inside).to(tl.float32)
    tl.store(out_ptr + offsets, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _product_and_grads(grad_ptr, gate_ptr, up_ptr, out_ptr, grad_up_ptr, n, BLOCK: tl.constexpr):
    """out = silu(g) u, d up = d silu(g), d gate (into grad_ptr) = d u silu'(g)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    d = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=inside).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=inside).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    tl.store(out_ptr + offsets, (silu * u).to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_up_ptr + offsets, (d * silu).to(grad_up_ptr.dtype.element_ty), mask=inside)
    grad_gate = d * u * s * (1.0 + g * (1.0 - s))
    tl.store(grad_ptr + offsets, grad_gate.to(grad_ptr.dtype.element_ty), mask=inside)


def _launch(kernel, *tensors: torch.Tensor, block: int, warps: int) -> None:
    n = tensors[0].numel()
    if n:
        kernel[(triton.cdiv(n, block),)](*tensors, n, BLOCK=block, num_warps=warps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, block: int = BLOCK, warps: int = WARPS) -> torch.Tensor:
    """silu(gate) * up, in gate's dtype. `block`, `warps`: elements per program and its warps."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _launch(_product, gate, up, out, block=block, warps=warps)
    return out


def swiglu_backward(grad_product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, block: int = BLOCK,
                    warps: int = WARPS):
    """(silu(gate) * up, d gate, d up) for the product's gradient; d gate is written over
    `grad_product` when it is contiguous (the caller hands it over)."""
    gate, up, grad = gate.contiguous(), up.contiguous(), grad_product.contiguous()
    out, grad_up = torch.empty_like(gate), torch.empty_like(grad)
    _launch(_product_and_grads, grad, gate, up, out, grad_up, block=block, warps=warps)
    return out, grad, grad_up
