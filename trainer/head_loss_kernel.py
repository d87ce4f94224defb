"""The fused head's per-chunk soft cross-entropy, its top-1 agreements and its logit gradient in
one Triton kernel (trainer/head_loss.py `_chunk_loss_grad`, same results).

torch.compile turns that function into several kernels that each sweep the chunk's logits and
teacher rows; measured on an H200 the chunk ran at about an eighth of HBM bandwidth. Here one
program handles one row in two passes over column blocks: the first takes the online max and
sum of exponentials of the logits (and of the teacher's logits), the second forms the
probabilities, the loss, both argmaxes and the gradient. Two passes read the row twice because
every gradient value needs the row's final log-sum-exp; the row (64 KiB of bf16 logits at a 32k
vocab) is read again soon after the first pass, meant to be found in L2, so that HBM sees about
one read of the logits and the teacher rows and one write of the gradient.

Inside a pass the running values are [BLOCK] vectors held in registers, one value per lane (lane
k sees columns k, k + BLOCK, ...): max and sum of exponentials, the loss, and the first max and
its column for the logits and for the teacher. A reduction across lanes goes through shared
memory behind barriers; taken in every block, as scalar running values would need, that is four
round trips per block in the first pass and five in the second (loss, and a max and a min for
each argmax), in a loop that otherwise only loads, computes and stores. Kept per lane, the loops
are elementwise and a row reduces across lanes nine times in all (eight for probabilities), after
its passes. The first argmax survives this: a lane sees its columns in increasing order and
takes a new best only when strictly larger, and across lanes the smallest column holding the
row's max wins, as in torch.argmax.

Per-row losses and agreements go to small buffers summed by torch afterwards: deterministic,
with no atomics. `scale` stays on the device (read by the kernel), so nothing waits on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per block and warps per row, by teacher: measured on an H200 for a 2097-row chunk
# (benchmarks/head_loss_kernel.py, docs/data/head_loss_kernel_blocks_h200.json), 1024 at 4 warps
# was the fastest of four pairs for bf16 teacher logits (0.234 ms at a 32k vocab against 0.285 for
# 2048 at 4; 0.852 against 1.040 at 128k) and 2048 at 4 for fp32 probabilities (0.253 against
# 0.268 at 32k). Two variants were slower and not kept: the whole row held in registers (one
# read of each row; 0.301 ms at best at a 32k vocab, 8-32 warps), and a fixed number of programs
# taking rows in turn so that fewer rows are in flight and the second pass finds its row in L2
# (0.285 ms at best, 528 programs; docs/data/head_loss_kernel_rows_in_turn_h200.json).
BLOCKS = {True: 1024, False: 2048}  # by as_logits
WARPS = 4


@triton.jit
def _row_loss_grad(z_ptr, z_stride, z_col_stride, t_ptr, t_stride, t_col_stride, p_rows_ptr, scale_ptr,
                   grad_ptr, grad_stride, loss_ptr, agree_ptr, vocab, AS_LOGITS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Row `program_id` of the chunk: its loss, agreement and gradient (the gradient contiguous;
    column strides of 1 are specialised by Triton, so the usual loads are vectorised). Every
    running quantity is a [BLOCK] vector, one value per lane (lane k sees columns k, k + BLOCK,
    ...), reduced across lanes once after its pass."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + tl.load(p_rows_ptr + row).to(tl.int64) * t_stride
    g_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK)

    # Pass 1: the logits' max and sum of exp(z - max); the teacher's too when it holds logits,
    # its plain sum when it holds probabilities (a row of those need not sum to 1).
    z_max = tl.full([BLOCK], float("-inf"), tl.float32)
    z_sum = tl.zeros([BLOCK], tl.float32)
    t_max = tl.full([BLOCK], float("-inf"), tl.float32)
    t_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        z = tl.load(z_row + idx * z_col_stride, mask=inside, other=float("-inf")).to(tl.float32)
        z_max, z_sum = _online_exp_sum(z, z_max, z_sum)
        if AS_LOGITS:
            t = tl.load(t_row + idx * t_col_stride, mask=inside, other=float("-inf")).to(tl.float32)
            t_max, t_sum = _online_exp_sum(t, t_max, t_sum)
        else:
            t_sum += tl.load(t_row + idx * t_col_stride, mask=inside, other=0.0).to(tl.float32)
    z_max, z_sum = _combine_exp_sums(z_max, z_sum)
    if AS_LOGITS:
        t_max, t_sum = _combine_exp_sums(t_max, t_sum)
        p_total = 1.0  # a softmax's sum is 1 by construction
    else:
        t_sum = tl.sum(t_sum, 0)
        p_total = t_sum

    # Pass 2: p, the loss -sum p (z - lse), first-index argmaxes of z and p, and the gradient
    # (softmax(z) sum(p) - p) scale. Lanes keep their own loss sums and their own first maxima:
    # a lane meets its columns in increasing order, so replacing its best only on a strictly
    # larger value keeps the earliest column of its max.
    lse = z_max + tl.log(z_sum)
    scale = tl.load(scale_ptr).to(tl.float32)
    loss = tl.zeros([BLOCK], tl.float32)
    z_best = tl.full([BLOCK], float("-inf"), tl.float32)
    z_arg = tl.zeros([BLOCK], tl.int32)
    p_best = tl.full([BLOCK], float("-inf"), tl.float32)
    p_arg = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        # -inf beyond the row: never a lane's max, and exp(-inf - lse) = 0
        z = tl.load(z_row + idx * z_col_stride, mask=inside, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + idx * t_col_stride, mask=inside, other=0.0).to(tl.float32)
        if AS_LOGITS:
            p = tl.exp(t - t_max) / t_sum
        else:
            p = t
        log_q = z - lse
        loss += tl.where(inside, p * log_q, 0.0)
        z_best, z_arg = _lane_first_max(z, idx, z_best, z_arg)
        p_best, p_arg = _lane_first_max(tl.where(inside, p, float("-inf")), idx, p_best, p_arg)
        grad = (tl.exp(log_q) * p_total - p) * scale
        tl.store(g_row + idx, grad.to(grad_ptr.dtype.element_ty), mask=inside)

    tl.store(loss_ptr + row, -tl.sum(loss, 0))
    agree = _first_argmax(z_best, z_arg, vocab) == _first_argmax(p_best, p_arg, vocab)
    tl.store(agree_ptr + row, agree.to(tl.int32))


@triton.jit
def _online_exp_sum(x, run_max, run_sum):
    """Per lane, (max, sum of exp(value - max)) taken on with one more value, at one exp: by
    exp(-|x - max|), which scales the old sum when x is the new max and is x's term otherwise.
    A lane that has seen only -inf (columns beyond a row shorter than a block) keeps sum 0
    rather than the NaN of -inf - -inf."""
    new_max = tl.maximum(run_max, x)
    diff = tl.exp(-tl.abs(x - run_max))
    run_sum = tl.where(x > run_max, run_sum * diff + 1.0, run_sum + diff)
    return new_max, tl.where(new_max == float("-inf"), 0.0, run_sum)


@triton.jit
def _combine_exp_sums(lane_max, lane_sum):
    """The row's (max, sum of exp(value - max)) from its lanes': sum of lane_sum x
    exp(lane_max - max), a lane that has seen only -inf adding 0 (not NaN when all have)."""
    row_max = tl.max(lane_max, 0)
    terms = tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp(lane_max - row_max))
    return row_max, tl.sum(terms, 0)


@triton.jit
def _lane_first_max(values, idx, best, arg):
    """Per lane, (best, arg) updated with one value: replaced only when strictly larger, so each
    lane keeps the earliest column of its max."""
    larger = values > best
    return tl.where(larger, values, best), tl.where(larger, idx, arg)


@triton.jit
def _first_argmax(best, arg, vocab):
    """The row's first argmax from its lanes' first maxima: the smallest column among the lanes
    holding the largest value (compared as columns, not lanes), as torch.argmax breaks ties."""
    row_best = tl.max(best, 0)
    return tl.min(tl.where(best == row_best, arg, vocab), 0)


def chunk_loss_grad(logits: torch.Tensor, teacher: torch.Tensor, p_rows: torch.Tensor, scale: torch.Tensor,
                    as_logits: bool, block: int | None = None, warps: int = WARPS):
    """(loss fp32, agreements int64, d/dz of scale x loss in the logits' dtype) of one chunk, as
    trainer/head_loss.py `_chunk_loss_grad`. logits [N, Vd]; teacher [M, Vd] whose row p_rows[i]
    scores row i (bf16 logits when as_logits, else probabilities); scale a 0-dim fp32 tensor.
    `block`: columns per block (BLOCKS' for the teacher's kind when None)."""
    rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    row_agree = torch.empty(rows, dtype=torch.int32, device=logits.device)
    block = min(block or BLOCKS[as_logits], triton.next_power_of_2(vocab))
    _row_loss_grad[(rows,)](logits, *logits.stride(), teacher, *teacher.stride(), p_rows, scale, grad,
                            grad.stride(0), row_loss, row_agree, vocab, AS_LOGITS=as_logits, BLOCK=block,
                            num_warps=warps)
    return row_loss.sum(), row_agree.sum(), grad
