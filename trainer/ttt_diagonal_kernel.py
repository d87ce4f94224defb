"""TTT attention's diagonal keys (trainer/ttt_attention.py `_merge_diagonal`, `_diagonal_backward`)
as Triton kernels that compile once for any number of keys.

At TTT step k each query position sees one extra key and value from each of steps 1..k, at its own
position: a score s_j = q . k_j * scale per position, folded into the causal part's (output, lse).
Everything is elementwise along the sequence, so each kernel reads its inputs once and is bound
by memory. torch.compile made one graph per key count (one per TTT step, forward and backward);
here the count is a runtime argument (not specialised), so one compiled kernel serves every step.

Keys and values reach a kernel as SLOTS pointer slots (tuples of tensors, each with its own batch,
head and position strides) and the count n: `tl.static_range(SLOTS)` unrolls the slots, so each
slot's pointer is a compile-time pick, and `if j < n` skips the unused ones (filled with the first
key, never read). Per-slot strides let views of [B, S, Hkv, d] memory, the projections' own
layout, be read in place; only a head dim that is not contiguous is copied, so that every load is
a run of d elements. More than SLOTS keys go in chunks: the merge is associative, so a chunk's
fp32 (output, lse) becomes the next chunk's causal part, and dq runs on through dq_causal.

Forward, one program per (batch x query head, block of positions): an online softmax merge
(running max) of the causal part and the n diagonal keys.

Backward, two kernels and no atomics, so the sums are deterministic:
- dq: one program per (batch x query head, block of positions) loops over the keys; it also
  writes p_j and ds_j * scale per (key, head, position) in fp32, 8 bytes against the 4d bytes of
  the key and value rows that dk/dv would otherwise read again to recompute them.
- dk, dv: one program per (key, batch x kv head, block of positions) sums its kv head's g query
  heads. The key index is the fastest grid axis, so the programs of one block of positions run
  together and share q and dout through L2, which HBM then serves about once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Key slots per launch: a TTT unroll of 7 steps needs at most 7 diagonal keys, so one launch covers
# every step; a longer unroll goes in chunks (each costing one more pass over q and the output).
SLOTS = 8
# Positions per program: 32 rows of d <= 128 keep the backward's five fp32 [BLOCK, d] tiles (q,
# dout, dq, k, v) within registers at 4 warps; d = 256 gets 8 warps for the same share per thread.
BLOCK = 32


def _warps(d: int) -> int:
    return 4 if d <= 128 else 8


@triton.jit
def _tile(ptr, strides, b, h, rows, inside, D: tl.constexpr):
    """Rows `rows` of head h of batch b as an fp32 [BLOCK, D] tile; `strides` (batch, head,
    position), the head dim contiguous."""
    base = ptr + b * strides[0] + h * strides[1]
    offsets = rows[:, None] * strides[2] + tl.arange(0, D)[None, :]
    return tl.load(base + offsets, mask=inside[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, strides, b, h, rows, inside, tile, D: tl.constexpr):
    base = ptr + b * strides[0] + h * strides[1]
    offsets = rows[:, None] * strides[2] + tl.arange(0, D)[None, :]
    tl.store(base + offsets, tile.to(ptr.dtype.element_ty), mask=inside[:, None])


@triton.jit
def _row(ptr, strides, b, h, rows, inside):
    """A per-position fp32 value ([BLOCK]) of head h of batch b."""
    return tl.load(ptr + b * strides[0] + h * strides[1] + rows * strides[2], mask=inside, other=0.0)


@triton.jit
def _positions(axis, S, BLOCK: tl.constexpr):
    """(positions as int64, so offsets cannot overflow, and which of them lie inside S)."""
    rows = tl.program_id(axis) * BLOCK + tl.arange(0, BLOCK)
    return rows.to(tl.int64), rows < S


@triton.jit(do_not_specialize=["n"])
def _merge_kernel(q, q_st, out_c, oc_st, lse_c, lc_st, keys, k_st, values, v_st, out, o_st, lse, l_st,
                  n, H, G, S, scale, D: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """(out, lse) of the causal part merged with keys 0..n-1, for one head and block of positions.
    k_st / v_st: each slot's (batch, head, position) strides, flat."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    kv = h // G
    rows, inside = _positions(1, S, BLOCK)
    qt = _tile(q, q_st, b, h, rows, inside, D)
    # Running max `top`, with the causal part's weight e^(lse_c - top) folded into acc and norm.
    top = _row(lse_c, lc_st, b, h, rows, inside)
    acc = _tile(out_c, oc_st, b, h, rows, inside, D)
    norm = tl.full([BLOCK], 1.0, tl.float32)
    for j in tl.static_range(SLOTS):
        if j < n:
            kt = _tile(keys[j], (k_st[3 * j], k_st[3 * j + 1], k_st[3 * j + 2]), b, kv, rows, inside, D)
            s = tl.sum(qt * kt, 1) * scale
            new_top = tl.maximum(top, s)
            old, w = tl.exp(top - new_top), tl.exp(s - new_top)
            vt = _tile(values[j], (v_st[3 * j], v_st[3 * j + 1], v_st[3 * j + 2]), b, kv, rows, inside, D)
            acc = acc * old[:, None] + w[:, None] * vt
            norm = norm * old + w
            top = new_top
    _store_tile(out, o_st, b, h, rows, inside, acc / norm[:, None], D)
    tl.store(lse + b * l_st[0] + h * l_st[1] + rows * l_st[2], top + tl.log(norm), mask=inside)


@triton.jit(do_not_specialize=["n"])
def _dq_kernel(dout, do_st, q, q_st, out, o_st, lse, l_st, dq_c, dqc_st, keys, k_st, values, v_st, dq, dq_st,
               p_buf, ds_buf, n, H, G, S, scale, D: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """dq_c plus the diagonal share of dq, for one head and block of positions; p_j and ds_j * scale
    to p_buf / ds_buf ([n, B * H, S] fp32) for the dk/dv kernel."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    kv = h // G
    rows, inside = _positions(1, S, BLOCK)
    dot = _tile(dout, do_st, b, h, rows, inside, D)
    delta = tl.sum(dot * _tile(out, o_st, b, h, rows, inside, D), 1)
    qt = _tile(q, q_st, b, h, rows, inside, D)
    lse_row = _row(lse, l_st, b, h, rows, inside)
    acc = _tile(dq_c, dqc_st, b, h, rows, inside, D)
    stride_key = tl.num_programs(0).to(tl.int64) * S  # one key's B * H * S entries in p_buf / ds_buf
    for j in tl.static_range(SLOTS):
        if j < n:
            kt = _tile(keys[j], (k_st[3 * j], k_st[3 * j + 1], k_st[3 * j + 2]), b, kv, rows, inside, D)
            vt = _tile(values[j], (v_st[3 * j], v_st[3 * j + 1], v_st[3 * j + 2]), b, kv, rows, inside, D)
            p = tl.exp(tl.sum(qt * kt, 1) * scale - lse_row)
            ds = p * (tl.sum(dot * vt, 1) - delta) * scale
            acc += ds[:, None] * kt
            at = j * stride_key + bh * S + rows
            tl.store(p_buf + at, p, mask=inside)
            tl.store(ds_buf + at, ds, mask=inside)
    _store_tile(dq, dq_st, b, h, rows, inside, acc, D)


@triton.jit
def _dkdv_kernel(dout, do_st, q, q_st, p_buf, ds_buf, dks, dvs, kv_st, H, G, S,
                 D: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """dk and dv of key program_id(0) for one kv head and block of positions: sums over its G query
    heads. dks / dvs: SLOTS slots of [B, Hkv, S, D] contiguous outputs (strides kv_st)."""
    key = tl.program_id(0).to(tl.int64)
    bkv = tl.program_id(1).to(tl.int64)
    hkv = H // G
    b, kv = bkv // hkv, bkv % hkv
    rows, inside = _positions(2, S, BLOCK)
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    for i in range(G):
        h = kv * G + i
        at = (key * tl.num_programs(1) * G + b * H + h) * S + rows  # [key, b * H + h, rows]
        ds = tl.load(ds_buf + at, mask=inside, other=0.0)
        p = tl.load(p_buf + at, mask=inside, other=0.0)
        dk += ds[:, None] * _tile(q, q_st, b, h, rows, inside, D)
        dv += p[:, None] * _tile(dout, do_st, b, h, rows, inside, D)
    for j in tl.static_range(SLOTS):
        if j == key:
            _store_tile(dks[j], kv_st, b, kv, rows, inside, dk, D)
            _store_tile(dvs[j], kv_st, b, kv, rows, inside, dv, D)


def fits(head_dim: int) -> bool:
    """Whether the kernels take this head dim: a power of two (tl.arange spans one)."""
    return head_dim >= 1 and head_dim & (head_dim - 1) == 0


def _head_dim(q: torch.Tensor) -> int:
    d = q.shape[-1]
    if not fits(d):
        raise ValueError(f"ttt diagonal kernel: head dim {d} is not a power of two (tl.arange spans a "
                         "power-of-two range; pad the heads or use trainer/ttt_attention.py's torch path)")
    return d


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim (a copy only where it is not), so each row loads as one run."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, head, position) strides of a [B, H, S, d] or [B, H, S] tensor."""
    return tuple(t.stride()[:3])


def _slots(tensors: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """(SLOTS tensors, their strides flat): the unused slots repeat the first tensor."""
    filled = [_rows(t) for t in tensors] + [_rows(tensors[0])] * (SLOTS - len(tensors))
    return tuple(filled), tuple(s for t in filled for s in _strides(t))


def _chunks(n: int):
    return [(start, min(start + SLOTS, n)) for start in range(0, n, SLOTS)]


def _sizes(q: torch.Tensor, keys) -> tuple[int, int, int, int]:
    """(B, H, S, heads per kv head)."""
    b, h, s, _ = q.shape
    return b, h, s, h // keys[0].shape[1]


def _result(q: torch.Tensor, last: bool) -> torch.Tensor:
    """The last chunk's [B, H, S, d] result in q.dtype, laid out [B, S, H, d] in memory as the flash
    kernels write it (o_proj, and q's projection in backward, then take it as it is); an fp32
    [B, H, S, d] carried into the next chunk before that."""
    b, h, s, d = q.shape
    if last:
        return torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty(b, h, s, d, dtype=torch.float32, device=q.device)


def merge_diagonal(q, out_c, lse_c, keys, values, scale: float):
    """trainer/ttt_attention.py `_merge_diagonal`: (out [B, H, S, d] in q.dtype laid out [B, S, H, d],
    lse [B, H, S] fp32) of the causal part (out_c, lse_c) with the diagonal keys folded in."""
    d = _head_dim(q)
    B, H, S, G = _sizes(q, keys)
    q, out_c = _rows(q), _rows(out_c)
    grid = (B * H, triton.cdiv(S, BLOCK))
    chunks = _chunks(len(keys))
    for i, (start, stop) in enumerate(chunks):
        out = _result(q, last=i == len(chunks) - 1)
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
        key_slots, k_st = _slots(keys[start:stop])
        value_slots, v_st = _slots(values[start:stop])
        _merge_kernel[grid](q, _strides(q), out_c, _strides(out_c), lse_c, _strides(lse_c), key_slots, k_st,
                            value_slots, v_st, out, _strides(out), lse, _strides(lse), stop - start, H, G, S,
                            scale, D=d, BLOCK=BLOCK, SLOTS=SLOTS, num_warps=_warps(d))
        out_c, lse_c = out, lse
    return out, lse


def diagonal_backward(dout, q, out, lse, keys, values, dq_causal, scale: float):
    """trainer/ttt_attention.py `_diagonal_backward`: (dq_causal plus the diagonal's share of dq, in
    q.dtype laid out [B, S, H, d]; dk_j and dv_j, [B, Hkv, S, d] contiguous in the keys' and values'
    dtypes)."""
    d = _head_dim(q)
    B, H, S, G = _sizes(q, keys)
    dout, q, out, dq = _rows(dout), _rows(q), _rows(out), _rows(dq_causal)
    dks, dvs = [], []
    chunks = _chunks(len(keys))
    for i, (start, stop) in enumerate(chunks):
        n = stop - start
        dq_c, dq = dq, _result(q, last=i == len(chunks) - 1)
        p_buf = torch.empty(n, B * H, S, dtype=torch.float32, device=q.device)
        ds_buf = torch.empty_like(p_buf)
        key_slots, k_st = _slots(keys[start:stop])
        value_slots, v_st = _slots(values[start:stop])
        _dq_kernel[(B * H, triton.cdiv(S, BLOCK))](
            dout, _strides(dout), q, _strides(q), out, _strides(out), lse, _strides(lse), dq_c, _strides(dq_c),
            key_slots, k_st, value_slots, v_st, dq, _strides(dq), p_buf, ds_buf, n, H, G, S, scale,
            D=d, BLOCK=BLOCK, SLOTS=SLOTS, num_warps=_warps(d))
        chunk_dks, chunk_dvs = _dkdv(dout, q, p_buf, ds_buf, keys[start:stop], values[start:stop], G)
        dks += chunk_dks
        dvs += chunk_dvs
    return dq, dks, dvs


def _dkdv(dout, q, p_buf, ds_buf, keys, values, G):
    """([dk_j], [dv_j]) of one chunk's keys from the dq kernel's p and ds buffers."""
    B, H, S, d = q.shape
    dks = [torch.empty(B, H // G, S, d, dtype=k.dtype, device=k.device) for k in keys]
    dvs = [torch.empty(B, H // G, S, d, dtype=v.dtype, device=v.device) for v in values]
    pad = SLOTS - len(keys)
    _dkdv_kernel[(len(keys), B * (H // G), triton.cdiv(S, BLOCK))](
        dout, _strides(dout), q, _strides(q), p_buf, ds_buf, tuple(dks + dks[:1] * pad),
        tuple(dvs + dvs[:1] * pad), _strides(dks[0]), H, G, S, D=d, BLOCK=BLOCK, SLOTS=SLOTS,
        num_warps=_warps(d))
    return dks, dvs
