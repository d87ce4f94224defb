"""The draft's lm_head fused with Eagle3's soft-label loss, a chunk of positions at a time.

Unfused, each TTT step keeps its fp32 log-softmax [B, S, Vd] for backward: at B1 S16384 with
a 32k draft vocab that is 2 GiB per step, 14 GiB over a 7-step unroll, more than the decoder
layer's own activations at short lengths. Here a step keeps only the normed hidden it was given
(the head's input, [B, S, h] bf16, which the unfused head saved too). Forward computes the loss
chunk by chunk and frees each chunk's logits; backward recomputes them a chunk at a time and
turns them into gradients for the hidden and the head weight.

Only positions the loss counts are computed: a masked position (outside the assistant's tokens,
target argmax outside the draft vocab, the TTT padding at the end) contributes neither loss nor
gradient, so its logits are never formed.

Liger-Kernel's fused linear losses do the same for hard labels and for teachers given as hidden
states and a weight; Eagle3's teacher is a probability table over the draft vocab, which none of
them takes, hence this small recompute-in-backward function in plain torch (it runs on CPU too).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.lean_ops import compute_dtype

# Bytes of fp32 logits one chunk may hold. Four fp32 tables of this size are alive at once
# (logits, the gathered teacher rows, log-softmax and product), so a chunk costs 256 MiB; small
# enough that the few hundred MiB a sparse loss mask leaves unused barely move the peak, large
# enough (524 rows at a 32k vocab) to keep the GEMMs efficient.
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab: int) -> int:
    """Positions per chunk: as many as fit CHUNK_BYTES of fp32 logits."""
    return max(1, CHUNK_BYTES // (4 * vocab))


class _HeadSoftCE(torch.autograd.Function):
    """sum over counted rows of -sum_v p[v] log softmax(x W^T)[v], and top-1 agreements.

    x [N, h] and probs [M, Vd] are row tables; x_rows[i] is scored against probs[p_rows[i]].
    """

    @staticmethod
    def forward(ctx, x, weight, probs, x_rows, p_rows, chunk):
        dtype = compute_dtype(x)
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        agree = torch.zeros((), dtype=torch.long, device=x.device)
        for start in range(0, x_rows.numel(), chunk):
            logits = (x.index_select(0, x_rows[start : start + chunk]).to(dtype) @ w.T).float()
            p = probs.index_select(0, p_rows[start : start + chunk])
            loss -= (p * torch.log_softmax(logits, dim=-1)).sum()
            agree += (logits.argmax(-1) == p.argmax(-1)).sum()
        ctx.save_for_backward(x, weight, probs, x_rows, p_rows)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(agree)
        return loss, agree

    @staticmethod
    def backward(ctx, grad_loss, _grad_agree):
        x, weight, probs, x_rows, p_rows = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_x = torch.zeros_like(x)
        grad_w = torch.zeros_like(weight)
        for start in range(0, x_rows.numel(), ctx.chunk):
            rows = x_rows[start : start + ctx.chunk]
            xs = x.index_select(0, rows).to(ctx.dtype)
            p = probs.index_select(0, p_rows[start : start + ctx.chunk])
            # d/dz of -sum p log softmax(z) is softmax(z) * sum(p) - p
            grad_logits = torch.softmax((xs @ w.T).float(), dim=-1).mul_(p.sum(-1, keepdim=True)).sub_(p)
            grad_logits = grad_logits.mul_(grad_loss).to(ctx.dtype)
            grad_x.index_copy_(0, rows, (grad_logits @ w).to(x.dtype))
            _accumulate(grad_w, grad_logits.T, xs)
        return grad_x, grad_w, None, None, None, None


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, in one GEMM when the dtypes agree (fp32 weights under autocast: cast)."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    else:
        total.add_((a @ b).to(total.dtype))


class DraftHead(nn.Module):
    """The draft's lm_head [Vd, h] (checkpoint key `lm_head.weight`), applied inside the loss.

    A module so that a sharded trainer gathers its weight on the way in, as for any layer.
    """

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation

    def forward(self, normed: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor, offset: int):
        """(summed soft cross-entropy, top-1 agreements) of TTT step `offset - 1`.

        normed [B, S, h]: the step's final-norm output. probs [B, S + L, Vd] and valid [B, S + L]:
        the whole teacher; position t of this step is scored against teacher position t + offset.
        Indexing the teacher by row keeps it in place (a slice of it, flattened, would be a copy).
        """
        batch, seq, hidden = normed.shape
        padded = probs.shape[1]
        b, t = valid[:, offset : offset + seq].nonzero(as_tuple=True)
        x_rows, p_rows = b * seq + t, b * padded + t + offset
        return _HeadSoftCE.apply(normed.reshape(-1, hidden), self.weight, probs.view(-1, probs.shape[-1]),
                                 x_rows, p_rows, chunk_rows(self.weight.shape[0]))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Plain logits [B, S, Vd], for inference-style checks."""
        return normed @ self.weight.to(normed.dtype).T
