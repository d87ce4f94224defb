"""RMSNorm fused with the projections that read its output, keeping only the norm's input.

In a Llama layer every RMSNorm output is read by matmuls alone (q/k/v, gate/up, the head), so
torch's composition keeps two tensors per token for one: the norm's input (for the norm's own
backward) and its output (for the matmuls' weight gradients). Here the output is recomputed in
backward from the input and an fp32 rstd per row, an elementwise pass, so a TTT step keeps the
input alone. For the draft's attention input, cat(norm(embedding), norm(hidden)), that is 4h
bytes per token per step less; after the attention, 2h.

The norm's arithmetic is compiled on CUDA (one fused pass each way; lean_ops.compiled_on_cuda).
"""

from __future__ import annotations

import torch

from trainer.lean_ops import compiled_on_cuda, compute_dtype
from trainer.step_grads import StepGrads, add_product, grad_result, grad_total


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x) in x's dtype, the fp32 rstd per row)."""
    x32 = _upcast(x)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def renormalize(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The norm's output again, from its input and the rstd forward computed."""
    return weight * (_upcast(x) * rstd).to(x.dtype)


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """(d x, d weight) of weight * x * rstd(x), given the output's gradient."""
    x_hat = _upcast(x) * rstd
    g = _upcast(grad)
    grad_weight = (g * x_hat).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
    gx = g * _upcast(weight)
    grad_x = rstd * (gx - x_hat * (gx * x_hat).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight


def norm_kernels(device_type: str):
    """(rms_normalize, renormalize, rms_norm_backward), compiled on CUDA."""
    return compiled_on_cuda(device_type, rms_normalize, renormalize, rms_norm_backward)


class _NormProject(torch.autograd.Function):
    """cat(norm_i(x_i)) @ W_j^T for each projection j; saves the x_i and their rstds."""

    @staticmethod
    def forward(ctx, eps, n_inputs, grads, names, *tensors):
        xs, norm_ws, proj_ws = tensors[:n_inputs], tensors[n_inputs : 2 * n_inputs], tensors[2 * n_inputs :]
        normalize, _, _ = norm_kernels(xs[0].device.type)
        dtype = compute_dtype(xs[0])
        normed, rstds = zip(*(normalize(x, w, eps) for x, w in zip(xs, norm_ws)))
        joined = torch.cat(normed, dim=-1).to(dtype) if n_inputs > 1 else normed[0].to(dtype)
        del normed
        outs = tuple(joined @ w.to(dtype).T for w in proj_ws)
        ctx.save_for_backward(*xs, *rstds, *norm_ws, *proj_ws)
        ctx.n_inputs, ctx.dtype, ctx.grads, ctx.names = n_inputs, dtype, grads, names
        return outs

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n_inputs
        saved = ctx.saved_tensors
        xs, rstds, norm_ws, proj_ws = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n], saved[3 * n :]
        _, renorm, norm_backward = norm_kernels(xs[0].device.type)
        joined = torch.cat([renorm(x, w, r) for x, w, r in zip(xs, norm_ws, rstds)], dim=-1).to(ctx.dtype)
        flat_joined = joined.reshape(-1, joined.shape[-1])
        names = ctx.names or tuple(f"w{i}" for i in range(len(saved) - 2 * n))  # any, when nothing is summed
        norm_names, proj_names = names[:n], names[n:]
        grad_joined = None
        grad_projs = []
        for grad, w, name in zip(grads, proj_ws, proj_names):
            grad = grad.to(ctx.dtype)
            flat = grad.reshape(-1, grad.shape[-1])
            total = grad_total(ctx.grads, name, w)
            add_product(total, flat.T, flat_joined)
            grad_projs.append(total)
            step = grad @ w.to(ctx.dtype)
            grad_joined = step if grad_joined is None else grad_joined.add_(step)
        del joined, flat_joined
        grad_projs = [grad_result(ctx.grads, name, total) for name, total in zip(proj_names, grad_projs)]
        grad_xs, grad_norm_ws = [], []
        for part, x, w, r, name in zip(grad_joined.split([x.shape[-1] for x in xs], dim=-1), xs, norm_ws, rstds,
                                       norm_names):
            grad_x, grad_w = norm_backward(part, x, w, r)
            grad_xs.append(grad_x if ctx.needs_input_grad[4 + len(grad_xs)] else None)
            total = grad_total(ctx.grads, name, w)
            total.add_(grad_w)
            grad_norm_ws.append(grad_result(ctx.grads, name, total))
        return None, None, None, None, *grad_xs, *grad_norm_ws, *grad_projs


def norm_project(xs: tuple[torch.Tensor, ...], norm_weights: tuple[torch.Tensor, ...], eps: float,
                 projections: tuple[torch.Tensor, ...], grads: StepGrads | None = None,
                 names: tuple[str, ...] = ()) -> tuple[torch.Tensor, ...]:
    """cat(RMSNorm_i(x_i)) projected by each weight [out_j, sum h_i]: one output per weight.
    With `grads` (trainer/step_grads.py) the weights' gradients are summed there under `names`
    (the norms' then the projections')."""
    if grads is not None and len(names) != len(norm_weights) + len(projections):
        raise ValueError("norm_project: one name per norm weight and per projection")
    return _NormProject.apply(eps, len(xs), grads, tuple(names), *xs, *norm_weights, *projections)


class _HeadsProject(torch.autograd.Function):
    """o_proj over the attention output as the kernel returns it, [B, H, S, d]: the [B, S, H*d]
    copy a matmul needs is made again in backward rather than kept (the kernel keeps its own
    output for its backward already)."""

    @staticmethod
    def forward(ctx, out, weight, grads, name):
        dtype = compute_dtype(out)
        ctx.save_for_backward(out, weight)
        ctx.dtype, ctx.grads, ctx.name = dtype, grads, name
        return _flat(out).to(dtype) @ weight.to(dtype).T

    @staticmethod
    def backward(ctx, grad):
        out, weight = ctx.saved_tensors
        b, heads, s, d = out.shape
        grad = grad.to(ctx.dtype)
        flat = _flat(out).to(ctx.dtype)
        grad_w = grad_total(ctx.grads, ctx.name, weight)
        add_product(grad_w, grad.reshape(-1, grad.shape[-1]).T, flat.reshape(-1, flat.shape[-1]))
        del flat
        grad_out = (grad @ weight.to(ctx.dtype)).view(b, s, heads, d).transpose(1, 2).to(out.dtype)
        return grad_out, grad_result(ctx.grads, ctx.name, grad_w), None, None


def _flat(out: torch.Tensor) -> torch.Tensor:
    b, heads, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, heads * d)


def heads_project(out: torch.Tensor, weight: torch.Tensor, grads: StepGrads | None = None,
                  name: str = "o_proj") -> torch.Tensor:
    """[B, H, S, d] attention output -> [B, S, hidden] through o_proj's weight [hidden, H*d]."""
    return _HeadsProject.apply(out, weight, grads, name)
