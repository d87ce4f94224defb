"""The fused head's per-chunk soft cross-entropy, its top-1 agreements and its logit gradient in
one Triton kernel (trainer/head_loss.py `_chunk_loss_grad`, same results).

torch.compile turns that function into several kernels that each sweep the chunk's logits and
teacher rows; measured on an H200 the chunk ran at about an eighth of HBM bandwidth. Here one
program handles one row in two passes over column blocks: the first takes the online max and
sum of exponentials of the logits (and of the teacher's logits), the second forms the
probabilities, the loss, both argmaxes and the gradient. A row (64 KiB of bf16 logits at a 32k
vocab) is read again in the second pass soon after the first, meant to be found in L2, so that
HBM sees about one read of the logits and the teacher rows and one write of the gradient.

Per-row losses and agreements go to small buffers summed by torch afterwards: deterministic,
with no atomics. `scale` stays on the device (read by the kernel), so nothing waits on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per block and warps per row: 2048 at 4 warps (16 values per thread) was the fastest of
# four pairs on an H200 for every case measured, 10-14% ahead of 4096 at 8 (0.320 against 0.357 ms
# for a 32k-vocab chunk of bf16 logits; benchmarks/head_loss_kernel.py,
# docs/data/head_loss_kernel_h200.json).
BLOCK = 2048
WARPS = 4


@triton.jit
def _row_loss_grad(z_ptr, z_stride, z_col_stride, t_ptr, t_stride, t_col_stride, p_rows_ptr, scale_ptr,
                   grad_ptr, grad_stride, loss_ptr, agree_ptr, vocab, AS_LOGITS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Row `program_id` of the chunk: its loss, agreement and gradient (the gradient contiguous;
    column strides of 1 are specialised by Triton, so the usual loads are vectorised)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + tl.load(p_rows_ptr + row).to(tl.int64) * t_stride
    g_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK)

    # Pass 1: the logits' max and sum of exp(z - max); the teacher's too when it holds logits,
    # its plain sum when it holds probabilities (a row of those need not sum to 1).
    z_max = float("-inf")
    z_sum = 0.0
    t_max = float("-inf")
    t_sum = 0.0
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        z = tl.load(z_row + idx * z_col_stride, mask=inside, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(z_max, tl.max(z, 0))
        z_sum = z_sum * tl.exp(z_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        z_max = new_max
        if AS_LOGITS:
            t = tl.load(t_row + idx * t_col_stride, mask=inside, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(t_max, tl.max(t, 0))
            t_sum = t_sum * tl.exp(t_max - new_max) + tl.sum(tl.exp(t - new_max), 0)
            t_max = new_max
        else:
            t_sum += tl.sum(tl.load(t_row + idx * t_col_stride, mask=inside, other=0.0).to(tl.float32), 0)

    # Pass 2: p, the loss -sum p (z - lse), first-index argmaxes of z and p, and the gradient
    # (softmax(z) sum(p) - p) scale. A softmax's sum is 1 by construction.
    lse = z_max + tl.log(z_sum)
    p_total = 1.0 if AS_LOGITS else t_sum
    scale = tl.load(scale_ptr).to(tl.float32)
    loss = 0.0
    z_best = float("-inf")
    z_arg = 0
    p_best = float("-inf")
    p_arg = 0
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        z = tl.load(z_row + idx * z_col_stride, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_row + idx * t_col_stride, mask=inside, other=0.0).to(tl.float32)
        if AS_LOGITS:
            p = tl.exp(t - t_max) / t_sum
        else:
            p = t
        log_q = z - lse
        loss += tl.sum(tl.where(inside, p * log_q, 0.0), 0)
        z_best, z_arg = _first_max(tl.where(inside, z, float("-inf")), idx, vocab, z_best, z_arg)
        p_best, p_arg = _first_max(tl.where(inside, p, float("-inf")), idx, vocab, p_best, p_arg)
        grad = (tl.exp(log_q) * p_total - p) * scale
        tl.store(g_row + idx, grad.to(grad_ptr.dtype.element_ty), mask=inside)

    tl.store(loss_ptr + row, -loss)
    tl.store(agree_ptr + row, (z_arg == p_arg).to(tl.int32))


@triton.jit
def _first_max(values, idx, vocab, best, arg):
    """(best, arg) updated with a block: its max, at the lowest index holding it, replaces them
    only when strictly larger, so the earliest column wins a tie as in torch.argmax."""
    block_max = tl.max(values, 0)
    block_arg = tl.min(tl.where(values == block_max, idx, vocab), 0)
    larger = block_max > best
    return tl.where(larger, block_max, best), tl.where(larger, block_arg, arg)


def chunk_loss_grad(logits: torch.Tensor, teacher: torch.Tensor, p_rows: torch.Tensor, scale: torch.Tensor,
                    as_logits: bool, block: int = BLOCK, warps: int = WARPS):
    """(loss fp32, agreements int64, d/dz of scale x loss in the logits' dtype) of one chunk, as
    trainer/head_loss.py `_chunk_loss_grad`. logits [N, Vd]; teacher [M, Vd] whose row p_rows[i]
    scores row i (bf16 logits when as_logits, else probabilities); scale a 0-dim fp32 tensor."""
    rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    row_agree = torch.empty(rows, dtype=torch.int32, device=logits.device)
    block = min(block, triton.next_power_of_2(vocab))
    _row_loss_grad[(rows,)](logits, *logits.stride(), teacher, *teacher.stride(), p_rows, scale, grad,
                            grad.stride(0), row_loss, row_agree, vocab, AS_LOGITS=as_logits, BLOCK=block,
                            num_warps=warps)
    return row_loss.sum(), row_agree.sum(), grad
