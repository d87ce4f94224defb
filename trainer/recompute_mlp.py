"""The post-attention RMSNorm and the SwiGLU MLP in one function that keeps only the norm's input.

With fused norms (trainer/norm_project.py) a TTT step already keeps the hidden after attention,
the post-attention norm's input; what its MLP adds is gate and up, [.., I] each (SwiGLUDown in
trainer/lean_ops.py keeps both), 4I bytes per token per step: at h 4096, I 14336 that is over
half of what a step keeps. Here backward makes the norm's output, gate and up again from the
kept input (two more matmuls per step) before running the same gradients, so a step keeps
nothing of its MLP but one fp32 rstd per row (RunSpec recompute_mlp).
"""

from __future__ import annotations

import torch

from trainer.lean_ops import compute_dtype, swiglu_down_backward, swiglu_kernels
from trainer.norm_project import norm_kernels
from trainer.step_grads import StepGrads, add_product, grad_result, grad_total

NAMES = ("post_attention_layernorm", "gate_proj", "up_proj", "down_proj")


class _NormSwiGLUDown(torch.autograd.Function):
    """down(silu(norm(x) @ Wg^T) * (norm(x) @ Wu^T)); saves x, its fp32 rstd and the weights."""

    @staticmethod
    def forward(ctx, x, norm_w, w_gate, w_up, w_down, eps, grads):
        normalize, _, _ = norm_kernels(x.device.type)
        swiglu, _ = swiglu_kernels(x.device.type)
        dtype = compute_dtype(x)
        normed, rstd = normalize(x, norm_w, eps)
        normed = normed.to(dtype)
        gate, up = normed @ w_gate.to(dtype).T, normed @ w_up.to(dtype).T
        del normed
        product = swiglu(gate, up).to(dtype)
        del gate, up
        ctx.save_for_backward(x, rstd, norm_w, w_gate, w_up, w_down)
        ctx.dtype, ctx.grads = dtype, grads
        return product @ w_down.to(dtype).T

    @staticmethod
    def backward(ctx, grad):
        x, rstd, norm_w, w_gate, w_up, w_down = ctx.saved_tensors
        _, renorm, norm_backward = norm_kernels(x.device.type)
        dtype, grads = ctx.dtype, ctx.grads
        totals = {}
        normed = renorm(x, norm_w, rstd).to(dtype)
        gate, up = normed @ w_gate.to(dtype).T, normed @ w_up.to(dtype).T
        totals["down_proj"] = grad_total(grads, "down_proj", w_down)
        grad_gate, grad_up = swiglu_down_backward(grad.to(dtype), gate, up, w_down, totals["down_proj"])
        del gate, up
        for name, g, w in (("gate_proj", grad_gate, w_gate), ("up_proj", grad_up, w_up)):
            totals[name] = grad_total(grads, name, w)
            add_product(totals[name], _rows(g).T, _rows(normed))
        del normed
        grad_normed = (grad_gate @ w_gate.to(dtype)).add_(grad_up @ w_up.to(dtype))
        del grad_gate, grad_up
        grad_x, grad_norm = norm_backward(grad_normed, x, norm_w, rstd)
        totals["post_attention_layernorm"] = grad_total(grads, "post_attention_layernorm", norm_w).add_(grad_norm)
        return (grad_x, *(grad_result(grads, name, totals[name]) for name in NAMES), None, None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def norm_swiglu_down(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_gate: torch.Tensor,
                     w_up: torch.Tensor, w_down: torch.Tensor, grads: StepGrads | None = None) -> torch.Tensor:
    """The MLP block's output for the hidden after attention `x` [.., h] (without the residual).
    With `grads` (trainer/step_grads.py) the four weights' gradients are summed there."""
    return _NormSwiGLUDown.apply(x, norm_weight, w_gate, w_up, w_down, eps, grads)
