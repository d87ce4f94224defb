"""SpecForge's classic `scripts/train_eagle3.py` runtime on one rank (docs/estimate.md,
"SpecForge's classic runtime").

What differs from fitplan's trainer:
- the target runs inside SGLang (fp32 logits for every position; gather, fp32 upcast, per-request
  cat and one-position shift copies while earlier ones are referenced: ~12*T_g*V bytes at the
  peak, 4*T_g*V alive through the draft forward) or the HF backend (bf16 logits gathered by the
  lm_head plus a shifted copy); `--shard-target-output` (output_sharding all-to-all) turns T_g
  into the rank's own B*S rows;
- SGLang's KV pool;
- offline, no live target: TargetHead (the target's lm_head) scores the stored last hidden state,
  and the teacher is built from its full-vocab logits (specforge_terms.teacher_instants);
- the draft (specforge_terms, flex attention): LogSoftmaxLoss keeps each step's bf16 logits, the
  acceptance rate's fp32 softmax is its forward's peak, the padded teachers stay to the end;
- the draft is one FSDP1 unit over all ranks in bf16, the frozen embedding included (SHARD_GRAD_OP;
  NO_SHARD on one rank): unsharded params and grads during forward/backward, a gradient for the
  embedding, and the gradient is kept after the optimizer step until FSDP's next pre-forward;
- BF16Optimizer: fp32 master (built with the optimizer) + AdamW moments, sharded 1/N, and at the
  step every master's fp32 gradient beside AdamW's foreach sqrt of the second moments, whatever
  `precision` says;
- two cuBLAS workspaces (the training thread's and autograd's) once backward has run.
"""

from __future__ import annotations

from fitplan.estimator import draft_terms, specforge_terms, target_terms
from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES
from fitplan.estimator.timeline import Timeline, merge, phase
from fitplan.layout import Job
from fitplan.shapes import BF16
from fitplan.units import FP32

# SGLang logits cascade, bytes per (row x vocab entry): fp32 gathered logits (4), fp32 upcast
# copy (4), cat copy (4) at the peak; 4 (one fp32 copy) stays referenced (docs/estimate.md).
SGLANG_LOGITS_PEAK = 12
SGLANG_LOGITS_ALIVE = 4
# HF backend: bf16 logits gathered by the lm_head plus a shifted bf16 copy, both referenced.
HF_LOGITS = 4


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


def _online_logits(job: Job) -> tuple[int, int]:
    """A live target's logits: (bytes at the target-forward peak, bytes alive through the draft
    forward and backward)."""
    V = job.model.vocab
    rows = target_terms.received_tokens(job)
    if job.spec.target_backend == "hf":
        return HF_LOGITS * rows * V, HF_LOGITS * rows * V
    return SGLANG_LOGITS_PEAK * rows * V, SGLANG_LOGITS_ALIVE * rows * V


def _largest(parts: list[dict[str, int]]) -> dict[str, int]:
    return max(parts, key=lambda p: sum(p.values()))


class _Sizes:
    """The per-rank sizes the phases are made of."""

    def __init__(self, job: Job):
        n, trainable = job.world, job.draft.trainable_params()
        self.flat = specforge_terms.flat_bytes(job)  # the one FSDP flat parameter
        self.shard = _ceil_div(self.flat, n)
        self.unsharded = self.flat if n > 1 else 0
        # flat_param.grad (NO_SHARD: the whole flat gradient; sharded: the reduce-scatter's shard)
        # lives from the end of backward until FSDP's next pre-forward drops it
        self.held = self.flat if n == 1 else self.shard
        # gradients carried between the micro-steps of an accumulation
        self.carried = self.shard if job.accum > 1 else 0
        self.master, self.moments = (_ceil_div(b * trainable, n) for b in (FP32, 2 * FP32))


def timeline(job: Job) -> Timeline:
    t = Timeline()
    z = _Sizes(job)
    offline, flex = job.spec.offline, specforge_terms.modelled(job)
    peak_logits, alive_logits = (0, 0) if offline else _online_logits(job)
    # offline the micro-batch's stored features; online the captured aux hidden states
    outputs = specforge_terms.batch_bytes(job) if offline else target_terms.aux_outputs_bytes(job)

    def resident(steady: bool, workspaces: int, **extra: int) -> dict[str, int]:
        return merge(phase(
            target__weights=target_terms.resident_weights(job),
            target__kv_pool=kv_pool_bytes(job),
            draft__params=z.shard,
            optimizer__master=z.master,
            optimizer__moments=z.moments if steady else 0,
            runtime__workspace=workspaces * CUBLAS_WORKSPACE_BYTES,
        ), phase(**extra))

    def target_forward(steady: bool) -> dict[str, int]:
        base = resident(steady, specforge_terms.CUBLAS_HANDLES if steady else 1, target__outputs=outputs,
                        draft__grads=z.carried)
        held = max(z.held - z.carried, 0) if steady else 0
        if offline:
            return merge(base, _largest(specforge_terms.teacher_instants(job, held)))
        live = phase(target__activations=target_terms.forward_working_bytes(job), logits__target=peak_logits,
                     logits__teacher=draft_terms.teacher_bytes(job), draft__grads=held)
        return merge(base, live)

    def in_draft(steady: bool, workspaces: int, target_logits: int) -> dict[str, int]:
        """Resident through the draft's forward and backward."""
        return resident(steady, workspaces, target__outputs=outputs, draft__grads=z.carried,
                        comm__buffers=z.unsharded, logits__target=target_logits)

    def draft_forward(steady: bool) -> dict[str, int]:
        # offline, forward_loss keeps TargetHead's logits until it returns
        alive = specforge_terms.target_logits_bytes(job) if offline else alive_logits
        base = in_draft(steady, specforge_terms.CUBLAS_HANDLES if steady else 1, alive)
        if flex:
            return merge(base, specforge_terms.draft_forward_instant(job))
        return merge(base, _generic_draft(job))

    def backward(steady: bool) -> dict[str, int]:
        base = in_draft(steady, specforge_terms.CUBLAS_HANDLES, alive_logits)
        if flex:
            return merge(base, _largest(specforge_terms.backward_instants(job)))
        grads = phase(draft__grads=z.flat if job.world == 1 else z.shard,
                      comm__buffers=z.flat if job.world > 1 else 0)
        extra = phase(activations__draft=draft_terms.draft_backward_extra_bytes(job))
        return merge(base, _generic_draft(job), grads, extra)

    def phases(steady: bool) -> dict[str, dict[str, int]]:
        after_backward = resident(True, specforge_terms.CUBLAS_HANDLES, draft__grads=z.held)
        return {
            "load": _load(job, resident(False, 1), z),
            "target_forward": target_forward(steady),
            "draft_forward": draft_forward(steady),
            "backward": backward(steady),
            "optimizer_step": merge(after_backward, phase(
                target__outputs=specforge_terms.batch_bytes(job) if offline else 0,
                optimizer__grad_copy=specforge_terms.optimizer_step_bytes(job))),
            "checkpoint": merge(after_backward, phase(comm__buffers=z.unsharded)),
        }

    t.steady, t.step1 = phases(steady=True), phases(steady=False)
    _candidates(t, job, z)
    return t


def _load(job: Job, base: dict[str, int], z: _Sizes) -> dict[str, int]:
    """One GPU: the draft's own tensors beside FSDP's flat copy, or the last master being made; on
    several GPUs what stays resident."""
    if job.world > 1:
        return base
    # the workspace comes last, with the first GEMM
    held = {name: n for name, n in base.items() if name not in ("draft.params", "optimizer.master", "runtime.workspace")}
    return _largest([merge(held, instant) for instant in specforge_terms.load_instants(job)] + [base])


def _generic_draft(job: Job) -> dict[str, int]:
    """Other attention backends or checkpointing: fitplan's plain-draft terms (draft_terms), not
    measured against SpecForge: the saved set and one padded teacher."""
    return phase(
        logits__teacher=draft_terms.teacher_bytes(job),
        activations__draft=draft_terms.draft_activation_bytes(job),
        logits__draft=draft_terms.draft_logits_bytes(job),
    )


def _candidates(t: Timeline, job: Job, z: _Sizes) -> None:
    if job.spec.offline:
        t.candidate(specforge_terms.target_upcast_bytes(job), "offline teacher logits [B*S, V] fp32")
    else:
        rows = target_terms.received_tokens(job)
        dtype, size = ("bf16", BF16) if job.spec.target_backend == "hf" else ("fp32", FP32)
        shape = "B*S" if rows == target_terms.own_tokens(job) else "tp*B*S"
        t.candidate(size * rows * job.model.vocab, f"gathered target logits [{shape}, V] {dtype}")
        t.candidate(*target_terms.largest_weight(job))
    t.candidate(z.flat, "draft FSDP flat parameter (bf16, embedding included)")
    t.candidate(draft_terms.teacher_bytes(job), "teacher probabilities [B, S+L, Vd] fp32")
