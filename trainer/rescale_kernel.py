"""Multiply a tensor in place by a device scalar, leaving it untouched when the scalar is 1.

The fused head makes its gradients in forward for the loss weight it was given, and backward
rescales them by what autograd hands it over that weight (trainer/head_loss.py). In a plain
step (one micro-batch, the loss weighted by the same fp32 scalar the head was given) that ratio
is exactly 1, but only the device knows it: reading it on the host would stall the backward
queue. torch's mul_ by 1 still reads and writes the whole tensor, a [B, S, h] gradient per TTT
step (2.6 ms over the seven steps at B1 S16384 on an H200). Here every program reads the scalar
first and touches its block only when it is not 1; x * 1 is x exactly, so both ways give the
same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _scale_unless_one(x_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    # rounded to x's dtype first, as torch's CUDA mul_ rounds a 0-dim CUDA tensor to the common dtype
    factor = tl.load(factor_ptr).to(x_ptr.dtype.element_ty).to(tl.float32)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        x = tl.load(x_ptr + offsets, mask=inside)
        tl.store(x_ptr + offsets, (x.to(tl.float32) * factor).to(x_ptr.dtype.element_ty), mask=inside)


def fits(x: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether the kernel takes these: a contiguous floating tensor, a one-element factor on its device."""
    return x.is_contiguous() and x.is_floating_point() and factor.numel() == 1 and factor.device == x.device


def scale_unless_one(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x *= factor in place, bit for bit as torch's x.mul_(factor) on CUDA (the factor rounded to
    x's dtype, the product taken in fp32 and rounded), x untouched where that factor is 1;
    returns x."""
    n = x.numel()
    if n:
        _scale_unless_one[(triton.cdiv(n, BLOCK),)](x, factor, n, BLOCK=BLOCK)
    return x
