"""What SpecForge's Eagle3 step holds, tensor by tensor, with its flex attention backend.

Read from SpecForge 0.2 (algorithms/eagle3/model.py OnlineEagle3Model, modeling/draft/llama3_eagle.py
LlamaDecoderLayer and LlamaFlexAttention, core/loss.py LogSoftmaxLoss, core/lk_loss.py,
training/strategies/base.py Eagle3TrainStrategy, training/backend.py FSDPTrainingBackend,
optimizer.py BF16Optimizer) and torch's FSDP1 and autograd, and checked against the allocator
histories of its offline step on one H200 (tests/data/gpu/trace/specforge). Both the phase sums
(specforge_runtime.py) and the written step (specforge_events.py) are made from these sizes.

Notation: T = B*S tokens, L TTT steps, h draft hidden, I its MLP width, H/Hkv heads, d head_dim,
Vd draft vocab, V target vocab, ht target hidden; bf16 2 B, fp32 4 B.

Per TTT step k the draft saves, per token: the embedding 2h (input_layernorm's input), the cat of
the two normed inputs 4h, roped q 2Hd, the flex kernel's output 2Hd (o_proj's input: the kernel
writes it in [B, S, H, d] order, so the transpose is a view), its fp32 logsumexp 4H, the hidden
after attention 2h, the MLP input 2h, gate, silu, up and their product 8I, the layer output 2h,
the final norm's output 2h, and the bf16 logits 2Vd that LogSoftmaxLoss saves (its Triton
backward writes the gradient into them). The keys and values live in DynamicCache: each step
concatenates the new ones onto steps 0..k-1, and the kernel saves those concatenations,
2 * 2*Hkv*d*T*(k+1). Left out (under 1 MiB at the shapes measured): the norms' fp32 rstds, the
rotary tables, ids, masks and the loss's row statistics.
"""

from __future__ import annotations

from fitplan.layout import Job
from fitplan.units import BF16, FP32

# cuBLAS keeps a workspace per (handle, stream) and a handle per thread: the training thread's and
# autograd's device thread's (made at the first backward): two of runtime.CUBLAS_WORKSPACE_BYTES.
CUBLAS_HANDLES = 2


def modelled(job: Job) -> bool:
    """The draft-side terms here are SpecForge's flex backend (its default, and what was measured),
    whatever `ac` says: SpecForge's draft has no activation checkpointing. Its other backends keep
    draft_terms' plain-draft terms (not measured)."""
    return job.spec.attention_impl == "flex"


def tokens(job: Job) -> int:
    return job.spec.micro_batch * job.spec.seq


def trainable_tensors(job: Job) -> list[tuple[str, int]]:
    """The trained draft tensors (name, elements) in the order BF16Optimizer walks them
    (draft.parameters(): the decoder layer's attention and MLP, its three norms, fc, the final
    norm, lm_head)."""
    d = job.draft
    h, q, kv = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim
    return [
        ("q_proj", 2 * h * q), ("k_proj", 2 * h * kv), ("v_proj", 2 * h * kv), ("o_proj", q * h),
        ("gate_proj", h * d.intermediate), ("up_proj", h * d.intermediate), ("down_proj", d.intermediate * h),
        ("hidden_norm", h), ("input_layernorm", h), ("post_attention_layernorm", h),
        ("fc", 3 * d.target_hidden * h), ("norm", h), ("lm_head", d.draft_vocab * h),
    ]


# Weights used once per TTT step, so a gradient arrives from each step (the norms' are left out,
# 8 KiB each); fc runs once, before the unroll.
STEP_WEIGHTS = ("lm_head", "down_proj", "up_proj", "gate_proj", "o_proj", "k_proj", "v_proj", "q_proj")


def step_weight_bytes(job: Job) -> int:
    """bf16 bytes of the weights each TTT step's backward sends a gradient to (STEP_WEIGHTS)."""
    sizes = dict(trainable_tensors(job))
    return BF16 * sum(sizes[name] for name in STEP_WEIGHTS)


def embedding_bytes(job: Job) -> int:
    """The draft's frozen [V, h] embedding in bf16 (inside FSDP's flat parameter, so it gets a gradient)."""
    return BF16 * job.draft.frozen_params()


def fc_bytes(job: Job) -> int:
    return BF16 * 3 * job.draft.target_hidden * job.draft.hidden


def flat_bytes(job: Job) -> int:
    """FSDP's one flat parameter (and its gradient): every draft tensor in bf16, the frozen
    embedding included."""
    return BF16 * (job.draft.trainable_params() + job.draft.frozen_params())


# ------------------------------------------------------------------ the teacher (offline)


def batch_bytes(job: Job) -> int:
    """The offline micro-batch on the GPU: the stored aux hidden states [T, 3ht] and last hidden
    state [T, ht], bf16 (ids and masks left out)."""
    return BF16 * 4 * job.draft.target_hidden * tokens(job)


def shifted_hidden_bytes(job: Job) -> int:
    """TargetHead.preprocess: the stored last hidden state shifted by one position (a new [T, ht])."""
    return BF16 * job.draft.target_hidden * tokens(job)


def target_logits_bytes(job: Job) -> int:
    """TargetHead's bf16 logits [T, V]: kept by Eagle3TrainStrategy.forward_loss until it returns."""
    return BF16 * tokens(job) * job.model.vocab


def target_upcast_bytes(job: Job) -> int:
    """_compute_target_p's fp32 copy of the target logits [T, V]."""
    return FP32 * tokens(job) * job.model.vocab


def draft_vocab_fp32_bytes(job: Job) -> int:
    """One fp32 [T, Vd]: the teacher's draft-vocab columns, softmax, on-draft probabilities, and
    the acceptance rate's softmax and minimum."""
    return FP32 * tokens(job) * job.draft.draft_vocab


TEACHER_KERNEL_TENSORS = 3  # _compute_target_p: the gathered columns, target_p, target_p_on_draft


def padded_teacher_bytes(job: Job) -> int:
    """One padded teacher, fp32 [B, S+L, Vd]: target_p_padded (kept through backward by every step's
    loss) or target_p_on_draft_padded (until the forward ends)."""
    spec = job.spec
    return FP32 * spec.micro_batch * (spec.seq + spec.ttt) * job.draft.draft_vocab


def teacher_slice_bytes(job: Job) -> int:
    """Each step's `.contiguous()` slice of a padded teacher: a copy only when B > 1 (one sequence's
    slice of [1, S+L, Vd] is contiguous already)."""
    return draft_vocab_fp32_bytes(job) if job.spec.micro_batch > 1 else 0


def teacher_instants(job: Job, held_grads: int) -> list[dict[str, int]]:
    """The teacher's candidate peaks beyond the resident state and the batch: TargetHead's GEMM (the
    shifted hidden state beside the logits it makes, the last step's gradient still held: FSDP's
    pre-forward drops it after the head has run) and the compiled _compute_target_p (the logits,
    their fp32 copy and three fp32 [T, Vd])."""
    return [
        {"target.activations": shifted_hidden_bytes(job), "logits.target": target_logits_bytes(job),
         "draft.grads": held_grads},
        {"logits.target": target_logits_bytes(job) + target_upcast_bytes(job),
         "logits.teacher": TEACHER_KERNEL_TENSORS * draft_vocab_fp32_bytes(job)},
    ]


# ------------------------------------------------------------------ the draft's forward


def per_token_saved(job: Job) -> int:
    """What one TTT step's layer saves per token (module docstring): seven h-wide bf16 tensors, q
    and the kernel's output, the logsumexp and the SwiGLU's four I-wide tensors."""
    d = job.draft
    return 7 * BF16 * d.hidden + 2 * BF16 * d.heads * d.head_dim + FP32 * d.heads + 4 * BF16 * d.intermediate


def step_logits_bytes(job: Job) -> int:
    """One step's bf16 logits [T, Vd], saved by LogSoftmaxLoss."""
    return BF16 * tokens(job) * job.draft.draft_vocab


def step_kv_bytes(job: Job, k: int) -> int:
    """DynamicCache's keys and values after step k, the concatenations of steps 0..k the kernel saves."""
    d = job.draft
    return 2 * BF16 * d.kv_heads * d.head_dim * tokens(job) * (k + 1)


def fc_output_bytes(job: Job) -> int:
    return BF16 * job.draft.hidden * tokens(job)


def saved(job: Job, steps: int) -> dict[str, int]:
    """What fc and the first `steps` TTT steps keep for backward, by component: the layers' saved
    tensors with their keys and values, the steps' logits, and with B > 1 the teacher slices
    their losses read."""
    layers = sum(per_token_saved(job) * tokens(job) + step_kv_bytes(job, k) for k in range(steps))
    return {"activations.draft": fc_output_bytes(job) + layers, "logits.draft": steps * step_logits_bytes(job),
            "logits.teacher": steps * teacher_slice_bytes(job)}


def draft_forward_instant(job: Job) -> dict[str, int]:
    """The draft forward's peak, in its last step's acceptance rate (no grad): everything the steps
    saved, both padded teachers, and softmax(logits.float()) beside the minimum with the teacher
    (two fp32 [T, Vd] at once), with B > 1 beside the step's on-draft teacher slice."""
    out = saved(job, job.spec.ttt)
    out["logits.teacher"] += 2 * padded_teacher_bytes(job) + teacher_slice_bytes(job)
    out["logits.draft"] += 2 * draft_vocab_fp32_bytes(job)
    return out


# ------------------------------------------------------------------ backward


def hidden_grad_bytes(job: Job) -> int:
    """A [T, h] bf16 gradient: the hidden stream's (one tensor through backward), the head's input,
    the embedding output's."""
    return BF16 * job.draft.hidden * tokens(job)


def backward_start(job: Job) -> dict[str, int]:
    """Step L-1's head backward: everything saved (but the teacher slice its loss released, B > 1),
    the padded teacher, lm_head's weight gradient and the gradient of its input (the loss's own
    gradient is written into its saved logits)."""
    out = saved(job, job.spec.ttt)
    out["logits.teacher"] += padded_teacher_bytes(job) - teacher_slice_bytes(job)  # the loss released its slice
    out["activations.draft"] += hidden_grad_bytes(job)
    out["draft.grads"] = BF16 * job.draft.draft_vocab * job.draft.hidden
    return out


def head_backward(job: Job, k: int) -> dict[str, int]:
    """Step k's head backward for k < L-1: what fc and steps 0..k saved, the padded teacher, the
    hidden stream's gradient and the head input's, the gradients of the keys and values of steps
    0..k+1 that step k+1 left pending, one gradient of every step weight (the first ones, or their
    sums on FSDP's stream), the embedding's first gradient, and lm_head's new one."""
    out = saved(job, k + 1)
    out["logits.teacher"] += padded_teacher_bytes(job) - teacher_slice_bytes(job)  # the loss released its slice
    out["activations.draft"] += 2 * hidden_grad_bytes(job) + step_kv_bytes(job, k + 1)
    out["draft.grads"] = step_weight_bytes(job) + embedding_bytes(job) + BF16 * job.draft.draft_vocab * job.draft.hidden
    return out


def embedding_backward(job: Job, k: int) -> dict[str, int]:
    """While step k's embedding backward runs: what fc and steps 0..k-1 saved (step k's own is
    released), the padded teacher, the hidden stream's gradient, the gradients of the keys and
    values of steps 0..k (pending for the steps before), the embedding output's gradient (step 0:
    no teacher, fc output nor pending gradients); one gradient of every step weight (step L-1: the first ones;
    later: their sums on FSDP's stream, the added ones released) and the embedding's: its first,
    which the later ones are added into in place, and step k's own."""
    out = saved(job, k)
    if k == 0:  # step 0's loss read the padded teacher last, its hidden_norm fc's output, and no
        # step before it takes the gradients of its keys and values
        out["activations.draft"] += 2 * hidden_grad_bytes(job) - fc_output_bytes(job)
    else:
        out["logits.teacher"] += padded_teacher_bytes(job)
        out["activations.draft"] += 2 * hidden_grad_bytes(job) + step_kv_bytes(job, k)
    embeddings = 1 if k == job.spec.ttt - 1 else 2
    out["draft.grads"] = step_weight_bytes(job) + embeddings * embedding_bytes(job)
    return out


def backward_end(job: Job) -> dict[str, int]:
    """SplitWithSizesBackward's cat on FSDP's stream: the flat gradient beside its inputs, the step
    weights' sums, fc's gradient and the embedding's (nothing saved is left)."""
    return {"draft.grads": flat_bytes(job) + step_weight_bytes(job) + fc_bytes(job) + embedding_bytes(job)}


def backward_instants(job: Job) -> list[dict[str, int]]:
    """The backward's candidate peaks beyond what is resident (weights, state, batch): its start;
    step L-2's head and embedding backward (earlier steps hold less; step L-1's embedding backward
    holds less than step L-2's head); with one step, its embedding backward; the flat gradient's cat."""
    L = job.spec.ttt
    steps = [head_backward(job, L - 2), embedding_backward(job, L - 2)] if L > 1 else [embedding_backward(job, 0)]
    return [backward_start(job), *steps, backward_end(job)]


# ------------------------------------------------------------------ the optimizer step


def load_instants(job: Job) -> list[dict[str, int]]:
    """Loading on one GPU beyond the target's lm_head: the draft's own tensors beside the flat
    parameter FSDP copies them into (then frees them), and BF16Optimizer's last fp32 master made
    from a bf16 clone of its parameter."""
    flat = flat_bytes(job)
    last = trainable_tensors(job)[-1][1]
    return [{"draft.params": 2 * flat},
            {"draft.params": flat + BF16 * last, "optimizer.master": FP32 * job.draft.trainable_params()}]


def optimizer_step_bytes(job: Job) -> int:
    """BF16Optimizer.step at its peak, per rank: every master's fp32 gradient (p.grad.float()) and
    torch AdamW's foreach step's fp32 sqrt of every exp_avg_sq, 8 B per trained parameter."""
    return 2 * -(-FP32 * job.draft.trainable_params() // job.world)
