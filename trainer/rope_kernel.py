"""Rotary position embedding as one Triton kernel each way (trainer/draft.py `_apply_rope`, same
results up to one bf16 rounding).

The draft's q and k are [B, H, S, d] views of the projections' [B, S, H, d] memory. torch.compile
with dynamic shapes made `x * cos + rotate_half(x) * sin` a kernel indexed element by element
over that view (its position and head recovered from a flat index by divisions); in a profiled
step on an H200 it ran at about a fifth of HBM bandwidth (157 us a call at 8192 tokens). Here one
program takes one token: all its heads as an [H, d / 2] tile per half, and that position's cos
and sin once, so every load is a contiguous run. The result keeps the input's [B, S, H, d] memory
order.

With x = (x1, x2) split at d / 2 and cos = (c1, c2), sin = (s1, s2):

    forward:  (x1 c1 - x2 s1,  x2 c2 + x1 s2)
    backward: (g1 c1 + g2 s2,  g2 c2 - g1 s1)     (the transpose of the same linear map)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, x_st, out_ptr, out_st, cos_ptr, sin_ptr, cs_st, S, HEADS,
            HALF: tl.constexpr, HEADS_PAD: tl.constexpr, BACKWARD: tl.constexpr):
    """Token program_id(0) (b * S + s): every head's two halves rotated by position s's angles.
    x_st / out_st: (batch, head, position) strides, the head dim contiguous; cs_st: cos/sin's
    position stride."""
    token = tl.program_id(0).to(tl.int64)
    b, s = token // S, token % S
    heads = tl.arange(0, HEADS_PAD)
    cols = tl.arange(0, HALF)
    inside = (heads < HEADS)[:, None]
    x_at = x_ptr + b * x_st[0] + s * x_st[2] + heads[:, None].to(tl.int64) * x_st[1] + cols[None, :]
    x1 = tl.load(x_at, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=inside, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + s * cs_st + cols).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + s * cs_st + HALF + cols).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + s * cs_st + cols).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + s * cs_st + HALF + cols).to(tl.float32)[None, :]
    if BACKWARD:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    out_at = out_ptr + b * out_st[0] + s * out_st[2] + heads[:, None].to(tl.int64) * out_st[1] + cols[None, :]
    tl.store(out_at, y1.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(out_at + HALF, y2.to(out_ptr.dtype.element_ty), mask=inside)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B, H, S, d] rotated (or its gradient taken back), laid out [B, S, H, d] in memory."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    b, h, s, d = x.shape
    out = torch.empty(b, s, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    _rotate[(b * s,)](x, x.stride()[:3], out, out.stride()[:3], cos, sin, cos.stride(0), s, h, HALF=d // 2,
                      HEADS_PAD=triton.next_power_of_2(h), BACKWARD=backward, num_warps=4)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotated(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotated(grad, cos, sin, backward=True), None, None


def fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel takes these: [B, H, S, d] with d / 2 a power of two (a Triton range) and
    cos and sin [S, d] tables with the same strides, their rows contiguous."""
    d = x.shape[-1]
    half = d // 2
    return (x.dim() == 4 and d % 2 == 0 and half & (half - 1) == 0 and cos.dim() == 2
            and tuple(cos.shape) == tuple(sin.shape) == (x.shape[2], d) and cos.stride() == sin.stride()
            and cos.stride(-1) == 1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """trainer/draft.py `_apply_rope` for x that `fits` (cos and sin alike), differentiable in x."""
    return _Rope.apply(x, cos, sin)
