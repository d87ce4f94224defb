"""The sft step on one rank: a full fine-tune of an HF causal LM with fused AdamW.

Sharding follows the usual FSDP2 layout (docs/estimate.md, "Trained state"): `fully_shard` on every decoder
layer, then on the root (embedding, final norm, lm_head). zero3 reshards after forward, so
forward and backward hold the root unit plus two layer units unsharded (the current one and the
prefetched next); zero2 keeps every unit unsharded from forward until backward ends. `none` on
several ranks is DDP, whose gradient buckets are a second copy of the grads.
"""

from __future__ import annotations

import math

from fitplan.estimator import param_steps, sft_terms
from fitplan.estimator.eagle3 import optimizer_state, optimizer_step_phase
from fitplan.estimator.recipes import TrainedState, moment_bytes_per_param
from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES
from fitplan.estimator.timeline import Timeline, merge, phase
from fitplan.layout import Job
from fitplan.shapes import count_params, embedding_params, lm_head_params
from fitplan.units import BF16, FP32


def _root_and_layer_params(job: Job) -> tuple[int, int]:
    """(root unit params: embedding, lm_head (none of its own when tied), final norm; params of
    one decoder layer unit)."""
    m = job.model
    total = count_params(m).total
    root = embedding_params(m) + lm_head_params(m) + m.hidden
    return root, (total - root) // m.layers


def layer_param_elements(job: Job) -> list[tuple[str, int]]:
    """One decoder layer's parameters (name, elements) in module order; norms, q/k norms and
    biases as one small tensor holding what count_params gives the layer beyond the matrices."""
    m = job.model
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    mats = [("q_proj", m.hidden * q), ("k_proj", m.hidden * kv), ("v_proj", m.hidden * kv), ("o_proj", q * m.hidden),
            ("gate_proj", m.hidden * m.intermediate), ("up_proj", m.hidden * m.intermediate),
            ("down_proj", m.intermediate * m.hidden)]
    _, per_layer = _root_and_layer_params(job)
    return mats + [("norms and biases", per_layer - sum(n for _, n in mats))]


def parameters(job: Job) -> list[tuple[str, int]]:
    """The model's parameters (name, elements) in creation order; the layers' remainder of the
    integer division goes to the final norm, so the sum is count_params' total."""
    m = job.model
    layers = [(f"layers.{i}.{name}", n) for i in range(m.layers) for name, n in layer_param_elements(job)]
    head = [("lm_head", lm_head_params(m))] if lm_head_params(m) else []
    listed = embedding_params(m) + sum(n for _, n in layers) + sum(n for _, n in head)
    return [("embed_tokens", embedding_params(m))] + layers + [("norm", count_params(m).total - listed)] + head


def unsharded_bytes(job: Job, state: TrainedState) -> int:
    """Params FSDP holds unsharded (in the compute dtype) during forward and backward."""
    per_param = state.recipe.param
    if not state.fsdp():
        return 0
    if job.spec.sharding == "zero2":
        return state.trainable * per_param
    root, layer = _root_and_layer_params(job)
    return (root + min(2, job.model.layers) * layer) * per_param


def _reduce_unit_bytes(job: Job, state: TrainedState) -> int:
    """Sharded grads are reduce-scattered unit by unit: one layer's and the root's full grads."""
    root, layer = _root_and_layer_params(job)
    return (root + layer) * state.recipe.grad


def _grads_at_backward_end(job: Job, state: TrainedState) -> dict[str, int]:
    if state.sharded_grads():
        return phase(model__grads=state.grads(), comm__buffers=_reduce_unit_bytes(job, state))
    return phase(model__grads=state.full_grads())


def _backward(job: Job, state: TrainedState, before: dict[str, int], carried: dict[str, int]) -> dict[str, int]:
    """Backward frees activations layer by layer while grads appear layer by layer: their sum
    moves linearly, so the peak is at one end. Start: every saved activation plus the logits'
    gradient buffers; end: all grads plus the first layer's saved (or recomputed) activations
    and its gradient working set."""
    start = merge(before, carried, phase(
        activations__model=sft_terms.activation_bytes(job),
        logits__model=sft_terms.backward_logits_bytes(job),
    ))
    m = job.model
    if m.is_moe or m.mla_attention_params is not None:
        ends = [merge(before, _grads_at_backward_end(job, state), phase(
            activations__model=sft_terms.first_layer_bytes(job) + sft_terms.layer_grad_working_bytes(job),
        ))]
    else:  # sharded: the same instants, the grads reduce-scattered unit by unit
        sharded = state.sharded_grads()
        ends = [merge(before, _grads_at_backward_end(job, state) if sharded else phase(model__grads=grads),
                      phase(activations__model=held))
                for grads, held in _whole_grad_backward_ends(job, state)]
    return max([start, *ends], key=lambda p: sum(p.values()))


def _whole_grad_backward_ends(job: Job, state: TrainedState) -> list[tuple[int, int]]:
    """(grads, other activation bytes) at the two highest instants of the end of backward with
    whole grads (one rank, or DDP), in the order trainer/sft_step.py's backward runs
    (sft_layer_events.py): inside the first layer's MLP backward, its embedding's and its own
    weights' gradients but down_proj's not made yet; and the embedding's gradient, made last
    beside every other one and the gradient of the first layer's input (the bf16 gradient
    still live beside it where it is added into an existing one: tied embeddings, or `mixed`'s
    fp32 grads)."""
    m, tokens = job.model, job.spec.micro_batch * job.spec.seq
    per_grad = state.full_grads() // max(1, state.trainable)
    layer = _root_and_layer_params(job)[1]
    pending = (layer - m.hidden * m.intermediate) + (0 if m.tie_embeddings else embedding_params(m))
    once = sft_terms.once_in_backward_bytes(job)
    incoming = m.vocab * m.hidden * state.recipe.param if m.tie_embeddings or job.spec.precision == "mixed" else 0
    return [
        (state.full_grads() - pending * per_grad, sft_terms.first_layer_mlp_backward_bytes(job) + once),
        (state.full_grads(), incoming + BF16 * m.hidden * tokens + once),
    ]


def optimizer_step(job: Job, state: TrainedState, steady: bool) -> dict[str, int]:
    """The model's optimizer step at its peak (eagle3.optimizer_step_phase)."""
    return optimizer_step_phase(job, state, steady, lambda: stepped_parameters(job, state), "model__grads")


def stepped_parameters(job: Job, state: TrainedState) -> list[param_steps.Stepped]:
    """The model's parameters as a rank's optimizer steps them: whole, or with FSDP (sharded
    grads) each a shard of ceil(n / world) elements whose grad is in its unit's storage (each
    decoder layer a unit, the rest the root's, sft_step.shard)."""
    sharded = state.sharded_grads()
    out = []
    for name, n in parameters(job):
        held = state.on_rank(n, 1)  # what its copy and moments are made over
        unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "root"
        out.append(param_steps.Stepped(
            elements=n, group=unit if sharded else name, grad=state.on_rank(n, 2) * state.recipe.grad,
            copy=held * state.recipe.grad_copy, moments=math.ceil(held * moment_bytes_per_param(job.spec))))
    return out


def timeline(job: Job) -> Timeline:
    t = Timeline()
    state = TrainedState(job.spec, count_params(job.model).total, 0, job.world)
    base = phase(
        model__params=state.params(), comm__buffers=state.ddp_buckets(), runtime__workspace=CUBLAS_WORKSPACE_BYTES
    )
    in_compute = phase(comm__buffers=unsharded_bytes(job, state), model__params=state.casts())
    carried = phase(model__grads=state.grads() if job.accum > 1 else 0)

    def phases(steady: bool) -> dict[str, dict[str, int]]:
        opt = optimizer_state(state, steady)
        return {
            "load": merge(base, optimizer_state(state, steady=False)),
            "forward": merge(base, opt, carried, in_compute, phase(
                activations__model=sft_terms.activation_bytes(job),
                logits__model=sft_terms.forward_logits_bytes(job),
            )),
            "backward": _backward(job, state, merge(base, opt, in_compute), carried),
            "optimizer_step": merge(base, optimizer_step(job, state, steady)),
            "checkpoint": merge(base, optimizer_state(state, steady=True)),
        }

    t.steady, t.step1 = phases(steady=True), phases(steady=False)
    m, tokens = job.model, job.spec.micro_batch * job.spec.seq
    t.candidate(FP32 * tokens * m.vocab, "fp32 logits upcast [B*S, V]")
    t.candidate(m.vocab * m.hidden * state.recipe.param, "embedding [V, h]")
    moment = state.moments() * (m.vocab * m.hidden) // max(1, state.trainable) // 2
    t.candidate(moment, "Adam exp_avg of the embedding [V, h] (this rank's shard)")
    return t
