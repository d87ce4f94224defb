"""The draft's forward and backward as ordered allocations and frees (step_events.py writes the rest).

The TTT unroll of trainer/draft.py, one decoder layer per step, with trainer/head_loss.py's
fused head (lean) or trainer/loss.py's plain_step_loss, flex, split or sdpa attention.
Each step saves, in the order it makes them (draft_terms.py lists the same bytes):
embedding, two rstds, the normed concatenation, roped q, the keys and values of steps 0..k
(split: its own roped key and value, which later steps read without copying), (sdpa's bool
mask), the kernel's output and logsumexp, the o_proj input, the hidden after
attention, an rstd, the MLP input, gate and up (plain: gate, silu, up, product), the layer
output, the final norm's rstd and output, and the loss's rows (plain: its fp32 log-softmax).
With the embedding's half of q/k/v projected once per unroll (trainer/embedding_projection.py)
a step saves neither its embedding nor the input norm's rstd: the unroll's projection P is made
before step 0, its fp32 gradient G at step L-1's q/k/v backward, and step 0's makes the
embedding's half of the weight gradients from G.

Backward runs the steps in reverse, as autograd's ready queue does (higher sequence numbers
first): step k's head and final norm, its MLP, attention, projections and norms; the gradient of
its input hidden carries into step k-1. The gradients of earlier steps' keys and values that
step L-1's attention makes are slices of one tensor each, which they keep whole until step L-2
adds its own into new tensors (autograd cannot add in place into a slice); after that the sums
are added to in place. The split attention's backward makes one gradient per step's key and value:
the first to arrive for a step is kept, later ones are added into it in place.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from fitplan.estimator import draft_terms, fsdp_events
from fitplan.estimator.step_trace import (
    State,
    Trace,
    accumulate_grad,
    keep_grad,
    keep_step_grad,
    loop_chunks,
    step_grad,
    step_grad_buffer,
)
from fitplan.layout import (
    fused_norms,
    head_grads_in_forward,
    lean_draft,
    projects_embedding_once,
    recomputes_mlp,
)
from fitplan.units import BF16, FP32

INDEX = 8  # int64


@dataclass
class Saved:
    """What the draft forward leaves for backward (keys of the trace)."""

    rope: tuple[int, int]
    fc_out: int
    steps: list[dict[str, int]] = field(default_factory=list)
    casts: list[int] = field(default_factory=list)
    held: dict[int, list[int]] = field(default_factory=dict)  # step -> its roped key and value
    head_grad: int | None = None  # the head weight's gradient, made in forward (_in_forward)
    projection: list[int] | None = None  # the embedding's half of q/k/v over the unroll, per projection
    projection_grad: list[int] | None = None  # its fp32 gradient, from the first q/k/v backward call


def _lean(state: State) -> bool:
    return lean_draft(state.job.spec)


def _fused(state: State) -> bool:
    """Norms fused with their projections (trainer/norm_project.py), the final one in the head."""
    return fused_norms(state.job)


def _in_forward(state: State) -> bool:
    """The head makes its gradients in forward (trainer/head_loss.py _HeadSoftCEGradInForward)."""
    return head_grads_in_forward(state.job)


def _split(state: State) -> bool:
    """The split TTT attention (trainer/ttt_attention.py): each step's keys kept once."""
    return state.job.spec.attention_impl == "split"


def _projected_once(state: State) -> bool:
    """The embedding's half of q/k/v made once per unroll (trainer/embedding_projection.py)."""
    return projects_embedding_once(state.job)


def draft_forward(t: Trace, state: State) -> Saved:
    """trainer/draft.py Eagle3Draft.unroll under trainer/loss.py unroll_loss."""
    z = state.sizes
    if state.sharded is not None:
        fsdp_events.gather_all(t, state)
    # fp32-autocast: the bf16 copy of each weight, cached at its first use and saved for backward
    casts = [t.alloc(n * state.recipe.cast, f"bf16 cast {name}") for name, n in state.params]
    rope = (t.alloc(BF16 * z.S * z.d, "rope cos"), t.alloc(BF16 * z.S * z.d, "rope sin"))
    saved = Saved(rope, t.alloc(BF16 * z.h * z.T, "fc output"), casts=[c for c in casts if c is not None])
    if _projected_once(state):
        saved.projection = _embedding_projection(t, state)
    for k in range(z.L):
        step: dict[str, int] = {} if _projected_once(state) else {"emb": t.alloc(BF16 * z.h * z.T, "embedding")}
        _layer_forward(t, state, k, step, saved)
        if _in_forward(state):
            _loss_forward_with_grads(t, state, step, saved, last=k == z.L - 1)
        else:
            _loss_forward(t, state, step)
        saved.steps.append(step)
    # the unroll's lists go; a checkpointed step's inputs still hold the keys and values before it
    for k in [k for k in saved.held if not state.job.spec.ac or k == z.L - 1]:
        t.free(*saved.held.pop(k))
    return saved


def _embedding_projection(t: Trace, state: State) -> list[int]:
    """P = norm(embedding) @ the emb columns of q/k/v over the unroll's S + L - 1 tokens, one
    tensor per projection: the embedding gathered, normalised (the gather let go), then each
    product (its emb columns cast to bf16 first where the weights are fp32)."""
    rows, h = draft_terms.projection_rows(state.job), state.sizes.h
    emb = t.alloc(BF16 * h * rows, "unroll's embedding")
    normed = t.alloc(BF16 * h * rows, "unroll's normed embedding")
    t.free(emb)
    products = []
    for name, width in draft_terms.qkv_widths(state.job).items():
        cast = t.alloc(state.recipe.cast * width * h, f"emb columns of {name}_proj in bf16")
        products.append(t.alloc(BF16 * width * rows, f"embedding projection P ({name})"))
        t.free(cast)
    t.free(normed)
    return products


# What a step saves for its backward in its attention and in its MLP block; a checkpointed
# step (trainer/draft.py checkpoint_layer) saves none of it and drops each when it goes out of use.
ATTENTION_SAVED = ("rstd_in", "rstd_hidden", "x", "q", "keys", "values", "mask", "out", "lse", "o_in")
MLP_SAVED = ("hidden_attn", "rstd_post", "mlp_in", "gate", "silu", "up", "product")


def _layer_forward(t: Trace, state: State, k: int, step: dict[str, int], saved: Saved) -> None:
    """One TTT step's decoder layer and final norm; its roped key and value go to `saved.held`."""
    z = state.sizes
    row = BF16 * z.h * z.T
    own = _attention_forward(t, state, k, step)
    if _split(state) and not state.job.spec.ac:  # its kernel keeps them to its backward
        step["keys"], step["values"] = own
    else:
        saved.held[k] = own
    if state.job.spec.ac:
        t.free(*(step.pop(name) for name in ATTENTION_SAVED if name in step))
    _mlp_forward(t, state, step)
    mlp_out = t.alloc(row, "MLP output")
    step["hidden_out"] = t.alloc(row, "layer output")
    t.free(mlp_out)
    if state.job.spec.ac:
        t.free(*(step.pop(name) for name in MLP_SAVED if name in step))
    if _fused(state):  # the fused head normalises the layer output itself
        return
    step["rstd_final"] = t.alloc(FP32 * z.T, "rstd")
    step["normed"] = t.alloc(row, "final norm output")


def _attention_forward(t: Trace, state: State, k: int, step: dict[str, int]) -> list[int]:
    """The input norms, the attention and its residual, up to the hidden after attention.
    Returns the roped key and the value (the unroll's lists hold them)."""
    z = state.sizes
    row, q_row, kv_row = BF16 * z.h * z.T, BF16 * z.H * z.d * z.T, BF16 * z.Hkv * z.d * z.T
    rstd = FP32 * z.T
    if _projected_once(state):  # the hidden's half, P's rows added in place
        step["rstd_hidden"] = t.alloc(rstd, "rstd")
        normed_hidden = t.alloc(row, "normed hidden")
        q, key, value = t.alloc(q_row, "q"), t.alloc(kv_row, "k"), t.alloc(kv_row, "v")
        t.free(normed_hidden)
    else:
        q, key, value = _joined_projections(t, state, step)
    step["q"] = t.alloc(q_row, "roped q")
    t.free(q)
    roped_k = t.alloc(kv_row, "roped k")
    t.free(key)
    if not _split(state):  # the concatenations the kernel reads and saves
        step["keys"] = t.alloc(kv_row * (k + 1), "keys of steps 0..k")
        step["values"] = t.alloc(kv_row * (k + 1), "values of steps 0..k")
    if state.job.spec.attention_impl == "sdpa":  # a dense bool mask [S, (k+1)*S]
        step["mask"] = t.alloc(z.S * z.S * (k + 1), "sdpa bool mask")
    step["out"] = t.alloc(q_row, "attention output")
    step["lse"] = t.alloc(FP32 * z.H * z.T, "logsumexp")
    o_in = t.alloc(q_row, "o_proj input")
    attn = t.alloc(row, "o_proj output")
    if _fused(state):  # o_proj keeps the kernel's own output instead
        t.free(o_in)
    else:
        step["o_in"] = o_in
    step["hidden_attn"] = t.alloc(row, "hidden after attention")
    t.free(attn)
    return [roped_k, value]


def _joined_projections(t: Trace, state: State, step: dict[str, int]) -> tuple[int, int, int]:
    """cat(norm(embedding), norm(hidden)) projected by q, k and v: the concatenation saved
    (plain) or made again in backward (fused norms)."""
    z = state.sizes
    row, q_row, kv_row = BF16 * z.h * z.T, BF16 * z.H * z.d * z.T, BF16 * z.Hkv * z.d * z.T
    step["rstd_in"] = t.alloc(FP32 * z.T, "rstd")
    normed_emb = t.alloc(row, "normed embedding")
    step["rstd_hidden"] = t.alloc(FP32 * z.T, "rstd")
    normed_hidden = t.alloc(row, "normed hidden")
    joined = t.alloc(2 * row, "cat(embedding, hidden)")
    t.free(normed_emb, normed_hidden)
    q, key, value = t.alloc(q_row, "q"), t.alloc(kv_row, "k"), t.alloc(kv_row, "v")
    if _fused(state):  # made again in backward
        t.free(joined)
    else:
        step["x"] = joined
    return q, key, value


def _mlp_forward(t: Trace, state: State, step: dict[str, int], recompute: bool = False) -> None:
    """The post-attention norm and the MLP. Lean (trainer/lean_ops.py SwiGLUDown): gate and up
    saved, the product transient (its compiled kernel's output; the estimator's instant has it
    beside them, not the MLP output). Plain: gate, silu(gate), up and the product, all saved.
    A checkpoint's recomputation stops once the last saved tensor is made again."""
    z = state.sizes
    wide = BF16 * z.I * z.T
    step["rstd_post"] = t.alloc(FP32 * z.T, "rstd")
    if recomputes_mlp(state.job):  # trainer/recompute_mlp.py: nothing of the MLP kept but the rstd
        normed = t.alloc(BF16 * z.h * z.T, "MLP input")
        gate, up = t.alloc(wide, "gate"), t.alloc(wide, "up")
        t.free(normed)
        t.free(t.alloc(wide, "SwiGLU product"), gate, up)
        return
    step["mlp_in"] = t.alloc(BF16 * z.h * z.T, "MLP input")
    step["gate"] = t.alloc(wide, "gate")
    if _lean(state):
        step["up"] = t.alloc(wide, "up")
        if _fused(state):  # the norm's output, made again in backward
            t.free(step.pop("mlp_in"))
        if not recompute:
            t.free(t.alloc(wide, "SwiGLU product"))
        return
    step["silu"] = t.alloc(wide, "silu(gate)")
    step["up"] = t.alloc(wide, "up")
    step["product"] = t.alloc(wide, "SwiGLU product")


def recompute(t: Trace, state: State, k: int, step: dict[str, int]) -> None:
    """A checkpointed step's layer run again in backward (its inputs kept, non-reentrant
    checkpoint with early stop): what it saves comes back; its outputs do not (the split
    attention saves its own key and value: they stay to its backward)."""
    own = _attention_forward(t, state, k, step)
    if _split(state):
        step["keys"], step["values"] = own
    else:
        t.free(*own)
    _mlp_forward(t, state, step, recompute=True)


def _loss_forward(t: Trace, state: State, step: dict[str, int]) -> None:
    """Lean: the counted rows (two int64 per position), then each chunk's bf16 logits.
    Plain: bf16 logits, the fp32 log-softmax (saved) and the fp32 product the loss sums."""
    z, job = state.sizes, state.job
    if _lean(state):
        step["rows"] = t.alloc(2 * INDEX * z.T, "counted rows")
        for rows in _chunks(job):
            t.free(t.alloc(draft_terms.HEAD_FORWARD_BYTES_PER_LOGIT * z.Vd * rows, "head chunk logits"))
        return
    logits = t.alloc(BF16 * z.Vd * z.T, "draft logits")
    step["logp"] = t.alloc(FP32 * z.Vd * z.T, "log-softmax fp32")
    t.free(t.alloc(FP32 * z.Vd * z.T, "p * log-softmax"))
    t.free(logits)


def _loss_forward_with_grads(t: Trace, state: State, step: dict[str, int], saved: Saved, last: bool) -> None:
    """The head making its gradients in forward: the counted rows, the hidden's gradient (kept),
    the head weight's gradient at the first step (the unroll's sum), then each chunk's final-norm
    output [rows, h], its bf16 logits (their gradient written over them), the hidden's gradient
    the head GEMM makes and the one the norm's backward makes of it, all gone before the next
    chunk's. Its rows go with it; the last step's layer output, which no later step keeps, goes
    after it."""
    z, job = state.sizes, state.job
    rows = t.alloc(2 * INDEX * z.T, "counted rows")
    step["grad_normed"] = t.alloc(BF16 * z.h * z.T, "grad of layer output (made in forward)")
    if saved.head_grad is None:
        saved.head_grad = t.alloc(state.numel["lm_head"] * state.recipe.param, "grad of lm_head (summed in forward)")
    for n in _chunks(job):
        normed = t.alloc(BF16 * z.h * n, "head chunk final-norm output")
        logits = t.alloc(draft_terms.HEAD_FORWARD_GRAD_BYTES_PER_LOGIT * z.Vd * n, "head chunk logits (grad over them)")
        grad_rows = t.alloc(BF16 * z.h * n, "head chunk hidden grad")
        t.free(grad_rows, t.alloc(BF16 * z.h * n, "head chunk hidden grad through the norm"), logits, normed)
    t.free(rows)
    if last:
        t.free(step.pop("hidden_out"))


def _chunks(job) -> list[int]:
    """Rows of the chunks the fused head scores (every position counted: the upper bound)."""
    return loop_chunks(job.spec.micro_batch * job.spec.seq, draft_terms.head_chunk_rows(job))


# ------------------------------------------------------------------ backward


@dataclass
class Pending:
    """Gradients in flight between steps: of the hidden stream, and of earlier steps' keys and values."""

    hidden: int | None = None
    kv_whole: list[int] = field(default_factory=list)  # step L-1's key and value gradients
    kv_sums: dict[int, list[int]] = field(default_factory=dict)  # step -> its summed k and v gradients


def draft_backward(t: Trace, state: State, saved: Saved) -> None:
    """(loss / accum).backward(): the steps from the last to the first, then fc."""
    pending = Pending()
    unit = _fsdp_unit(t, state)
    for k in reversed(range(state.sizes.L)):
        step = saved.steps[k]
        with unit("lm_head"):
            if _in_forward(state):  # its gradients are made: the last call hands the head's sum over
                if k == 0:
                    keep_grad(t, state, "lm_head", saved.head_grad)
                step_grad(t, state, "norm")
            else:
                _head_backward(t, state, step)
            if _fused(state):  # one FSDP unit with the head
                _final_norm_backward(t, state, step, pending)
        if not _fused(state):
            with unit("norm"):
                _final_norm_backward(t, state, step, pending)
        with unit("midlayer"):
            if state.job.spec.ac:
                recompute(t, state, k, step)
            _mlp_backward(t, state, step)
            _attention_backward(t, state, step, k, pending)
            if _projected_once(state):
                _projected_input_backward(t, state, step, k, saved)
            else:
                _input_backward(t, state, step, k, pending)
        # the step's checkpoint held the keys and values of the step before as inputs
        t.free(*saved.held.pop(k - 1, []))
    t.free(saved.fc_out)  # saved by step 0's hidden norm
    accumulate_grad(t, state, "fc")  # aux needs no gradient: only fc's weight
    if state.sharded is not None:
        fsdp_events.end_backward(t, state)
    t.free(pending.hidden, *pending.kv_whole, *saved.rope, *saved.casts)


def _fsdp_unit(t: Trace, state: State):
    """A context for one call's backward of an FSDP unit: gathered again before (pre_backward),
    reduced and resharded after (post_backward); nothing without FSDP."""

    @contextmanager
    def call(name: str):
        if state.sharded is not None:
            fsdp_events.gather(t, state, name)
        yield
        if state.sharded is not None:
            fsdp_events.post_backward(t, state, name)

    return call


def _head_backward(t: Trace, state: State, step: dict[str, int]) -> int:
    """The step's loss backward: lean, the hidden's gradient [T, h] and the head weight's
    gradient made whole first, then per chunk the recomputed logits and their gradient; plain,
    the fp32 gradients of the log-softmax's output and input, then the matmul's."""
    z, job = state.sizes, state.job
    row = BF16 * z.h * z.T
    if _fused(state):  # the head's input is the layer output: its gradient is that of the layer output
        step["grad_normed"] = t.alloc(row, "grad of layer output (head's)")
        weight_grad = step_grad_buffer(t, state, "lm_head")
        for rows in _chunks(job):
            per = draft_terms.HEAD_BACKWARD_BYTES_PER_LOGIT // 2 * z.Vd * rows
            t.free(t.alloc(per, "recomputed chunk logits"), t.alloc(per, "chunk logits grad"))
        keep_step_grad(t, state, "lm_head", weight_grad)
        step_grad(t, state, "norm")
        t.free(step.pop("rows"))
        return step["grad_normed"]
    if _lean(state):
        step["grad_normed"] = t.alloc(row, "grad of final norm output")
        weight_grad = t.alloc(state.numel["lm_head"] * state.recipe.param, "head weight grad (zeros_like)")
        for rows in _chunks(job):
            per = draft_terms.HEAD_BACKWARD_BYTES_PER_LOGIT // 2 * z.Vd * rows
            logits, grad = t.alloc(per, "recomputed chunk logits"), t.alloc(per, "chunk logits grad")
            t.free(logits, grad)
        keep_grad(t, state, "lm_head", weight_grad)
        t.free(step.pop("rows"), step.pop("normed"))
        return step["grad_normed"]
    grad_logp = t.alloc(FP32 * z.Vd * z.T, "grad of log-softmax output")
    grad_logits = t.alloc(FP32 * z.Vd * z.T, "grad of logits")
    t.free(grad_logp, step.pop("logp"))
    step["grad_normed"] = t.alloc(row, "grad of final norm output")
    accumulate_grad(t, state, "lm_head")
    t.free(grad_logits, step.pop("normed"))
    return step["grad_normed"]


def _final_norm_backward(t: Trace, state: State, step: dict[str, int], pending: Pending) -> None:
    """The final norm's input gradient joins the gradient of the layer output that the step
    after this one sent back (added in place), or starts it (the last step)."""
    z = state.sizes
    if _fused(state):  # the head's gradient is the layer output's (_head_backward)
        grad = step.pop("grad_normed")
        if "hidden_out" in step:  # the last step's went in forward when the head made its gradients there
            t.free(step.pop("hidden_out"))
    else:
        grad = t.alloc(BF16 * z.h * z.T, "grad of layer output")
        t.free(step.pop("grad_normed"), step.pop("rstd_final"), step.pop("hidden_out"))
        accumulate_grad(t, state, "norm")
    if pending.hidden is None:
        pending.hidden = grad
    else:
        t.free(grad)


def _mlp_backward(t: Trace, state: State, step: dict[str, int]) -> None:
    z = state.sizes
    wide, row = BF16 * z.I * z.T, BF16 * z.h * z.T
    if recomputes_mlp(state.job):
        _recomputed_mlp_backward(t, state, step)
        return
    if _lean(state):  # SwiGLUDown.backward: the product's gradient, then one pass makes the
        # product again, d up, and d gate over the product's gradient (trainer/swiglu_kernel.py):
        # gate, up and those three at its peak, while down's weight gradient is made
        grad_gate = t.alloc(wide, "grad of product, then of gate")
        product, grad_up = t.alloc(wide, "recomputed SwiGLU product"), t.alloc(wide, "grad of up")
        step_grad(t, state, "down_proj")
        t.free(product, step.pop("gate"), step.pop("up"))
    else:
        grad_product = t.alloc(wide, "grad of product")
        accumulate_grad(t, state, "down_proj")
        t.free(step.pop("product"))
        grad_silu, grad_up = t.alloc(wide, "grad of silu"), t.alloc(wide, "grad of up")
        t.free(grad_product, step.pop("silu"), step.pop("up"))
        grad_gate = t.alloc(wide, "grad of gate")
        t.free(grad_silu, step.pop("gate"))
    if _fused(state):
        _norm_project_backward(t, state, step, [grad_gate, grad_up], ("gate_proj", "up_proj"),
                               [("post_attention_layernorm", "rstd_post")])
        t.free(step.pop("hidden_attn"))
        return
    grad_in = t.alloc(row, "grad of MLP input")
    accumulate_grad(t, state, "up_proj")
    t.free(grad_up)
    t.free(t.alloc(row, "grad of MLP input (gate's)"))
    accumulate_grad(t, state, "gate_proj")
    t.free(grad_gate, step.pop("mlp_in"))
    normed_grad = t.alloc(row, "grad of hidden after attention (norm's)")
    accumulate_grad(t, state, "post_attention_layernorm")
    t.free(grad_in, step.pop("rstd_post"), normed_grad, step.pop("hidden_attn"))


def _recomputed_mlp_backward(t: Trace, state: State, step: dict[str, int]) -> None:
    """trainer/recompute_mlp.py backward: the norm's output, gate and up made again; the
    product's gradient, then the product again and both input gradients in one pass (d gate over
    the product's gradient), down's weight gradient from the product; gate's and up's weight
    gradients, the norm's input gradient; the four weight gradients are returned together."""
    z = state.sizes
    wide, row = BF16 * z.I * z.T, BF16 * z.h * z.T
    weight_grads = {}
    normed = t.alloc(row, "norm output (again)")
    gate, up = t.alloc(wide, "gate (again)"), t.alloc(wide, "up (again)")
    weight_grads["down_proj"] = step_grad_buffer(t, state, "down_proj")
    grad_gate = t.alloc(wide, "grad of product, then of gate")
    product, grad_up = t.alloc(wide, "recomputed SwiGLU product"), t.alloc(wide, "grad of up")
    t.free(product, gate, up)
    for name in ("gate_proj", "up_proj"):
        weight_grads[name] = step_grad_buffer(t, state, name)
    t.free(normed)
    grad_normed = t.alloc(row, "grad of the norm output")
    t.free(t.alloc(row, "grad of the norm output (up's)"), grad_gate, grad_up)
    t.free(t.alloc(row, "grad of post_attention_layernorm's input"))
    weight_grads["post_attention_layernorm"] = step_grad_buffer(t, state, "post_attention_layernorm")
    t.free(grad_normed, step.pop("rstd_post"))
    for name, incoming in weight_grads.items():
        keep_step_grad(t, state, name, incoming)
    t.free(step.pop("hidden_attn"))


def _attention_backward(t: Trace, state: State, step: dict[str, int], k: int, pending: Pending) -> None:
    z = state.sizes
    q_row, kv_row = BF16 * z.H * z.d * z.T, BF16 * z.Hkv * z.d * z.T
    if _fused(state):  # o_proj's input made again from the kernel's output for the weight's gradient
        flat = t.alloc(q_row, "o_proj input (again)")
        step_grad(t, state, "o_proj")
        t.free(flat)
        grad_o_in = t.alloc(q_row, "grad of attention output")
    else:
        grad_o_in = t.alloc(q_row, "grad of o_proj input")
        accumulate_grad(t, state, "o_proj")
        t.free(step.pop("o_in"))
    split = _split(state)
    grad_q, kv_grads = (_split_kernel_grads if split else _concatenated_kernel_grads)(t, state, k)
    t.free(grad_o_in, *(step.pop(name) for name in ("q", "keys", "values", "out", "lse")), step.pop("mask", None))
    own, after = (_split_kv_sums if split else _kv_sums)(t, state, k, pending, kv_grads)
    step["grad_q0"] = t.alloc(q_row, "grad of q (rope backward)")
    step["grad_k0"] = t.alloc(kv_row, "grad of k (rope backward)")
    step["grad_v0"] = t.alloc(kv_row, "grad of v")
    t.free(grad_q, *own, *after)


def _concatenated_kernel_grads(t: Trace, state: State, k: int) -> tuple[int, list[int]]:
    """A kernel over the concatenated keys of steps 0..k: its gradients of q, of the keys and of
    the values (k + 1 steps' each)."""
    z = state.sizes
    q_row, kv_row = BF16 * z.H * z.d * z.T, BF16 * z.Hkv * z.d * z.T
    grad_q = t.alloc(q_row, "grad of roped q")
    return grad_q, [t.alloc(kv_row * (k + 1), "grad of keys"), t.alloc(kv_row * (k + 1), "grad of values")]


def _kv_sums(t: Trace, state: State, k: int, pending: Pending, kv_grads: list[int]) -> tuple[list[int], list[int]]:
    """The gradients of steps 0..k's keys and values that step k's attention adds: step L-1's are
    slices of its two tensors (kept whole); step L-2 sums them with its own into new tensors,
    later steps add in place. Returns what step k's own k and v backward reads, and the
    concatenations' gradients to free after it (not step L-1's, whose slices the earlier steps keep)."""
    L, kv_row = state.sizes.L, BF16 * state.sizes.Hkv * state.sizes.d * state.sizes.T
    if k == L - 1:
        pending.kv_whole = kv_grads
        return [], []
    if k == L - 2:
        pending.kv_sums = {i: [t.alloc(kv_row, "summed k grad"), t.alloc(kv_row, "summed v grad")] for i in range(k + 1)}
        t.free(*pending.kv_whole)
        pending.kv_whole = []
    return pending.kv_sums.pop(k), kv_grads


def _split_kernel_grads(t: Trace, state: State, k: int) -> tuple[int, list[list[int]]]:
    """trainer/ttt_attention.py's backward: the causal kernel's gradients of q and of step 0's key
    and value, then (k > 0) the diagonal's (trainer/ttt_diagonal_kernel.py): a new q gradient and
    its fp32 probabilities and score gradients per later key, head and position, then one key and
    value gradient per later step; the scratch and the causal q gradient go when it returns.
    Returns q's gradient and the key and value gradients of steps 0..k."""
    z = state.sizes
    q_row, kv_row = BF16 * z.H * z.d * z.T, BF16 * z.Hkv * z.d * z.T
    grad_q = t.alloc(q_row, "grad of roped q (causal kernel)")
    pairs = [[t.alloc(kv_row, "grad of step 0's key"), t.alloc(kv_row, "grad of step 0's value")]]
    if k:
        merged = t.alloc(q_row, "grad of roped q")
        scratch = [t.alloc(FP32 * k * z.H * z.T, name) for name in ("diagonal probabilities", "diagonal score grads")]
        pairs += [[t.alloc(kv_row, "grad of a diagonal key"), t.alloc(kv_row, "grad of a diagonal value")]
                  for _ in range(k)]
        t.free(*scratch, grad_q)
        grad_q = merged
    return grad_q, pairs


def _split_kv_sums(t: Trace, state: State, k: int, pending: Pending,
                   pairs: list[list[int]]) -> tuple[list[int], list[int]]:
    """Autograd's sum per step of the split attention's key and value gradients: a step's first
    arriving pair is kept, later ones are added into it in place. Returns step k's (its own k
    and v backward reads them, to free after) and nothing more to free."""
    for j, pair in enumerate(pairs):
        if j in pending.kv_sums:
            t.free(*pair)
        else:
            pending.kv_sums[j] = pair
    return pending.kv_sums.pop(k), []


def _input_backward(t: Trace, state: State, step: dict[str, int], k: int, pending: Pending) -> None:
    """q/k/v projections into the gradient of the concatenation, then the two input norms; the
    hidden norm's input gradient is added into the pending hidden gradient (the residual's)."""
    z = state.sizes
    row = BF16 * z.h * z.T
    if _fused(state):
        grads = [step.pop(name) for name in ("grad_q0", "grad_k0", "grad_v0")]
        _norm_project_backward(t, state, step, grads, ("q_proj", "k_proj", "v_proj"),
                               [("input_layernorm", "rstd_in"), ("hidden_norm", "rstd_hidden")])
        t.free(step.pop("emb"))
        return
    grad_x = t.alloc(2 * row, "grad of cat(embedding, hidden)")
    for proj, grad in (("q_proj", "grad_q0"), ("k_proj", "grad_k0"), ("v_proj", "grad_v0")):
        if proj != "q_proj":
            t.free(t.alloc(2 * row, f"grad of cat ({proj}'s)"))
        accumulate_grad(t, state, proj)
        t.free(step.pop(grad))
    t.free(step.pop("x"))
    grad_hidden = t.alloc(row, "grad of hidden input (norm's)")
    accumulate_grad(t, state, "hidden_norm")
    t.free(step.pop("rstd_hidden"))
    grad_emb = t.alloc(row, "grad of embedding (discarded)")
    accumulate_grad(t, state, "input_layernorm")
    t.free(grad_emb, step.pop("rstd_in"), step.pop("emb"), grad_x, grad_hidden)


def _projected_input_backward(t: Trace, state: State, step: dict[str, int], k: int, saved: Saved) -> None:
    """trainer/embedding_projection.py backward of step k: its q/k/v gradients added into G (made
    at the first call), the hidden's half (its norm output made again, the weights' hidden columns
    summed, the gradient of the normed hidden, then of the hidden, added to the residual's), and at
    the last call (step 0) the embedding's half from G."""
    z = state.sizes
    row = BF16 * z.h * z.T
    if saved.projection_grad is None:
        saved.projection_grad = [t.alloc(FP32 * width * draft_terms.projection_rows(state.job),
                                         f"embedding projection G ({name})")
                                 for name, width in draft_terms.qkv_widths(state.job).items()]
    incoming = [step.pop(name) for name in ("grad_q0", "grad_k0", "grad_v0")]
    normed = t.alloc(row, "norm output (again)")
    weight_grads = {"q_proj": step_grad_buffer(t, state, "q_proj")}
    grad_normed = t.alloc(row, "grad of the normed hidden")  # k's and v's added into it in place
    for name in ("k_proj", "v_proj"):
        weight_grads[name] = step_grad_buffer(t, state, name)
    t.free(normed)
    grad_hidden = t.alloc(row, "grad of hidden_norm's input")
    step_grad(t, state, "hidden_norm")
    t.free(grad_normed, step.pop("rstd_hidden"))
    if k == 0:
        _embedding_projection_backward(t, state, saved)
    t.free(grad_hidden, *incoming)
    for name, buffer in weight_grads.items():
        keep_step_grad(t, state, name, buffer)


def _embedding_projection_backward(t: Trace, state: State, saved: Saved) -> None:
    """The last call's embedding half: P goes, G is cast to bf16 (each projection's) and goes, the
    embedding is gathered and normalised again for the emb columns' weight gradients (added into
    the sums), then the normed embedding's gradient gives the input norm weight's."""
    rows, h = draft_terms.projection_rows(state.job), state.sizes.h
    t.free(*saved.projection)
    casts = [t.alloc(BF16 * width * rows, f"G in bf16 ({name})")
             for name, width in draft_terms.qkv_widths(state.job).items()]
    t.free(*saved.projection_grad)
    saved.projection = saved.projection_grad = None
    emb = t.alloc(BF16 * h * rows, "unroll's embedding (again)")
    normed = t.alloc(BF16 * h * rows, "unroll's normed embedding (again)")
    rstd = t.alloc(FP32 * rows, "rstd")
    t.free(normed)
    grad_normed = t.alloc(BF16 * h * rows, "grad of the unroll's normed embedding")
    t.free(*casts)
    accumulate_grad(t, state, "input_layernorm")
    t.free(emb, rstd, grad_normed)


def _norm_project_backward(t: Trace, state: State, step: dict[str, int], grads: list[int],
                           projections: tuple[str, ...], norms: list[tuple[str, str]]) -> None:
    """trainer/norm_project.py backward: the joined norm outputs made again, each projection's
    weight gradient and its input gradient (the first allocated, the others added in place),
    then each norm's backward; the incoming gradients go when it returns. The norms' input
    gradients join the residual stream's in place (the embedding's is discarded)."""
    row = BF16 * state.sizes.h * state.sizes.T
    width = len(norms) * row
    renormed = [t.alloc(row, "norm output (again)") for _ in norms]
    joined = t.alloc(width, "joined norm outputs (again)")
    t.free(*renormed)
    grad_joined = None
    weight_grads = {}
    for name in projections:  # returned together: all alive until the function returns
        weight_grads[name] = step_grad_buffer(t, state, name)
        part = t.alloc(width, f"grad of the joined input ({name}'s)")
        if grad_joined is None:
            grad_joined = part
        else:
            t.free(part)
    t.free(joined)
    for norm, rstd in norms:
        t.free(t.alloc(row, f"grad of {norm}'s input"))
        step_grad(t, state, norm)
        t.free(step.pop(rstd))
    t.free(grad_joined, *grads)
    for name, incoming in weight_grads.items():
        keep_step_grad(t, state, name, incoming)
