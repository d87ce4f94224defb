"""The ordered allocations and frees of SpecForge's offline Eagle3 step on one GPU: load, step 1, a
steady step (docs/allocator.md, "SpecForge's offline step on one GPU").

Written from specforge_terms' sizes in the order SpecForge 0.2's code makes and drops its tensors
(FSDPTrainingBackend with FSDP1 NO_SHARD on one rank, Eagle3TrainStrategy.forward_loss,
OnlineEagle3Model with the flex backend, LogSoftmaxLoss, BF16Optimizer), as its recorded
allocator histories show them (tests/data/gpu/trace/specforge):

- load: TargetHead's lm_head, the draft's tensors in module order, FSDP's flat parameter copied
  from them (they go), BF16Optimizer's fp32 masters (each from a bf16 clone), the cuBLAS workspace;
- teacher (`target_forward`): the micro-batch, TargetHead.preprocess's shifted copy and the bf16
  logits; FSDP's pre-forward drops the last step's flat gradient; the compiled _compute_target_p
  (fp32 logits, three fp32 [T, Vd]) and the two padded teachers; then torch.cuda.empty_cache();
- draft forward: fc, then per TTT step the layer's tensors as LlamaDecoderLayer and
  LlamaFlexAttention make them, DynamicCache's concatenations, the logits LogSoftmaxLoss saves,
  the acceptance rate's fp32 softmax;
- backward: the steps in reverse, as autograd runs them. A weight's gradient from each step is a
  tensor of its own: the first is kept, the second summed with it on FSDP's unshard stream (the
  parameter views were made there, and a view's gradients are added on its stream), later ones
  added in place; the embedding's [V, h] gradient is made every step and added into the first.
  At the end SplitWithSizesBackward concatenates them into the flat gradient on that stream.
  Gradients made on the compute stream and read on the unshard stream are "retired": the caller
  lets them go (allocated bytes drop), but their blocks return to the pool only when that stream
  has run the addition; the CPU enqueues backward far ahead of the GPU (nothing in it
  synchronizes), so the sequence returns them when backward ends;
- optimizer step: BF16Optimizer.step: the gradient norm's fp32 square per parameter, every
  master's fp32 gradient, Adam's moments (step 1), AdamW's foreach sqrt of the second moments,
  zero_grad, the bf16 copies back; the batch goes when the step ends, the flat gradient stays.

Tensors specforge_terms leaves out are left out here, so the most bytes live at once in each phase
(counting a retired block's bytes until its retire, as torch's allocated bytes do) is the phase's sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitplan.allocator import Event
from fitplan.estimator import specforge_terms as terms
from fitplan.estimator import target_terms
from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES
from fitplan.estimator.step_trace import StepEvents, Trace, written
from fitplan.layout import Job
from fitplan.units import BF16, FP32

# Step 1 (Adam's moments made, no gradient held from a step before), a second step, and the steady
# step: each step's teacher makes its fp32 logits after the step before left its blocks in the
# cache, and after the first step that cache is not yet the one later steps leave.
STEP_LABELS = ("step1", "step2", "steady")
# the stream FSDP made the parameter views on (its unshard stream): their gradients are summed there
UNSHARD_STREAM = 1


def unsupported(job: Job) -> str | None:
    """Why SpecForge's step is not written for this job (None: it is)."""
    spec = job.spec
    if not spec.offline:
        return "SpecForge's online step (a live target) is not written; its offline step on one GPU is"
    if job.world > 1:
        return "SpecForge on several GPUs is not written; its offline step on one GPU is"
    if not terms.modelled(job):
        return f"SpecForge's {spec.attention_impl} attention backend is not written (flex is)"
    if job.accum > 1:
        return "gradient accumulation (FSDP's no_sync) is not written for SpecForge"
    return None


@dataclass
class _State:
    job: Job
    params: list[tuple[str, int]]  # trained tensors (name, elements), BF16Optimizer's order
    batch: list[int] = field(default_factory=list)
    flat_grad: int | None = None
    autograd_workspace: int | None = None
    grads: dict[str, int] = field(default_factory=dict)  # weight -> its kept first gradient or the sum
    summed: set[str] = field(default_factory=set)  # weights whose gradient is a sum on the unshard stream
    retired: list[int] = field(default_factory=list)  # back to the pool when backward ends

    @property
    def T(self) -> int:
        return terms.tokens(self.job)


def retire(t: Trace, state: _State, *keys: int | None) -> None:
    """The caller lets blocks go that the unshard stream still reads (torch's free with
    record_stream): allocated bytes drop now, the blocks return when backward ends."""
    for key in keys:
        if key is not None:
            t.events.append(Event("retire", key))
            state.retired.append(key)


# ------------------------------------------------------------------ load


def load(t: Trace, state: _State) -> None:
    job = state.job
    t.alloc(target_terms.resident_weights(job), "TargetHead lm_head [V, h_t]")
    # from_config makes the embedding, then the rest in BF16Optimizer's order
    own = [t.alloc(terms.embedding_bytes(job), "draft.embed_tokens")]
    own += [t.alloc(BF16 * n, f"draft.{name}") for name, n in state.params]
    t.alloc(terms.flat_bytes(job), "FSDP flat parameter")
    t.free(*own)
    for name, n in state.params:
        clone = t.alloc(BF16 * n, f"bf16 clone of {name}")
        t.alloc(FP32 * n, f"fp32 master {name}")  # kept
        t.free(clone)
    t.alloc(CUBLAS_WORKSPACE_BYTES, "cuBLAS workspace")


# ------------------------------------------------------------------ teacher


def teacher(t: Trace, state: _State) -> tuple[int, list[int]]:
    """forward_loss up to OnlineEagle3Model's empty_cache: (the bf16 target logits, which
    forward_loss keeps until it returns; [target_p_padded, target_p_on_draft_padded])."""
    job = state.job
    aux = t.alloc(BF16 * 3 * job.draft.target_hidden * state.T, "stored aux hidden states [T, 3h_t]")
    last = t.alloc(terms.shifted_hidden_bytes(job), "stored last hidden state [T, h_t]")
    state.batch = [aux, last]
    shifted = t.alloc(terms.shifted_hidden_bytes(job), "shifted last hidden state")
    logits = t.alloc(terms.target_logits_bytes(job), "TargetHead logits [T, V] bf16")
    t.free(shifted)
    if state.flat_grad is not None:  # FSDP's pre-forward: every original parameter's grad is None
        t.free(state.flat_grad)
        state.flat_grad = None
    upcast = t.alloc(terms.target_upcast_bytes(job), "target logits fp32")
    columns, p, p_on_draft = (t.alloc(terms.draft_vocab_fp32_bytes(job), name)
                              for name in ("draft-vocab columns fp32", "target_p", "target_p_on_draft"))
    t.free(upcast, columns)
    padded = [t.alloc(terms.padded_teacher_bytes(job), name)
              for name in ("target_p_padded", "target_p_on_draft_padded")]
    t.free(p, p_on_draft)
    t.events.append(Event("empty_cache"))
    return logits, padded


# ------------------------------------------------------------------ draft forward


@dataclass
class _Step:
    """One TTT step's saved tensors (keys) in the order its backward releases what it can."""

    k: int
    emb: int
    cat: int
    q: int
    keys: int
    values: int
    lse: int
    out: int
    attended: int  # the hidden after attention (post_attention_layernorm's input)
    mlp_in: int
    gate: int
    silu: int
    up: int
    product: int
    layer_out: int
    final: int
    logits: int
    slices: list[int]  # B > 1: the teacher slice its loss saved


def draft_forward(t: Trace, state: _State, padded: list[int]) -> tuple[int, list[_Step]]:
    """fc, then the unroll: (fc's output, each step's saved tensors)."""
    job, T = state.job, state.T
    d = job.draft
    h2 = BF16 * d.hidden * T
    fc_out = t.alloc(h2, "fc output [T, h]")
    steps: list[_Step] = []
    on_draft_slice = None
    for k in range(job.spec.ttt):
        slices = []
        if terms.teacher_slice_bytes(job):  # step_view's .contiguous() copies (B > 1)
            slices = [t.alloc(terms.teacher_slice_bytes(job), "target_p slice")]
            following = t.alloc(terms.teacher_slice_bytes(job), "target_p_on_draft slice")
            t.free(on_draft_slice)
            on_draft_slice = following
        steps.append(_layer(t, job, k, slices))
        _acceptance(t, job)
    t.free(on_draft_slice, padded[1])
    return fc_out, steps


def _layer(t: Trace, job: Job, k: int, slices: list[int]) -> _Step:
    T, d = terms.tokens(job), job.draft
    h2, q2, kv2, i2 = (BF16 * n * T for n in (d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim,
                                                d.intermediate))
    emb = t.alloc(h2, "embedding output")
    hidden_normed = t.alloc(h2, "hidden_norm output")
    emb_normed = t.alloc(h2, "input_layernorm output")  # the layer's `input_emb` keeps it to the end
    cat = t.alloc(2 * h2, "cat(emb, hidden) [T, 2h]")
    t.free(hidden_normed)
    q, k_new, v_new = t.alloc(q2, "q_proj output"), t.alloc(kv2, "k_proj output"), t.alloc(kv2, "v_proj output")
    q_roped, k_roped = t.alloc(q2, "roped q"), t.alloc(kv2, "roped k")
    t.free(q, k_new)
    half = terms.step_kv_bytes(job, k) // 2
    keys, values = t.alloc(half, "keys of steps 0..k"), t.alloc(half, "values of steps 0..k")
    lse = t.alloc(FP32 * d.heads * T, "flex logsumexp")
    out = t.alloc(q2, "flex output (o_proj input)")
    t.free(k_roped, v_new)
    o = t.alloc(h2, "o_proj output")
    attended = t.alloc(h2, "hidden after attention")
    t.free(o)
    mlp_in = t.alloc(h2, "post_attention_layernorm output")
    gate, silu, up, product = (t.alloc(i2, name) for name in ("gate", "silu", "up", "gate*up"))
    down = t.alloc(h2, "down_proj output")
    layer_out = t.alloc(h2, "layer output")
    t.free(down, emb_normed)
    final = t.alloc(h2, "final norm output")
    logits = t.alloc(terms.step_logits_bytes(job), "draft logits [T, Vd] bf16")
    return _Step(k, emb, cat, q_roped, keys, values, lse, out, attended, mlp_in, gate, silu, up, product,
                 layer_out, final, logits, slices)


def _acceptance(t: Trace, job: Job) -> None:
    """compute_acceptance_rate: softmax(logits.float()), then its minimum with the teacher."""
    size = terms.draft_vocab_fp32_bytes(job)
    upcast = t.alloc(size, "logits fp32")
    probs = t.alloc(size, "draft softmax fp32")
    t.free(upcast)
    t.free(t.alloc(size, "min(teacher, draft) fp32"))
    t.free(probs)


# ------------------------------------------------------------------ backward


def backward(t: Trace, state: _State, fc_out: int, steps: list[_Step], target_p: int) -> None:
    job = state.job
    if state.autograd_workspace is None:  # autograd's device thread's cuBLAS handle, at its first GEMM
        state.autograd_workspace = t.alloc(CUBLAS_WORKSPACE_BYTES, "cuBLAS workspace (autograd's thread)")
    stream = None  # the hidden stream's gradient: one tensor, added into in place
    pending: list[int] = []  # gradients of the keys and values of steps 0..k, from step k+1
    for step in reversed(steps):
        if step.k == 0:
            t.free(target_p)  # step 0's loss was its last reader
        stream, pending = _step_backward(t, state, step, stream, pending, fc_out)
    fc_grad = t.alloc(terms.fc_bytes(job), "grad of fc")
    t.free(stream)
    flat = t.alloc(terms.flat_bytes(job), "FSDP flat gradient", UNSHARD_STREAM)
    t.free(*(state.grads.pop(name) for name in list(state.grads) if name in state.summed))
    retire(t, state, *state.grads.values(), fc_grad)
    state.grads.clear()
    state.summed.clear()
    t.free(*state.retired)
    state.retired.clear()
    state.flat_grad = flat


def _step_backward(t: Trace, state: _State, step: _Step, stream: int | None, pending: list[int],
                   fc_out: int) -> tuple[int, list[int]]:
    """Step k's backward as autograd runs it: (the hidden stream's gradient, the gradients of the
    keys and values of steps 0..k-1 it leaves pending)."""
    job, T = state.job, state.T
    d = job.draft
    h2, q2, kv2, i2 = (BF16 * n * T for n in (d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim,
                                                d.intermediate))
    sizes = dict(terms.trainable_tensors(job))
    t.free(*step.slices)
    # the head: LogSoftmaxLoss writes its gradient into the saved logits, lm_head's mm backward
    head_grad = t.alloc(BF16 * sizes["lm_head"], "grad of lm_head")
    head_input_grad = t.alloc(h2, "grad of the head's input")
    t.free(step.logits, step.final)
    _weight_grad(t, state, "lm_head", head_grad)
    # the final norm: its gradient starts the hidden stream's, or is added into it
    norm_grad = t.alloc(h2, "final norm grad")
    t.free(step.layer_out, head_input_grad)
    stream = _into_stream(t, stream, norm_grad)
    # the MLP
    down_grad = t.alloc(BF16 * sizes["down_proj"], "grad of down_proj")
    product_grad = t.alloc(i2, "grad of gate*up")
    t.free(step.product)
    _weight_grad(t, state, "down_proj", down_grad)
    silu_grad, up_grad = t.alloc(i2, "grad of silu"), t.alloc(i2, "grad of up")
    t.free(product_grad, step.up, step.silu)
    up_weight = t.alloc(BF16 * sizes["up_proj"], "grad of up_proj")
    from_up = t.alloc(h2, "grad of the MLP input (up)")
    t.free(up_grad)
    _weight_grad(t, state, "up_proj", up_weight)
    gate_grad = t.alloc(i2, "grad of gate")
    t.free(silu_grad, step.gate)
    gate_weight = t.alloc(BF16 * sizes["gate_proj"], "grad of gate_proj")
    from_gate = t.alloc(h2, "grad of the MLP input (gate)")
    t.free(gate_grad, step.mlp_in)
    _weight_grad(t, state, "gate_proj", gate_weight)
    mlp_in_grad = t.alloc(h2, "grad of the MLP input")
    t.free(from_up, from_gate)
    attended_grad = t.alloc(h2, "post_attention_layernorm grad")
    t.free(step.attended, mlp_in_grad)
    t.free(attended_grad)  # added into the hidden stream's gradient
    # o_proj and the flex kernel
    o_weight = t.alloc(BF16 * sizes["o_proj"], "grad of o_proj")
    out_grad, out_grad_copy = t.alloc(q2, "grad of the flex output"), t.alloc(q2, "grad of the flex output, copied")
    t.free(step.out)
    _weight_grad(t, state, "o_proj", o_weight)
    half = terms.step_kv_bytes(job, step.k) // 2
    q_grad = t.alloc(q2, "grad of roped q")
    key_grad, value_grad = t.alloc(half, "grad of keys 0..k"), t.alloc(half, "grad of values 0..k")
    t.free(step.q, step.keys, step.values, step.lse, out_grad_copy, out_grad)
    if pending:  # step k+1's gradients of these keys and values (slices of its) are added to ours
        summed = [t.alloc(half, "grad of keys 0..k (sum)"), t.alloc(half, "grad of values 0..k (sum)")]
        t.free(*pending, key_grad, value_grad)
        key_grad, value_grad = summed
    # rope and the projections read by the step's own chunk of the keys and values
    q_pre = t.alloc(q2, "grad of q_proj output")
    t.free(q_grad)
    k_pre = t.alloc(kv2, "grad of k_proj output")
    k_weight, from_k = t.alloc(BF16 * sizes["k_proj"], "grad of k_proj"), t.alloc(2 * h2, "grad of cat (k)")
    _weight_grad(t, state, "k_proj", k_weight)
    v_weight, from_v = t.alloc(BF16 * sizes["v_proj"], "grad of v_proj"), t.alloc(2 * h2, "grad of cat (v)")
    _weight_grad(t, state, "v_proj", v_weight)
    if step.k == 0:  # no step before: the gradients of step 0's keys and values are used up
        t.free(key_grad, value_grad)
    cat_grad = t.alloc(2 * h2, "grad of cat")
    t.free(from_k, from_v, k_pre)
    q_weight, from_q = t.alloc(BF16 * sizes["q_proj"], "grad of q_proj"), t.alloc(2 * h2, "grad of cat (q)")
    t.free(q_pre, step.cat, from_q)
    _weight_grad(t, state, "q_proj", q_weight)
    # the two norms under the cat; the embedding's gradient
    emb_grad, hidden_grad = t.alloc(h2, "input_layernorm grad"), t.alloc(h2, "hidden_norm grad")
    t.free(step.emb, cat_grad)
    if step.k == 0:  # step 0's hidden_norm read fc's output
        t.free(fc_out)
    t.free(hidden_grad)  # added into the hidden stream's gradient
    embedding_grad = t.alloc(terms.embedding_bytes(job), "grad of embed_tokens [V, h]")
    t.free(emb_grad)
    if "embed_tokens" in state.grads:
        retire(t, state, embedding_grad)  # added into the first in place
    else:
        state.grads["embed_tokens"] = embedding_grad
    return stream, ([key_grad, value_grad] if step.k > 0 else [])


def _into_stream(t: Trace, stream: int | None, grad: int) -> int:
    """The hidden stream's gradient: the first one arriving is it; later ones are added in place."""
    if stream is None:
        return grad
    t.free(grad)
    return stream


def _weight_grad(t: Trace, state: _State, name: str, grad: int) -> None:
    """A step's gradient of a weight arrives at its view's input buffer (module docstring)."""
    if name not in state.grads:
        state.grads[name] = grad
        return
    if name in state.summed:
        retire(t, state, grad)
        return
    first = state.grads[name]
    state.grads[name] = t.alloc(BF16 * dict(terms.trainable_tensors(state.job))[name], f"grad of {name} (sum)",
                                UNSHARD_STREAM)
    state.summed.add(name)
    retire(t, state, first, grad)


# ------------------------------------------------------------------ optimizer step


def optimizer_step(t: Trace, state: _State, first: bool) -> None:
    """BF16Optimizer.step (clip coefficient from the grads' fp32 norms, fp32 master grads, torch
    AdamW foreach, zero_grad, bf16 copies back); then TrainerCore.train_step returns and its
    batch goes. The flat gradient stays (FSDP drops it at the next pre-forward)."""
    for name, n in state.params:
        upcast = t.alloc(FP32 * n, f"{name} grad fp32 (norm)")
        squared = t.alloc(FP32 * n, f"{name} grad squared (norm)")
        t.free(upcast, squared)
    master_grads = [t.alloc(FP32 * n, f"fp32 master grad {name}") for name, n in state.params]
    if first:
        for name, n in state.params:
            t.alloc(FP32 * n, f"exp_avg {name}"), t.alloc(FP32 * n, f"exp_avg_sq {name}")  # kept
    roots = [t.alloc(FP32 * n, f"sqrt(exp_avg_sq) {name}") for name, n in state.params]
    t.free(*reversed(roots))
    t.free(*master_grads[:-1])  # zero_grad; step()'s local `master_grad` keeps the last until it returns
    for name, n in state.params:
        t.free(t.alloc(BF16 * n, f"{name} master as bf16"))
    t.free(master_grads[-1], *state.batch)
    state.batch = []


# ------------------------------------------------------------------ the whole sequence


def build(job: Job) -> StepEvents:
    """Load, step 1 and a steady step of SpecForge's offline step (unsupported(job) must be None)."""
    reason = unsupported(job)
    if reason:
        raise ValueError(reason)
    state = _State(job, terms.trainable_tensors(job))
    t = Trace()
    t.begin("load")
    load(t, state)

    def micro_step(label: str) -> None:
        t.begin(f"{label}.target_forward")
        logits, padded = teacher(t, state)
        t.begin(f"{label}.draft_forward")
        fc_out, steps = draft_forward(t, state, padded)
        t.free(logits)  # forward_loss returns
        t.begin(f"{label}.backward")
        backward(t, state, fc_out, steps, padded[0])

    for label in STEP_LABELS:
        micro_step(label)
        t.begin(f"{label}.optimizer_step")
        optimizer_step(t, state, first=label == "step1")
    return written(t)
