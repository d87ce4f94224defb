"""Step-time model: how long one optimizer step of a Job takes, from FLOPs and bytes moved.

Used by the fix ladder to rank the configurations that fit by predicted throughput. Three
kinds of time, each from a GPU profile rate (GpuSpec) derated by a named efficiency:
- compute: target forward (2·active params·tokens + causal attention), the draft's forward and
  backward over the TTT unroll (or the sft forward+backward, 6·P·tokens + attention), and the
  recompute forward that activation checkpointing adds and the gate and up recompute_mlp adds,
  less the embedding half of q/k/v the trainer projects once per unroll instead of per step;
- communication over the GPU interconnect: the target's TP all-reduces, the logits and aux
  hidden states (all-gather of the TP group's rows vs all-to-all of its own rows), the trained
  model's gradient all-reduce / FSDP all-gather and reduce-scatter;
- offload traffic over PCIe.
No overlap between them is assumed, so absolute times are pessimistic; the ranking between
configurations of one job is what the ladder uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fitplan.config import CUDNN_ATTENTION_FROM_CAPABILITY
from fitplan.estimator.target_terms import runs_eager_attention
from fitplan.layout import (
    Job,
    head_grads_in_forward,
    lean_draft,
    projects_embedding_once,
    recomputes_mlp,
)
from fitplan.shapes import ModelShape, count_params
from fitplan.units import BF16, FP32

# Achievable fractions of the bf16 peak, per compute path, calibrated on steady step times of
# `fitplan train` / the sft job: tests/data/gpu/multi_train_x{2,4}.jsonl and
# tests/data/gpu/validation/h200_rows.jsonl (meas_step_s; its eagle3 rows ran on a trainer that
# still built the dense TTT mask). The efficiency each run implies is FLOPs / (peak * (measured - comm)).
# - Dense GEMMs (dense targets, and the drafts of SpecForge and speculators): fitted on the
#   qwen3-8b tp2 runs, the draft priced with them (0.397-0.421);
#   checked on qwen3-8b tp4 (0.392: predicted 7% fast) and the one-GPU H200 dense eagle3 rows
#   (0.453-0.476: predicted 8-13% slow; the trainer with the dense TTT mask).
DENSE_EFFICIENCY = 0.42
# - The Eagle3 draft in fitplan's trainer (the FLOPs it computes, the attention priced as flex
#   less what the split attention saves): fitted on the trainer's offline steps that
#   benchmarks/vs_specforge.py measured on one H200 at B1 S 2048, 4096, 8192 and 16384
#   (docs/data/vs_fitplan_steps_y.json and vs_fitplan_16k_y.json, call Y), where the target is
#   only the teacher's lm_head: implied efficiencies 0.489, 0.537, 0.548, 0.520, median 0.528
#   (lowest at 2048, where launches and the optimizer's fixed few milliseconds weigh more; at
#   16384 the step ran the board at its 700 W limit with the SM clock at 1440-1710 MHz of 1980,
#   docs/vs-specforge.md call AB, which the efficiency absorbs).
#   Held out: the same call's B2 S2048, B2 S4096 and B1 S6144 (predicted 1-8% over), the same
#   trainer's steps beside SpecForge in calls Z-AA (-1..+8% from S 4096; 14% fast at 2048, where
#   the step moved 7% between calls) and calls W-X, the trainer before its SwiGLU kernel (1-9%
#   over). Older trainers (flex at every length, the embedding's half projected per step) ran
#   3-25% slower than this says (tests/test_steptime.py).
DRAFT_EFFICIENCY = 0.53
# - MoE targets in transformers' eager expert loop (gpt-oss, Qwen-MoE: one bf16 GEMM per routed
#   expert in a Python loop), and the eager attention of gpt-oss (no SDPA path in transformers),
#   which is memory-bound: its [B, H, S, S+1] scores are written, masked, concatenated with the
#   sinks, max-subtracted and soft-maxed in bf16/fp32 passes. Target forward time = GEMM FLOPs at
#   this efficiency + EAGER_ATTENTION_BYTES_PER_SCORE per score entry per layer at the GPU's memory
#   bandwidth. Least squares over the gpt-oss calibration rows, target time = measured step -
#   predicted draft and comm (tests/data/gpu/validation: 4xH200 tp4 gather 8k, 2xH200 tp2
#   gather 2k, 1xH200 gpt-oss-20b b2 4k; multi_train_x4.jsonl tp4 4k gather and all-to-all):
#   0.179 and 86 B. Checked on the 11 gpt-oss check rows (1xH100 to 4xH200, seq 2k-12.5k):
#   median error 9.6% (max 21.6%), where one efficiency over GEMMs and attention FLOPs (0.045)
#   had 25% (max 36%), too slow at 2k and too fast past 8k. No Qwen-MoE measurement: assumed the
#   same loop.
MOE_EXPERT_LOOP_EFFICIENCY = 0.18
EAGER_ATTENTION_BYTES_PER_SCORE = 86
# - sft (plain transformers, SDPA, fused AdamW): fitted on the qwen3-8b sft rows (0.473, 0.491);
#   checked on llama-3.1-8b s4k b2 ac (0.520: predicted 8% slow) and s2k b1 no ac (0.405:
#   predicted 16% fast). Dense models only; MoE sft below.
SFT_EFFICIENCY = 0.48
# - MoE sft (gpt-oss in plain transformers, flex attention, FSDP2): fitted on the calibration row
#   h200x4-sft-gpt-oss-20b-s4k-b1-ac-bf16-zero3 (0.87 s measured, 0.30 s of it predicted comm:
#   0.233; tests/data/gpu/validation/h200x4_rows.jsonl); checked on its bf16-master twin (0.89 s,
#   predicted 0.88 s). Near the eagle3 target's expert-loop figure above (0.18), once that
#   target's eager attention is priced apart.
MOE_SFT_EFFICIENCY = 0.23
# Interconnect and PCIe: typical public figure (~70% of NVLink / PCIe bandwidth), not calibrated
# (comm is 2-15% of the measured multi-GPU steps).
LINK_EFFICIENCY = 0.70
# Fixed cost of one collective (launch + ring latency): makes many small micro-steps slower
# than few large ones. An assumed figure, not measured (the efficiencies above are fitted).
COLLECTIVE_LATENCY_S = 20e-6



@dataclass(frozen=True)
class StepTime:
    """Predicted seconds per optimizer step, by kind, for the busiest GPU."""

    compute_s: float
    comm_s: float
    offload_s: float
    tokens_per_step: int

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    def to_json(self) -> dict[str, float]:
        return {
            "step_time_s": self.step_s,
            "tokens_per_s": self.tokens_per_s,
            "compute_s": self.compute_s,
            "comm_s": self.comm_s,
            "offload_s": self.offload_s,
        }


# ---------------------------------------------------------------- FLOPs per GPU per micro-step


def matmul_params(m: ModelShape) -> float:
    """Parameters a token multiplies through: all but the embedding lookup, routed experts pro rata."""
    c = count_params(m)
    lookup = 0 if m.tie_embeddings else m.vocab * m.hidden
    routed = c.expert_weights * m.experts_per_token / m.experts if m.is_moe else 0
    return c.other - lookup + routed


def causal_attention_flops(batch: int, seq: int, heads: int, head_dim: int) -> float:
    """Forward of one causal attention layer: QK^T and PV, each 2·S²·H·d, half masked."""
    return 2 * batch * seq * seq * heads * head_dim


def model_gemm_flops(job: Job) -> float:
    """The model's weight GEMMs over one micro-batch of B samples (no attention)."""
    return 2 * matmul_params(job.model) * job.spec.micro_batch * job.spec.seq


def model_forward_flops(job: Job) -> float:
    """Forward of the whole model over one micro-batch of B samples."""
    b, s, m = job.spec.micro_batch, job.spec.seq, job.model
    return model_gemm_flops(job) + m.layers * causal_attention_flops(b, s, m.heads, m.head_dim)


def target_forward_flops(job: Job) -> float:
    """Per GPU: the TP group runs tp·B samples split tp ways, i.e. B samples' worth each."""
    if job.spec.offline:  # precomputed hidden states: only the frozen lm_head for the teacher
        return 2 * job.model.vocab * job.model.hidden * job.spec.micro_batch * job.spec.seq
    return model_forward_flops(job)


def _draft_step_forward_flops(job: Job) -> float:
    """One TTT step's forward: every trained matmul but fc, and the attention."""
    d, b, s = job.draft, job.spec.micro_batch, job.spec.seq
    fc = 3 * d.target_hidden * d.hidden
    return (d.trainable_params() - fc) * 2 * b * s + causal_attention_flops(b, s, d.heads, d.head_dim)


def draft_flops(job: Job) -> float:
    """The draft's model FLOPs: forward + backward (3x forward) over the TTT unroll, fc once,
    the rest L times. What is computed twice (draft_recompute_flops) is not counted, nor is what
    the trainer skips (draft_skipped_flops) taken off: MFU's numerator."""
    d, b, s = job.draft, job.spec.micro_batch, job.spec.seq
    forward = 3 * d.target_hidden * d.hidden * 2 * b * s + job.spec.ttt * _draft_step_forward_flops(job)
    return 3 * forward


def draft_recompute_flops(job: Job) -> float:
    """What backward computes again: every step's forward with activation checkpointing; with
    recompute_mlp (layout.recomputes_mlp) each step's gate and up (once more under
    checkpointing: the recomputing MLP's own backward makes them again); and the fused head's
    logits, when it does not make its gradients in forward (layout.head_grads_in_forward)."""
    ttt, d = job.spec.ttt, job.draft
    tokens = job.spec.micro_batch * job.spec.seq
    checkpointed = ttt * _draft_step_forward_flops(job) if job.spec.ac else 0.0
    gate_up = ttt * 2 * (2 * d.hidden * d.intermediate) * tokens if recomputes_mlp(job) else 0.0
    head_again = lean_draft(job.spec) and not head_grads_in_forward(job)
    logits = ttt * 2 * d.hidden * d.draft_vocab * tokens if head_again else 0.0
    return checkpointed + gate_up + logits


def draft_skipped_flops(job: Job) -> float:
    """What the trainer does not compute of draft_flops: with the embedding's half of q/k/v
    projected once per unroll (layout.projects_embedding_once) over the S + L - 1 tokens the steps
    embed, instead of S per step, that half's forward GEMM, its weight-gradient GEMM and its
    input-gradient GEMM each run over (L - 1)(S - 1) rows fewer per sample."""
    if not projects_embedding_once(job):
        return 0.0
    d, b, s, ttt = job.draft, job.spec.micro_batch, job.spec.seq, job.spec.ttt
    emb_half = d.hidden * (d.heads + 2 * d.kv_heads) * d.head_dim  # weights of the emb columns
    return 3 * 2 * emb_half * b * (ttt - 1) * (s - 1)


def sft_flops(job: Job) -> float:
    forward = model_forward_flops(job)
    return 3 * forward + (forward if job.spec.ac else 0)


# The split TTT attention against flex, which DRAFT_EFFICIENCY was fitted with: flex's time less
# split's for the forward and backward of a whole 7-step unroll (32 heads of 128, 8 KV heads, B 1)
# on an H200, in ms, by seq; with the causal part on cuDNN's kernel (the trainer's from compute
# capability 9.0 on) and on FlashAttention-2 (before). benchmarks/ttt_attention_kernels.py,
# docs/data/ttt_attention_kernels_{all,4096,8192,16384}.json (the diagonal keys torch.compile'd).
# At 8192 and 16384 the diagonal keys' Triton kernels (the trainer's where triton imports) took a
# further `_TRITON_DIAGONAL_SAVED_MS` off, measured against the compiled ones in one call
# (docs/data/ttt_attention_kernels_triton_h200.json); at 2048 and 4096 that is not measured and
# the compiled figures stand.
_TRITON_DIAGONAL_SAVED_MS = {8192: 36.711 - 30.146, 16384: 121.377 - 106.098}
SPLIT_SAVED_MS = {
    "cudnn": ((2048, 7.294 - 9.061), (4096, 16.597 - 14.080),
              (8192, 47.074 - 37.382 + _TRITON_DIAGONAL_SAVED_MS[8192]),
              (16384, 156.887 - 123.205 + _TRITON_DIAGONAL_SAVED_MS[16384])),
    "flash": ((2048, 7.294 - 8.013), (4096, 16.597 - 19.543),
              (8192, 47.074 - 57.653 + _TRITON_DIAGONAL_SAVED_MS[8192]),
              (16384, 156.887 - 192.018 + _TRITON_DIAGONAL_SAVED_MS[16384])),
}
SPLIT_MEASURED_STEPS_HEADS_DIM = 7 * 32 * 128
SPLIT_MEASURED_ON_TFLOPS = 989.0  # the H200's dense bf16 peak


def split_attention_saved_seconds(job: Job) -> float:
    """What the split attention takes off (negative: adds to) the draft's time priced as flex:
    the measured difference per S² at the nearest measured lengths (interpolated in log2 S, held
    beyond them), scaled by B x L x H x d and by the GPU's bf16 peak against the H200's."""
    if job.draft is None or job.spec.attention_impl != "split":
        return 0.0
    capability = job.cluster.gpu.compute_capability
    points = SPLIT_SAVED_MS["cudnn" if capability and capability >= CUDNN_ATTENTION_FROM_CAPABILITY else "flash"]
    per_s2 = _interpolated_per_s2(points, job.spec.seq)
    d = job.draft
    scale = job.spec.micro_batch * job.spec.ttt * d.heads * d.head_dim / SPLIT_MEASURED_STEPS_HEADS_DIM
    speed = SPLIT_MEASURED_ON_TFLOPS / job.cluster.gpu.bf16_tflops
    return per_s2 * job.spec.seq**2 * scale * speed / 1e3


def _interpolated_per_s2(points: tuple[tuple[int, float], ...], seq: int) -> float:
    """ms per S² at `seq` from (seq, ms) points: linear in log2 S between them, the end value beyond."""
    per = [(math.log2(s), ms / s**2) for s, ms in points]
    x = math.log2(seq)
    if x <= per[0][0]:
        return per[0][1]
    for (x0, y0), (x1, y1) in zip(per, per[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return per[-1][1]


# ---------------------------------------------------------------- bytes over the interconnect


def _ring(bytes_: float, ranks: int) -> float:
    """Bytes each rank receives in a ring all-gather / reduce-scatter / all-to-all."""
    return bytes_ * (ranks - 1) / ranks if ranks > 1 else 0.0


def target_comm(job: Job) -> tuple[float, int]:
    """(bytes, collectives) per micro-step: TP all-reduces, then the outputs reaching each rank."""
    tp, b, s, m = job.tp, job.spec.micro_batch, job.spec.seq, job.model
    if tp == 1 or job.spec.offline:
        return 0.0, 0
    group_tokens = tp * b * s
    all_reduces = 2 * m.layers  # attention output + MLP output, each an all-reduce (2x a ring pass)
    volume = all_reduces * 2 * _ring(group_tokens * m.hidden * BF16, tp)
    logit_bytes = FP32 if job.spec.runtime == "specforge" and job.spec.target_backend == "sglang" else BF16
    outputs_per_token = m.vocab * logit_bytes + 3 * m.hidden * BF16
    rows = group_tokens if job.spec.output_sharding == "gather" else b * s
    volume += _ring(rows * outputs_per_token, tp)
    return volume, all_reduces + 2


def trained_params(job: Job) -> float:
    if job.draft is None:
        return count_params(job.model).total
    # SpecForge wraps the frozen embedding into the draft's FSDP unit: it is gathered too.
    frozen = job.draft.frozen_params() if job.spec.runtime == "specforge" else 0
    return job.draft.trainable_params() + frozen


def sharding_comm(job: Job) -> tuple[float, float]:
    """(bytes per micro-step, bytes per optimizer step) of the trained model's collectives."""
    n, p = job.dp, trained_params(job) * BF16
    if job.spec.sharding == "zero3":  # gather for forward and backward, reduce-scatter grads
        return 3 * _ring(p, n), 0.0
    if job.spec.sharding == "zero2":  # FSDP SHARD_GRAD_OP: one gather and one reduce-scatter
        return 2 * _ring(p, n), 0.0
    return 0.0, 2 * _ring(p, n)  # one gradient all-reduce per optimizer step


def offload_bytes(job: Job) -> tuple[float, float]:
    """(PCIe bytes per micro-step, per optimizer step): fp32 grads down, bf16 params up."""
    shard = trained_params(job) / job.dp
    if job.spec.offload == "none":
        return 0.0, 0.0
    per_step = shard * (FP32 + BF16)
    per_micro = 2 * shard * BF16 if job.spec.offload == "params" else 0.0
    return per_micro, per_step


# ---------------------------------------------------------------- the step


def runs_expert_loop(job: Job) -> bool:
    """The eagle3 target's layers run transformers' MoE expert loop; an offline target only
    multiplies through its dense lm_head."""
    return job.model.is_moe and not job.spec.offline


def compute_seconds(job: Job) -> float:
    """Per micro-step: each path's FLOPs at its own achievable fraction of the bf16 peak."""
    peak = job.cluster.gpu.bf16_tflops * 1e12
    if job.draft is None:
        efficiency = MOE_SFT_EFFICIENCY if job.model.is_moe else SFT_EFFICIENCY
        return sft_flops(job) / (peak * efficiency)
    efficiency = DRAFT_EFFICIENCY if job.spec.runtime == "fitplan" else DENSE_EFFICIENCY
    computed = draft_flops(job) + draft_recompute_flops(job) - draft_skipped_flops(job)
    return target_seconds(job) + computed / (peak * efficiency) - split_attention_saved_seconds(job)


def target_seconds(job: Job) -> float:
    """The frozen target's forward: its FLOPs at the path's efficiency, or, with eager attention,
    its GEMMs at that efficiency and the attention as memory traffic over the scores."""
    gpu = job.cluster.gpu
    efficiency = MOE_EXPERT_LOOP_EFFICIENCY if runs_expert_loop(job) else DENSE_EFFICIENCY
    if not runs_eager_attention(job):
        return target_forward_flops(job) / (gpu.bf16_tflops * 1e12 * efficiency)
    b, s, m = job.spec.micro_batch, job.spec.seq, job.model
    gemms = model_gemm_flops(job)
    # per rank: the TP group's tp*B samples on H/tp heads each, i.e. B*H score rows of length S
    scores = m.layers * b * m.heads * s * s
    attention = scores * EAGER_ATTENTION_BYTES_PER_SCORE / (gpu.memory_tbps * 1e12)
    return gemms / (gpu.bf16_tflops * 1e12 * efficiency) + attention


def step_time(job: Job) -> StepTime:
    gpu = job.cluster.gpu
    compute = job.accum * compute_seconds(job)
    link = gpu.peer_gbps * 1e9 * LINK_EFFICIENCY
    target_bytes, target_calls = target_comm(job) if job.draft is not None else (0.0, 0)
    shard_micro, shard_step = sharding_comm(job)
    calls = job.accum * (target_calls + (2 if shard_micro else 0)) + (1 if shard_step else 0)
    comm = (job.accum * (target_bytes + shard_micro) + shard_step) / link + calls * COLLECTIVE_LATENCY_S
    pcie_micro, pcie_step = offload_bytes(job)
    offload = (job.accum * pcie_micro + pcie_step) / (gpu.pcie_gbps * 1e9 * LINK_EFFICIENCY)
    return StepTime(compute_s=compute, comm_s=comm, offload_s=offload, tokens_per_step=job.tokens_per_step)


# ---------------------------------------------------------------- prefill (offline feature generation)

# SGLang's prefill of the target when offline features are generated (SpecForge's
# prepare_hidden_states.py): not measured by fitplan. Assumed the efficiency fitted above on the
# dense GEMMs of fitplan's own target forward; SGLang runs fused kernels for MoE experts, so the
# expert-loop figure does not apply.
PREFILL_EFFICIENCY = DENSE_EFFICIENCY


def prefill_flops(m: ModelShape, seq: int) -> float:
    """One request of `seq` tokens through the whole target, no lm_head (the capture returns
    hidden states, not logits): 2·(params a token multiplies through, less V·h)·seq + causal attention."""
    return 2 * (matmul_params(m) - m.vocab * m.hidden) * seq + m.layers * causal_attention_flops(
        1, seq, m.heads, m.head_dim)
