"""The Eagle3 step on one rank with fitplan's trainer: frozen TP target + trainable draft.

Timeline (docs/estimate.md, "Phases"): the target forward builds the aux hidden states, the logits
and the teacher (offline, from stored features, only the lm_head runs, over the stored last
hidden state, and it is the only target weight held); the fitplan trainer drops the full-vocab
logits once the teacher exists, so the draft forward holds outputs + teacher + the TTT unroll's
saved tensors and peaks in its last step; backward peaks at its start, before any gradient
exists; the optimizer step holds grads + optimizer state; the checkpoint holds the state. Each phase lists what is live at the instant
of its peak, measured against the trainer in tests/test_trainer_estimator.py (CPU) and
tests/data/gpu/*.json (H100).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fitplan.estimator import draft_terms, param_steps, target_terms
from fitplan.estimator.recipes import (
    TrainedState,
    moment_bytes_per_param,
    quantized_moments,
)
from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES
from fitplan.estimator.timeline import Component, Timeline, merge, phase
from fitplan.layout import (
    Job,
    fused_norms,
    head_grads_in_forward,
    projects_embedding_once,
    recomputes_mlp,
    shares_target_embedding,
    steps_per_param,
    sums_step_grads,
)
from fitplan.units import FP32


def draft_frozen_params(job: Job) -> int:
    """The draft's own frozen embedding: none where it is the target's tensor (trainer/loop.py
    build_draft; layout.shares_target_embedding), counted once in target.weights."""
    return 0 if shares_target_embedding(job) else job.draft.frozen_params()


def draft_state(job: Job) -> TrainedState:
    """The draft's state; the trainer keeps its frozen embedding in the target's bf16 whatever
    the recipe (trainer/loop.py build_draft), TrainedState's default.

    Where the target's embedding is not whole on the rank (tp > 1), or not loaded (stored
    features), or share_embedding is off, the draft's embedding is a copy: a second [V, h] beside
    target.weights, for a tied target too, counted here in draft.params. The target's own [V, h]
    is counted once in target.weights whether or not lm_head is tied to it (params.lm_head_params)."""
    return TrainedState(job.spec, job.draft.trainable_params(), draft_frozen_params(job), job.world)


def optimizer_state(state: TrainedState, steady: bool) -> dict[str, int]:
    """Master and moments resident outside the step: Adam's moments (and a lazily built
    master) only exist after the first optimizer.step()."""
    master = state.master() if steady or not state.recipe.lazy_master else 0
    return phase(optimizer__master=master, optimizer__moments=state.moments() if steady else 0)


def draft_units(job: Job) -> dict[str, tuple[int, bool]]:
    """The FSDP units of the fitplan trainer's draft (one per child module): params, trainable."""
    d = job.draft
    attention = 2 * d.hidden * (d.heads + 2 * d.kv_heads) * d.head_dim + d.heads * d.head_dim * d.hidden
    return {
        "embedding": (draft_frozen_params(job), False),
        "fc": (3 * d.target_hidden * d.hidden, True),
        "midlayer": (attention + 3 * d.hidden * d.intermediate + 3 * d.hidden, True),
        "lm_head": (d.hidden * d.draft_vocab, True),
    }


def draft_parameters(job: Job) -> list[tuple[str, int]]:
    """The draft's trained parameters (name, elements) in the order of draft.parameters()."""
    d = job.draft
    h, q, kv = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim
    return [
        ("fc", 3 * d.target_hidden * h),
        ("input_layernorm", h), ("hidden_norm", h),
        ("q_proj", 2 * h * q), ("k_proj", 2 * h * kv), ("v_proj", 2 * h * kv), ("o_proj", q * h),
        ("post_attention_layernorm", h),
        ("gate_proj", h * d.intermediate), ("up_proj", h * d.intermediate), ("down_proj", d.intermediate * h),
        ("norm", h),
        ("lm_head", d.draft_vocab * h),
    ]


# the FSDP unit (draft child module, trainer/parallel/draft_sharding.py) of each trained
# parameter of draft_parameters that is a unit of its own; the others are the layer's
OWN_UNITS = ("fc", "norm", "lm_head")


def draft_unit_of(name: str, job: Job) -> str:
    if name == "norm" and fused_norms(job):  # grouped with the head that uses its weight
        return "lm_head"
    return name if name in OWN_UNITS else "midlayer"


def gathered_params(job: Job, state: TrainedState) -> int:
    """Unsharded params during the draft's forward/backward: every unit with zero2 (kept from
    forward until backward ends), the two largest with zero3 (the current and the prefetched)."""
    if not state.fsdp():
        return 0
    if job.spec.sharding == "zero3":
        per_param = {True: state.recipe.param, False: state.frozen_bytes_per_param}
        sizes = sorted(n * per_param[trainable] for n, trainable in draft_units(job).values())
        return sum(sizes[-2:])
    return state.full_params()


def checkpoint_gather_bytes(job: Job, state: TrainedState) -> int:
    """The checkpoint of a sharded draft gathers its full state dict one tensor at a time straight
    to the host (trainer/checkpoint.py: get_model_state_dict(full_state_dict=True,
    cpu_offload=True)), so the GPU holds the largest full weight at once, not every unit.
    Measured (checkpoint phase less resident state, tests/data/gpu/validation/h200x4): 1.01 GiB
    for llama-3.1-8b zero2 on 2 H200 (h200x2-...-zero2-tp2-gather-near-fit-s9472), whose [V, h]
    embedding is 0.98 GiB; 1.19 GiB for qwen3-8b zero3 on 4 (h200x4-...-zero3-tp4-gather),
    embedding 1.16 GiB. Counting every gathered unit had predicted 1.77 and 1.57 GiB."""
    if not state.fsdp():
        return 0
    d, p = job.draft, state.recipe.param
    trainable = max(d.draft_vocab * d.hidden, 3 * d.target_hidden * d.hidden, d.intermediate * d.hidden,
                    2 * d.hidden * d.heads * d.head_dim)
    return max(draft_frozen_params(job) * state.frozen_bytes_per_param, trainable * p)


def backward_grads(job: Job, state: TrainedState) -> dict[str, int]:
    """Grads at the end of backward: replicated, or the sharded accumulation plus the largest
    unit's unsharded grads (FSDP reduce-scatters unit by unit). The saved tensors are gone by
    then, so this instant is the backward peak only when grads outweigh the activations."""
    if state.sharded_grads():
        largest = max(n for n, trainable in draft_units(job).values() if trainable)
        return {Component.DRAFT_GRADS: state.grads(), Component.COMM_BUFFERS: largest * state.recipe.grad}
    return {Component.DRAFT_GRADS: state.full_grads()}


# torchao's AdamW8bit steps each tensor in one compiled kernel that dequantizes both moments of
# that tensor into fp32 buffers first: 2 x 4 B per element of the tensor being stepped, the
# largest at the peak. Measured on an H200 (tests/data/gpu/knobs/, llama-3.2-1b s4096, whose
# largest trained tensor is the 65.5M-element lm_head): the optimizer step held 0.53 GiB more
# than the moments, grads and masters; 2 x 4 x 65.5M is 0.49 GiB.
EIGHT_BIT_STEP_BYTES_PER_ELEMENT = 2 * FP32


def eight_bit_step_bytes(job: Job, state: TrainedState) -> int:
    """The 8-bit step's fp32 buffers for the largest tensor (its shard where FSDP shards it)."""
    if job.spec.optimizer != "adamw-8bit" or job.spec.offload != "none":
        return 0
    largest = job.draft.largest_trained_tensor()
    return EIGHT_BIT_STEP_BYTES_PER_ELEMENT * (-(-largest // job.world) if state.fsdp() else largest)


def optimizer_step(job: Job, state: TrainedState, steady: bool) -> dict[str, int]:
    """The draft's optimizer step at its peak (optimizer_step_phase), with the 8-bit step's buffers."""
    return optimizer_step_phase(job, state, steady, lambda: stepped_parameters(job, state), "draft__grads",
                                eight_bit_step_bytes(job, state))


def optimizer_step_phase(job: Job, state: TrainedState, steady: bool,
                         stepped: Callable[[], list[param_steps.Stepped]], grads: str, step_bytes: int = 0) -> dict[str, int]:
    """The step's peak: every grad (the component `grads`) beside every fp32 grad copy
    (bf16-master) and the optimizer state, the step's own buffers (`step_bytes`) with the copies;
    or with the step a parameter at a time (layout.steps_per_param) the grads not yet stepped
    beside one copy (param_steps.py over `stepped()`), where step 1 has made the moments of the
    parameters stepped so far."""
    if not steps_per_param(job.spec):
        return merge(optimizer_state(state, steady=True), phase(
            **{grads: state.grads()}, optimizer__grad_copy=state.grad_copy() + step_bytes))
    peak = param_steps.peak(stepped(), first=not steady)
    return phase(optimizer__master=state.master(), optimizer__moments=state.moments() if steady else peak.moments,
                 **{grads: peak.grads}, optimizer__grad_copy=peak.copy)


def stepped_parameters(job: Job, state: TrainedState) -> list[param_steps.Stepped]:
    """The draft's parameters as a rank's optimizer steps them: whole, or with FSDP (sharded
    grads) each a dim-0 shard of ceil(n / world) elements whose grad is in its unit's storage."""
    sharded = state.sharded_grads()
    eight_bit = job.spec.optimizer == "adamw-8bit"
    out = []
    for name, n in draft_parameters(job):
        held = state.on_rank(n, 1)  # what its copy, moments and step are made over
        step = EIGHT_BIT_STEP_BYTES_PER_ELEMENT * held if eight_bit and quantized_moments(held) else 0
        out.append(param_steps.Stepped(
            elements=n, group=draft_unit_of(name, job) if sharded else name,
            grad=state.on_rank(n, 2) * state.recipe.grad, copy=held * state.recipe.grad_copy,
            moments=math.ceil(held * moment_bytes_per_param(job.spec)), step=step))
    return out


def _after_last_step(job: Job, state: TrainedState) -> tuple[dict[str, int], int]:
    """Once step L-1's backward is done: the grads every trained unit but fc (which only step 0
    reaches) holds, and the activations still saved (step L-1's released)."""
    grads = backward_grads(job, state)
    grads[Component.DRAFT_GRADS] -= draft_units(job)["fc"][0] * state.recipe.grad
    kept = draft_terms.draft_activation_bytes(job) + draft_terms.draft_logits_bytes(job)
    # step L-1's q/k/v backward made the embedding projection's gradient
    return grads, kept - draft_terms.last_step_saved_bytes(job) + draft_terms.embedding_grad_bytes(job)


def earlier_head_backward(job: Job, state: TrainedState, head_trained: bool = True) -> dict[str, int]:
    """The loss backward of step L-2, after step L-1's (_after_last_step): the head's weight
    gradient of this step is made beside the one held since step L-1 (a recorded llama-3.1-8b
    s2048 trace holds both at its backward peak), unless the steps sum theirs in one buffer
    (layout.sums_step_grads) or the head is not trained (`head_trained`). Past the first step's
    instant when the grads outweigh one step's activations (short sequences). Not modelled with
    sharded grads: when FSDP reduce-scatters a unit called once per step in the middle of
    backward is unmeasured."""
    if job.spec.ttt < 2 or state.sharded_grads():
        return {}
    grads, left = _after_last_step(job, state)
    arriving = 0
    if head_trained and not sums_step_grads(job):
        arriving = job.draft.hidden * job.draft.draft_vocab * state.recipe.param
    return merge(grads, phase(draft__grads=arriving,
                              activations__draft=left + draft_terms.earlier_head_backward_bytes(job)))


def earlier_mlp_backward(job: Job, state: TrainedState) -> dict[str, int]:
    """The MLP backward of step L-2, when the MLP's weights outweigh a step's activations (wide
    drafts at short sequences): as at the head's instant, after step L-1's (_after_last_step);
    SwiGLU's input gradients (4I per token) and the gradients pending from step L-1 are alive,
    and the weight gradients of gate and up arrive to be added to the held ones: one at a time
    from autograd's linears, both at once from the fused norm-projection backward (trainer/
    norm_project.py returns all its weight gradients together), or with summed step gradients
    nothing (layout.sums_step_grads: added in place into the buffers). A checkpointed step's layer
    has been made again first (draft_terms.recomputed_step_bytes), beside G, the embedding
    projection's gradient, where there is one."""
    if job.spec.ttt < 2 or state.sharded_grads():
        return {}
    d = job.draft
    grads, left = _after_last_step(job, state)
    # summed over the steps in the buffers step L-1 made (trainer/step_grads.py): nothing arrives
    arriving = 0 if sums_step_grads(job) else _arriving_mlp_grads(job) * d.hidden * d.intermediate * state.recipe.param
    working = draft_terms.mlp_backward_working_bytes(job) + draft_terms.pending_from_last_step_bytes(job)
    if job.spec.ac:
        working += draft_terms.recomputed_step_bytes(job, job.spec.ttt - 2)
    return merge(grads, phase(draft__grads=arriving, activations__draft=left + working))


def embedding_finish(job: Job, state: TrainedState) -> dict[str, int]:
    """The last q/k/v backward call, where the embedding's half of the projection is made from G
    (layout.projects_embedding_once; draft_terms.embedding_finish_live_bytes): the grads of every
    trained unit but fc (as after step L-1's backward) and the input norm (whose gradient this
    call makes), the draft's few tensors left and the call's own. Past the other backward
    instants when the grads outweigh the activations."""
    if not projects_embedding_once(job):
        return {}
    grads, _ = _after_last_step(job, state)
    grads[Component.DRAFT_GRADS] -= job.draft.hidden * state.recipe.grad
    return merge(grads, phase(activations__draft=draft_terms.embedding_finish_live_bytes(job)))


def _arriving_mlp_grads(job: Job) -> int:
    """[I, h] weight gradients of one step's MLP alive together before they are added to the
    held ones: one from autograd's linears, gate's and up's from the fused norm-projection, all
    three from the recomputing MLP (returned together; counted at SwiGLU's instant, an upper
    bound)."""
    if recomputes_mlp(job):
        return 3
    return 2 if fused_norms(job) else 1


def target_forward_instants(job: Job) -> list[dict[str, int]]:
    """What is live at the three candidate peaks of the target forward (trainer/target.py,
    trainer/loss.py make_teacher); the layers' working set and the logits never coexist:
    - inside a layer: the captured aux states and one layer's working set (with eager
      attention, its [B, H, S, S] scores);
    - after the forward: the three captured aux states, their concatenation and the logits,
      with TP while the exchange holds its buffer and the reordered copy of the received rows;
    - building the teacher: aux, logits, the teacher and what making it holds beside them
      (draft_terms.teacher_chunk_bytes);
    - a soft-capped head (Gemma 2): the captured aux states and two copies of this rank's logits
      shard, while tanh(logits / c) * c writes each step into a new tensor."""
    if job.spec.offline:
        return offline_teacher_instants(job)
    aux, logits = target_terms.aux_outputs_bytes(job), target_terms.logits_bytes(job)
    softcap = [phase(target__outputs=aux, logits__target=2 * target_terms.logits_shard_bytes(job))]
    return softcap * job.model.final_logit_softcap + [
        phase(target__outputs=aux, target__activations=target_terms.forward_working_bytes(job)
              + target_terms.eager_attention_bytes(job)),
        phase(target__outputs=2 * aux, logits__target=logits + target_terms.exchange_copy_bytes(job)),
        phase(target__outputs=aux, logits__target=logits + draft_terms.teacher_chunk_bytes(job),
              logits__teacher=draft_terms.teacher_bytes(job)),
    ]


def offline_teacher_instants(job: Job) -> list[dict[str, int]]:
    """The target forward of an offline job (trainer/features.py teach): the stored aux and last
    hidden states of the micro-batch reach the device, the lm_head scores the last hidden state
    (its soft-cap, where there is one, runs in place), then the teacher is built as online:
    - the lm_head's output beside both stored states;
    - building the teacher: aux, logits, the teacher and what making it holds beside them (the
      last hidden state is freed once scored)."""
    aux, logits = target_terms.aux_outputs_bytes(job), target_terms.logits_bytes(job)
    return [
        phase(target__outputs=aux + target_terms.last_hidden_bytes(job), logits__target=logits),
        phase(target__outputs=aux, logits__target=logits + draft_terms.teacher_chunk_bytes(job),
              logits__teacher=draft_terms.teacher_bytes(job)),
    ]


def _largest_instant(instants: list[dict[str, int]]) -> dict[str, int]:
    return max(instants, key=lambda components: sum(components.values()))


def timeline(job: Job) -> Timeline:
    t = Timeline()
    state = draft_state(job)
    base = phase(
        target__weights=target_terms.resident_weights(job),
        draft__params=state.params(),
        comm__buffers=state.ddp_buckets(),
        runtime__workspace=CUBLAS_WORKSPACE_BYTES,
    )
    # Between micro-steps of an accumulation the grads stay; with accum 1 zero_grad(set_to_none).
    carried = phase(draft__grads=state.grads() if job.accum > 1 else 0)
    outputs = phase(target__outputs=target_terms.aux_outputs_bytes(job), logits__teacher=draft_terms.teacher_bytes(job))
    # the head's gradients made in forward: its weight's from the first step on, and backward
    # reads no teacher (trainer/loop.py lets it go)
    head_grad = phase(draft__grads=draft_terms.head_grad_buffer_bytes(job, state.recipe.param))
    in_forward = head_grads_in_forward(job)
    backward_outputs = phase(target__outputs=target_terms.aux_outputs_bytes(job)) if in_forward else outputs
    # a later micro-step's sum beside the .grad the earlier ones left, until the first step's backward adds it in
    summing = head_grad if job.accum > 1 else phase()
    casts_and_gather = phase(draft__params=state.casts(), comm__buffers=gathered_params(job, state))
    saved = phase(
        activations__draft=draft_terms.draft_activation_bytes(job),
        logits__draft=draft_terms.draft_logits_bytes(job),
    )
    forward_extra = phase(activations__draft=draft_terms.draft_forward_extra_bytes(job))
    backward_extra = phase(activations__draft=draft_terms.draft_backward_extra_bytes(job))
    target_peak = _largest_instant(target_forward_instants(job))
    # offline, the target's embedding is on the device only while the draft copies it
    staged = phase(target__weights=target_terms.staged_embedding_bytes(job) if job.spec.offline else 0)

    def phases(steady: bool) -> dict[str, dict[str, int]]:
        opt = optimizer_state(state, steady)
        return {
            "load": merge(base, optimizer_state(state, steady=False), staged),
            "target_forward": merge(base, opt, carried, target_peak),
            "draft_forward": merge(base, opt, carried, outputs, casts_and_gather, saved, forward_extra, head_grad),
            "backward": _largest_instant([
                merge(base, opt, carried, backward_outputs, casts_and_gather, saved, backward_extra, head_grad),
                merge(base, opt, backward_outputs, casts_and_gather, earlier_head_backward(job, state), summing),
                merge(base, opt, backward_outputs, casts_and_gather, earlier_mlp_backward(job, state), summing),
                merge(base, opt, backward_outputs, casts_and_gather, embedding_finish(job, state), summing),
                merge(base, opt, backward_outputs, casts_and_gather, backward_grads(job, state)),
            ]),
            "optimizer_step": merge(base, optimizer_step(job, state, steady)),
            "checkpoint": merge(base, optimizer_state(state, steady=True),
                                phase(comm__buffers=checkpoint_gather_bytes(job, state))),
        }

    t.steady, t.step1 = phases(steady=True), phases(steady=False)
    _largest(job, t)
    return t


def _largest(job: Job, t: Timeline) -> None:
    V, Vd = job.model.vocab, job.draft.draft_vocab
    if job.tp > 1:
        rows = target_terms.received_tokens(job)
        shape = "[B*S, V]" if job.spec.output_sharding == "all-to-all" else "[tp*B*S, V]"
        t.candidate(2 * rows * V, f"exchanged target logits {shape} bf16")
    else:
        t.candidate(2 * target_terms.own_tokens(job) * V, "target logits [B*S, V] bf16")
    t.candidate(*target_terms.largest_weight(job))
    if target_terms.eager_attention_bytes(job):
        t.candidate(target_terms.eager_scores_tensor_bytes(job), "target eager attention scores [B, H, S, S]")
    t.candidate(draft_terms.teacher_bytes(job), "teacher probabilities [B, S+L, Vd] fp32")
    t.candidate(FP32 * target_terms.own_tokens(job) * Vd, "draft log-softmax [B, S, Vd] fp32")
    if draft_frozen_params(job):
        t.candidate(draft_frozen_params(job) * draft_state(job).frozen_bytes_per_param, "draft embedding [V, h] bf16")
    if job.spec.attention_impl == "eager":
        B, S, L = job.spec.micro_batch, job.spec.seq, job.spec.ttt
        # the last TTT step attends to the keys of all L steps: [B, H, S, L*S]
        t.candidate(FP32 * B * job.draft.heads * S * S * L, "draft attention scores [B, H, S, L*S] fp32")
