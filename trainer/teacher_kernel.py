"""The teacher's table made from the target's logits in one Triton pass (trainer/loss.py
`make_teacher`).

What the draft learns from, per position, is the target's logits over the draft vocab and
whether the target's top token over its whole vocab lies in the draft vocab (the position
counts only then). In torch that is a gather of the draft columns into the table, chunk by
chunk, and an argmax over the full logits: two reads of [B, S, V] and a copy, 4.8 ms of a B1
S16384 step on an H200 at a 128k target vocab (docs/data/trace_fitplan_16k_ag.json.gz) beside
the 22 ms GEMM that made the logits. Here a program reads one position's logits once, in column
blocks, keeps its first argmax per lane (trainer/head_loss_kernel.py's running values and
reduction) and writes the draft columns into the table through a map from target id to draft
column (-1 outside the draft vocab; int16 where the draft vocab allows, halving what each block
reads of it). The table's row statistics are then taken by head_loss_kernel's `teacher_stats`,
over the table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.head_loss_kernel import _first_argmax, _lane_first_max

# Columns per block and warps, measured on an H200 for B1 S16384 and a 32k draft vocab
# (benchmarks/teacher_kernel.py, docs/data/teacher_kernel_h200.json): 1024 columns at 4 warps
# was the fastest of four settings at 128k, 152k and 201k target vocabs (2.26 ms at 128k with the
# table's statistics; torch's path 5.16 ms). Programs taking two to eight positions each, sharing
# each block of the column map, were slower (docs/data/teacher_kernel_rows_h200.json: 3.01-5.51
# ms at 128k against 2.83 for one, each call synchronized) and are not kept.
BLOCK = 1024
WARPS = 4


@triton.jit
def _scatter_row(z_ptr, z_batch_stride, z_row_stride, columns_ptr, table_ptr, table_batch_stride, table_row_stride,
                 target_top_ptr, seq, vocab, BLOCK: tl.constexpr):
    """Position `program_id` (batch row p // seq, place p % seq): its draft columns into the
    table and its first argmax over the whole vocab (at p)."""
    pos = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + (pos // seq) * z_batch_stride + (pos % seq) * z_row_stride
    t_row = table_ptr + (pos // seq) * table_batch_stride + (pos % seq) * table_row_stride
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        z = tl.load(z_row + idx, mask=inside, other=float("-inf"))
        best, best_at = _lane_first_max(z.to(tl.float32), idx, best, best_at)
        column = tl.load(columns_ptr + idx, mask=inside, other=-1).to(tl.int32)
        tl.store(t_row + column, z.to(table_ptr.dtype.element_ty), mask=column >= 0)
    tl.store(target_top_ptr + pos, _first_argmax(best, best_at, vocab))


def fits(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these logits: [B, S, V] floating, on CUDA, columns contiguous."""
    return logits.is_cuda and logits.dim() == 3 and logits.is_floating_point() and logits.stride(-1) == 1


def draft_columns(draft_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[V]: the draft column of each target id, -1 outside the draft vocab; int16 where every
    column fits, else int32."""
    dtype = torch.int16 if len(draft_ids) <= torch.iinfo(torch.int16).max else torch.int32
    columns = torch.full((vocab,), -1, dtype=dtype, device=draft_ids.device)
    columns[draft_ids] = torch.arange(len(draft_ids), dtype=dtype, device=draft_ids.device)
    return columns


def teacher_from_logits(logits: torch.Tensor, draft_ids: torch.Tensor, ttt: int, block: int = BLOCK,
                        warps: int = WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [B, S + ttt, Vd] in the logits' dtype, its ttt padding rows zeros; the target's
    first argmax [B, S] int32) from the target's logits [B, S, V]."""
    batch, seq, vocab = logits.shape
    table = torch.empty(batch, seq + ttt, len(draft_ids), dtype=logits.dtype, device=logits.device)
    table[:, seq:].zero_()
    target_top = torch.empty(batch, seq, dtype=torch.int32, device=logits.device)
    if batch * seq:
        _scatter_row[(batch * seq,)](
            logits, logits.stride(0), logits.stride(1), draft_columns(draft_ids, vocab), table, table.stride(0),
            table.stride(1), target_top, seq, vocab, BLOCK=min(block, triton.next_power_of_2(vocab)),
            num_warps=warps)
    return table, target_top
