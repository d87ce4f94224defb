"""The draft's lm_head fused with Eagle3's soft-label loss, a chunk of positions at a time.

Unfused, each TTT step keeps its fp32 log-softmax [B, S, Vd] for backward: at B1 S16384 with
a 32k draft vocab that is 2 GiB per step, 14 GiB over a 7-step unroll, more than the decoder
layer's own activations at short lengths. Here a step keeps only the layer's output hidden it
was given ([B, S, h] bf16, which the next step keeps anyway): the final RMSNorm is applied
inside, per chunk, and its output recomputed in backward rather than kept. Forward computes the
loss chunk by chunk and frees each chunk's logits; backward recomputes them a chunk at a time
and turns them into gradients for the hidden, the norm weight and the head weight. The teacher
is the target's bf16 logits over the draft vocab; each of its rows' log-sum-exp and argmax is
taken once per micro-batch (`teacher_stats`), its probabilities per chunk from those.

Only positions the loss counts are computed: a masked position (outside the assistant's tokens,
target argmax outside the draft vocab, the TTT padding at the end) contributes neither loss nor
gradient, so its logits are never formed. Which positions count is read to the host once per
micro-step (`CountedRows`), so the steps themselves never wait for the device.

On CUDA the per-chunk softmax arithmetic is compiled into a couple of fused kernels that read
the bf16 logits and gather the teacher rows themselves; eager, the same arithmetic would make
about ten passes over fp32 [chunk, Vd] tables. Loss and gradient at once, the hot path, is a
hand-written Triton kernel there (trainer/head_loss_kernel.py): two passes over each row, the
second meant to find it still in L2.

With summed step gradients (trainer/step_grads.py) the head can make its gradients in forward
instead, while each chunk's logits exist (RunSpec head_grad_in_forward, the default there):
the logits are formed once, not twice, the softmax taken in one pass for loss and gradient,
and backward reads neither the teacher nor the hidden. A step then keeps the hidden's gradient
[B, S, h] bf16 in place of the hidden, and the teacher can go once the unroll has scored it.

Liger-Kernel's fused linear losses do the same for hard labels and for teachers given as hidden
states and a weight; Eagle3's teacher is a probability table over the draft vocab, which none of
them takes, hence these small functions in plain torch (they run on CPU too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fitplan.estimator import draft_terms
from trainer.lean_ops import compiled_on_cuda, compute_dtype, triton_module
from trainer.norm_project import norm_kernels
from trainer.step_grads import StepGrads, add_product, grad_result, grad_total

if TYPE_CHECKING:
    from trainer.loss import Teacher


def chunk_rows(vocab: int, grad_in_forward: bool = False) -> int:
    """Positions per chunk, as the estimator counts them (fitplan draft_terms.fused_head_rows:
    256 MiB of fp32 logits, or with the gradients made in forward 512 MiB of bf16 ones, over which
    the Triton kernel writes the gradient). Compiled (CUDA), a chunk holds its bf16 logits
    (forward) and their bf16 gradient (backward); eager (CPU) about 20 bytes per logit."""
    return draft_terms.fused_head_rows(vocab, grad_in_forward)


class CountedRows:
    """The positions a micro-batch's loss counts, on the host: one device-to-host copy per
    micro-step instead of a wait inside every TTT step. Kept as numpy arrays: torch's boolean
    indexing of host tensors took milliseconds per row on the GPU machine, time the GPU spent
    idle waiting for the draft's first kernels.

    On CUDA the copy is queued behind the teacher and read when the first step's head needs it:
    by then the host has queued that step's layer, so the GPU works through it while the host
    waits, instead of idling between the teacher and the draft while the host reads."""

    def __init__(self, valid: torch.Tensor):
        self.batch, self.padded = valid.shape
        self.device = valid.device
        self._copied = None
        if valid.is_cuda:
            self._host = torch.empty(valid.shape, dtype=valid.dtype, pin_memory=True).copy_(valid, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = valid
        self._positions: list[np.ndarray] | None = None

    @property
    def positions(self) -> list[np.ndarray]:
        """Per batch row, the counted positions, sorted."""
        if self._positions is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._positions = [np.flatnonzero(row) for row in self._host.numpy()]
            self._host = None
        return self._positions

    def _spans(self, offset: int, seq: int) -> list[np.ndarray]:
        """Per row, where teacher positions offset .. offset + seq start and end in its positions."""
        return [np.searchsorted(j, (offset, offset + seq)) for j in self.positions]

    def count(self, offset: int, seq: int) -> int:
        """Positions the step scored at teacher offset counts."""
        return sum(int(hi - lo) for lo, hi in self._spans(offset, seq))

    def for_step(self, offset: int, seq: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(rows of the step's [B*S, h] hidden, rows of the teacher's [B*(S+L), Vd] table, spans)
        for the step scored against teacher positions t + offset. `spans` has one entry per
        `chunk` rows: the hidden's rows as a slice where they are consecutive (every position
        counted, the usual case: the chunk reads a view and writes its gradient in one copy, no
        gather or scatter), else None."""
        x_rows, p_rows = [], []
        for row, (j, (lo, hi)) in enumerate(zip(self.positions, self._spans(offset, seq))):
            kept = j[lo:hi]
            x_rows.append(row * seq + kept - offset)
            p_rows.append(row * self.padded + kept)
        x_host = np.concatenate(x_rows)
        spans = tuple(_consecutive(x_host[start : start + chunk]) for start in range(0, len(x_host), chunk))
        both = torch.from_numpy(np.stack((x_host, np.concatenate(p_rows))).astype(np.int64))
        if self.device.type == "cuda":
            both = both.pin_memory().to(self.device, non_blocking=True)
        return both[0], both[1], spans


def _consecutive(rows: np.ndarray) -> slice | None:
    """rows (sorted, distinct) as a slice where they run without a gap, else None."""
    first, last = int(rows[0]), int(rows[-1])
    return slice(first, last + 1) if last - first + 1 == len(rows) else None


def _hidden_grad_buffer(x: torch.Tensor, x_rows: torch.Tensor, spans: tuple) -> torch.Tensor:
    """The hidden's gradient, for the chunks to write their rows into: zeros where some rows are
    not counted (their gradient is 0), left unfilled where the chunks' slices cover every row."""
    covered = x_rows.numel() == x.shape[0] and all(span is not None for span in spans)
    return torch.empty_like(x) if covered else torch.zeros_like(x)


def _chunks(x_rows: torch.Tensor, spans: tuple, chunk: int):
    """Per chunk: (where its hidden rows are: a slice or an index tensor, its offset in the rows)."""
    for i, start in enumerate(range(0, x_rows.numel(), chunk)):
        yield (spans[i] if spans[i] is not None else x_rows[start : start + chunk]), start


# Teacher rows whose statistics are taken at a time on the CPU path: bounds its fp32 copy.
STATS_ROWS = 1024


def _torch_teacher_stats(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp fp32, first argmax int32) of each row of a teacher of logits [M, Vd], a
    block of rows at a time."""
    rows = table.shape[0]
    lse = torch.empty(rows, dtype=torch.float32, device=table.device)
    top = torch.empty(rows, dtype=torch.int32, device=table.device)
    for start in range(0, rows, STATS_ROWS):
        part = table[start : start + STATS_ROWS].float()
        lse[start : start + STATS_ROWS] = torch.logsumexp(part, dim=-1)
        top[start : start + STATS_ROWS] = part.argmax(-1)
    return lse, top


def teacher_stats(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (log-sum-exp, first argmax) of a teacher of logits [M, Vd]: what the chunks
    read instead of taking the teacher's softmax again at every TTT step. On CUDA one pass of
    trainer/head_loss_kernel.py where triton imports."""
    kernel = triton_module("head_loss_kernel") if table.is_cuda else None
    if kernel is not None and table.stride(-1) == 1:
        return kernel.teacher_stats(table)
    return _torch_teacher_stats(table)


def _teacher_rows(teacher: torch.Tensor, p_rows: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, its first argmax) at the chunk's teacher rows: exp(t - lse_t) for a teacher of logits
    (`stats`: its rows' log-sum-exp and first argmax), the rows themselves for probabilities."""
    rows = teacher[p_rows]
    if stats is None:
        return rows, rows.argmax(-1)
    lse, top = stats
    return torch.exp(rows.float() - lse[p_rows].unsqueeze(-1)), top[p_rows]


def _p_total(p: torch.Tensor, stats):
    """sum(p) per row: 1 for a softmax by construction, summed for given probabilities."""
    return 1.0 if stats is not None else p.sum(-1, keepdim=True)


def _chunk_loss(logits: torch.Tensor, teacher: torch.Tensor, p_rows: torch.Tensor, stats):
    """(-sum p log softmax(logits), top-1 agreements) of one chunk; p the teacher's rows (their
    softmax when they are logits, `stats` then their log-sum-exp and first argmax)."""
    p, p_top = _teacher_rows(teacher, p_rows, stats)
    z = logits.float()
    log_probs = z - torch.logsumexp(z, dim=-1, keepdim=True)
    return -(p * log_probs).sum(), (z.argmax(-1) == p_top).sum()


def _chunk_grad(logits: torch.Tensor, teacher: torch.Tensor, p_rows: torch.Tensor, scale: torch.Tensor,
                stats) -> torch.Tensor:
    """d/dz of -sum p log softmax(z), times the upstream gradient, in the logits' dtype."""
    p, _ = _teacher_rows(teacher, p_rows, stats)
    soft = torch.softmax(logits.float(), dim=-1)
    return ((soft * _p_total(p, stats) - p) * scale).to(logits.dtype)


def _chunk_loss_grad(logits: torch.Tensor, teacher: torch.Tensor, p_rows: torch.Tensor, scale: torch.Tensor, stats,
                     reuse_logits: bool = False):
    """_chunk_loss and _chunk_grad of one chunk from one softmax: (loss, agreements, d/dz of
    scale x loss in the logits' dtype). `reuse_logits` lets the Triton kernel write the gradient
    over the logits; here the gradient is a new tensor either way (compiled, writing into an
    input would add a copy)."""
    p, p_top = _teacher_rows(teacher, p_rows, stats)
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = -(p * (z - lse)).sum()
    grad = ((torch.exp(z - lse) * _p_total(p, stats) - p) * scale).to(logits.dtype)
    return loss, (z.argmax(-1) == p_top).sum(), grad


def _kernels(device_type: str):
    """The chunk arithmetic: (loss, gradient, both at once); both at once by the Triton kernel
    (trainer/head_loss_kernel.py) on CUDA where triton imports."""
    loss, grad, loss_grad = compiled_on_cuda(device_type, _chunk_loss, _chunk_grad, _chunk_loss_grad)
    kernel = triton_module("head_loss_kernel") if device_type == "cuda" else None
    return loss, grad, kernel.chunk_loss_grad if kernel else loss_grad


class _HeadSoftCE(torch.autograd.Function):
    """sum over counted rows of -sum_v p[v] log softmax(norm(x) W^T)[v], and top-1 agreements.

    x [N, h] and teacher [M, Vd] are row tables; x_rows[i] is scored against p = teacher[p_rows[i]]
    (softmax(teacher[p_rows[i]]) when the teacher holds logits: t_lse and t_top then hold its
    rows' log-sum-exp and first argmax, else None). Without a norm weight x is the final norm's
    output already.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, weight, teacher, t_lse, t_top, x_rows, p_rows, spans, chunk, eps, grads):
        dtype = compute_dtype(x)
        w = weight.to(dtype)
        stats = _stats(t_lse, t_top)
        chunk_loss = _kernels(x.device.type)[0]
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        agree = torch.zeros((), dtype=torch.long, device=x.device)
        for rows, start in _chunks(x_rows, spans, chunk):
            _, normed, _ = _rows(x, rows, norm_weight, eps)
            part, hits = chunk_loss(normed.to(dtype) @ w.T, teacher, p_rows[start : start + chunk], stats)
            loss += part
            agree += hits
        ctx.save_for_backward(x, norm_weight, weight, teacher, t_lse, t_top, x_rows, p_rows)
        ctx.spans, ctx.chunk, ctx.dtype, ctx.eps, ctx.grads = spans, chunk, dtype, eps, grads
        ctx.mark_non_differentiable(agree)
        return loss, agree

    @staticmethod
    def backward(ctx, grad_loss, _grad_agree):
        x, norm_weight, weight, teacher, t_lse, t_top, x_rows, p_rows = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        stats = _stats(t_lse, t_top)
        chunk_grad = _kernels(x.device.type)[1]
        grad_x = _hidden_grad_buffer(x, x_rows, ctx.spans)
        grad_w = grad_total(ctx.grads, "lm_head", weight)
        grad_norm = _norm_grad_buffer(norm_weight)
        for rows, start in _chunks(x_rows, ctx.spans, ctx.chunk):
            picked, normed, rstd = _rows(x, rows, norm_weight, ctx.eps)
            normed = normed.to(ctx.dtype)
            grad_logits = chunk_grad(normed @ w.T, teacher, p_rows[start : start + ctx.chunk], grad_loss, stats)
            _chunk_backward(grad_logits, picked, normed, rstd, rows, w, norm_weight, grad_x, grad_w, grad_norm)
            del picked, normed, rstd, grad_logits  # gone before the next chunk's are made
        grad_w = grad_result(ctx.grads, "lm_head", grad_w)
        if grad_norm is not None:
            norm_total = grad_total(ctx.grads, "norm", norm_weight)
            norm_total.add_(grad_norm.to(norm_weight.dtype))
            grad_norm = grad_result(ctx.grads, "norm", norm_total)
        return grad_x, grad_norm, grad_w, None, None, None, None, None, None, None, None, None


def _stats(t_lse, t_top):
    """The teacher's row statistics as the chunk functions take them: None for probabilities."""
    return None if t_lse is None else (t_lse, t_top)


class _HeadSoftCEGradInForward(torch.autograd.Function):
    """_HeadSoftCE with its gradients made in forward, while each chunk's logits exist.

    Made for `scale` x the loss, `scale` being what the caller multiplies this step's loss by
    (trainer/loss.py unroll_loss: the step's decay over its counted positions). Backward rescales
    by upstream / scale, the same for every step of an unroll (1 / accum), so the weights'
    sums over the steps in `grads` (required) are rescaled once, by the last call. Keeps the
    hidden's gradient [N, h] for backward; neither the hidden nor the teacher.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, weight, teacher, t_lse, t_top, x_rows, p_rows, spans, chunk, eps, grads, scale):
        dtype = compute_dtype(x)
        w = weight.to(dtype)
        stats = _stats(t_lse, t_top)
        chunk_loss_grad = _kernels(x.device.type)[2]
        scale_on_device = torch.full((), scale, dtype=torch.float32, device=x.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        agree = torch.zeros((), dtype=torch.long, device=x.device)
        grad_x = _hidden_grad_buffer(x, x_rows, spans)
        grad_w = grads.total("lm_head", weight)
        grad_norm = _norm_grad_buffer(norm_weight)
        for rows, start in _chunks(x_rows, spans, chunk):
            picked, normed, rstd = _rows(x, rows, norm_weight, eps)
            normed = normed.to(dtype)
            part, hits, grad_logits = chunk_loss_grad(normed @ w.T, teacher, p_rows[start : start + chunk],
                                                      scale_on_device, stats, reuse_logits=True)
            loss += part
            agree += hits
            _chunk_backward(grad_logits, picked, normed, rstd, rows, w, norm_weight, grad_x, grad_w, grad_norm)
            del picked, normed, rstd, grad_logits  # gone before the next chunk's are made
        if grad_norm is not None:
            grads.total("norm", norm_weight).add_(grad_norm.to(norm_weight.dtype))
        ctx.grad_x, ctx.grads, ctx.scale, ctx.normed = grad_x, grads, scale, norm_weight is not None
        ctx.mark_non_differentiable(agree)
        return loss, agree

    @staticmethod
    def backward(ctx, grad_loss, _grad_agree):
        factor = grad_loss / ctx.scale  # exactly 1 in a plain step (trainer/loss.py unroll_loss)
        grad_x, ctx.grad_x = _rescaled(ctx.grad_x, factor), None
        grad_w = _rescaled(ctx.grads.done("lm_head"), factor)
        grad_norm = _rescaled(ctx.grads.done("norm"), factor) if ctx.normed else None
        return grad_x, grad_norm, grad_w, None, None, None, None, None, None, None, None, None, None


def _rescaled(total: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor | None:
    """total *= factor in place; on CUDA by trainer/rescale_kernel.py, which leaves it untouched
    (unread) when factor is 1."""
    if total is None:
        return None
    kernel = triton_module("rescale_kernel") if total.is_cuda else None
    if kernel is not None and kernel.fits(total, factor):
        return kernel.scale_unless_one(total, factor)
    return total.mul_(factor)


def _norm_grad_buffer(norm_weight) -> torch.Tensor | None:
    """The final norm weight's gradient over one call's chunks, fp32 (None without the norm)."""
    return None if norm_weight is None else torch.zeros_like(norm_weight, dtype=torch.float32)


def _chunk_backward(grad_logits, picked, normed, rstd, rows, w, norm_weight, grad_x, grad_w, grad_norm) -> None:
    """A chunk's logit gradient into the head weight's, the norm weight's and the hidden's rows
    (`rows`: a slice or an index tensor)."""
    add_product(grad_w, grad_logits.T, normed)
    grad_rows = grad_logits @ w
    if norm_weight is not None:
        _, _, norm_backward = norm_kernels(grad_rows.device.type)
        grad_rows, grad_nw = norm_backward(grad_rows, picked, norm_weight, rstd)
        grad_norm += grad_nw
    if isinstance(rows, slice):
        grad_x[rows] = grad_rows
    else:
        grad_x.index_copy_(0, rows, grad_rows.to(grad_x.dtype))


def _rows(x: torch.Tensor, rows: torch.Tensor, norm_weight, eps: float):
    """(x at `rows` (a slice or an index tensor), the final norm's output there, its rstd); x's
    rows are the output when x is normed already."""
    picked = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
    if norm_weight is None:
        return picked, picked, None
    normalize, _, _ = norm_kernels(x.device.type)
    return (picked, *normalize(picked, norm_weight, eps))


class DraftHead(nn.Module):
    """The draft's lm_head [Vd, h] (checkpoint key `lm_head.weight`), applied inside the loss.

    A module so that a sharded trainer gathers its weight on the way in, as for any layer.
    """

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation

    def forward(self, hidden: torch.Tensor, norm, teacher: "Teacher", counted: CountedRows, offset: int,
                grads: StepGrads | None = None, scale: float | None = None):
        """(summed soft cross-entropy, top-1 agreements) of the step scored at teacher offset.

        hidden [B, S, h]: the step's layer output, before the final RMSNorm `norm` (the
        draft's own module: its weight and eps); with `norm` None, the norm's output. teacher:
        the whole teacher (trainer/loss.py), its table [B, S + L, Vd] of logits or probabilities;
        position t of this step is scored against teacher position t + offset where `counted` has it.
        Indexing the teacher by row keeps it in place (a slice of it, flattened, would be a copy).
        `grads`: the unroll's summed weight gradients (trainer/step_grads.py), or None.
        `scale`: what the caller multiplies the summed loss by, to make the gradients in forward
        (_HeadSoftCEGradInForward, which needs `grads`); None: made again in backward.
        """
        batch, seq, width = hidden.shape
        chunk = chunk_rows(self.weight.shape[0], grad_in_forward=scale is not None)
        x_rows, p_rows, spans = counted.for_step(offset, seq, chunk)
        t_lse, t_top = teacher.row_stats() or (None, None)
        args = (hidden.reshape(-1, width), None if norm is None else norm.weight, self.weight,
                teacher.table.view(-1, teacher.table.shape[-1]), t_lse, t_top, x_rows, p_rows, spans, chunk,
                None if norm is None else norm.eps, grads)
        if scale is None:
            return _HeadSoftCE.apply(*args)
        if grads is None:
            raise ValueError("the head makes its gradients in forward only into the unroll's summed gradients")
        return _HeadSoftCEGradInForward.apply(*args, scale)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Plain logits [B, S, Vd], for inference-style checks."""
        return normed @ self.weight.to(normed.dtype).T
