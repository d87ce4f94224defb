"""Eagle3 draft-side memory terms of the fitplan trainer (trainer/draft.py, trainer/loss.py).

The specforge runtime reuses them with its own draft's unfused head and MLP (`_lean` false):
the lm_head's fp32 log-softmax kept per step, and the SwiGLU's four I-wide tensors. The
speculators runtime too (`_lean` false), with its fused Triton loss (`_fused_loss`): a step keeps
the bf16 logits it scored and five fp32 statistics per row, its teacher is the verifier head's
bf16 logits, and its keys and values live only in the concatenations the attention saves.

Bytes per GPU for ONE micro-batch. Each term counts what the trainer's code keeps alive, found
by enumerating autograd's saved tensors (torch.autograd.graph.saved_tensors_hooks) and checked
against a live-storage tracker on CPU (tests/test_trainer_estimator.py). Notation: B micro-batch,
S seq, T = B*S tokens, L TTT unroll, h draft hidden, H/Hkv heads, d head_dim, I draft MLP width,
Vd draft vocab. bf16 draft (the bf16-master / bf16 recipes).

Saved per token and TTT step k (no activation checkpointing):
  decoder layer: embedding 2h, cat(emb, hidden) 4h, hidden after attention 2h, MLP input 2h,
    layer output 2h, final-norm output 2h (= 14h); one fp32 rstd per RMSNorm (4 x 4 B);
    roped q 2Hd and o_proj input 2Hd; SwiGLU gate and up 4I (trainer/lean_ops.py SwiGLUDown
    recomputes silu and the product; unfused: gate, silu, up, product 8I; none with
    recompute_mlp, trainer/recompute_mlp.py, which makes gate and up again in backward)
  attention (flex): keys and values of steps 0..k, 4*Hkv*d*(k+1); output 2Hd; fp32 logsumexp 4H
  attention (split, trainer/ttt_attention.py): the step's own keys and values 4*Hkv*d (the
    unroll's tensors, which later steps' kernels read and save without copying, so each lives to
    its own step's backward); output 2Hd; fp32 logsumexp 4H
  attention (eager): keys and values repeated to all heads 4*H*d*(k+1); fp32 softmax and bf16
    probabilities 6*H*S*(k+1); a bool mask S*S*(k+1) per step
  loss: two int64 row indices 16 (trainer/head_loss.py recomputes the logits in backward;
    unfused: the fp32 log-softmax 4*Vd); with the head's gradients made in forward
    (layout.head_grads_in_forward) the hidden's gradient 2h instead, and the last step's layer
    output is let go at the end of forward (no step after it keeps it)
plus the fc output 2h once and the bf16 RoPE tables 2*S*d*2 once. With the embedding's half of
q/k/v projected once per unroll (layout.projects_embedding_once) no step keeps its embedding or
its rstd; the unroll keeps that projection P [B, S+L-1, (H+2Hkv)d] bf16 instead, through backward
until the last step's q/k/v backward, which from the first step's on adds into G, its fp32 gradient.
"""

from __future__ import annotations

from fitplan.layout import (
    Job,
    fused_norms,
    head_grads_in_forward,
    lean_draft,
    projects_embedding_once,
    recomputes_mlp,
)
from fitplan.units import BF16, FP32

NORMS_PER_STEP = 4  # input, hidden, post-attention and final RMSNorm: one fp32 rstd per token each
ROW_INDEX_BYTES = 2 * 8  # the fused head's int64 row indices into the hidden and the teacher
# The fused head's chunks (fused_head_rows, which trainer/head_loss.py chunks by): a chunk of
# counted positions has as many rows as this many bytes of fp32 logits: 2097 at a 32k vocab, large
# enough for efficient GEMMs and few launches. Every position is assumed counted (synthetic data's
# worst case); a sparse loss mask that leaves fewer counted positions than a chunk's rows makes the
# real chunk smaller.
HEAD_CHUNK_BYTES = 256 * 2**20
# Bytes per logit a chunk holds while it runs, on CUDA where its arithmetic is compiled: the bf16
# logits in forward; the bf16 logits and their bf16 gradient in backward. (Run eagerly, as on
# CPU, the same arithmetic holds about 18 and 20: fp32 copies, the gathered teacher rows.)
HEAD_FORWARD_BYTES_PER_LOGIT = 2
HEAD_BACKWARD_BYTES_PER_LOGIT = 4
# Made in forward (layout.head_grads_in_forward): the bf16 logits, the gradient written over them
# (trainer/head_loss_kernel.py), in chunks of HEAD_FORWARD_GRAD_CHUNK_BYTES of them, a multiple of
# HEAD_ROW_MULTIPLE rows (GEMM tiles): 8192 at a 32k vocab. The head weight's gradient is an
# accumulating GEMM that reads and writes its [Vd, h] sum once per chunk, so fewer, longer chunks
# take time off: at B1 S16384 on an H200 the step's kernels took 521 ms with these chunks against
# 529 ms with 2097-row ones and a separate gradient (docs/vs-specforge.md, calls AM and AR). Beside
# the logits, the chunk's [rows, h] bf16 final-norm output, the hidden's gradient the head GEMM
# makes and the one the norm's backward turns it into.
HEAD_FORWARD_GRAD_BYTES_PER_LOGIT = 2
HEAD_FORWARD_GRAD_CHUNK_BYTES = 512 * 2**20
HEAD_ROW_MULTIPLE = 256
HEAD_FORWARD_GRAD_ROW_TABLES = 3


def _lean(job: Job) -> bool:
    """fitplan's trainer runs the fused head + loss and the lean SwiGLU unless told `plain`;
    SpecForge's draft never does."""
    return lean_draft(job.spec)


# speculators' fused loss (losses/fused.py): per row, the draft's and the teacher's max and sum of
# exponentials and the row's loss, fp32, saved with the logits for its backward.
FUSED_LOSS_STATS_BYTES = 5 * FP32


def _fused_loss(job: Job) -> bool:
    """speculators' Triton loss (its default --loss-implementation fused; the reader refuses eager)."""
    return job.spec.runtime == "speculators"


def _h_wide_saved(job: Job) -> int:
    """h-wide bf16 tensors a step saves: the embedding, the cat of normed embedding and hidden
    (two), the hidden after attention, the MLP input, the layer output and the final norm's
    output (7); with fused norms only the norms' inputs: embedding, hidden after attention,
    layer output (3); the embedding not when it is projected once per unroll (2)."""
    if not fused_norms(job):
        return 7
    return 2 if projects_embedding_once(job) else 3


def _norms_saved(job: Job) -> int:
    """fp32 rstds a step saves per token: one per RMSNorm, the final one's recomputed in the
    fused head, the input norm's not when the embedding is projected once per unroll."""
    if not fused_norms(job):
        return NORMS_PER_STEP
    return NORMS_PER_STEP - 2 if projects_embedding_once(job) else NORMS_PER_STEP - 1


def _embedding_kept_per_token(job: Job) -> int:
    """The step's embedding, which a checkpointed step keeps as its input: none when the
    embedding is projected once per unroll (the step reads its rows of that projection)."""
    return 0 if projects_embedding_once(job) else BF16 * job.draft.hidden


def projection_rows(job: Job) -> int:
    """Rows of the unroll's embedding projection: the S + L - 1 tokens its steps embed, per sample."""
    return job.spec.micro_batch * (job.spec.seq + job.spec.ttt - 1)


def qkv_widths(job: Job) -> dict[str, int]:
    """Output columns of each projection: {"q": .., "k": .., "v": ..}."""
    d = job.draft
    return {"q": d.heads * d.head_dim, "k": d.kv_heads * d.head_dim, "v": d.kv_heads * d.head_dim}


def qkv_width(job: Job) -> int:
    return sum(qkv_widths(job).values())


def embedding_projection_bytes(job: Job) -> int:
    """P, the embedding's half of q/k/v over the unroll [B, S+L-1, (H+2Hkv)d] bf16
    (trainer/embedding_projection.py): made before step 0's forward, alive until the last
    backward call of the q/k/v projection; 0 where each step projects its own embedding."""
    return BF16 * qkv_width(job) * projection_rows(job) if projects_embedding_once(job) else 0


def embedding_grad_bytes(job: Job) -> int:
    """G, P's gradient summed over the steps, the same rows in fp32: made at the first backward
    call of the q/k/v projection (step L-1's), alive until the last (step 0's)."""
    return FP32 * qkv_width(job) * projection_rows(job) if projects_embedding_once(job) else 0


def embedding_finish_bytes(job: Job) -> int:
    """The last q/k/v backward call's own work beyond G, P having gone: G's bf16 copy beside G
    (4 + 2 bytes per column), or later beside that copy the embedding gathered again, its norm's
    output or gradient (2h each, one at a time) and its fp32 rstd; the larger, less G."""
    rows, width, h = projection_rows(job), qkv_width(job), job.draft.hidden
    cast = BF16 * width
    regathered = BF16 * width + 2 * BF16 * h + FP32 - FP32 * width
    return max(cast, regathered) * rows


def _o_proj_input_per_token(job: Job) -> int:
    """o_proj's [B, S, H*d] input copy; with fused norms o_proj reads the kernel's output, which
    flex and sdpa keep anyway (counted with the kernel) and eager does not."""
    d = job.draft
    if fused_norms(job) and job.spec.attention_impl != "eager":
        return 0
    return BF16 * d.heads * d.head_dim


def _step_kept_per_token(job: Job) -> int:
    """What a checkpointed step keeps of its own making beside its output hidden: the final
    norm's output and rstd (none with fused norms: the head normalises the hidden itself)."""
    return 0 if fused_norms(job) else BF16 * job.draft.hidden + FP32


def _swiglu_saved_per_token(job: Job) -> int:
    """gate and up (lean), with silu and the product (plain); nothing when the MLP is made
    again in backward (trainer/recompute_mlp.py)."""
    if recomputes_mlp(job):
        return 0
    return (4 if _lean(job) else 8) * job.draft.intermediate


def _loss_saved_per_token(job: Job) -> int:
    """What one step's loss keeps for backward, per token."""
    if _fused_loss(job):  # the bf16 logits it was given (a view, not a copy) and its row statistics
        return BF16 * job.draft.draft_vocab + FUSED_LOSS_STATS_BYTES
    if head_grads_in_forward(job):  # the hidden's gradient, made in forward
        return BF16 * job.draft.hidden
    return ROW_INDEX_BYTES if _lean(job) else FP32 * job.draft.draft_vocab


def let_go_in_forward_bytes(job: Job) -> int:
    """The last step's layer output, which no step after it keeps: let go at the end of forward
    when the head made its gradients there (counted in the saved set until then), else kept by the
    head for backward (0)."""
    return BF16 * job.draft.hidden * _tokens(job) if head_grads_in_forward(job) else 0


def head_grad_buffer_bytes(job: Job, param_bytes: int) -> int:
    """The head weight's gradient over the unroll, made by the first step's head in forward when
    it makes its gradients there (trainer/step_grads.py), alive from then on; 0 otherwise (made
    in backward, counted with the grads)."""
    return job.draft.hidden * job.draft.draft_vocab * param_bytes if head_grads_in_forward(job) else 0


def fused_head_rows(vocab: int, grad_in_forward: bool) -> int:
    """Rows of a chunk of the fused head (trainer/head_loss.py chunks by this): as many as
    HEAD_CHUNK_BYTES of fp32 logits hold, or with the gradients made in forward
    HEAD_FORWARD_GRAD_CHUNK_BYTES of bf16 ones, rounded down to a multiple of HEAD_ROW_MULTIPLE."""
    if not grad_in_forward:
        return max(1, HEAD_CHUNK_BYTES // (FP32 * vocab))
    rows = HEAD_FORWARD_GRAD_CHUNK_BYTES // (BF16 * vocab)
    return rows // HEAD_ROW_MULTIPLE * HEAD_ROW_MULTIPLE if rows >= HEAD_ROW_MULTIPLE else max(1, rows)


def head_chunk_rows(job: Job) -> int:
    """Positions the fused head scores at a time (all of them when fewer)."""
    return min(fused_head_rows(job.draft.draft_vocab, head_grads_in_forward(job)), _tokens(job))


def _tokens(job: Job) -> int:
    return job.spec.micro_batch * job.spec.seq


def _rope_bytes(job: Job) -> int:
    """cos and sin tables [S, d] in bf16, shared by the batch and the steps."""
    return 2 * BF16 * job.spec.seq * job.draft.head_dim


def _layer_saved_per_token(job: Job) -> int:
    """Saved inside the decoder layer per token per step, attention kernel excluded: the h-wide
    tensors, the rstds, the roped q 2Hd, o_proj's input and the SwiGLU's."""
    d = job.draft
    return (_h_wide_saved(job) * BF16 * d.hidden + _norms_saved(job) * FP32 + BF16 * d.heads * d.head_dim
            + _o_proj_input_per_token(job) + _swiglu_saved_per_token(job))


def _kernel_saved_bytes(job: Job, k: int) -> int:
    """What the attention kernel of step k saves (step k attends to k+1 chunks of S keys)."""
    d, T, S = job.draft, _tokens(job), job.spec.seq
    impl = job.spec.attention_impl
    if impl == "eager":
        per_token = 4 * d.heads * d.head_dim * (k + 1) + (FP32 + BF16) * d.heads * S * (k + 1)
        return per_token * T + S * S * (k + 1)
    out_and_lse = BF16 * d.heads * d.head_dim + FP32 * d.heads
    if impl == "split":  # the step's own keys and values; earlier steps' are theirs
        return (2 * BF16 * d.kv_heads * d.head_dim + out_and_lse) * T
    kv = 2 * BF16 * d.kv_heads * d.head_dim * (k + 1)
    mask = S * S * (k + 1) if impl == "sdpa" else 0  # sdpa is given a dense bool mask
    return (kv + out_and_lse) * T + mask


def _kv_lists_bytes(job: Job) -> int:
    """Each step's roped keys and values, held by the unroll until it ends (freed before backward).
    speculators' unroll keeps them in a DynamicCache, whose concatenations are the tensors the
    attention saves (counted there): nothing apart. The split attention saves each step's own
    (counted with its kernel): nothing apart either."""
    if job.spec.runtime == "speculators" or job.spec.attention_impl == "split":
        return 0
    d = job.draft
    return 2 * BF16 * d.kv_heads * d.head_dim * job.spec.ttt * _tokens(job)


def draft_activation_bytes(job: Job) -> int:
    """Saved for backward over the TTT unroll at the end of the draft forward (loss excluded).

    With activation checkpointing a step keeps only its inputs and outputs: the embedding, the
    output hidden (with the final norm's rstd and output: 6h + 4 per token), and the keys and
    values of steps 0..L-2, which later steps' checkpoints hold as inputs. (Compiled flex keeps
    none of its saved tensors under the checkpoint: llama-3.1-8b seq 32k with checkpointing on an
    H200 measured 67.65 GiB allocated against 67.6 predicted without such a term,
    tests/data/gpu/validation/h200_postfix_rows.jsonl.)
    """
    d, T, L = job.draft, _tokens(job), job.spec.ttt
    fc_out = BF16 * d.hidden * T
    once = fc_out + _rope_bytes(job) + embedding_projection_bytes(job)
    if job.spec.ac:
        per_step = (_embedding_kept_per_token(job) + BF16 * d.hidden + _step_kept_per_token(job)) * T
        held_kv = 2 * BF16 * d.kv_heads * d.head_dim * (L - 1) * T
        kept = per_step * L + held_kv
        return kept + once
    steps = sum(_layer_saved_per_token(job) * T + _kernel_saved_bytes(job, k) for k in range(L))
    return steps + once


def draft_logits_bytes(job: Job) -> int:
    """What the steps' losses keep for backward: the fused head's row indices (every position
    counted, the upper bound), or unfused the fp32 log-softmax [B, S, Vd] of each step."""
    return _loss_saved_per_token(job) * _tokens(job) * job.spec.ttt


# trainer/loss.py Teacher: per position of a teacher of logits, its log-sum-exp (fp32) and first
# argmax (int32), read by every TTT step's loss
TEACHER_ROW_STATS_BYTES = 4 + 4


def teacher_bytes(job: Job) -> int:
    """fp32 target probabilities over the draft vocab, [B, S + L, Vd] (padded by L); with fused
    norms the target's bf16 logits and their rows' statistics. speculators: the verifier head's
    bf16 logits over the draft vocab, [1, T, Vd], which its loss reads as they are (each step a
    slice)."""
    B, S, L = job.spec.micro_batch, job.spec.seq, job.spec.ttt
    if job.spec.runtime == "speculators":
        return BF16 * B * S * job.draft.draft_vocab
    if fused_norms(job):
        return (BF16 * job.draft.draft_vocab + TEACHER_ROW_STATS_BYTES) * B * (S + L)
    return FP32 * B * (S + L) * job.draft.draft_vocab


# trainer/loss.py TEACHER_CHUNK: target positions gathered into the teacher at a time.
TEACHER_CHUNK = 1024


def teacher_chunk_bytes(job: Job) -> int:
    """What making the teacher holds beside the logits and the teacher. A teacher of fp32
    probabilities: the bf16 draft-vocab columns of one chunk of the target logits, [B, chunk, Vd],
    gathered before they are cast into it. A teacher of logits (fused norms) is made in one pass
    on the GPU (trainer/teacher_kernel.py) and holds nothing beside them but an int32 per
    position (the target's top token) and per target id (its draft column): 0.6 MiB at B1 S16384
    and a 128k vocab, left out as the estimate leaves out what is under 1 MiB."""
    if fused_norms(job):
        return 0
    return BF16 * job.spec.micro_batch * min(job.spec.seq, TEACHER_CHUNK) * job.draft.draft_vocab


def _loss_forward_bytes(job: Job) -> int:
    """The last step's loss while it runs, beyond what it keeps. Fused: one chunk's logits
    (HEAD_FORWARD_BYTES_PER_LOGIT; with the gradients made in forward, the logits their gradient is
    written over and the chunk's [rows, h] tables). Unfused: the bf16 logits and the fp32 product over every
    position (6*Vd per token)."""
    d = job.draft
    if _fused_loss(job):  # its kernel streams the rows: nothing [T, Vd]-wide beyond the logits
        return 0
    if head_grads_in_forward(job):  # with its row indices, which it does not keep
        per_row = HEAD_FORWARD_GRAD_BYTES_PER_LOGIT * d.draft_vocab + HEAD_FORWARD_GRAD_ROW_TABLES * BF16 * d.hidden
        return per_row * head_chunk_rows(job) + ROW_INDEX_BYTES * _tokens(job)
    if _lean(job):
        return HEAD_FORWARD_BYTES_PER_LOGIT * d.draft_vocab * head_chunk_rows(job)
    return (BF16 + FP32) * d.draft_vocab * _tokens(job)


def _loss_backward_bytes(job: Job) -> int:
    """The last step's loss backward, first in backward. Fused: the hidden's gradient [T, h]
    bf16, allocated whole, and one chunk's recomputed logits and their gradient
    (HEAD_BACKWARD_BYTES_PER_LOGIT). Unfused: the fp32 gradients of the log-softmax's output and
    input (8*Vd per token)."""
    d = job.draft
    if _fused_loss(job):  # the logits' bf16 gradient, allocated whole, and the hidden's the head returns
        return BF16 * (d.draft_vocab + d.hidden) * _tokens(job)
    if head_grads_in_forward(job):  # its kept gradient, rescaled in place
        return 0
    if _lean(job):
        return BF16 * d.hidden * _tokens(job) + HEAD_BACKWARD_BYTES_PER_LOGIT * d.draft_vocab * head_chunk_rows(job)
    return 2 * FP32 * d.draft_vocab * _tokens(job)


def _post_attention_saved_per_token(job: Job) -> int:
    """What a step saves after its attention, per token: the o_proj input 2Hd, the hidden after
    attention, the MLP input, the layer output and the final-norm output (8h), two fp32 rstds
    and the SwiGLU 8I. None of it exists yet while the step's attention runs."""
    d = job.draft
    if fused_norms(job):  # the hidden after attention, the layer output, the post-attention rstd
        return 2 * BF16 * d.hidden + FP32 + _o_proj_input_per_token(job) + _swiglu_saved_per_token(job)
    return 4 * BF16 * d.hidden + 2 * FP32 + BF16 * d.heads * d.head_dim + _swiglu_saved_per_token(job)


def _step_outputs_per_token(job: Job) -> int:
    """What a checkpointed step keeps of its own making: the output hidden and the final norm's
    output and rstd (4h + 4; its third kept tensor, the embedding, is an input; with fused norms
    the output hidden alone)."""
    return BF16 * job.draft.hidden + _step_kept_per_token(job)


def draft_forward_extra_bytes(job: Job) -> int:
    """Peak of the draft forward beyond what it saves, reached in the last TTT step.

    The larger of two instants of the last step. Its loss (the tail): the bf16 logits and the
    fp32 product the soft-label cross-entropy sums (6*Vd per token), with the steps' roped keys
    and values, which the unroll holds until it ends. Its attention (eager, or the MLP of a
    checkpointed step with a fused kernel): the step's log-softmax and what it saves after the
    attention do not exist yet, so they come off the saved set counted in `saved`.
    A checkpointed step saves nothing inside, but while it runs its working set is alive: with
    eager attention, at the cast of the probabilities, the fp32 masked scores (the trainer's
    `scores` holds them until eager() returns), the fp32 softmax and the bf16 probabilities
    (10*H*K for K = S*L keys; the bool masks are freed by then), the repeated and the
    concatenated keys and values, the 2h-wide input and q (2Hd); for fused kernels the MLP
    (8I + 4h).
    """
    d, T, L = job.draft, _tokens(job), job.spec.ttt
    tail = _loss_forward_bytes(job)
    if not job.spec.ac:
        return _kv_lists_bytes(job) + max(tail, _eager_unsaved_bytes(job), _lean_mlp_forward_bytes(job))
    last_kv = 2 * BF16 * d.kv_heads * d.head_dim * T  # earlier steps' k/v are saved inputs already
    if job.spec.attention_impl == "eager":
        joined_input = 0 if fused_norms(job) else 2 * BF16 * d.hidden  # fused: gone once q, k, v are made
        per_token = (10 * d.heads * job.spec.seq * L + 4 * (d.heads + d.kv_heads) * d.head_dim * L
                     + joined_input + BF16 * d.heads * d.head_dim)
        not_yet = _step_outputs_per_token(job) + _loss_saved_per_token(job)
        working = (per_token - not_yet) * T
    else:
        working = _checkpointed_mlp_bytes(job)
    return last_kv + max(tail, working)


def _eager_unsaved_bytes(job: Job) -> int:
    """Eager attention's last-step excess over the saved set at its peak (no checkpointing).

    The peak is at `probs @ v`: softmax has saved its fp32 output and matmul the bf16
    probabilities (6*H*K per token, counted as saved), and the fp32 masked scores (4*H*K) are
    still alive, held by the trainer's `scores` until eager() returns, as are the concatenated
    keys and values (4*Hkv*d*L) the repeats were made from; K = S*L keys. The step's
    log-softmax and what it saves after the attention do not exist yet (`saved` counts them).
    """
    if job.spec.attention_impl != "eager":
        return 0
    d, T, S, L = job.draft, _tokens(job), job.spec.seq, job.spec.ttt
    live = FP32 * d.heads * S * L + 2 * BF16 * d.kv_heads * d.head_dim * L
    not_yet = _post_attention_saved_per_token(job) + _loss_saved_per_token(job)
    return (live - not_yet) * T


def _eager_backward_bytes(job: Job) -> int:
    """Eager attention's backward in the last step, per token, beyond that step's saved set
    before its post-attention part was consumed: softmax's backward holds the fp32 gradient
    of its output and the fp32 gradient of its input beside the saved fp32 output, while the
    bf16 probabilities are already released (8*H*K - 2*H*K), with the gradient of the repeated
    values (2*H*d*L) and of the hidden stream (2 x 2h). 0 for the fused kernels."""
    if job.spec.attention_impl != "eager":
        return 0
    d, S, L = job.draft, job.spec.seq, job.spec.ttt
    return 6 * d.heads * S * L + BF16 * d.heads * d.head_dim * L + 2 * BF16 * d.hidden


# SwiGLUDown's backward on CUDA (trainer/lean_ops.py, compiled): the gradient of the product and
# the gradients of gate and up, 6I bytes per token, at its peak.
SWIGLU_BACKWARD_PER_INTERMEDIATE = 6
# SwiGLUDown's forward on CUDA: gate, up and the product its one fused kernel writes, 6I bytes per
# token (eager, silu(gate) exists beside them: 8I, as in torch's composition).
SWIGLU_FORWARD_PER_INTERMEDIATE = 6


def _lean_mlp_forward_bytes(job: Job) -> int:
    """The lean draft's last-step MLP in forward, beyond the saved set: the product (gate and up
    are saved), less what the step saves after its MLP and does not hold yet (the layer output,
    the final norm's output and rstd, the loss's row indices)."""
    if not _lean(job):
        return 0
    d = job.draft
    transient = SWIGLU_FORWARD_PER_INTERMEDIATE * d.intermediate - _swiglu_saved_per_token(job)
    not_yet = _step_outputs_per_token(job) + _loss_saved_per_token(job)
    return (transient - not_yet) * _tokens(job)


def _checkpointed_mlp_bytes(job: Job) -> int:
    """A checkpointed step's MLP while it runs (nothing saved inside): the MLP input and the
    hidden stream (4h) beside gate, up, silu and product (8I; lean on CUDA 6I), less, for the
    lean draft, the step's own outputs and loss rows that `saved` counts but do not exist yet."""
    d = job.draft
    if not _lean(job):
        return (8 * d.intermediate + 4 * d.hidden) * _tokens(job)
    not_yet = _step_outputs_per_token(job) + _loss_saved_per_token(job)
    # fused norms: the normed MLP input lives only inside the norm-projection, gone by SwiGLU
    streams = 2 * d.hidden if fused_norms(job) else 4 * d.hidden
    return (SWIGLU_FORWARD_PER_INTERMEDIATE * d.intermediate + streams - not_yet) * _tokens(job)


def _mlp_backward_bytes(job: Job) -> int:
    """The lean draft's last-step MLP backward, beyond the saved set: SwiGLUDown's gradients and
    the gradient of the hidden stream (2h), less what the head and the final norm released before
    it (their saved hidden 2h each, the norm's rstd, the loss's row indices). With checkpointing
    the step's layer has been recomputed first, beside its kept embedding; what it recomputes
    excludes the layer output and final-norm output the norm outside it kept. 0 for the plain draft,
    whose loss backward (8*Vd per token) is the larger instant."""
    if not _lean(job):
        return 0
    d, T = job.draft, _tokens(job)
    mlp = (SWIGLU_BACKWARD_PER_INTERMEDIATE * d.intermediate + BF16 * d.hidden + _mlp_remade_per_token(job)) * T
    if not job.spec.ac:
        released = (_step_outputs_per_token(job) + _loss_saved_per_token(job)) * T
        return mlp - released
    return recomputed_step_bytes(job, job.spec.ttt - 1) + mlp


def recomputed_step_bytes(job: Job, k: int) -> int:
    """A checkpointed step k's layer made again at its MLP backward, beside what it kept: what it
    saves again, less the outputs the norm outside it kept (released by now, as the kept ones
    are), the embedding, which stays kept as its input, and its loss's saved rows, released."""
    T = _tokens(job)
    recomputed = _layer_saved_per_token(job) * T + _kernel_saved_bytes(job, k)
    released = (_embedding_kept_per_token(job) + 2 * _step_outputs_per_token(job) + _loss_saved_per_token(job)) * T
    return recomputed - released


def _mlp_remade_per_token(job: Job) -> int:
    """What the MLP's backward makes again beside SwiGLU's gradients when it kept only its input
    (trainer/recompute_mlp.py): gate and up 4I and the norm's output 2h; 0 otherwise."""
    if not recomputes_mlp(job):
        return 0
    return 4 * job.draft.intermediate + BF16 * job.draft.hidden


def mlp_backward_working_bytes(job: Job) -> int:
    """An earlier step's MLP backward at SwiGLU's gradients, beyond its saved set: the input
    gradients of gate and up 4I (SwiGLU's), and what a recomputing MLP made again, with the
    product's gradient beside them then."""
    remade = _mlp_remade_per_token(job)
    extra = 2 * job.draft.intermediate if remade else 0
    return (4 * job.draft.intermediate + remade + extra) * _tokens(job)


def draft_backward_extra_bytes(job: Job) -> int:
    """Transient peak of backward beyond the saved tensors: the larger of two instants.

    Its start: the last step's loss backward holds the fp32 gradient of the log-softmax and its
    fp32 input gradient (8*Vd per token) before any saved tensor is released (with the head's
    gradients made in forward, nothing, and the last step's layer output already gone). The last step's
    layer: by then its log-softmax and what it saved after the attention have been released
    (`_post_attention_saved_per_token`); with eager attention softmax's backward then adds
    `_eager_backward_bytes`. With checkpointing that layer is first recomputed: its saved set
    comes back beside the kept inputs (its embedding is the kept one, not a second copy) while
    the step's own outputs are gone. Checkpointing therefore never adds to this instant: the
    recomputed set is what the step would have saved anyway.
    """
    T = _tokens(job)
    logits_grads = _loss_backward_bytes(job) - let_go_in_forward_bytes(job)
    released = (_post_attention_saved_per_token(job) + _loss_saved_per_token(job)) * T
    attention = _eager_backward_bytes(job) * T
    if not job.spec.ac:
        return max(logits_grads, attention - released, _mlp_backward_bytes(job))
    recomputed = _layer_saved_per_token(job) * T + _kernel_saved_bytes(job, job.spec.ttt - 1)
    kept_by_last_step = (_embedding_kept_per_token(job) + _step_outputs_per_token(job)) * T
    return max(logits_grads, recomputed - kept_by_last_step - released + attention, _mlp_backward_bytes(job))


def last_step_saved_bytes(job: Job) -> int:
    """What the last TTT step keeps and releases in its own backward, before the step before
    it starts its backward: its layer's saved set, its kernel's and its loss's (checkpointed:
    its kept outputs and the keys and values it held of the step before)."""
    d, T, L = job.draft, _tokens(job), job.spec.ttt
    loss = _loss_saved_per_token(job) * T
    if job.spec.ac:
        kept = _embedding_kept_per_token(job) + BF16 * d.hidden + _step_kept_per_token(job)
        return kept * T + 2 * BF16 * d.kv_heads * d.head_dim * T + loss
    return _layer_saved_per_token(job) * T + _kernel_saved_bytes(job, L - 1) + loss


def pending_from_last_step_bytes(job: Job) -> int:
    """Gradients step L-1 sends back and the earlier steps' backward holds: of the hidden stream
    (2h) and of the keys and values step L-1 attended to, one tensor per step L-1's
    concatenation that its slices for the earlier steps keep whole (4*Hkv*d*L); with the split
    attention, one key and value gradient per earlier step (4*Hkv*d*(L-1))."""
    d, T, L = job.draft, _tokens(job), job.spec.ttt
    steps = L - 1 if job.spec.attention_impl == "split" else L
    return BF16 * d.hidden * T + 2 * BF16 * d.kv_heads * d.head_dim * steps * T


def embedding_finish_live_bytes(job: Job) -> int:
    """What the draft holds at the last q/k/v backward call (step 0's) beside the grads, where
    the embedding's half is made from G (0 where there is none): the fc output step 0 read, the
    gradients of the hidden stream and of hidden_norm's input (2h each), step 0's q/k/v output
    gradients, the RoPE tables, G and the call's own work (`embedding_finish_bytes`); with one
    step, also the whole key and value gradients its attention made."""
    if not projects_embedding_once(job):
        return 0
    d, T = job.draft, _tokens(job)
    one_step_kv = 2 * BF16 * d.kv_heads * d.head_dim * T if job.spec.ttt == 1 else 0
    per_token = 3 * BF16 * d.hidden + BF16 * qkv_width(job)
    return (per_token * T + _rope_bytes(job) + one_step_kv + embedding_grad_bytes(job)
            + embedding_finish_bytes(job))


def earlier_head_backward_bytes(job: Job) -> int:
    """Beyond the saved set that is left, while step L-2's loss backward runs: its own transient
    (`_loss_backward_bytes`) and the gradients pending from step L-1."""
    return _loss_backward_bytes(job) + pending_from_last_step_bytes(job)
