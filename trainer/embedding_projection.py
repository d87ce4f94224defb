"""The embedding half of the draft's q/k/v projections, made once per unroll instead of per TTT step.

The draft's attention reads cat(norm(emb_k), norm(hidden_k)) at TTT step k, and emb_k is the
frozen embedding of the input tokens shifted by k: emb_k[t] = E[x_{t+k+1}]. RMSNorm works row by
row, so norm(emb_k) @ W_e^T (W_e: the first h columns of a projection weight) is rows k..k+S of
one product over the unroll's S + L - 1 distinct tokens,

    P = norm(E[x_1 .. x_{S+L-1}]) @ W_e^T,

made once before the first step and sliced by each. Backward is shifted the same way: each step
adds its q/k/v output gradients into fp32 buffers G over those rows (its rows k..k+S), and the
last step's backward call makes from G, in one GEMM each, the emb columns' weight gradients and
the gradient of norm(E), whence the input_layernorm weight's. Per step this drops the emb half of
the forward GEMM, of the weight-gradient GEMM and of the input-gradient GEMM (whose only use was
that norm weight's gradient); and no step keeps its embedding, which is gathered again at the end.

It runs with fused norms and the steps' gradients summed in one buffer per weight (StepGrads,
trainer/step_grads.py: one GPU): the emb columns' gradient joins the weight's sum before the last
call hands it to autograd. Backward calls are counted, as StepGrads counts them: a checkpointed
step runs its forward twice and its backward once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.lean_ops import compiled_on_cuda, triton_module
from trainer.norm_project import norm_kernels
from trainer.step_grads import StepGrads, add_product

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _norm_weight_grad(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d weight of weight * x * rstd(x) given the output's gradient (no input gradient: the
    embedding is frozen), summed over every row, fp32."""
    return (grad.float() * (x.float() * rstd)).sum(dim=tuple(range(grad.dim() - 1)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _add(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """total += part in place, bf16 into fp32: on CUDA trainer/add_kernel.py's one pass where
    triton imports and the two are contiguous (batch 1), else torch's add_; returns total."""
    kernel = triton_module("add_kernel") if total.is_cuda else None
    if kernel is not None and kernel.fits(total, part):
        return kernel.add_into(total, part)
    return total.add_(part)


class EmbeddingProjection:
    """P for one unroll, and G, the gradient of P summed over the steps' backward calls, each
    kept as one tensor per projection: a step's rows of one are contiguous at batch 1, so adding
    into them is one vectorized pass (a column slice of a joined table was a strided one).

    `ids` are the tokens the steps embed, [B, S + L - 1] (input positions 1 .. S + L - 1); `dtype`
    the steps' compute dtype, P's. P lives until the last backward call, G from the first.
    """

    def __init__(self, table: torch.Tensor, ids: torch.Tensor, norm: torch.nn.Module,
                 projections: tuple[torch.Tensor, ...], dtype: torch.dtype, steps: int):
        self.table, self.ids, self.eps, self.dtype, self.steps = table, ids, norm.eps, dtype, steps
        self.grads: list[torch.Tensor] | None = None
        self.calls = 0
        with torch.no_grad():
            emb = self._embedding()
            normed, _ = self._normalize(emb, norm.weight)
            del emb
            self.products = [normed @ w[:, : w.shape[1] // 2].to(dtype).T for w in projections]

    def _embedding(self) -> torch.Tensor:
        return F.embedding(self.ids, self.table).to(self.dtype)

    def _normalize(self, emb: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalize, _, _ = norm_kernels(emb.device.type)
        normed, rstd = normalize(emb, weight, self.eps)
        return normed.to(self.dtype), rstd

    def step_rows(self, k: int, seq: int, j: int) -> torch.Tensor:
        """Step k's slice of P for projection j: [B, S, out_j]."""
        return self.products[j][:, k : k + seq]

    def add_grad(self, k: int, out_grads: tuple[torch.Tensor, ...]) -> None:
        """Step k's q/k/v output gradients into G's rows k..k+S (G made at the first call)."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p, dtype=torch.float32) for p in self.products]
        seq = out_grads[0].shape[1]
        for grad, g in zip(self.grads, out_grads):
            _add(grad[:, k : k + seq], g)

    def counted_last(self) -> bool:
        """Count one backward call; whether it is the unroll's last."""
        self.calls += 1
        return self.calls == self.steps

    def finish(self, norm_weight: torch.Tensor, projections: tuple[torch.Tensor, ...],
               totals: list[torch.Tensor]) -> torch.Tensor:
        """At the last call: the emb columns' weight gradients added into `totals` (each weight's
        summed gradient), and the input norm weight's gradient returned. P and G go."""
        self.products = None
        grads = [_rows(g.to(self.dtype)) for g in self.grads]  # the GEMMs run in the compute dtype, as the steps' did
        self.grads = None
        emb = self._embedding()
        normed, rstd = self._normalize(emb, norm_weight)
        normed = _rows(normed)
        h = normed.shape[-1]
        for grad, total in zip(grads, totals):
            add_product(total[:, :h], grad.T, normed)
        del normed
        grad_normed = None
        for grad, w in zip(grads, projections):
            w_e = w[:, :h].to(self.dtype)
            grad_normed = grad @ w_e if grad_normed is None else grad_normed.addmm_(grad, w_e)
        del grads
        (weight_grad,) = compiled_on_cuda(emb.device.type, _norm_weight_grad)
        return weight_grad(grad_normed.view_as(emb), emb, rstd).to(norm_weight.dtype)


class _ProjectWithEmbedding(torch.autograd.Function):
    """q/k/v of step k: norm(hidden) @ W_h^T plus step k's rows of P; saves hidden and its rstd."""

    @staticmethod
    def forward(ctx, shared, k, grads, hidden, hidden_norm_w, input_norm_w, *projections):
        normalize, _, _ = norm_kernels(hidden.device.type)
        normed, rstd = normalize(hidden, hidden_norm_w, shared.eps)  # the layer's norms share one eps
        normed = normed.to(shared.dtype)
        h, seq = hidden.shape[-1], hidden.shape[1]
        outs = tuple((normed @ w[:, h:].to(shared.dtype).T).add_(shared.step_rows(k, seq, j))
                     for j, w in enumerate(projections))
        ctx.save_for_backward(hidden, rstd, hidden_norm_w, input_norm_w, *projections)
        ctx.shared, ctx.k, ctx.grads = shared, k, grads
        return outs

    @staticmethod
    def backward(ctx, *out_grads):
        hidden, rstd, hidden_norm_w, input_norm_w, *projections = ctx.saved_tensors
        shared, grads, dtype = ctx.shared, ctx.grads, ctx.shared.dtype
        _, renorm, norm_backward = norm_kernels(hidden.device.type)
        shared.add_grad(ctx.k, out_grads)
        h = hidden.shape[-1]
        normed = _rows(renorm(hidden, hidden_norm_w, rstd).to(dtype))
        totals, grad_normed = [], None
        for g, w, name in zip(out_grads, projections, PROJECTIONS):
            g = _rows(g.to(dtype))
            totals.append(grads.total(name, w))
            add_product(totals[-1][:, h:], g.T, normed)
            w_h = w[:, h:].to(dtype)
            grad_normed = g @ w_h if grad_normed is None else grad_normed.addmm_(g, w_h)
        del normed
        grad_hidden, grad_norm = norm_backward(grad_normed.view_as(hidden), hidden, hidden_norm_w, rstd)
        del grad_normed
        grads.total("hidden_norm", hidden_norm_w).add_(grad_norm)
        grad_input_norm = shared.finish(input_norm_w, projections, totals) if shared.counted_last() else None
        return (None, None, None, grad_hidden, grads.done("hidden_norm"), grad_input_norm,
                *(grads.done(name) for name in PROJECTIONS))


class StepEmbedding:
    """What TTT step k's layer reads in place of its embedding: its rows of the unroll's P."""

    def __init__(self, shared: EmbeddingProjection, k: int):
        self.shared, self.k = shared, k

    def project(self, hidden: torch.Tensor, hidden_norm_w: torch.Tensor, input_norm_w: torch.Tensor,
                projections: tuple[torch.Tensor, ...], grads: StepGrads) -> tuple[torch.Tensor, ...]:
        """(q, k, v) of cat(norm(emb_k), norm(hidden)) through `projections` ([out, 2h] each)."""
        return _ProjectWithEmbedding.apply(self.shared, self.k, grads, hidden, hidden_norm_w, input_norm_w,
                                           *projections)
