"""Eagle3's loss: soft-label cross-entropy against the target, over the draft vocab, in fp32.

Step k of the TTT unroll is weighted 0.8^k. Positions whose target argmax lies outside the
draft vocab (the draft cannot express it) and positions outside the assistant's tokens are
masked. Top-1 agreement with the target per step is the quantity that predicts acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def step_loss(logits: torch.Tensor, teacher: Teacher, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean soft CE over valid positions, number of top-1 agreements) for TTT step k."""
    seq = logits.shape[1]
    probs = teacher.probs[:, k + 1 : k + 1 + seq]
    valid = teacher.valid[:, k + 1 : k + 1 + seq]
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # upcast inside: no fp32 copy of the logits
    per_position = -(probs * logp).sum(-1)
    count = valid.sum().clamp(min=1)
    loss = (per_position * valid).sum() / count
    with torch.no_grad():
        agree = ((logits.argmax(-1) == probs.argmax(-1)) & valid).sum()
    return loss, agree


def unroll_loss(step_logits, teacher: Teacher, ttt: int) -> tuple[torch.Tensor, list[float]]:
    """Weighted loss over the unroll and per-step top-1 accuracy.

    `step_logits` is the draft's generator: each step's logits are reduced to a scalar before
    the next step runs, so only what autograd saves stays alive.
    """
    total = None
    accuracy = []
    for k, logits in enumerate(step_logits):
        loss, agree = step_loss(logits, teacher, k)
        weighted = loss * STEP_DECAY**k
        total = weighted if total is None else total + weighted
        valid = teacher.valid[:, k + 1 : k + 1 + logits.shape[1]].sum().clamp(min=1)
        accuracy.append(agree / valid)
        del logits  # else this step's logits stay alive through the next step's forward
    return total, [float(a) for a in accuracy]
