"""The teacher's table made from the target's logits in one Triton pass (trainer/loss.py
`make_teacher`).

What the draft learns from, per position, is the target's logits over the draft vocab and
whether the target's top token over its whole vocab lies in the draft vocab (the position
counts only then). In torch that is a gather of the draft columns into the table, chunk by
chunk, and an argmax over the full logits: two reads of [B, S, V] and a copy, 4.8 ms of a B1
S16384 step on an H200 at a 128k target vocab (docs/data/trace_fitplan_16k_ag.json.gz) beside
the 22 ms GEMM that made the logits. Here each program reads its positions' logits once, in
column blocks, keeps each row's first argmax (per lane, as trainer/head_loss_kernel.py keeps
its running values) and writes the draft columns into the table through a map from target id
to draft column (-1 outside the draft vocab; int16 where the draft vocab allows, halving what
each block reads of it). A program may take several positions, sharing each block of that map
(ROWS; one measured fastest). The table's row statistics are then taken by head_loss_kernel's
`teacher_stats`, over the table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Positions per program, columns per block and warps, measured on an H200 for B1 S16384 and a
# 32k draft vocab (benchmarks/teacher_kernel.py, docs/data/teacher_kernel_h200.json): one position
# of 1024-column blocks at 4 warps was the fastest of eight settings at 128k, 152k and 201k target
# vocabs (2.83 ms at 128k with the table's statistics, against 3.01-3.26 for two or four positions
# sharing the map's blocks and 5.1-5.5 for eight; torch's path 5.23 ms).
ROWS = 1
BLOCK = 1024
WARPS = 4


@triton.jit
def _scatter_rows(z_ptr, z_batch_stride, z_row_stride, columns_ptr, table_ptr, table_batch_stride, table_row_stride,
                  target_top_ptr, positions, seq, vocab, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Positions ROWS * program_id .. + ROWS (position p: batch row p // seq, place p % seq):
    their draft columns into the table and their first argmax over the whole vocab (at p)."""
    pos = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = pos < positions
    pos = tl.where(live, pos, 0).to(tl.int64)
    z_rows = z_ptr + (pos // seq) * z_batch_stride + (pos % seq) * z_row_stride
    t_rows = table_ptr + (pos // seq) * table_batch_stride + (pos % seq) * table_row_stride
    cols = tl.arange(0, BLOCK)
    best = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    best_at = tl.zeros([ROWS, BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        column = tl.load(columns_ptr + idx, mask=inside, other=-1).to(tl.int32)
        z = tl.load(z_rows[:, None] + idx[None, :], mask=live[:, None] & inside[None, :], other=float("-inf"))
        larger = z.to(tl.float32) > best  # a lane sees its columns in increasing order: it keeps the first
        best = tl.where(larger, z.to(tl.float32), best)
        best_at = tl.where(larger, idx[None, :], best_at)
        tl.store(t_rows[:, None] + column[None, :], z.to(table_ptr.dtype.element_ty),
                 mask=live[:, None] & (column >= 0)[None, :])
    row_best = tl.max(best, 1)
    # across lanes the smallest column holding the row's max, as torch.argmax breaks ties
    tl.store(target_top_ptr + pos, tl.min(tl.where(best == row_best[:, None], best_at, vocab), 1), mask=live)


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
                        rows: int = ROWS, warps: int = WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [B, S + ttt, Vd] in the logits' dtype, its ttt padding rows zeros; the target's
    first argmax [B, S] int32) from the target's logits [B, S, V]."""
    batch, seq, vocab = logits.shape
    table = torch.empty(batch, seq + ttt, len(draft_ids), dtype=logits.dtype, device=logits.device)
    table[:, seq:].zero_()
    target_top = torch.empty(batch, seq, dtype=torch.int32, device=logits.device)
    positions = batch * seq
    if positions:
        _scatter_rows[(triton.cdiv(positions, rows),)](
            logits, logits.stride(0), logits.stride(1), draft_columns(draft_ids, vocab), table, table.stride(0),
            table.stride(1), target_top, positions, seq, vocab, ROWS=rows,
            BLOCK=min(block, triton.next_power_of_2(vocab)), num_warps=warps)
    return table, target_top
