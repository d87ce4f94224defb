"""SpecForge's classic `scripts/train_eagle3.py` runtime on one rank (docs/estimate.md,
"SpecForge's classic runtime").

What differs from fitplan's trainer:
- the target runs inside SGLang (fp32 logits for every position; gather, fp32 upcast, per-request
  cat and one-position shift copies while earlier ones are referenced: ~12*T_g*V bytes at the
  peak, 4*T_g*V alive through the draft forward) or the HF backend (bf16 logits gathered by the
  lm_head plus a shifted copy); `--shard-target-output` (output_sharding all-to-all) turns T_g
  into the rank's own B*S rows;
- SGLang's KV pool;
- the draft is one FSDP SHARD_GRAD_OP unit over all ranks in bf16, the frozen embedding included:
  unsharded params and grads during forward/backward, and a gradient for the embedding;
- BF16Optimizer: fp32 master (built with the optimizer) + AdamW moments, sharded 1/N, and an
  fp32 grad copy at the step, whatever `precision` says;
- offline mode: no live target, a replicated frozen lm_head (2*V*h) and ~6*B*S*V for the teacher.
"""

from __future__ import annotations

from fitplan.estimator import draft_terms, target_terms
from fitplan.shapes import BF16
from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES
from fitplan.estimator.timeline import Timeline, merge, phase
from fitplan.layout import Job
from fitplan.units import FP32

# SGLang logits cascade, bytes per (row x vocab entry): fp32 gathered logits (4), fp32 upcast
# copy (4), cat copy (4) at the peak; 4 (one fp32 copy) stays referenced (docs/estimate.md).
SGLANG_LOGITS_PEAK = 12
SGLANG_LOGITS_ALIVE = 4
# HF backend: bf16 logits gathered by the lm_head plus a shifted bf16 copy, both referenced.
HF_LOGITS = 4
# Offline mode: teacher built from a replicated lm_head over precomputed hidden states.
OFFLINE_TEACHER = 6


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kv_pool_bytes(job: Job) -> int:
    """SGLang's KV pool: tp*B*max_length tokens x layers x (K, V) x ceil(Hkv/tp) x d x bf16; with
    sglang_mem_fraction given, that fraction of the GPU minus the weights (older versions)."""
    if job.spec.offline or job.spec.target_backend != "sglang":
        return 0
    if job.spec.sglang_mem_fraction is not None:
        budget = job.spec.sglang_mem_fraction * job.cluster.gpu.total_bytes
        return max(0, int(budget) - target_terms.weights_per_rank(job))
    m = job.model
    tokens = target_terms.group_tokens(job)
    return tokens * m.layers * 2 * _ceil_div(m.kv_heads, job.tp) * m.head_dim * BF16


def _logits(job: Job) -> tuple[int, int]:
    """(bytes at the target-forward peak, bytes alive through the draft forward and backward)."""
    V = job.model.vocab
    if job.spec.offline:
        return OFFLINE_TEACHER * target_terms.own_tokens(job) * V, 0
    rows = target_terms.received_tokens(job)
    if job.spec.target_backend == "hf":
        return HF_LOGITS * rows * V, HF_LOGITS * rows * V
    return SGLANG_LOGITS_PEAK * rows * V, SGLANG_LOGITS_ALIVE * rows * V


def timeline(job: Job) -> Timeline:
    t = Timeline()
    n, trainable = job.world, job.draft.trainable_params()
    flat = BF16 * (trainable + job.draft.frozen_params())  # the one FSDP flat parameter
    shard = _ceil_div(flat, n)
    unsharded = flat if n > 1 else 0
    master, moments, grad_copy = (_ceil_div(b * trainable, n) for b in (FP32, 2 * FP32, FP32))
    peak_logits, alive_logits = _logits(job)
    base = phase(
        target__weights=target_terms.resident_weights(job),
        target__kv_pool=kv_pool_bytes(job),
        draft__params=shard,
        optimizer__master=master,
        runtime__workspace=CUBLAS_WORKSPACE_BYTES,
    )
    carried = phase(draft__grads=shard if job.accum > 1 else 0)
    outputs = phase(
        target__outputs=0 if job.spec.offline else target_terms.aux_outputs_bytes(job),
        logits__teacher=draft_terms.teacher_bytes(job),
    )
    live_target = phase(
        target__activations=0 if job.spec.offline else target_terms.forward_working_bytes(job),
        logits__target=peak_logits,
    )
    in_draft = merge(
        outputs,
        phase(
            logits__target=alive_logits,
            comm__buffers=unsharded,
            activations__draft=draft_terms.draft_activation_bytes(job),
            logits__draft=draft_terms.draft_logits_bytes(job),
        ),
    )
    # Backward: the unsharded flat grad (embedding included) before its reduce-scatter.
    grads = phase(draft__grads=flat if n == 1 else shard, comm__buffers=flat if n > 1 else 0)

    def phases(steady: bool) -> dict[str, dict[str, int]]:
        opt = phase(optimizer__moments=moments if steady else 0)
        state = phase(optimizer__moments=moments, draft__grads=shard if n > 1 else flat)
        return {
            "load": base,
            "target_forward": merge(base, opt, carried, outputs, live_target),
            "draft_forward": merge(base, opt, carried, in_draft),
            "backward": merge(base, opt, in_draft, grads,
                              phase(activations__draft=draft_terms.draft_backward_extra_bytes(job))),
            "optimizer_step": merge(base, state, phase(optimizer__grad_copy=grad_copy)),
            "checkpoint": merge(base, phase(optimizer__moments=moments, comm__buffers=unsharded)),
        }

    t.steady, t.step1 = phases(steady=True), phases(steady=False)
    if job.spec.offline:
        t.candidate(FP32 * target_terms.own_tokens(job) * job.model.vocab, "offline teacher logits [B*S, V] fp32")
    else:
        rows = target_terms.received_tokens(job)
        dtype, size = ("bf16", BF16) if job.spec.target_backend == "hf" else ("fp32", FP32)
        shape = "B*S" if rows == target_terms.own_tokens(job) else "tp*B*S"
        t.candidate(size * rows * job.model.vocab, f"gathered target logits [{shape}, V] {dtype}")
        t.candidate(*target_terms.largest_weight(job))
    t.candidate(flat, "draft FSDP flat parameter (bf16, embedding included)")
    t.candidate(draft_terms.teacher_bytes(job), "teacher probabilities [B, S+L, Vd] fp32")
    return t
