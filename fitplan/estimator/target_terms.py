"""The frozen Eagle3 target on one rank: weights, forward working set, outputs and logits.

With TP the target runs every rank's micro-batch of its TP group: T_g = tp*B*S tokens, with
activations replicated over the group and weights split. Its vocab-parallel lm_head yields
[T_g, V/tp] per rank; `gather` leaves every rank holding [T_g, V] (tp times what it needs),
`all-to-all` only its own [B*S, V] rows (memory-anatomy §4).
"""

from __future__ import annotations

from fitplan.estimator.params import BF16, MXFP4_BYTES_PER_PARAM, count_params, weight_bytes
from fitplan.layout import Job

FP32 = 4


def target_weight_bytes(model, spec) -> int:
    """Full, unsharded frozen target weight bytes (MXFP4-packed experts when asked)."""
    return weight_bytes(model, packed=spec.target_weights == "mxfp4")


def weights_per_rank(job: Job) -> int:
    return -(-target_weight_bytes(job.model, job.spec) // job.tp)


def group_tokens(job: Job) -> int:
    """Tokens the target's forward runs on each rank: the whole TP group's micro-batches."""
    return job.tp * job.spec.micro_batch * job.spec.seq


def own_tokens(job: Job) -> int:
    return job.spec.micro_batch * job.spec.seq


def received_tokens(job: Job) -> int:
    """Rows of full-vocab outputs a rank ends up holding: T_g with gather, B*S with all-to-all."""
    return own_tokens(job) if job.spec.output_sharding == "all-to-all" else group_tokens(job)


def forward_working_bytes(job: Job) -> int:
    """One layer's transient working set under no_grad (earlier layers' tensors are freed).

    bf16 per token: the residual stream, its normed copy and the layer output (3h), the
    attention's q/k/v and output on this rank's heads, and the MLP's gate/up/product (3*I/tp);
    for MoE layers each token visits k experts (their inputs and SwiGLU tensors) and the router
    keeps fp32 logits over the experts.
    """
    m, tp = job.model, job.tp
    per_token = 3 * m.hidden + (2 * m.heads + 2 * m.kv_heads) * m.head_dim // tp
    if m.is_moe:
        per_token += m.experts_per_token * (m.hidden + 3 * m.expert_intermediate) // tp
        per_token += FP32 // BF16 * m.experts
    else:
        per_token += 3 * m.intermediate // tp
    return BF16 * per_token * group_tokens(job)


def aux_outputs_bytes(job: Job) -> int:
    """Captured hidden states [rows, 3h] bf16 kept for the draft (exchanged like the logits)."""
    return BF16 * len(job.draft.aux_layers) * job.model.hidden * received_tokens(job)


def logits_bytes(job: Job) -> int:
    """fitplan runtime, at the end of the target forward: this rank's bf16 vocab shard [T_g, V/tp]
    plus what the exchange delivers ([T_g, V] gathered or [B*S, V] all-to-all); with tp 1 just
    [B*S, V]. The fitplan trainer frees them once the teacher is built."""
    V = job.model.vocab
    if job.tp == 1:
        return BF16 * own_tokens(job) * V
    shard = BF16 * group_tokens(job) * V // job.tp
    return shard + BF16 * received_tokens(job) * V


def largest_weight(job: Job) -> tuple[int, str]:
    c = count_params(job.model)
    packed = c.largest_is_expert and job.spec.target_weights == "mxfp4"
    per_param = MXFP4_BYTES_PER_PARAM if packed else BF16
    return int(c.largest_tensor * per_param) // job.tp, f"target {c.largest_tensor_name} (TP shard)"
