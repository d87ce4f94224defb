"""The split-master AdamW step (trainer/split_master.py) as one Triton kernel: per element it
reads the bf16 parameter's bits, the master's low 16 bits, the gradient and both fp32 moments,
and writes the parameter, low and the moments back: 14 bytes read and 12 written per bf16
parameter, where a step over whole fp32 masters reads and writes some 40 (the gradient's fp32
copy, the master, its moments, then the master rounded into the parameter).
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024
WARPS = 4


@triton.jit
def _split_adamw(p_ptr, low_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n, decay, one_minus_beta1,
                 beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, BLOCK: tl.constexpr):
    """trainer/split_master.py _step_torch's arithmetic, op for op. The launch turns fp fusion
    off and the divisions and sqrt are the correctly rounded ones, so each op rounds once as
    torch's do; scalar arguments arrive as fp32."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    lo = tl.load(low_ptr + offsets, mask=inside).to(tl.int32) & 0xFFFF
    hi = tl.load(p_ptr + offsets, mask=inside).to(tl.int32) & 0xFFFF
    hi = (hi - (lo >= 0x8000).to(tl.int32)) & 0xFFFF
    master = ((hi << 16) | lo).to(tl.float32, bitcast=True)
    g = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=inside)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=inside)

    master = master * decay
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + g * one_minus_beta2 * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    master = master - tl.div_rn(m * step_size, denom)

    bits = master.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits)
    lo = bits & 0xFFFF
    hi = ((bits >> 16) + (lo >= 0x8000).to(tl.int32)) & 0xFFFF
    tl.store(p_ptr + offsets, tl.where(hi >= 0x8000, hi - 0x10000, hi).to(tl.int16), mask=inside)
    tl.store(low_ptr + offsets, tl.where(lo >= 0x8000, lo - 0x10000, lo).to(tl.int16), mask=inside)
    tl.store(exp_avg_ptr + offsets, m, mask=inside)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=inside)


def step(param_bits, low, grad, exp_avg, exp_avg_sq, scalars) -> None:
    """One step in place; `param_bits` the parameter's int16 view, `scalars` split_master._Scalars."""
    n = param_bits.numel()
    if n:
        _split_adamw[(triton.cdiv(n, BLOCK),)](param_bits, low, grad.contiguous(), exp_avg, exp_avg_sq, n, *scalars,
                                               BLOCK=BLOCK, num_warps=WARPS, enable_fp_fusion=False)
