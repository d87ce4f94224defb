"""The frozen Eagle3 target on one rank: weights, forward working set, outputs and logits.

With TP the target runs every rank's micro-batch of its TP group: T_g = tp*B*S tokens, with
activations replicated over the group and weights split. Its vocab-parallel lm_head yields
[T_g, V/tp] per rank; `gather` leaves every rank holding [T_g, V] (tp times what it needs),
`all-to-all` only its own [B*S, V] rows (docs/estimate.md, "Target forward").
"""

from __future__ import annotations

from fitplan.shapes import BF16, MXFP4, ModelShape, count_params
from fitplan.estimator.runtime import runs_fitplan_trainer
from fitplan.layout import Job, target_weight_bytes
from fitplan.units import FP32


def weights_per_rank(job: Job) -> int:
    return -(-target_weight_bytes(job.model, job.spec) // job.tp)


# ---------------------------------------------------------------- offline: stored target features
# An offline job reads the target's features from disk (SpecForge's prepare_hidden_states.py
# files): no target runs, and of its weights only the lm_head stays, to score the stored last
# hidden state for the teacher.


def head_bytes(job: Job) -> int:
    """The target's lm_head [V, h] bf16, whole on every rank (a tied one is the embedding tensor)."""
    return BF16 * job.model.vocab * job.model.hidden


def resident_weights(job: Job) -> int:
    """The target weights a rank holds through the run: its TP shard, or offline the lm_head alone."""
    return head_bytes(job) if job.spec.offline else weights_per_rank(job)


def staged_embedding_bytes(job: Job) -> int:
    """fitplan's trainer offline (trainer/target_head.py): the target's embedding [V, h] bf16, read
    while the draft copies it and freed after; none apart when tied (it is the lm_head)."""
    return 0 if job.model.tie_embeddings else head_bytes(job)


def last_hidden_bytes(job: Job) -> int:
    """The stored last hidden states of a micro-batch [B, S, h] bf16, on the device until the
    lm_head has scored them."""
    return BF16 * job.model.hidden * own_tokens(job)


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
    per_token = 3 * m.hidden + (2 * m.heads + 2 * m.kv_heads) * m.head_dim // tp + mlp_working_per_token(m, tp)
    return BF16 * per_token * group_tokens(job)


def mlp_working_per_token(m: ModelShape, tp: int) -> int:
    """bf16 elements per token of one layer's MLP on a TP shard: gate, up and their product
    (3*I/tp), or for MoE the k experts' inputs and SwiGLU tensors and the router's fp32 logits."""
    if m.is_moe:
        return m.experts_per_token * (m.hidden + 3 * m.expert_intermediate) // tp + FP32 // BF16 * m.experts
    return 3 * m.intermediate // tp


# transformers has no SDPA path for these models (gpt-oss: attention sinks; Gemma 2: logit
# soft-capping; their PreTrainedModel sets _supports_sdpa = False), and the trainer builds the
# target without choosing an attention implementation (trainer/target.py), so their attention
# runs the family's eager_attention_forward. Bytes per [B, H, S, S] score entry at its peak under
# no_grad, read off that function:
# - gpt_oss: three bf16 score tensors (with a sink column): the masked scores (still named
#   attn_weights), their concatenation with the sinks, and the max-subtracted copy while softmax
#   writes the fourth over the freed third;
# - gemma2: the soft-capped, masked bf16 scores, softmax's fp32 cast of them
#   (softmax(..., dtype=float32) casts its input first) and its fp32 output: 2 + 4 + 4.
EAGER_SCORE_BYTES = {"gpt_oss": 3 * BF16, "gemma2": BF16 + 2 * FP32}
EAGER_SINK_COLUMNS = {"gpt_oss": 1}
# The largest single tensor of that working set: a bf16 score tensor (gpt-oss), the fp32 softmax
# (gemma2).
EAGER_LARGEST_BYTES = {"gpt_oss": BF16, "gemma2": FP32}
# The float causal masks [B, 1, S, S] in bf16, one per layer type (full and sliding window),
# built once per forward and kept to its end.
EAGER_MASKS = 2


def runs_eager_attention(job: Job) -> bool:
    """fitplan's trainer runs this target's attention in eager_attention_forward (no SDPA path)."""
    return job.model.model_type in EAGER_SCORE_BYTES and runs_fitplan_trainer(job) and not job.spec.offline


def eager_attention_bytes(job: Job) -> int:
    """The target layer's eager attention transient on this rank's heads (0 with SDPA/flash).

    Checked against the H200 reports' target_forward peaks (gpt-oss-20b 4k b2 and 8k b1, same
    8192 tokens): measured minus predicted before this term was 8.3 and 20.5 GiB, a slope of
    6.1 B per score entry (3 bf16 copies: 6 B) over B*H*S^2 of 2.1e9 and 4.3e9 entries."""
    if not runs_eager_attention(job):
        return 0
    batch, seq = job.tp * job.spec.micro_batch, job.spec.seq
    per_entry = EAGER_SCORE_BYTES[job.model.model_type]
    return per_entry * _score_entries(job) + EAGER_MASKS * BF16 * batch * seq * seq


def _score_entries(job: Job) -> int:
    """[B, H/tp, S, S(+sink)] on this rank, for the TP group's micro-batches."""
    seq, sinks = job.spec.seq, EAGER_SINK_COLUMNS.get(job.model.model_type, 0)
    return job.tp * job.spec.micro_batch * (job.model.heads // job.tp) * seq * (seq + sinks)


def eager_scores_tensor_bytes(job: Job) -> int:
    """The largest tensor of eager attention: one score tensor (bf16, or gemma2's fp32 softmax)."""
    return EAGER_LARGEST_BYTES[job.model.model_type] * _score_entries(job)


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
    return logits_shard_bytes(job) + BF16 * received_tokens(job) * V


def logits_shard_bytes(job: Job) -> int:
    """What the target's lm_head returns on this rank: [T_g, V/tp] bf16 ([B*S, V] with tp 1)."""
    return BF16 * group_tokens(job) * job.model.vocab // job.tp


def exchange_copy_bytes(job: Job) -> int:
    """The second full-vocab block alive while the exchange runs (trainer/parallel/outputs.py):
    gather's all-gather buffer [T_g, V] beside its row-ordered copy, all-to-all's receive buffer
    [B*S, V] beside its reordered copy; 0 with tp 1. Measured target_forward (steady) minus the
    prediction without it, tests/data/gpu/multi_train_x{2,4}.jsonl: gather 2.96 / 4.79 / 9.43 /
    6.74 GiB for blocks of 2.32 / 4.64 / 9.27 / 6.14 (qwen3-8b tp2 S4096, S8192, tp4 S8192,
    gpt-oss-120b tp4); all-to-all 1.89 / 2.66 / 3.04 / 1.02 for 1.16 / 2.32 / 2.32 / 1.53."""
    return BF16 * received_tokens(job) * job.model.vocab if job.tp > 1 else 0


def largest_weight(job: Job) -> tuple[int, str]:
    if job.spec.offline:
        return head_bytes(job), "target lm_head [V, h] bf16"
    c = count_params(job.model)
    packed = c.largest_is_expert and job.spec.target_weights == "mxfp4"
    per_param = MXFP4 if packed else BF16
    return int(c.largest_tensor * per_param) // job.tp, f"target {c.largest_tensor_name} (TP shard)"
