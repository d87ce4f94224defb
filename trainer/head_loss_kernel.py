"""The fused head's per-chunk soft cross-entropy, its top-1 agreements and its logit gradient in
one Triton kernel (trainer/head_loss.py `_chunk_loss_grad`, same results).

torch.compile turns that function into several kernels that each sweep the chunk's logits and
teacher rows; measured on an H200 the chunk ran at about an eighth of HBM bandwidth. Here one
program handles one row in two passes over column blocks: the first takes the online max, sum
of exponentials and first argmax of the logits, the second forms the teacher's probabilities,
the loss and the gradient. Two passes read the row twice because every gradient value needs the
row's final log-sum-exp; the row (64 KiB of bf16 logits at a 32k vocab) is read again soon after
the first pass, meant to be found in L2, so that HBM sees about one read of the logits and the
teacher rows and one write of the gradient.

A teacher of logits is read by every TTT step (each scores the same positions, shifted), so its
rows' log-sum-exp and first argmax are taken once per micro-batch (`teacher_stats`, a one-pass
kernel) and the chunk kernel reads two numbers per row instead of sweeping the teacher in its
first pass: that pass reads the logits alone, and the second forms p = exp(t - lse_t) with no
division and no argmax of its own.

Inside a pass the running values are [BLOCK] vectors held in registers, one value per lane (lane
k sees columns k, k + BLOCK, ...): max, sum of exponentials and the first max's column, the loss.
A reduction across lanes goes through shared memory behind barriers; taken in every block, as
scalar running values would need, that would put round trips in a loop that otherwise only
loads, computes and stores. Kept per lane, the loops are elementwise and a row reduces across
lanes a few times, after its passes. The first argmax survives this: a lane sees its columns in
increasing order and takes a new best only when strictly larger, and across lanes the smallest
column holding the row's max wins, as in torch.argmax.

Per-row losses and agreements go to small buffers summed by torch afterwards: deterministic,
with no atomics. `scale` stays on the device (read by the kernel), so nothing waits on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per block and warps per row, by teacher kind (as_logits), measured on an H200 for a
# 2097-row chunk (benchmarks/head_loss_kernel.py, docs/data/head_loss_kernel_stats_h200.json):
# for bf16 teacher logits, read through their row statistics, 2048 columns at 8 warps was the
# fastest of four pairs (0.163 ms at a 32k vocab against 0.173 for 1024 at 4, 0.172 for 4096 at 8,
# 0.200 for 2048 at 4; 0.582 against 0.622-0.641 at 128k); for fp32 probabilities 1024 at 4
# (0.260 against 0.266-0.323; 0.960 against 0.956-1.206 at 128k, level with 2048 at 8). Before
# the kernel read the teacher's statistics (docs/data/head_loss_kernel_blocks_h200.json) two
# variants were slower and not kept: the whole row held in registers (one read of each row;
# 0.301 ms at best at a 32k vocab, 8-32 warps), and a fixed number of programs taking rows in
# turn so that fewer rows are in flight and the second pass finds its row in L2 (0.285 ms at
# best, 528 programs; docs/data/head_loss_kernel_rows_in_turn_h200.json).
CONFIGS = {True: (2048, 8), False: (1024, 4)}  # (columns per block, warps) by as_logits
STATS_WARPS = 4
STATS_BLOCK = 1024


@triton.jit
def _row_loss_grad(z_ptr, z_stride, z_col_stride, t_ptr, t_stride, t_col_stride, t_lse_ptr, t_top_ptr, p_rows_ptr,
                   scale_ptr, grad_ptr, grad_stride, loss_ptr, agree_ptr, vocab, AS_LOGITS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Row `program_id` of the chunk: its loss, agreement and gradient (the gradient contiguous;
    column strides of 1 are specialised by Triton, so the usual loads are vectorised). Every
    running quantity is a [BLOCK] vector, one value per lane (lane k sees columns k, k + BLOCK,
    ...), reduced across lanes once after its pass. A teacher of logits comes with each row's
    log-sum-exp and first argmax (teacher_stats), made once for the seven steps that read it."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    p_row = tl.load(p_rows_ptr + row).to(tl.int64)
    t_row = t_ptr + p_row * t_stride
    g_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK)

    # Pass 1: the logits' max, sum of exp(z - max) and first argmax; for probabilities, their sum
    # (a row of those need not sum to 1).
    z_max = tl.full([BLOCK], float("-inf"), tl.float32)
    z_sum = tl.zeros([BLOCK], tl.float32)
    z_arg = tl.zeros([BLOCK], tl.int32)
    t_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        z = tl.load(z_row + idx * z_col_stride, mask=inside, other=float("-inf")).to(tl.float32)
        z_max, z_sum, z_arg = _online_exp_sum_argmax(z, idx, z_max, z_sum, z_arg)
        if not AS_LOGITS:
            t_sum += tl.load(t_row + idx * t_col_stride, mask=inside, other=0.0).to(tl.float32)
    z_top = _first_argmax(z_max, z_arg, vocab)
    z_max, z_sum = _combine_exp_sums(z_max, z_sum)
    if AS_LOGITS:
        t_lse = tl.load(t_lse_ptr + p_row)
        p_total = 1.0  # a softmax's sum is 1 by construction
    else:
        p_total = tl.sum(t_sum, 0)

    # Pass 2: p, the loss -sum p (z - lse), for probabilities their first argmax, and the
    # gradient (softmax(z) sum(p) - p) scale.
    lse = z_max + tl.log(z_sum)
    scale = tl.load(scale_ptr).to(tl.float32)
    loss = tl.zeros([BLOCK], tl.float32)
    p_best = tl.full([BLOCK], float("-inf"), tl.float32)
    p_arg = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        z = tl.load(z_row + idx * z_col_stride, mask=inside, other=0.0).to(tl.float32)
        if AS_LOGITS:  # exp(-inf - lse) = 0 beyond the row
            p = tl.exp(tl.load(t_row + idx * t_col_stride, mask=inside, other=float("-inf")).to(tl.float32) - t_lse)
        else:
            p = tl.load(t_row + idx * t_col_stride, mask=inside, other=0.0).to(tl.float32)
            p_best, p_arg = _lane_first_max(tl.where(inside, p, float("-inf")), idx, p_best, p_arg)
        log_q = z - lse
        loss += p * log_q
        grad = (tl.exp(log_q) * p_total - p) * scale
        tl.store(g_row + idx, grad.to(grad_ptr.dtype.element_ty), mask=inside)

    tl.store(loss_ptr + row, -tl.sum(loss, 0))
    if AS_LOGITS:
        p_top = tl.load(t_top_ptr + p_row)
    else:
        p_top = _first_argmax(p_best, p_arg, vocab)
    tl.store(agree_ptr + row, (z_top == p_top).to(tl.int32))


@triton.jit
def _row_stats(t_ptr, t_stride, lse_ptr, top_ptr, vocab, BLOCK: tl.constexpr):
    """Row `program_id` of a teacher of logits: its log-sum-exp and first argmax."""
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK)
    t_max = tl.full([BLOCK], float("-inf"), tl.float32)
    t_sum = tl.zeros([BLOCK], tl.float32)
    t_arg = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        t = tl.load(t_row + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        t_max, t_sum, t_arg = _online_exp_sum_argmax(t, idx, t_max, t_sum, t_arg)
    tl.store(top_ptr + row, _first_argmax(t_max, t_arg, vocab))
    t_max, t_sum = _combine_exp_sums(t_max, t_sum)
    tl.store(lse_ptr + row, t_max + tl.log(t_sum))


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
def _online_exp_sum_argmax(x, idx, run_max, run_sum, arg):
    """_online_exp_sum with the lane's first argmax kept too: a lane's running max is its best
    value, and its column is replaced only on a strictly larger one."""
    arg = tl.where(x > run_max, idx, arg)
    run_max, run_sum = _online_exp_sum(x, run_max, run_sum)
    return run_max, run_sum, arg


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
                    stats: tuple[torch.Tensor, torch.Tensor] | None, block: int | None = None,
                    warps: int | None = None, reuse_logits: bool = False):
    """(loss fp32, agreements int64, d/dz of scale x loss in the logits' dtype) of one chunk, as
    trainer/head_loss.py `_chunk_loss_grad`. logits [N, Vd]; teacher [M, Vd] whose row p_rows[i]
    scores row i: bf16 logits with `stats` (their rows' log-sum-exp and first argmax,
    teacher_stats), or probabilities with `stats` None; scale a 0-dim fp32 tensor.
    `block`, `warps`: columns per block and warps per row (CONFIGS' for the teacher's kind when None).
    `reuse_logits`: the caller has no further use for the logits, so the gradient is written over
    them where they are contiguous (each program reads a block of its row before it writes that
    block) and no second [N, Vd] table is made."""
    rows, vocab = logits.shape
    as_logits = stats is not None
    if reuse_logits and logits.is_contiguous():
        grad = logits
    else:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    row_agree = torch.empty(rows, dtype=torch.int32, device=logits.device)
    t_lse, t_top = stats if as_logits else (row_loss, row_agree)  # unread without logits
    default_block, default_warps = CONFIGS[as_logits]
    block = min(block or default_block, triton.next_power_of_2(vocab))
    _row_loss_grad[(rows,)](logits, *logits.stride(), teacher, *teacher.stride(), t_lse, t_top, p_rows, scale, grad,
                            grad.stride(0), row_loss, row_agree, vocab, AS_LOGITS=as_logits, BLOCK=block,
                            num_warps=warps or default_warps)
    return row_loss.sum(), row_agree.sum(), grad


def teacher_stats(table: torch.Tensor, block: int = STATS_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp fp32, first argmax int32) of each row of a contiguous teacher of logits [M, Vd]."""
    rows, vocab = table.shape
    lse = torch.empty(rows, dtype=torch.float32, device=table.device)
    top = torch.empty(rows, dtype=torch.int32, device=table.device)
    if rows:
        _row_stats[(rows,)](table, table.stride(0), lse, top, vocab, BLOCK=min(block, triton.next_power_of_2(vocab)),
                            num_warps=STATS_WARPS)
    return lse, top
