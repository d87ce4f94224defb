"""Eagle3's loss: soft-label cross-entropy against the target, over the draft vocab, in fp32.

Step k of the TTT unroll is weighted 0.8^k. Positions whose target argmax lies outside the
draft vocab (the draft cannot express it) and positions outside the assistant's tokens are
masked. Top-1 agreement with the target per step is the quantity that predicts acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.head_loss import CountedRows, teacher_stats
from trainer.lean_ops import triton_module

STEP_DECAY = 0.8


@dataclass
class Teacher:
    """What the draft learns from, padded by `ttt` positions so step k reads [k+1, k+1+S).

    The lean draft keeps the target's bf16 logits over the draft vocab and its fused head takes
    their softmax a chunk at a time (the logits come out of the target's bf16 lm_head, so the
    fp32 probabilities made from them later are the same numbers, at half the bytes held);
    the plain draft keeps the fp32 probabilities its loss multiplies by.
    """

    table: torch.Tensor  # [B, S + L, Vd]: bf16 logits (as_logits) or fp32 probabilities
    valid: torch.Tensor  # [B, S + L] bool: position counts in the loss
    as_logits: bool
    # of logits, per position: the log-sum-exp (fp32) and first argmax (int32) over the draft
    # vocab, which every TTT step's loss reads; made here when not given
    lse: torch.Tensor | None = None
    top: torch.Tensor | None = None

    def __post_init__(self):
        if self.as_logits and self.lse is None:
            flat = self.table.reshape(-1, self.table.shape[-1])
            self.lse, self.top = (t.view(self.table.shape[:-1]) for t in teacher_stats(flat))

    def row_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(log-sum-exp, first argmax) per row of the flattened table; None for probabilities."""
        return None if not self.as_logits else (self.lse.view(-1), self.top.view(-1))


TEACHER_CHUNK = 1024  # positions gathered at a time: bounds the bf16 gather's transient


@torch.no_grad()
def make_teacher(logits: torch.Tensor, loss_mask: torch.Tensor, draft_ids: torch.Tensor, t2d: torch.Tensor, ttt: int,
                 as_logits: bool = True) -> Teacher:
    """Target logits [B, S, V] -> the draft's targets.

    The target's prediction at position j is of token j + 1: it is trained on when that token
    is an assistant token and the target's top choice is in the draft vocab. A teacher of
    logits on CUDA is made by one pass of trainer/teacher_kernel.py where triton imports;
    otherwise the draft-vocab logits are gathered into the teacher buffer a chunk at a time
    (and, for fp32 probabilities, the softmax taken in place), so no full-size temporary exists
    beside it.
    """
    kernel = triton_module("teacher_kernel") if as_logits and logits.is_cuda else None
    if kernel is not None and kernel.fits(logits):
        table, target_top = kernel.teacher_from_logits(logits, draft_ids, ttt)
        return Teacher(table, _counted(loss_mask, t2d, target_top, ttt), True)
    b, s, _ = logits.shape
    dtype = logits.dtype if as_logits else torch.float32
    table = torch.zeros(b, s + ttt, len(draft_ids), dtype=dtype, device=logits.device)
    for start in range(0, s, TEACHER_CHUNK):
        stop = min(s, start + TEACHER_CHUNK)
        table[:, start:stop] = logits[:, start:stop].index_select(-1, draft_ids)
    if not as_logits:
        head = table[:, :s]
        head.sub_(head.amax(-1, keepdim=True)).exp_()
        head.div_(head.sum(-1, keepdim=True))
    return Teacher(table, _counted(loss_mask, t2d, logits.argmax(-1), ttt), as_logits)


def _counted(loss_mask: torch.Tensor, t2d: torch.Tensor, target_top: torch.Tensor, ttt: int) -> torch.Tensor:
    """[B, S + ttt] bool: position j counts when token j + 1 is the assistant's and the target's
    top choice there (target_top [B, S]) lies in the draft vocab; the last position and the ttt
    padding never do."""
    b, s = target_top.shape
    valid = torch.zeros(b, s + ttt, dtype=torch.bool, device=target_top.device)
    valid[:, : s - 1] = loss_mask[:, 1:] & t2d[target_top[:, : s - 1]]
    return valid


def plain_step_loss(normed: torch.Tensor, head, teacher: Teacher, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused step (draft_memory plain): full logits and an fp32 log-softmax kept for
    backward. Same (summed loss, agreements) as the fused head."""
    seq = normed.shape[1]
    probs = teacher.table[:, offset : offset + seq]
    valid = teacher.valid[:, offset : offset + seq]
    logits = head.logits(normed)
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # upcast inside: no fp32 copy of the logits
    summed = (-(probs * logp).sum(-1) * valid).sum()
    with torch.no_grad():
        agree = ((logits.argmax(-1) == probs.argmax(-1)) & valid).sum()
    return summed, agree


def unroll_loss(step_outputs, draft, teacher: Teacher, grads=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted loss over the unroll and per-step top-1 accuracy ([ttt] fp32, on the device: read
    after backward and the optimizer are launched, so the host does not wait for the forward's
    end before launching backward).

    `step_outputs` is the draft's generator (Eagle3Draft.unroll): final-norm outputs, or with
    fused norms the pre-norm hiddens, whose fused head (trainer/head_loss.py) applies the final
    norm and the lm_head with the loss. Step k is scored against teacher
    positions shifted by k + 1. Each step is reduced to a scalar before the next step runs, so
    only what autograd saves stays alive. `grads`: the unroll's summed weight gradients
    (trainer/step_grads.py), shared with the fused head. A head that makes its gradients in
    forward (RunSpec head_grad_in_forward, into `grads`) is given each step's weight in the
    total; backward then does not read the teacher, which the caller may let go before it.
    """
    lean = draft.lean
    if draft.fused_norms != teacher.as_logits:
        raise ValueError("a draft with fused norms learns from a teacher of logits, others from probabilities")
    rows = CountedRows(teacher.valid) if lean else None
    # without autograd recording (a loss looked at, not trained on) no gradient is made at all
    in_forward = draft.head_grad_in_forward and grads is not None and torch.is_grad_enabled()
    total = None
    accuracy = []
    for k, output in enumerate(step_outputs):
        seq = output.shape[1]
        if lean:
            norm = draft.norm if draft.fused_norms else None
            counted = max(rows.count(k + 1, seq), 1)
            weight = STEP_DECAY**k / counted
            summed, agree = draft.lm_head(output, norm, teacher, rows, k + 1, grads, weight if in_forward else None)
            # weighted by the float the head made its gradients with: autograd hands the head
            # back exactly that weight (in fp32), so the ratio its backward rescales by is 1 and
            # the rescale is skipped (trainer/rescale_kernel.py)
            weighted = summed * weight
        else:
            summed, agree = plain_step_loss(output, draft.lm_head, teacher, k + 1)
            counted = teacher.valid[:, k + 1 : k + 1 + seq].sum().clamp(min=1)
            weighted = summed / counted * STEP_DECAY**k
        total = weighted if total is None else total + weighted
        accuracy.append(agree / counted)
        del output  # else this step's output stays alive through the next step's forward
    return total, torch.stack([a.float() for a in accuracy])
