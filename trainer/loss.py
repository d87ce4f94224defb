"""Eagle3's loss: soft-label cross-entropy against the target, over the draft vocab, in fp32.

Step k of the TTT unroll is weighted 0.8^k. Positions whose target argmax lies outside the
draft vocab (the draft cannot express it) and positions outside the assistant's tokens are
masked. Top-1 agreement with the target per step is the quantity that predicts acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.head_loss import CountedRows

STEP_DECAY = 0.8


@dataclass
class Teacher:
    """What the draft learns from, padded by `ttt` positions so step k reads [k+1, k+1+S)."""

    probs: torch.Tensor  # [B, S + L, Vd] fp32 target distribution over the draft vocab
    valid: torch.Tensor  # [B, S + L] bool: position counts in the loss


TEACHER_CHUNK = 1024  # positions gathered at a time: bounds the bf16 gather's transient


@torch.no_grad()
def make_teacher(logits: torch.Tensor, loss_mask: torch.Tensor, draft_ids: torch.Tensor, t2d: torch.Tensor, ttt: int) -> Teacher:
    """Target logits [B, S, V] -> the draft's targets.

    The draft-vocab logits are gathered into the fp32 teacher buffer a chunk at a time and the
    softmax is taken in place, so no full-size temporary exists beside the teacher.
    The target's prediction at position j is of token j + 1: it is trained on when that token
    is an assistant token and the target's top choice is in the draft vocab.
    """
    b, s, _ = logits.shape
    probs = torch.zeros(b, s + ttt, len(draft_ids), dtype=torch.float32, device=logits.device)
    for start in range(0, s, TEACHER_CHUNK):
        stop = min(s, start + TEACHER_CHUNK)
        probs[:, start:stop] = logits[:, start:stop].index_select(-1, draft_ids)
    head = probs[:, :s]
    head.sub_(head.amax(-1, keepdim=True)).exp_()
    head.div_(head.sum(-1, keepdim=True))
    valid = torch.zeros(b, s + ttt, dtype=torch.bool, device=logits.device)
    valid[:, : s - 1] = loss_mask[:, 1:] & t2d[logits[:, : s - 1].argmax(-1)]
    return Teacher(probs, valid)


def plain_step_loss(normed: torch.Tensor, head, teacher: Teacher, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused step (draft_memory plain): full logits and an fp32 log-softmax kept for
    backward. Same (summed loss, agreements) as the fused head."""
    seq = normed.shape[1]
    probs = teacher.probs[:, offset : offset + seq]
    valid = teacher.valid[:, offset : offset + seq]
    logits = head.logits(normed)
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # upcast inside: no fp32 copy of the logits
    summed = (-(probs * logp).sum(-1) * valid).sum()
    with torch.no_grad():
        agree = ((logits.argmax(-1) == probs.argmax(-1)) & valid).sum()
    return summed, agree


def unroll_loss(step_normed, head, teacher: Teacher, lean: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Weighted loss over the unroll and per-step top-1 accuracy.

    `step_normed` is the draft's generator of final-norm outputs; `head` (the draft's lm_head,
    trainer/head_loss.py) scores step k against teacher positions shifted by k + 1, fused with
    the loss when `lean`. Each step is reduced to a scalar before the next step runs, so only
    what autograd saves stays alive.
    """
    rows = CountedRows(teacher.valid) if lean else None
    total = None
    accuracy = []
    for k, normed in enumerate(step_normed):
        seq = normed.shape[1]
        if lean:
            summed, agree = head(normed, teacher.probs, rows, k + 1)
            counted = max(rows.count(k + 1, seq), 1)
        else:
            summed, agree = plain_step_loss(normed, head, teacher, k + 1)
            counted = teacher.valid[:, k + 1 : k + 1 + seq].sum().clamp(min=1)
        weighted = summed / counted * STEP_DECAY**k
        total = weighted if total is None else total + weighted
        accuracy.append(agree / counted)
        del normed  # else this step's output stays alive through the next step's forward
    return total, [float(a) for a in accuracy]
