"""vLLM speculators' Eagle3 trainer (`scripts/train.py`) on one GPU (docs/estimate.md, "speculators
runtime"). A model read from its source (vllm-project/speculators c05b95b: scripts/train.py,
src/speculators/train/{trainer,optimizers,distributed,data,checkpointer}.py, model.py,
models/eagle3/{core,metrics}.py, losses/{utils,fused}.py); NOT MEASURED ON A GPU.

What the trainer process holds:
- No verifier. Its hidden states are read: from files, or generated on demand through a vLLM
  server (`--on-missing generate`) that runs in a process of its own (fitplan/vllm_server.py says
  when it shares the trainer's GPUs: then its gpu_memory_utilization x the device is counted
  outside the trainer's allocator).
- The draft, built in fp32 and kept so ("master weights are always kept in fp32"), run under
  torch.autocast(bf16). Trained: fc (3h -> h), one decoder layer (attention over the 2h-wide
  input, the verifier's MLP width) and its norms. Frozen, and fp32 too: the embedding [V, h], the
  lm_head and a second copy of the verifier's head, both cut to the draft vocabulary [Vd, h] (the
  draft's lm_head is not trained: speculators re-freezes it after loading the verifier's rows),
  and the verifier's final norm; plus the t2d / d2t vocabulary maps when Vd < V.
- Gradients: fp32, one per trained weight. zero_grad runs after the forward, so the previous
  step's gradients are alive through the next forward.
- The optimizer: Muon by default (torch.optim.Muon: one fp32 momentum buffer per matrix; the
  norms go to AdamW) or AdamW (two fp32 moments), both created in the first step. AdamW's
  foreach step takes the square root of every second moment at once (one moment's size);
  Muon orthogonalises one matrix at a time: its fp32 update, two bf16 iterates and two m x m
  Gram matrices.
- Replication: one GPU holds everything; DDP (the default on several) adds gradient buckets as
  large as the gradients; `--fsdp-shard` is FSDP2 fully_shard of the decoder layers and of the
  whole model (the root: fc, norms and the frozen tensors) with bf16 compute copies and fp32
  gradient reduction: the fp32 weights, gradients and optimizer state are 1/N per GPU, the root
  stays gathered in bf16 from the forward to the end of backward (FSDP2 does not reshard the root
  after forward), a layer is gathered while it runs, and a unit's bf16 gradients meet their fp32
  reduce-scatter copy at the end. Without FSDP2 autocast keeps bf16 casts of the trained weights
  from forward to backward, and the frozen lm_head's bf16 cast is saved for the steps' backward.
- The batch: one packed sequence of exactly --total-seq-len tokens (padded): the three aux
  hidden states [T, 3h] and the verifier's last hidden state [T, h] in bf16, and int64 ids,
  positions and document ids with a bool loss mask.
- The teacher: the verifier's head over the normed last hidden state, under no_grad: bf16 logits
  [T, Vd], kept to the end of backward (every step's loss reads a slice of it).
- The TTT unroll (`--ttt-steps`, default 3), no activation checkpointing: draft_terms' plain
  functions (`_lean` false: the SwiGLU keeps its four I-wide tensors) with speculators' fused
  loss (`_fused_loss`): each step keeps its bf16 logits [T, Vd] and five fp32 statistics per row,
  and its backward allocates one bf16 gradient of the logits. Keys and values of earlier steps
  live in the DynamicCache, whose concatenations the attention saves anyway.
- The checkpoint (rank 0): one GPU or DDP converts the whole model state and the optimizer state
  to bf16 on the GPU before writing them; FSDP2 gathers one full fp32 tensor at a time to the host.

Outside what these terms count: the whole forward is torch.compile'd on CUDA, so what autograd
keeps is the partitioner's choice (it may recompute the weight casts and elementwise products
this model counts as kept: an upper bound there); its Triton kernels take memory outside the
allocator (fitplan's trainer's compiled flex figure is used); the fp32 embedding output promotes
the first cat to fp32, which the shared 2-byte terms do not count.
"""

from __future__ import annotations

from fitplan.estimator import draft_terms, eagle3, target_terms
from fitplan.estimator.recipes import TrainedState
from fitplan.estimator.runtime import (
    COMPILED_FLEX_KERNELS_BYTES,
    CUBLAS_WORKSPACE_BYTES,
)
from fitplan.estimator.timeline import Timeline, merge, phase
from fitplan.layout import Job
from fitplan.units import BF16, FP32, GIB

# Per token of the packed batch: input_ids, position_ids and document_ids int64, loss_mask bool.
BATCH_IDS_BYTES_PER_TOKEN = 3 * 8 + 1
# The norms of the trained draft: the decoder layer's input, hidden and post-attention norms, and
# the final norm (each h wide).
LAYER_NORMS, FINAL_NORMS = 3, 1


def _tokens(job: Job) -> int:
    return target_terms.own_tokens(job)


# ---------------------------------------------------------------- what the draft holds


def frozen_params(job: Job) -> int:
    """The embedding [V, h], the draft's lm_head and the verifier's head [Vd, h], the verifier norm."""
    d = job.draft
    return d.vocab * d.hidden + 2 * d.draft_vocab * d.hidden + d.hidden


def units(job: Job) -> dict[str, tuple[int, int]]:
    """FSDP2's units under --fsdp-shard: (params, trained params). The decoder layer; the root
    holds the rest (fc, the final norm and every frozen tensor)."""
    d = job.draft
    attention = 2 * d.hidden * (d.heads + 2 * d.kv_heads) * d.head_dim + d.heads * d.head_dim * d.hidden
    layer = attention + 3 * d.hidden * d.intermediate + LAYER_NORMS * d.hidden
    fc = 3 * d.target_hidden * d.hidden
    root_trained = fc + FINAL_NORMS * d.hidden
    return {"layer": (layer, layer), "root": (root_trained + frozen_params(job), root_trained)}


def trained_params(job: Job) -> int:
    return sum(trained for _, trained in units(job).values())


def draft_state(job: Job) -> TrainedState:
    """fp32 weights (frozen ones included), fp32 grads, the optimizer's state, split 1/N by FSDP2."""
    return TrainedState(job.spec, trained_params(job), frozen_params(job), job.world, frozen_bytes_per_param=FP32)


def vocab_maps_bytes(job: Job) -> int:
    """t2d [V] bool and d2t [Vd] int64, registered when the vocabulary is pruned."""
    d = job.draft
    return 0 if d.draft_vocab == d.vocab else d.vocab + 8 * d.draft_vocab


def compute_weights(job: Job, state: TrainedState, layer_running: bool = True) -> dict[str, int]:
    """The bf16 weights the forward and backward compute with. FSDP2: the root gathered, and the
    layer while it runs. Otherwise autocast's casts of the trained weights and the frozen
    lm_head's cast, which the steps' backward keeps."""
    d = job.draft
    if state.fsdp():
        u = units(job)
        gathered = BF16 * (u["root"][0] + (u["layer"][0] if layer_running else 0))
        return phase(comm__buffers=gathered)
    return phase(draft__params=state.casts() + BF16 * d.draft_vocab * d.hidden)


def teacher_weights(job: Job, state: TrainedState) -> dict[str, int]:
    """At the teacher: FSDP2's gathered root; else fc's cast and the verifier head's bf16 cast
    (made under no_grad, so autocast does not keep it)."""
    d = job.draft
    if state.fsdp():
        return compute_weights(job, state, layer_running=False)
    return phase(draft__params=BF16 * (3 * d.target_hidden * d.hidden + d.draft_vocab * d.hidden))


def batch_bytes(job: Job) -> int:
    """The packed batch on the GPU: aux and last hidden states bf16, ids and mask."""
    extra = BATCH_IDS_BYTES_PER_TOKEN * _tokens(job)
    return target_terms.aux_outputs_bytes(job) + target_terms.last_hidden_bytes(job) + extra


def teacher_instant(job: Job) -> dict[str, int]:
    """The verifier's head scoring the last hidden state: fc's output already made, the norm's
    fp32 output (its fp32 weight promotes the product) and the teacher being written."""
    h, T = job.draft.hidden, _tokens(job)
    return phase(activations__draft=BF16 * h * T, target__activations=FP32 * h * T,
                 logits__teacher=draft_terms.teacher_bytes(job))


def backward_grads(job: Job, state: TrainedState) -> dict[str, int]:
    """Grads at the end of backward: all of them, or FSDP2's shards plus the largest trained
    unit's bf16 grads beside their fp32 reduce-scatter copy."""
    if not state.sharded_grads():
        return eagle3.backward_grads(job, state)
    largest = max(trained for _, trained in units(job).values())
    return phase(draft__grads=state.grads(), comm__buffers=(BF16 + FP32) * largest)


def matrices(job: Job) -> list[tuple[int, int]]:
    """The draft's trained matrices (rows, columns): fc, q, k, v, o, gate, up, down."""
    d = job.draft
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    return [(d.hidden, 3 * d.target_hidden), (q, 2 * d.hidden), (kv, 2 * d.hidden), (d.hidden, q),
            (d.intermediate, d.hidden), (d.hidden, d.intermediate)]


def step_bytes(job: Job, state: TrainedState) -> int:
    """The optimizer step's own buffers. AdamW: the square roots of all second moments (one
    moment). Muon, one matrix at a time (unsharded: under FSDP2 its Newton-Schulz products run
    on whole matrices): the fp32 update and two bf16 iterates (8 B an element) and two bf16 Gram
    matrices of the shorter side (4 m^2)."""
    if job.spec.optimizer == "adamw":
        return state.moments() // 2
    return max((FP32 + 2 * BF16) * r * c + 2 * BF16 * min(r, c) ** 2 for r, c in matrices(job))


def save_bytes(job: Job, state: TrainedState) -> dict[str, int]:
    """The checkpoint's GPU buffers on rank 0. FSDP2: the largest full tensor, fp32, on its way to
    the host. Else bf16 copies of the whole model state and of the optimizer state."""
    d = job.draft
    if job.spec.sharding == "zero3":
        largest = max([d.vocab * d.hidden, d.draft_vocab * d.hidden] + [r * c for r, c in matrices(job)])
        return phase(comm__buffers=FP32 * largest)
    return phase(draft__params=BF16 * (state.trainable + state.frozen), optimizer__moments=state.moments() // 2)


# ---------------------------------------------------------------- outside the trainer's allocator


def server_bytes(job: Job) -> int:
    """A co-located vLLM server's share of the GPU: gpu_memory_utilization x the device."""
    fraction = job.spec.vllm_gpu_memory_utilization
    return int(fraction * job.cluster.gpu.total_bytes) if fraction else 0


def extra_outside_bytes(job: Job) -> int:
    """Beyond the general CUDA context and NCCL figures: the compiled forward's kernels and a
    co-located vLLM server (0 for other runtimes)."""
    if job.spec.runtime != "speculators":
        return 0
    return COMPILED_FLEX_KERNELS_BYTES + server_bytes(job)


def notes(job: Job) -> list[str]:
    total = job.cluster.gpu.total_bytes
    fraction = job.spec.vllm_gpu_memory_utilization
    if fraction:
        server = (f"a vLLM server shares these GPUs: its gpu_memory_utilization {fraction} x {total / GIB:.2f} GiB = "
                  f"{server_bytes(job) / GIB:.2f} GiB is counted outside the trainer's allocator, so the job fits "
                  f"only if {fraction} x device + the trainer's peak <= device")
    else:
        server = ("the vLLM server that generates missing hidden states (--on-missing generate) runs outside this "
                  "estimate, on GPUs of its own as in speculators' examples; if it shares these GPUs, give its "
                  "gpu_memory_utilization as --vllm-gpu-memory-utilization")
    return [server, "speculators runtime: modelled from speculators' source, not measured on a GPU"]


# ---------------------------------------------------------------- the step


def timeline(job: Job) -> Timeline:
    t = Timeline()
    state = draft_state(job)
    base = phase(draft__params=state.params() + vocab_maps_bytes(job), comm__buffers=state.ddp_buckets(),
                 runtime__workspace=CUBLAS_WORKSPACE_BYTES)
    batch = phase(target__outputs=batch_bytes(job))
    teacher = phase(logits__teacher=draft_terms.teacher_bytes(job))
    weights = compute_weights(job, state)
    saved = phase(activations__draft=draft_terms.draft_activation_bytes(job),
                  logits__draft=draft_terms.draft_logits_bytes(job))
    forward_extra = phase(activations__draft=draft_terms.draft_forward_extra_bytes(job))
    backward_extra = phase(activations__draft=draft_terms.draft_backward_extra_bytes(job))
    full_state = phase(optimizer__moments=state.moments())
    grads = phase(draft__grads=state.grads())

    def phases(steady: bool) -> dict[str, dict[str, int]]:
        opt = full_state if steady else {}
        carried = grads if steady else {}  # zero_grad comes after the forward
        in_backward = merge(base, opt, batch, teacher, weights)
        return {
            "load": base,
            "target_forward": merge(base, opt, carried, batch, teacher_weights(job, state), teacher_instant(job)),
            "draft_forward": merge(base, opt, carried, batch, teacher, weights, saved, forward_extra),
            "backward": max([
                merge(in_backward, saved, backward_extra),
                merge(in_backward, eagle3.earlier_head_backward(job, state, head_trained=False)),
                merge(base, opt, batch, weights, backward_grads(job, state)),
            ], key=lambda components: sum(components.values())),
            "optimizer_step": merge(base, full_state, grads, batch, phase(optimizer__grad_copy=step_bytes(job, state))),
            "checkpoint": merge(base, full_state, grads, save_bytes(job, state)),
        }

    t.steady, t.step1 = phases(steady=True), phases(steady=False)
    t.notes.extend(notes(job))
    _largest(job, state, t)
    return t


def _largest(job: Job, state: TrainedState, t: Timeline) -> None:
    d, T = job.draft, _tokens(job)
    t.candidate(BF16 * T * d.draft_vocab, "draft-vocab logits [T, Vd] bf16 (teacher, a step's logits, their gradient)")
    t.candidate(target_terms.aux_outputs_bytes(job), "aux hidden states of the batch [T, 3h] bf16")
    if state.fsdp():
        t.candidate(BF16 * units(job)["root"][0], "FSDP2 all-gather of the root unit (bf16, frozen tensors included)")
    else:
        t.candidate(FP32 * d.vocab * d.hidden, "draft embedding [V, h] fp32")
    if job.spec.sharding == "zero3":
        t.candidate(save_bytes(job, state)["comm.buffers"], "checkpoint: a full fp32 tensor gathered for the host")
    if job.spec.optimizer == "muon":
        r, c = max(matrices(job), key=lambda m: m[0] * m[1])
        t.candidate(FP32 * r * c, "Muon's fp32 update of the largest matrix")
    if job.spec.attention_impl == "eager":
        t.candidate(FP32 * d.heads * T * T * job.spec.ttt, "draft attention scores [1, H, T, L*T] fp32")
