"""Eagle3's TTT attention as step 0's causal attention plus one diagonal key per later step.

At TTT step k the query at position t sees step 0's keys at positions <= t and, from each of
steps 1..k, the key the draft made at position t itself. A masked kernel over the
concatenation of all k + 1 key sets (flex with the TTT block mask, trainer/draft.py) makes that
concatenation at every step, saves it for backward (1 + 2 + ... + 7 = 28 copies of the keys
and values over a 7-step unroll) and computes a whole tile for each diagonal entry.

A softmax over a union of key sets splits exactly. With the causal part's output o_c and
log-sum-exp l_c, and one score s_j = q . k_j / sqrt(d) per later step j:

    out = (e^l_c o_c + sum_j e^s_j v_j) / (e^l_c + sum_j e^s_j),   lse = log(e^l_c + sum_j e^s_j)

and the causal part's backward is the causal kernel's own, given the merged output and
log-sum-exp (its probabilities and its rowsum(dO * O) are then the whole softmax's, as in split
key-value attention); the diagonal's backward is elementwise. So the causal part runs on a plain
causal kernel (cuDNN's or FlashAttention-2 on CUDA, torch's flash kernel on CPU), each step's
keys and values are kept once (by the steps that read them, as tensors, not copies), and no
concatenation is made. On CUDA the diagonal's two passes are Triton kernels that take the number
of keys at run time (trainer/ttt_diagonal_kernel.py), so one compilation serves every TTT step.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fitplan.config import CUDNN_ATTENTION_FROM_CAPABILITY
from trainer.lean_ops import compiled_on_cuda, triton_module


class _CudaFlash:
    """torch's FlashAttention-2 (bf16/fp16, grouped-query heads native)."""

    @staticmethod
    def forward(q, k, v, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    @staticmethod
    def backward(dout, q, k, v, out, lse, state, scale):
        cum_q, cum_k, max_q, max_k, seed, offset = state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)


class CudaCudnn:
    """cuDNN's fused attention (bf16/fp16, grouped-query heads native): the faster causal kernel on
    an H200 from S 4096 on (benchmarks/ttt_attention_kernels.py). Its lse comes as [B, H, S, 1]."""

    @staticmethod
    def forward(q, k, v, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, lse.reshape(q.shape[:3]), (cum_q, cum_k, max_q, max_k, seed, offset, lse.shape)

    @staticmethod
    def backward(dout, q, k, v, out, lse, state, scale):
        cum_q, cum_k, max_q, max_k, seed, offset, lse_shape = state
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.reshape(lse_shape), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
            scale=scale)


class _CpuFlash:
    """torch's CPU flash attention: the same contract, for tests and CPU runs."""

    @staticmethod
    def forward(q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse, ()

    @staticmethod
    def backward(dout, q, k, v, out, lse, state, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, scale=scale)


def causal_kernel(q: torch.Tensor):
    """The causal kernel for q's device, or None where there is none (fp32 on CUDA)."""
    if q.device.type == "cpu":
        return _CpuFlash
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    # cuDNN's attention from Hopper on, where it beat FlashAttention-2 by 28-36% at S 4k-16k (not on
    # ROCm, which has no cuDNN); FlashAttention-2 elsewhere
    cudnn = (torch.version.hip is None and torch.backends.cuda.cudnn_sdp_enabled()
             and torch.cuda.get_device_capability(q.device) >= CUDNN_ATTENTION_FROM_CAPABILITY)
    return CudaCudnn if cudnn else _CudaFlash


def _grouped(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, S, ...] -> [B, Hkv, H / Hkv, S, ...]: query heads by the key head they share."""
    b, h = t.shape[:2]
    return t.reshape(b, kv_heads, h // kv_heads, *t.shape[2:])


def _diagonal_scores(qg: torch.Tensor, keys, scale: float) -> list[torch.Tensor]:
    """s_j = q . k_j / sqrt(d) at each position, fp32 [B, Hkv, g, S], one per later step."""
    return [(qg * k.float().unsqueeze(2)).sum(-1) * scale for k in keys]


def _merge_diagonal(q, out_c, lse_c, keys, values, scale: float):
    """The causal part's (output, lse) with the later steps' diagonal keys folded in."""
    kv_heads = keys[0].shape[1]
    qg = _grouped(q, kv_heads).float()
    lse_g = _grouped(lse_c, kv_heads)
    scores = _diagonal_scores(qg, keys, scale)
    top = lse_g
    for s in scores:
        top = torch.maximum(top, s)
    w_c = torch.exp(lse_g - top)
    total = w_c.unsqueeze(-1) * _grouped(out_c, kv_heads).float()
    norm = w_c
    for s, v in zip(scores, values):
        w = torch.exp(s - top)
        total = total + w.unsqueeze(-1) * v.float().unsqueeze(2)
        norm = norm + w
    out = (total / norm.unsqueeze(-1)).flatten(1, 2)
    # laid out [B, S, H, d] in memory, as the flash kernel writes: o_proj flattens the heads free
    out = out.transpose(1, 2).contiguous().transpose(1, 2).to(q.dtype)
    return out, (top + torch.log(norm)).flatten(1, 2)


def _diagonal_backward(dout, q, out, lse, keys, values, dq_causal, scale: float):
    """(dq with the diagonal's share added, dk_j, dv_j) for the later steps' keys."""
    kv_heads = keys[0].shape[1]
    qg, dog = _grouped(q, kv_heads).float(), _grouped(dout, kv_heads).float()
    lse_g = _grouped(lse, kv_heads)
    delta = (dog * _grouped(out, kv_heads).float()).sum(-1)
    dq = _grouped(dq_causal, kv_heads).float()
    dks, dvs = [], []
    for s, k, v in zip(_diagonal_scores(qg, keys, scale), keys, values):
        p = torch.exp(s - lse_g)
        ds = p * ((dog * v.float().unsqueeze(2)).sum(-1) - delta)
        dq = dq + (ds * scale).unsqueeze(-1) * k.float().unsqueeze(2)
        dks.append(((ds * scale).unsqueeze(-1) * qg).sum(2).to(k.dtype))
        dvs.append((p.unsqueeze(-1) * dog).sum(2).to(v.dtype))
    return dq.flatten(1, 2).to(q.dtype), dks, dvs


@lru_cache(maxsize=None)
def diagonal_kernels(device_type: str, head_dim: int):
    """(merge, backward) of the diagonal keys: on CUDA the Triton kernels
    (trainer/ttt_diagonal_kernel.py: one compilation for every key count) where triton imports and
    the head dim is a power of two, else the torch functions compiled (one graph per key count, a
    TTT unroll's worth of cold compilation); as they are elsewhere."""
    kernels = triton_module("ttt_diagonal_kernel") if device_type == "cuda" else None
    if kernels and kernels.fits(head_dim):
        return kernels.merge_diagonal, kernels.diagonal_backward
    return compiled_diagonal_kernels(device_type)


@lru_cache(maxsize=None)
def compiled_diagonal_kernels(device_type: str):
    """(merge, backward) as torch functions, compiled on CUDA into fused passes (no fp32 copies made)."""
    return compiled_on_cuda(device_type, _merge_diagonal, _diagonal_backward)


class _TTTAttention(torch.autograd.Function):
    """Attention of step k's queries over step 0's causal keys and steps 1..k's diagonal keys.

    Saves the query, the merged output and lse, and the keys and values given (the unroll's own
    tensors, shared by every step that reads them)."""

    @staticmethod
    def forward(ctx, kernel, diagonal, scale, q, *keys_values):
        n = len(keys_values) // 2
        keys, values = keys_values[:n], keys_values[n:]
        out, lse, state = kernel.forward(q, keys[0], values[0], scale)
        if n > 1:
            out, lse = diagonal[0](q, out, lse, keys[1:], values[1:], scale)
        ctx.save_for_backward(q, out, lse, *keys_values)
        ctx.kernel, ctx.diagonal, ctx.scale, ctx.state, ctx.n = kernel, diagonal, scale, state, n
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, *keys_values = ctx.saved_tensors
        keys, values = keys_values[: ctx.n], keys_values[ctx.n :]
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        dq, dk0, dv0 = ctx.kernel.backward(dout, q, keys[0], values[0], out, lse, ctx.state, ctx.scale)
        dks, dvs = [], []
        if ctx.n > 1:
            dq, dks, dvs = ctx.diagonal[1](dout, q, out, lse, keys[1:], values[1:], dq, ctx.scale)
        return None, None, None, dq, dk0, *dks, dv0, *dvs


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], kernel=None,
                  diagonal=None) -> torch.Tensor:
    """Step len(keys) - 1's attention: q [B, H, S, d]; keys[0] / values[0] step 0's [B, Hkv, S, d]
    (causal), keys[j] / values[j] step j's (each position sees its own). Returns [B, H, S, d].
    `kernel`: the causal kernel (default: causal_kernel(q)); `diagonal`: the diagonal keys' (merge,
    backward) (default: diagonal_kernels for q's device and head dim)."""
    kernel = kernel or causal_kernel(q)
    if kernel is None:
        raise ValueError(f"ttt_attention: no causal kernel for {q.dtype} on {q.device.type}")
    diagonal = diagonal or diagonal_kernels(q.device.type, q.shape[-1])
    return _TTTAttention.apply(kernel, diagonal, q.shape[-1] ** -0.5, q, *keys, *values)
