"""Add a bf16 tensor into an fp32 one in place, in one vectorized pass.

In backward the draft's embedding projection (trainer/embedding_projection.py) adds each TTT
step's q/k/v output gradients (bf16) into fp32 sums over the unroll's rows: [B, S, out] per
projection per step. torch's add_ of a bf16 tensor into an fp32 one takes its dynamic-casting
loop: in the B1 S16384 step's profile on an H200 those adds took 3.5 ms (docs/data/
trace_fitplan_16k_w.json.gz), this kernel 2.7 ms (docs/data/profile_fitplan_16k_ag.json). Each
program reads a block of both, adds in fp32 and rounds once into the first: the same bits as
torch's add_ (tests/test_add_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _add_into(total_ptr, part_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    total = tl.load(total_ptr + offsets, mask=inside).to(tl.float32)
    part = tl.load(part_ptr + offsets, mask=inside).to(tl.float32)
    tl.store(total_ptr + offsets, (total + part).to(total_ptr.dtype.element_ty), mask=inside)


def fits(total: torch.Tensor, part: torch.Tensor) -> bool:
    """Whether the kernel takes these: two contiguous floating tensors of one shape on one device."""
    return (total.shape == part.shape and total.device == part.device and total.is_contiguous()
            and part.is_contiguous() and total.is_floating_point() and part.is_floating_point())


def add_into(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """total += part in place (the sum in fp32, rounded once to total's dtype); returns total."""
    n = total.numel()
    if n:
        _add_into[(triton.cdiv(n, BLOCK),)](total, part, n, BLOCK=BLOCK)
    return total
