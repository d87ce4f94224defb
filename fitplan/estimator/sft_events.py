"""The ordered allocations and frees of the sft trainer on one GPU (trainer/sft_step.py): load,
step 1 and a steady step, written from the estimator's sft terms (sft.py, sft_terms.py,
recipes.py) the way step_events.py writes the Eagle3 trainer's.

- load (build_model, build_optimizer): the model's weights in module order (embedding, each
  decoder layer, final norm, untied lm_head), the cuBLAS workspace, `mixed`'s fp32 masters;
- forward (transformers' decoder, the model's own loss on `labels`): ids, rotary tables, then
  each layer: without checkpointing its saved tensors, kept; with it the layer's ops in the real
  code's order, nothing saved inside (sft_layer_events.py), its output kept as the next layer's
  checkpointed input; the final norm, then the loss: bf16 logits, their fp32 upcast, the fp32
  log-softmax cross_entropy saves (only that one survives the forward);
- backward: the loss's two fp32 gradients beside the saved log-softmax (sft_terms'
  backward_logits_bytes), the bf16 one, lm_head's weight gradient then its input's, the final
  norm's backward, then the layers in reverse (sft_layer_events.py: recomputed under
  checkpointing, each saved tensor freed after the node that used it, each parameter's gradient
  where mm's backward makes it, bf16 or into fp32 master gradients in `mixed`), the gradient of
  each layer's input handed to the next, the embedding's gradient last;
- optimizer step (torch's fused AdamW, or trainer/optim.py MasterWeightAdamW): step 1 makes the
  moments (and bf16-master's masters), bf16-master copies every grad to fp32 for the step (or
  one at a time, each grad dropped as its copy is made: param_steps.py), zero_grad(set_to_none)
  frees the grads.

Small tensors the estimator does not count (the norms' rstd and the loss's scalars) are left out
or ride with a neighbour, so the live bytes at each phase's peak are the estimator's phase sum
(sft.py's backward instants follow this order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from fitplan.estimator import param_steps, sft_terms
from fitplan.estimator import sft_layer_events as layers
from fitplan.estimator.recipes import TrainedState
from fitplan.estimator.runtime import CUBLAS_WORKSPACE_BYTES
from fitplan.estimator.sft import parameters
from fitplan.estimator.sft_layer_events import LayerSizes
from fitplan.estimator.step_trace import StepEvents, Trace, write_steps
from fitplan.layout import Job, steps_per_param
from fitplan.shapes import count_params, lm_head_params
from fitplan.units import BF16, FP32

INT64 = sft_terms.INT64


def unsupported(job: Job) -> str | None:
    """Why the sft step's sequence is not written for this job (None: it is)."""
    spec, m = job.spec, job.model
    if job.world > 1 or job.tp > 1:
        return "sft on several GPUs is not modelled (one GPU is)"
    if m.is_moe or m.mla_attention_params is not None:
        return "sft of MoE or latent-attention models is not modelled (dense decoders are)"
    if spec.offload != "none":
        return "sft with offload is not modelled"
    if spec.optimizer != "adamw":
        return f"sft with optimizer {spec.optimizer} is not modelled (adamw is)"
    return None


# ------------------------------------------------------------------ sizes


def layer_saved_tensors(job: Job) -> list[tuple[str, int]]:
    """What one layer saves for backward (sft_terms.layer_saved_bytes_per_token), as tensors over
    the micro-batch's tokens, named as sft_layer_events uses them; lse and the rstds ride with
    the attention's output."""
    m, T = job.model, job.spec.micro_batch * job.spec.seq
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    parts = [("input norm fp32", 4 * m.hidden), ("input norm normed", 2 * m.hidden), ("input norm out", 2 * m.hidden)]
    if LayerSizes.of(job).qk_norms:
        parts += [("q norm fp32", FP32 * q), ("q norm normed", BF16 * q), ("k norm fp32", FP32 * kv),
                  ("k norm normed", BF16 * kv)]
    parts += [("q", BF16 * q), ("k", BF16 * kv), ("v", BF16 * kv), ("attention out, lse, rstd", BF16 * q),
              ("post norm fp32", 4 * m.hidden), ("post norm normed", 2 * m.hidden), ("post norm out", 2 * m.hidden)]
    parts += [(name, BF16 * sft_terms._mlp_width(job)) for name in ("gate", "silu", "up", "product")]
    rest = sft_terms.layer_saved_bytes_per_token(job) - sum(n for _, n in parts)
    parts = [(name, n + rest if name == "attention out, lse, rstd" else n) for name, n in parts]
    return [(name, n * T) for name, n in parts]


def once_tensors(job: Job) -> list[tuple[str, int]]:
    """Per micro-step, once per model (sft_terms.activation_bytes' `once`): ids and labels, the
    rotary cos and sin."""
    m, T, S = job.model, job.spec.micro_batch * job.spec.seq, job.spec.seq
    return [("input ids", INT64 * T), ("labels", INT64 * T), ("rotary cos", BF16 * S * m.head_dim),
            ("rotary sin", BF16 * S * m.head_dim)]


def final_norm_tensors(job: Job) -> list[tuple[str, int]]:
    h, T = job.model.hidden, job.spec.micro_batch * job.spec.seq
    return [("final norm fp32, rstd", (4 * h + FP32) * T), ("final norm normed", 2 * h * T), ("final norm out", 2 * h * T)]


# ------------------------------------------------------------------ state


@dataclass
class SftState:
    job: Job
    trained: TrainedState
    params: list[tuple[str, int]]
    grads: dict[str, int] = field(default_factory=dict)  # parameter -> key of its (fp32 in `mixed`) grad
    masters: list[int] = field(default_factory=list)
    moments: list[int] = field(default_factory=list)

    @property
    def recipe(self):
        return self.trained.recipe

    @cached_property  # params do not change; each micro-step's forward and backward ask
    def layer_params(self) -> dict[int, list[tuple[str, int]]]:
        out: dict[int, list[tuple[str, int]]] = {}
        for name, n in self.params:
            if name.startswith("layers."):
                out.setdefault(int(name.split(".")[1]), []).append((name, n))
        return out


def accumulate(t: Trace, state: SftState, name: str, n: int) -> None:
    """AccumulateGrad: the first gradient is kept (`mixed`: added into a new fp32 master grad by
    the post-accumulate hook, the bf16 one dropped), later ones are added and freed."""
    incoming = t.alloc(n * state.recipe.param, f"grad of {name}")
    if name in state.grads:
        t.free(incoming)
    elif state.job.spec.precision == "mixed":
        state.grads[name] = t.alloc(FP32 * n, f"fp32 grad of {name}")
        t.free(incoming)
    else:
        state.grads[name] = incoming


# ------------------------------------------------------------------ phases


def load(t: Trace, state: SftState) -> None:
    for name, n in state.params:
        t.alloc(n * state.recipe.param, name)
    t.alloc(CUBLAS_WORKSPACE_BYTES, "cuBLAS workspace")
    if state.recipe.master and not state.recipe.lazy_master:
        state.masters = [t.alloc(state.recipe.master * n, f"master {name}") for name, n in state.params]


@dataclass
class Saved:
    once: list[int]
    layers: list[dict[str, int]]  # per layer: its saved tensors (none under checkpointing)
    inputs: list[int | None]  # per layer under checkpointing: its input, which the checkpoint holds
    final_norm: list[int]
    casts: list[int]
    log_softmax: int | None = None


def _allocs(t: Trace, tensors: list[tuple[str, int]], prefix: str = "") -> list[int]:
    return [t.alloc(n, prefix + name) for name, n in tensors]


def _casts(t: Trace, state: SftState, names: list[str]) -> list[int]:
    """autocast's bf16 copies of fp32 weights as the forward reaches them, held until backward
    ends (the estimator's model.params casts: every trainable parameter)."""
    numel = dict(state.params)
    return [t.alloc(numel[name] * state.recipe.cast, f"bf16 cast of {name}") for name in names]


def forward(t: Trace, state: SftState) -> Saved:
    job = state.job
    m, T = job.model, job.spec.micro_batch * job.spec.seq
    row = BF16 * m.hidden * T
    saved = Saved(_allocs(t, once_tensors(job)), [], [], [], [])
    params = dict(state.params)
    saved.casts += _casts(t, state, ["embed_tokens"])
    hidden = t.alloc(row, "embedding output") if job.spec.ac else None
    saved_tensors = layer_saved_tensors(job)
    for i, layer in sorted(state.layer_params.items()):
        saved.casts += _casts(t, state, [name for name, _ in layer])
        if job.spec.ac:
            saved.inputs.append(hidden)
            hidden = layers.checkpointed_forward(t, job, i)
        else:
            saved.layers.append({name: t.alloc(n, f"layer {i} {name}") for name, n in saved_tensors})
    last = hidden
    saved.final_norm = _allocs(t, final_norm_tensors(job))
    t.free(last)
    saved.casts += _casts(t, state, [name for name in ("norm", "lm_head") if name in params])
    logits = t.alloc(BF16 * T * m.vocab, "logits [B*S, V] bf16")
    upcast = t.alloc(FP32 * T * m.vocab, "logits fp32")
    saved.log_softmax = t.alloc(FP32 * T * m.vocab, "log-softmax fp32")
    t.free(upcast, logits)
    return saved


def backward(t: Trace, state: SftState, saved: Saved) -> None:
    """The loss, lm_head and the final norm, then the layers in reverse (sft_layer_events), each
    passing the gradient of its input to the next; the embedding's gradient last."""
    job = state.job
    m = job.model
    head = "lm_head" if lm_head_params(m) else "embed_tokens"
    grad = _loss_backward(t, state, saved, head)
    layer_params, saved_sizes = state.layer_params, dict(layer_saved_tensors(job))
    for i in reversed(range(m.layers)):
        names = {name.split(".", 2)[2]: (name, n) for name, n in layer_params[i]}

        def weight_grad(short: str, names=names) -> None:
            accumulate(t, state, *names[short])

        if job.spec.ac:
            kept = layers.recompute(t, job, i, saved_sizes)
            grad = layers.layer_backward(t, job, i, kept, grad, weight_grad, layer_input=(saved.inputs[i],))
        else:
            grad = layers.layer_backward(t, job, i, saved.layers[i], grad, weight_grad)
    accumulate(t, state, "embed_tokens", m.vocab * m.hidden)  # embedding_dense_backward, after every layer
    t.free(grad, *saved.once, *saved.casts)


def _loss_backward(t: Trace, state: SftState, saved: Saved, head: str) -> int:
    """cross_entropy's nll and log-softmax backward in fp32 beside the saved log-softmax
    (sft_terms.backward_logits_bytes), the cast back to bf16, lm_head's weight gradient then its
    input's, the final norm's backward; returns the gradient of the last layer's output."""
    job = state.job
    m, T = job.model, job.spec.micro_batch * job.spec.seq
    entries, row = T * m.vocab, BF16 * m.hidden * T
    grad_out = t.alloc(FP32 * entries, "grad of log-softmax output")
    grad_in = t.alloc(FP32 * entries, "grad of logits fp32")
    t.free(grad_out, saved.log_softmax)
    grad_bf16 = t.alloc(BF16 * entries, "grad of logits bf16")
    t.free(grad_in)
    accumulate(t, state, head, m.vocab * m.hidden)
    grad_hidden = t.alloc(row, "grad of final norm out")
    upcast, cast, out = saved.final_norm
    t.free(grad_bf16, out)
    return layers.norm_backward(t, grad_hidden, upcast, cast, row, "final norm",
                                lambda: accumulate(t, state, "norm", dict(state.params)["norm"]))


def optimizer_step(t: Trace, state: SftState, first: bool) -> None:
    """MasterWeightAdamW (mixed, bf16-master) or torch's fused AdamW: moments made in step 1 for
    every tensor, then one kernel; zero_grad(set_to_none) frees the grads. bf16-master a
    parameter at a time (layout.steps_per_param, param_steps.py): each one's copy, its grad
    dropped, its moments (step 1), the copy dropped."""
    recipe = state.recipe
    if first and recipe.master and not state.masters:
        state.masters = [t.alloc(state.recipe.master * n, f"master {name}") for name, n in state.params]
    if steps_per_param(state.job.spec):
        for name, n in param_steps.order(state.params):
            copy = t.alloc(FP32 * n, f"fp32 grad copy {name}")
            t.free(state.grads.pop(name))
            if first:
                state.moments += _moments(t, state, name, n)
            t.free(copy)
    else:
        copies = [t.alloc(FP32 * n, f"fp32 grad copy {name}") for name, n in state.params] if recipe.grad_copy else []
        if first:
            state.moments = [key for name, n in state.params for key in _moments(t, state, name, n)]
        t.free(*copies)
    t.free(*state.grads.values())
    state.grads.clear()


def _moments(t: Trace, state: SftState, name: str, n: int) -> list[int]:
    per_moment = state.recipe.moments // 2
    return [t.alloc(per_moment * n, f"{moment} {name}") for moment in ("exp_avg", "exp_avg_sq")]


def build(job: Job) -> StepEvents:
    """Load, step 1 and a steady step of an sft `job` (unsupported(job) must be None)."""
    reason = unsupported(job)
    if reason:
        raise ValueError(reason)
    state = SftState(job, TrainedState(job.spec, count_params(job.model).total, 0, 1), parameters(job))
    t = Trace()
    t.begin("load")
    load(t, state)

    def micro_step(label: str) -> None:
        t.begin(f"{label}.forward")
        saved = forward(t, state)
        t.begin(f"{label}.backward")
        backward(t, state, saved)

    return write_steps(t, job, micro_step, lambda first: optimizer_step(t, state, first=first))
