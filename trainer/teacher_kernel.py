"""The teacher made from the target's logits in one Triton pass (trainer/loss.py `make_teacher`).

What the draft learns from, per position, is the target's logits over the draft vocab, their
log-sum-exp and first argmax there (what every TTT step's loss reads), and whether the target's
top token over its whole vocab lies in the draft vocab (the position counts only then). In torch
that is a gather of the draft columns into the table, an argmax over the full logits and a pass
over the table for its statistics: three reads of [B, S, V] or [B, S, Vd], 5.2 ms of a B1 S16384
step on an H200 at a 128k target vocab (docs/data/trace_fitplan_16k_ag.json.gz) beside the 22 ms
GEMM that made the logits. Here one program reads one position's logits once, in column blocks:
it keeps the full row's first argmax, writes each draft column into the table (the map
`columns` gives a target id's draft column, or -1) and takes the draft columns' online max, sum
of exponentials and first argmax, the running values per lane as in trainer/head_loss_kernel.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from trainer.head_loss_kernel import _combine_exp_sums, _first_argmax, _lane_first_max, _online_exp_sum

BLOCK = 2048
WARPS = 8


@triton.jit
def _teacher_row(z_ptr, z_batch_stride, z_row_stride, columns_ptr, table_ptr, table_batch_stride, table_row_stride,
                 lse_ptr, top_ptr, target_top_ptr, seq, padded, vocab, draft_vocab, BLOCK: tl.constexpr):
    """Position `program_id` (batch row b, position s): its draft-vocab row of the table, that
    row's log-sum-exp and first argmax (at b * padded + s), and the first argmax over the whole
    target vocab (at b * seq + s). A draft column's argmax is broken towards the smaller draft
    column explicitly, so the draft ids need not be sorted."""
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // seq, pid % seq
    z_row = z_ptr + b * z_batch_stride + s * z_row_stride
    t_row = table_ptr + b * table_batch_stride + s * table_row_stride
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK], tl.int32)
    d_max = tl.full([BLOCK], float("-inf"), tl.float32)
    d_sum = tl.zeros([BLOCK], tl.float32)
    d_at = tl.full([BLOCK], draft_vocab, tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        z = tl.load(z_row + idx, mask=inside, other=float("-inf")).to(tl.float32)
        best, best_at = _lane_first_max(z, idx, best, best_at)
        column = tl.load(columns_ptr + idx, mask=inside, other=-1)
        drafted = column >= 0
        tl.store(t_row + column, z.to(table_ptr.dtype.element_ty), mask=drafted)
        x = tl.where(drafted, z, float("-inf"))
        column = tl.where(drafted, column, draft_vocab)
        d_at = tl.where((x > d_max) | ((x == d_max) & (column < d_at)), column, d_at)
        d_max, d_sum = _online_exp_sum(x, d_max, d_sum)
    tl.store(target_top_ptr + pid, _first_argmax(best, best_at, vocab))
    out = b * padded + s
    tl.store(top_ptr + out, _first_argmax(d_max, d_at, draft_vocab))
    d_max, d_sum = _combine_exp_sums(d_max, d_sum)
    tl.store(lse_ptr + out, d_max + tl.log(d_sum))


def fits(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these logits: [B, S, V] floating, on CUDA, columns contiguous."""
    return logits.is_cuda and logits.dim() == 3 and logits.is_floating_point() and logits.stride(-1) == 1


def draft_columns(draft_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[V] int32: the draft column of each target id, -1 outside the draft vocab."""
    columns = torch.full((vocab,), -1, dtype=torch.int32, device=draft_ids.device)
    columns[draft_ids] = torch.arange(len(draft_ids), dtype=torch.int32, device=draft_ids.device)
    return columns


def teacher_from_logits(logits: torch.Tensor, draft_ids: torch.Tensor, ttt: int, block: int = BLOCK,
                        warps: int = WARPS) -> tuple[torch.Tensor, ...]:
    """(table [B, S + ttt, Vd] in the logits' dtype, its rows' log-sum-exp [B, S + ttt] fp32 and
    first argmax [B, S + ttt] int32, the target's first argmax [B, S] int32) from the target's
    logits [B, S, V]. The ttt padding rows are zeros, with the statistics of a row of zeros."""
    batch, seq, vocab = logits.shape
    draft_vocab, padded = len(draft_ids), seq + ttt
    device = logits.device
    table = torch.empty(batch, padded, draft_vocab, dtype=logits.dtype, device=device)
    lse = torch.empty(batch, padded, dtype=torch.float32, device=device)
    top = torch.empty(batch, padded, dtype=torch.int32, device=device)
    target_top = torch.empty(batch, seq, dtype=torch.int32, device=device)
    table[:, seq:].zero_()
    lse[:, seq:] = math.log(draft_vocab)
    top[:, seq:] = 0
    if batch * seq:
        _teacher_row[(batch * seq,)](logits, logits.stride(0), logits.stride(1), draft_columns(draft_ids, vocab), table,
                                     table.stride(0), table.stride(1), lse, top, target_top, seq, padded, vocab,
                                     draft_vocab, BLOCK=min(block, triton.next_power_of_2(vocab)), num_warps=warps)
    return table, lse, top, target_top
