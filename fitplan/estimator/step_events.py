"""The ordered allocations and frees of fitplan's Eagle3 trainer on one GPU: load, step 1, a steady step.

The estimator's phase sums say how many bytes are live at each phase's peak; the caching
allocator (fitplan/allocator) needs more: which tensors, of which sizes, in which order, since
sizes decide the segments and the order decides which freed blocks are reused. This module
writes that sequence for one GPU (world 1, tp 1) from the same terms as the phase sums
(eagle3.py, draft_terms.py, target_terms.py, recipes.py), a tensor at a time where the allocator
can tell them apart:

- load (trainer/loop.py build): the target's weights a layer at a time (trainer/target.py
  build_random), then the draft's parameters in module order, the cuBLAS workspace, and the
  `mixed` recipe's masters;
- target forward (trainer/target.py, trainer/loss.py make_teacher): each layer's working set
  (the estimator's instant: all of it live at once), the three captured hidden states, the
  logits, their concatenation, the teacher (fp32 probabilities filled a chunk at a time);
- draft forward (trainer/draft.py unroll, trainer/head_loss.py or loss.py plain_step_loss): the
  TTT steps' saved tensors one by one in the order they are made, each step's roped keys and
  values held by the unroll until it ends, the head's chunk logits;
- backward (draft_events.py): the steps in reverse, with the gradients autograd makes on the
  way and the parameter gradients where AccumulateGrad first stores them;
- optimizer step (trainer/optim.py): masters, fp32 grad copies and moments a parameter at a
  time, moments and lazy masters only in step 1; bf16-master stepping a parameter at a time
  (param_steps.py) drops each bf16 grad as its copy is made and the copy after its step.

Tensors the estimator does not count (ids, masks of the loss, RMSNorm's fp32 temporaries,
anything under 1 MiB that does not persist) are left out: the sequence holds the estimator's
bytes, so its live bytes at each phase's peak are the phase's sum.
"""

from __future__ import annotations

from fitplan.estimator import (
    draft_terms,
    fsdp_events,
    param_steps,
    sft_events,
    target_terms,
)
from fitplan.estimator.eagle3 import (
    EIGHT_BIT_STEP_BYTES_PER_ELEMENT,
    draft_parameters,
    draft_state,
)
from fitplan.estimator.recipes import ADAM_8BIT_BLOCK, quantized_moments
from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES, runs_fitplan_trainer
from fitplan.estimator.step_trace import (
    Sizes,
    State,
    StepEvents,
    Trace,
    loop_chunks,
    write_steps,
)
from fitplan.layout import Job, head_grads_in_forward, steps_per_param
from fitplan.shapes import attention_params
from fitplan.units import BF16, FP32

# trainer/loss.py TEACHER_CHUNK is draft_terms.TEACHER_CHUNK


# Several GPUs: the sequence is written (fsdp_events.py, the TP exchange below) but its replay
# was less accurate than the fitted reserve on the measured 2- and 4-H200 rows
# (python -m fitplan.validation.replay_table; docs/allocator.md, "Several GPUs"), so those jobs
# keep the fitted reserve.
SEVERAL_GPUS = ("several GPUs: the replayed step under-predicts the device level of measured 2- and 4-H200 "
                "runs by more than 3% on 8 of 21 (up to 11.6%), so the fitted reserve is kept")


def unsupported(job: Job) -> str | None:
    """Why the estimate does not take this job's device level from the replay (None: it does)."""
    reason = sequence_unsupported(job)
    if reason is None and job.world > 1:
        return SEVERAL_GPUS
    return reason


def sequence_unsupported(job: Job) -> str | None:
    """Why the step's sequence is not written for this job (None: it is)."""
    spec = job.spec
    if spec.workload == "sft":
        return sft_events.unsupported(job)
    if spec.runtime == "specforge":
        from fitplan.estimator import specforge_events

        return specforge_events.unsupported(job)
    if not runs_fitplan_trainer(job):
        return "only fitplan's Eagle3 trainer and sft are modelled"
    if job.world > 1:
        reason = _sharded_unsupported(job)
        if reason:
            return reason
    if spec.offline:
        return "training from stored features is not modelled"
    if spec.attention_impl == "eager":
        return "the draft's eager attention is not modelled"
    if job.model.mla_attention_params is not None:
        return "latent attention targets are not modelled"
    return None


def _sharded_unsupported(job: Job) -> str | None:
    """What of a multi-GPU job the sequence does not write (fsdp_events.py: zero2 FSDP2)."""
    spec = job.spec
    if spec.sharding != "zero2":
        return f"FSDP sharding {spec.sharding} is not modelled on several GPUs (zero2 is)"
    if spec.precision not in ("bf16-master", "bf16"):
        return f"precision {spec.precision} is not modelled on several GPUs (bf16-master and bf16 are)"
    if spec.optimizer != "adamw" or spec.offload != "none":
        return "on several GPUs only AdamW on the GPU is modelled"
    if spec.ac:
        return "activation checkpointing is not modelled on several GPUs"
    if job.accum > 1:
        return "gradient accumulation is not modelled on several GPUs (FSDP holds unsharded grads between micro-steps)"
    return None


# ------------------------------------------------------------------ sizes


def target_layer_tensors(job: Job, moe: bool) -> list[tuple[str, int]]:
    """One target decoder layer's weight tensors (name, bytes) on a rank: the attention and MLP
    matrices (their TP shards, trainer/parallel/tensor_parallel.py), then the rest of its
    attention (biases, q/k norms, sinks) as one small tensor. MoE experts are stacked per layer
    as transformers 5 stores them ([E, 2*Ie, h] and [E, h, Ie]), split over the intermediate size."""
    m = job.model
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    mats = [("q_proj", m.hidden * q), ("k_proj", m.hidden * kv), ("v_proj", m.hidden * kv), ("o_proj", q * m.hidden)]
    mlp = [("gate_proj", m.hidden * m.intermediate), ("up_proj", m.hidden * m.intermediate),
           ("down_proj", m.intermediate * m.hidden)]
    if moe:
        mlp = [("experts.gate_up_proj", m.experts * 2 * m.expert_intermediate * m.hidden),
               ("experts.down_proj", m.experts * m.expert_intermediate * m.hidden)]
        if m.shared_experts:
            mlp.append(("shared_experts", 3 * m.hidden * m.expert_intermediate * m.shared_experts))
    listed = [(name, BF16 * n // job.tp) for name, n in mats + mlp]
    rest = BF16 * (attention_params(m) - sum(n for _, n in mats)) // job.tp
    return listed + [("norms and biases", rest)]


def target_weight_tensors(job: Job) -> list[tuple[str, int]]:
    """The target's weights in the order build_random makes them: each layer, then the
    embedding, the final norm and an untied lm_head. The bytes the matrices leave over (norms,
    routers, expert biases) are spread over the layers' small tensors, so the sum is the
    estimator's target.weights."""
    m = job.model
    dense = m.layers - m.moe_layers
    layers = [target_layer_tensors(job, moe=i >= dense) for i in range(m.layers)]
    embed = BF16 * m.vocab * m.hidden // job.tp  # split over the vocabulary with TP
    head = 0 if m.tie_embeddings else embed
    listed = sum(n for layer in layers for _, n in layer) + embed + head + BF16 * m.hidden // job.tp
    left = target_terms.resident_weights(job) - listed
    out = []
    for i, layer in enumerate(layers):
        extra = left // m.layers if left > 0 else 0
        out += [(f"target.layers.{i}.{name}", n + (extra if name == "norms and biases" else 0)) for name, n in layer]
    out += [("target.embed_tokens", embed), ("target.norm", BF16 * m.hidden // job.tp + max(left, 0) % m.layers),
            ("target.lm_head", head)]
    return out


# ------------------------------------------------------------------ load


def load(t: Trace, state: State) -> None:
    """trainer/loop.py build: target, draft, workspace, optimizer (masters made now only in `mixed`)."""
    job = state.job
    for group in _materialized_together(target_weight_tensors(job)):
        _split(t, group, job.tp)
    world = state.sharded.world if state.sharded is not None else 1
    frozen = fsdp_events.shard(state.trained.frozen, world)
    draft = [("draft.embed_tokens", frozen * state.trained.frozen_bytes_per_param)] if frozen else []
    draft += [(f"draft.{name}", n * state.recipe.param) for name, n in state.stored]
    _split(t, draft, world)
    t.alloc(CUBLAS_WORKSPACE_BYTES, "cuBLAS workspace")
    if state.recipe.master and not state.recipe.lazy_master and state.on_device_optimizer:
        state.masters = [t.alloc(state.recipe.master * n, f"master {name}") for name, n in state.stored]


def _materialized_together(tensors: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """build_random's groups: each decoder layer, then the rest of the model."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, nbytes in tensors:
        key = ".".join(name.split(".")[:3]) if name.startswith("target.layers.") else "root"
        groups.setdefault(key, []).append((name, nbytes))
    return list(groups.values())


def _split(t: Trace, group: list[tuple[str, int]], parts: int) -> None:
    """A group of tensors (name, bytes this rank keeps) made whole, then split over `parts`
    ranks: each rank's piece is a new tensor (TP's distribute_tensor and the experts' slices
    clone; FSDP's fully_shard copies each shard), and the whole ones go."""
    if parts == 1:
        for name, nbytes in group:
            t.alloc(nbytes, name)
        return
    whole = [t.alloc(nbytes * parts, f"{name} (whole, before the split)") for name, nbytes in group]
    for name, nbytes in group:
        t.alloc(nbytes, name)
    t.free(*whole)


# ------------------------------------------------------------------ target forward


def _layer_working_set(job: Job, T: int) -> list[tuple[str, int]]:
    """One target layer's transient tensors beside its input and output (target_terms
    .forward_working_bytes less those two [T, h]): normed input, q, k, v, attention output and
    the MLP's (or the routed experts') tensors, all live at once as the estimator counts them;
    with TP, on this rank's heads and slice of the intermediate size, over the group's T tokens."""
    m, tp = job.model, job.tp
    heads, kv = m.heads * m.head_dim // tp, m.kv_heads * m.head_dim // tp
    parts = [("normed", m.hidden), ("q", heads), ("k", kv), ("v", kv), ("attention out", heads)]
    if m.is_moe:
        k = m.experts_per_token
        parts += [("router logits fp32", FP32 // BF16 * m.experts), ("expert inputs", k * m.hidden // tp)]
        parts += [(name, k * m.expert_intermediate // tp) for name in ("expert gate", "expert up", "expert product")]
    else:
        parts += [(name, m.intermediate // tp) for name in ("gate", "up", "product")]
    return [(name, BF16 * n * T) for name, n in parts]


def eager_scores(t: Trace, job: Job) -> None:
    """One layer's eager_attention_forward (transformers, no_grad), its [B, H, S, S] score tensors
    one by one as the function makes and drops them; the most live at once is
    target_terms.EAGER_SCORE_BYTES per entry.
    - gpt_oss: q k^T and its scaling, the mask added, the concatenation with the sink column, its
      max-subtracted copy and softmax's output (the masked scores, the max-subtracted copy and the
      probabilities are live together);
    - gemma2: the bf16 scores through scaling, soft-cap (/c, tanh, *c) and mask, each step a new
      tensor, then softmax's fp32 cast of them and its fp32 output, cast back to bf16."""
    # the TP group's micro-batches on this rank's heads
    B, S, H = job.tp * job.spec.micro_batch, job.spec.seq, job.model.heads // job.tp
    square = BF16 * B * H * S * S
    if job.model.model_type == "gpt_oss":
        wide = BF16 * target_terms._score_entries(job)
        scores = _replacing(t, square, "attention scores", 3)  # matmul, * scaling, + mask
        cat = t.alloc(wide, "scores with sinks")
        shifted = t.alloc(wide, "scores - max")
        t.free(cat)
        probs = t.alloc(wide, "softmax")
        t.free(scores, shifted, probs)
        return
    scores = _replacing(t, square, "attention scores", 6)  # matmul, scaling, /c, tanh, *c, + mask
    upcast, soft = t.alloc(2 * square, "scores fp32"), t.alloc(2 * square, "softmax fp32")
    t.free(upcast)
    probs = t.alloc(square, "probabilities bf16")
    t.free(soft, scores, probs)


def _replacing(t: Trace, nbytes: int, name: str, steps: int) -> int:
    """`x = f(x)` `steps` times: each result is made while the one before is live, then that one goes."""
    current = t.alloc(nbytes, name)
    for _ in range(steps - 1):
        following = t.alloc(nbytes, name)
        t.free(current)
        current = following
    return current


def written_layers(layers: int, aux: tuple[int, ...]) -> list[int]:
    """The target layers written out. Layers alike in what they allocate hand the same blocks
    back and forth: the output of one takes the block the output before the last one had, and
    after two such layers the allocator is where it was. So a run of them between the layers
    that differ (the first two, each captured layer and the two after it, the last two) loses
    an even number: the blocks and every peak are those of the whole forward (only the count
    of failed requests differs, where layers fail)."""
    keep = {0, 1, layers - 2, layers - 1} | {i + j for i in aux for j in (0, 1, 2)}
    keep = sorted(i for i in keep if 0 <= i < layers)
    out: list[int] = []
    for i in keep:
        gap = i - (out[-1] + 1) if out else i
        if gap % 2:
            out.append(i - 1)
        out.append(i)
    return out


def target_forward(t: Trace, job: Job) -> tuple[int, int]:
    """The frozen target under no_grad (with TP over the group's micro-batches), then the
    teacher: (aux [T, 3h], teacher) keys."""
    m, T = job.model, target_terms.group_tokens(job)
    row = BF16 * m.hidden * T
    eager = bool(target_terms.eager_attention_bytes(job))
    masks = [t.alloc(BF16 * job.tp * job.spec.micro_batch * job.spec.seq ** 2, "eager causal mask")
             for _ in range(target_terms.EAGER_MASKS)] if eager else []
    working = _layer_working_set(job, T)
    resid = t.alloc(row, "target embeddings")
    captured: list[int] = []
    # with expandable segments where a block sits decides how far it can grow: every layer is written
    every = job.spec.expandable_segments
    for i in range(m.layers) if every else written_layers(m.layers, job.draft.aux_layers):
        keys = [t.alloc(n, f"target layer {name}") for name, n in working]
        out = t.alloc(row, "target layer output")
        if eager:
            eager_scores(t, job)
        t.free(*keys)
        if resid not in captured:
            t.free(resid)
        if i in job.draft.aux_layers:
            captured.append(out)
        resid = out
    t.free(*masks)
    normed = t.alloc(row, "target final norm")
    if resid not in captured:
        t.free(resid)
    own = target_terms.logits_shard_bytes(job)
    logits = t.alloc(own, "target logits [B, S, V] bf16" if job.tp == 1 else "target logits shard [T_g, V/tp] bf16")
    t.free(normed)
    if m.final_logit_softcap:  # tanh(logits / c) * c, each step a new tensor over the freed one before
        logits = _replacing_existing(t, logits, own, "soft-capped logits", 3)
    aux = t.alloc(target_terms.aux_outputs_bytes(job), "aux hidden states [B, S, 3h]")
    if job.tp > 1:
        # the estimator's instant (eagle3.target_forward_instants) holds the captured states
        # beside their concatenation while the exchange runs
        logits = exchange(t, job, logits)
    t.free(*captured)
    teacher = make_teacher(t, job)
    t.free(logits)
    return aux, teacher


def exchange(t: Trace, job: Job, shard: int) -> int:
    """trainer/parallel/outputs.py collect_target_outputs: the collective's output buffer, its
    row-ordered copy (what the rank keeps: gather, all of [T_g, V], the own rows a view of it;
    all-to-all, its own [B*S, V]), then the buffer and this rank's vocabulary shard go."""
    received = BF16 * target_terms.received_tokens(job) * job.model.vocab
    buffer = t.alloc(received, f"{job.spec.output_sharding} output buffer")
    kept = t.alloc(received, "exchanged logits, rows in order")
    t.free(buffer, shard)
    return kept


def _replacing_existing(t: Trace, current: int, nbytes: int, name: str, steps: int) -> int:
    for _ in range(steps):
        following = t.alloc(nbytes, name)
        t.free(current)
        current = following
    return current


def make_teacher(t: Trace, job: Job) -> int:
    """trainer/loss.py make_teacher: the teacher; fp32 probabilities have the bf16 draft-vocab
    columns gathered into them a chunk of positions at a time, bf16 logits (fused norms) are
    written by one pass of trainer/teacher_kernel.py that holds nothing counted beside them."""
    teacher = t.alloc(draft_terms.teacher_bytes(job), "teacher [B, S+L, Vd]")
    if draft_terms.teacher_chunk_bytes(job):
        per_position = BF16 * job.spec.micro_batch * job.draft.draft_vocab
        for positions in loop_chunks(job.spec.seq, draft_terms.TEACHER_CHUNK):
            t.free(t.alloc(per_position * positions, "teacher chunk"))
    return teacher


# ------------------------------------------------------------------ optimizer step


def _eight_bit(state: State, n: int) -> bool:
    return state.job.spec.optimizer == "adamw-8bit" and quantized_moments(n)


def _moments(t: Trace, state: State, name: str, n: int, stepped_bytes: int) -> list[int]:
    """The two Adam moments of one tensor: in the stepped tensor's dtype (torch's AdamW: the
    recipe's), or torchao's 8-bit codes with an fp32 scale per block."""
    if _eight_bit(state, n):
        return [t.alloc(size, f"{moment} {name}") for moment in ("exp_avg", "exp_avg_sq")
                for size in (n, FP32 * n // ADAM_8BIT_BLOCK)]
    eight_bit_optimizer = state.job.spec.optimizer == "adamw-8bit"
    per_moment = stepped_bytes if eight_bit_optimizer else state.recipe.moments // 2
    return [t.alloc(per_moment * n, f"{moment} {name}") for moment in ("exp_avg", "exp_avg_sq")]


def _adam(t: Trace, state: State, first: bool) -> None:
    """torch's fused AdamW makes every tensor's moments, then steps them all in one kernel;
    torchao's AdamW8bit goes tensor by tensor: its moments (step 1), then one compiled step
    that dequantizes both into fp32 buffers (eagle3.EIGHT_BIT_STEP_BYTES_PER_ELEMENT)."""
    for name, n in state.stored:
        _adam_tensor(t, state, name, n, first)


def _adam_tensor(t: Trace, state: State, name: str, n: int, first: bool) -> None:
    stepped = FP32 if state.recipe.master else state.recipe.param
    if first:
        state.moments += _moments(t, state, name, n, stepped)
    if _eight_bit(state, n):  # one fp32 buffer per moment (a recorded step makes two, not one of twice the size)
        per_moment = EIGHT_BIT_STEP_BYTES_PER_ELEMENT // 2 * n
        t.free(*[t.alloc(per_moment, f"8-bit step fp32 {moment} {name}") for moment in ("exp_avg", "exp_avg_sq")])


def optimizer_step(t: Trace, state: State, first: bool) -> None:
    """trainer/optim.py: clip (in place), the step, zero_grad(set_to_none). With the optimizer
    offloaded (trainer/offload.py) the step runs on the host: the GPU only loses its grads."""
    if state.on_device_optimizer:
        master = bool(state.recipe.master)
        if first and master and not state.masters:
            state.masters = [t.alloc(state.recipe.master * n, f"master {name}") for name, n in state.stored]
        if steps_per_param(state.job.spec):
            _step_each(t, state, first)
        else:
            copies = []
            if state.recipe.grad_copy:  # bf16-master, masters whole: master.grad = p.grad.float()
                copies = [t.alloc(FP32 * n, f"fp32 grad copy {name}") for name, n in state.stored
                          if _has_grad(state, name)]
            _adam(t, state, first)
            t.free(*copies)
    t.free(*state.grads.values())  # master.grad = None (`mixed`), zero_grad(set_to_none=True)
    state.grads.clear()
    if state.sharded is not None:
        fsdp_events.free_grads(t, state)


def _step_each(t: Trace, state: State, first: bool) -> None:
    """bf16-master a parameter at a time (param_steps.py): its fp32 grad copy, its bf16 grad
    dropped (with FSDP the unit's sharded grad goes with its last parameter's), its moments
    (step 1) and step, the copy dropped."""
    stored = dict(state.stored)
    stepped = [(name, n) for name, n in param_steps.order(state.params) if _has_grad(state, name)]
    frees_group = param_steps.last_of_groups([name for name, _ in stepped], lambda name: _grad_group(state, name))
    for name, _ in stepped:
        n = stored[name]
        copy = t.alloc(FP32 * n, f"fp32 grad copy {name}")
        if state.sharded is None:
            t.free(state.grads.pop(name))
        elif name in frees_group:
            t.free(state.sharded.grads.pop(_grad_group(state, name)))
        _adam_tensor(t, state, name, n, first)
        t.free(copy)


def _grad_group(state: State, name: str) -> str:
    """The storage a parameter's grad is in: its own, or with FSDP its unit's reduce-scatter output."""
    return name if state.sharded is None else fsdp_events.unit_of(name, state.job)


def _has_grad(state: State, name: str) -> bool:
    if state.sharded is not None:
        return fsdp_events.unit_of(name, state.job) in state.sharded.grads
    return name in state.grads


# ------------------------------------------------------------------ the whole sequence


def build(job: Job) -> StepEvents:
    """Load, step 1 and a steady step of `job` (sequence_unsupported(job) must be None)."""
    if job.spec.workload == "sft":
        return sft_events.build(job)
    if job.spec.runtime == "specforge":
        from fitplan.estimator import specforge_events

        return specforge_events.build(job)
    # imported here: an sft estimate, which replays its step too, does not load the draft's steps
    from fitplan.estimator.draft_events import draft_backward, draft_forward

    reason = sequence_unsupported(job)
    if reason:
        raise ValueError(reason)
    state = State(job, Sizes.of(job), draft_state(job), draft_parameters(job))
    if job.world > 1:
        state.sharded = fsdp_events.Sharded.of(state.params, job.world)
    t = Trace()
    t.begin("load")
    load(t, state)

    # the head makes its gradients in forward: backward does not read the teacher, which
    # trainer/loop.py lets go once it is scored
    teacher_goes_before_backward = head_grads_in_forward(job)

    def micro_step(label: str) -> None:
        t.begin(f"{label}.target_forward")
        aux, teacher = target_forward(t, job)
        t.begin(f"{label}.draft_forward")
        saved = draft_forward(t, state)
        if teacher_goes_before_backward:
            t.free(teacher)
        t.begin(f"{label}.backward")
        draft_backward(t, state, saved)
        t.free(aux)
        if not teacher_goes_before_backward:
            t.free(teacher)

    return write_steps(t, job, micro_step, lambda first: optimizer_step(t, state, first=first))
