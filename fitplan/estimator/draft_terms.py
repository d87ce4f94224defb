"""Eagle3 draft-side memory terms: bytes per GPU for ONE micro-batch.

First version from memory-anatomy.md §4 (bf16 draft, flex attention by default). The trainer's
author calibrates these against the real trainer with a live-tensor tracker; the constants here
are the anatomy's hypotheses until then. Notation: B micro-batch, S seq, L TTT unroll, h draft
hidden, H/Hkv heads, d head_dim, I draft MLP width, Vd draft vocab.
"""

from __future__ import annotations

from fitplan.layout import Job

BF16 = 2
FP32 = 4

# Eager attention materializes [B, H, S, S + k] scores each TTT step: memory-anatomy §4 gives
# ~110 B x B*H*S^2 over L = 7 steps, i.e. ~16 B per score element per step (fp32 scores,
# fp32 softmax saved for backward, the bf16 cast).
EAGER_SCORE_BYTES_PER_STEP = 16


def _tokens(job: Job) -> int:
    return job.spec.micro_batch * job.spec.seq


def _saved_per_token_per_step(job: Job) -> int:
    """Bytes autograd saves per token per TTT step inside the decoder layer (anatomy §4).

    14h (norms, fc, residuals, the 2h-wide attention input) + 6*H*d (q, attention output,
    o_proj input) + 8*I (SwiGLU gate, up, act, product). The logits' 2*Vd is in draft_logits_bytes.
    """
    d = job.draft
    return 14 * d.hidden + 6 * d.heads * d.head_dim + 8 * d.intermediate


def _kv_cache_bytes(job: Job) -> int:
    """K/V of every earlier step stay referenced: step k attends to k+1 chunks of [B,S,Hkv,d]."""
    d, L = job.draft, job.spec.ttt
    return 2 * job.spec.micro_batch * job.spec.seq * d.kv_heads * d.head_dim * L * (L + 1)


def _attention_scores_bytes(job: Job) -> int:
    """Materialized score matrices: eager keeps them for backward; sdpa keeps only a bf16 mask."""
    d, B, S, L = job.draft, job.spec.micro_batch, job.spec.seq, job.spec.ttt
    impl = job.spec.attention_impl
    if impl == "eager":
        return EAGER_SCORE_BYTES_PER_STEP * B * d.heads * S * S * L
    if impl == "sdpa":
        return BF16 * B * S * S  # one [B, 1, S, S] additive mask shared by the steps
    return 0


def draft_activation_bytes(job: Job) -> int:
    """Saved for backward over the TTT unroll, at the end of the draft forward.

    With activation checkpointing each step keeps only its inputs (embedding + hidden, and the
    step's output hidden that feeds the next step: ~3h bf16 per token) and the K/V cache.
    """
    tokens, L = _tokens(job), job.spec.ttt
    if job.spec.ac:
        per_step = 3 * BF16 * job.draft.hidden * tokens
        return per_step * L + _kv_cache_bytes(job)
    return _saved_per_token_per_step(job) * tokens * L + _kv_cache_bytes(job) + _attention_scores_bytes(job)


def draft_logits_bytes(job: Job) -> int:
    """Per TTT step: bf16 logits [B,S,Vd] and the fp32 log-softmax the soft-label CE saves."""
    return (BF16 + FP32) * _tokens(job) * job.draft.draft_vocab * job.spec.ttt


def teacher_bytes(job: Job) -> int:
    """fp32 target probabilities over the draft vocab, [B, S + L, Vd] (padded by L)."""
    B, S, L = job.spec.micro_batch, job.spec.seq, job.spec.ttt
    return FP32 * B * (S + L) * job.draft.draft_vocab


def draft_backward_extra_bytes(job: Job) -> int:
    """Transient peak in backward beyond saved activations and grads.

    One step's logits gradient (fp32 + its bf16 cast) and one decoder layer's gradient working
    set (SwiGLU grads 6*I, q/k/v grads, residual grads); with checkpointing also one step's
    recomputed activations.
    """
    d, tokens = job.draft, _tokens(job)
    logits_grad = (FP32 + BF16) * tokens * d.draft_vocab
    layer_grad = BF16 * tokens * (3 * d.intermediate + (d.heads + 2 * d.kv_heads) * d.head_dim + 2 * d.hidden)
    recompute = 0
    if job.spec.ac:
        recompute = _saved_per_token_per_step(job) * tokens + _attention_scores_bytes(job) // job.spec.ttt
    return logits_grad + layer_grad + recompute
