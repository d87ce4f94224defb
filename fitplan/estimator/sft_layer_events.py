"""One decoder layer of the sft step (trainer/sft_step.py: transformers' Llama/Qwen3 decoder layer
with SDPA) as ordered allocations and frees, for sft_events.py.

The order is the order of the real code: the ops of the layer as Python runs them, each output
freed when its last reference goes (a variable reassigned, a function returning, autograd
releasing a node's saved tensors after the node ran), as a CPU run of the same code under a
dispatch mode that logs every storage made and freed shows it. Sizes are per micro-batch of T
tokens. Where CUDA's kernels differ from CPU's, CUDA's are written: flash attention's backward
(mha_bwd) makes dq, dk, dv, softmax_d, an fp32 dq accumulator and, with grouped KV heads, dk and
dv expanded to every query head, and frees the last four before it returns.

- forward under checkpointing (nothing saved inside): every temporary freed after its last use;
- recompute (non-reentrant checkpoint, stopping once down_proj's input is saved): the tensors
  the layer saves (sft_events.layer_saved_tensors), with the temporaries made between them;
- backward: from down_proj back to the input norm, each matrix's weight gradient before its
  input gradient (mm's backward), each saved tensor freed after the node that saved it, the
  gradient of the layer's output passed on to the next layer down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fitplan.estimator import sft_terms
from fitplan.estimator.step_trace import Trace
from fitplan.layout import Job
from fitplan.units import BF16, FP32


@dataclass(frozen=True)
class LayerSizes:
    """Bytes of the layer's tensors over T tokens (bf16 unless named fp32)."""

    T: int
    row: int  # [T, h]
    wide: int  # [T, I]: the MLP's
    q: int  # [T, H*d]
    kv: int  # [T, Hkv*d]
    heads: int
    qk_norms: bool  # Qwen3 / Gemma 3: RMSNorm over each head of q and k

    @classmethod
    def of(cls, job: Job) -> LayerSizes:
        m, T = job.model, job.spec.micro_batch * job.spec.seq
        return cls(T=T, row=BF16 * T * m.hidden, wide=BF16 * T * sft_terms._mlp_width(job),
                   q=BF16 * T * m.heads * m.head_dim, kv=BF16 * T * m.kv_heads * m.head_dim, heads=m.heads,
                   qk_norms=m.model_type.startswith(("qwen3", "gemma3")))


# ------------------------------------------------------------------ RMSNorm and rotary


def norm_forward(t: Trace, n16: int, name: str) -> int:
    """transformers' RMSNorm without saving (checkpointed forward), over a bf16 input of n16
    bytes: the fp32 upcast, its square (freed after the mean), the normalized fp32, its bf16
    cast and the weight's product; returns the product."""
    upcast = t.alloc(2 * n16, f"{name} fp32")
    t.free(t.alloc(2 * n16, f"{name} squared"))
    normed = t.alloc(2 * n16, f"{name} normalized fp32")
    t.free(upcast)
    cast = t.alloc(n16, f"{name} normalized bf16")
    out = t.alloc(n16, f"{name} output")
    t.free(cast, normed)
    return out


def norm_saving(t: Trace, n16: int, name: str) -> tuple[int, int, int]:
    """The same with autograd saving: the fp32 upcast, the bf16 cast and the output are kept
    (sft_events.layer_saved_tensors' "<norm> fp32", "<norm> normed", "<norm> out"); returns
    the three keys."""
    upcast = t.alloc(2 * n16, f"{name} fp32")
    t.free(t.alloc(2 * n16, f"{name} squared"))
    normed = t.alloc(2 * n16, f"{name} normalized fp32")
    cast = t.alloc(n16, f"{name} normed")
    out = t.alloc(n16, f"{name} out")
    t.free(normed)
    return upcast, cast, out


def norm_backward(t: Trace, grad: int, upcast: int, cast: int, n16: int, name: str,
                  weight_grad: Callable[[], None], also_free: tuple[int | None, ...] = ()) -> int:
    """RMSNorm's backward from the gradient of its output (n16 bytes bf16): the weight's product
    (two bf16 gradients, one summed into the weight's), the cast back to fp32, the mul and pow
    backward of the normalization in fp32; frees the saved cast and upcast as their nodes run
    (with `also_free`, what the checkpoint held only for them); returns the input's gradient."""
    g_cast, g_weight = t.alloc(n16, f"{name} grad of cast"), t.alloc(n16, f"{name} grad times normed")
    t.free(cast)
    weight_grad()
    t.free(g_weight, grad)
    f1 = t.alloc(2 * n16, f"{name} grad fp32")
    t.free(g_cast)
    f2, f3 = t.alloc(2 * n16, f"{name} grad times rstd"), t.alloc(2 * n16, f"{name} grad times upcast")
    t.free(f2, f1)
    f4, f5, f6, f7 = (t.alloc(2 * n16, f"{name} pow backward {k}") for k in range(4))
    t.free(f6, f5, upcast, *also_free, f4)
    total = t.alloc(2 * n16, f"{name} grad of upcast")
    t.free(f3, f7)
    out = t.alloc(n16, f"{name} grad of input")
    t.free(total)
    return out


def rotary_forward(t: Trace, x: int | None, n: int, name: str) -> int:
    """x * cos + rotate_half(x) * sin over n bytes; x stays (its caller frees it)."""
    by_cos, half = t.alloc(n, f"{name} times cos"), t.alloc(n // 2, f"{name} negated half")
    rotated = t.alloc(n, f"{name} rotated")
    t.free(half)
    by_sin = t.alloc(n, f"{name} rotated times sin")
    t.free(rotated)
    out = t.alloc(n, f"{name} roped")
    t.free(by_cos, by_sin)
    return out


def rotary_backward(t: Trace, grad: int, n: int, name: str) -> int:
    """The same op's backward (slice_backward of rotate_half); frees `grad`."""
    by_sin, half = t.alloc(n, f"{name} grad times sin"), t.alloc(n // 2, f"{name} grad negated half")
    first = t.alloc(n, f"{name} slice backward")
    t.free(half)
    second = t.alloc(n, f"{name} slice backward 2")
    t.free(by_sin)
    rotated = t.alloc(n, f"{name} grad rotated")
    t.free(first, second)
    by_cos = t.alloc(n, f"{name} grad times cos")
    t.free(grad)
    out = t.alloc(n, f"{name} grad before rotary")
    t.free(rotated, by_cos)
    return out


# ------------------------------------------------------------------ forward and recompute


def checkpointed_forward(t: Trace, job: Job, i: int) -> int:
    """Layer i under checkpointing (nothing saved inside); returns its output [T, h]."""
    z, p = LayerSizes.of(job), f"layer {i}"
    normed = norm_forward(t, z.row, f"{p} input norm")
    q = t.alloc(z.q, f"{p} q")
    if z.qk_norms:  # q_norm runs on q_proj's output before k_proj runs
        q = _then_free(norm_forward(t, z.q, f"{p} q norm"), t, q)
    k = t.alloc(z.kv, f"{p} k")
    if z.qk_norms:
        k = _then_free(norm_forward(t, z.kv, f"{p} k norm"), t, k)
    v = t.alloc(z.kv, f"{p} v")
    roped = [rotary_forward(t, q, z.q, f"{p} q"), rotary_forward(t, k, z.kv, f"{p} k")]
    t.free(q, k)
    attention = t.alloc(z.q, f"{p} attention out")
    t.free(t.alloc(FP32 * z.T * z.heads, f"{p} attention lse"))
    projected = t.alloc(z.row, f"{p} o_proj out")
    t.free(attention, *roped, v, normed)
    mid = t.alloc(z.row, f"{p} residual after attention")
    t.free(projected)
    normed = norm_forward(t, z.row, f"{p} post norm")
    gate = t.alloc(z.wide, f"{p} gate")
    act = t.alloc(z.wide, f"{p} silu")
    t.free(gate)
    up = t.alloc(z.wide, f"{p} up")
    product = t.alloc(z.wide, f"{p} product")
    t.free(act, up)
    down = t.alloc(z.row, f"{p} down out")
    t.free(product, normed)
    out = t.alloc(z.row, f"{p} output")
    t.free(down, mid)
    return out


def _then_free(result: int, t: Trace, *keys: int | None) -> int:
    t.free(*keys)
    return result


def recompute(t: Trace, job: Job, i: int, saved_sizes: dict[str, int]) -> dict[str, int]:
    """Checkpointing's recomputation of layer i: the saved tensors by their layer_saved_tensors
    names (their keys), with the temporaries between them."""
    z, p = LayerSizes.of(job), f"layer {i} recomputed"
    kept: dict[str, int] = {}

    def keep(name: str) -> int:
        kept[name] = t.alloc(saved_sizes[name], f"{p} {name}")
        return kept[name]

    def norm(name: str, n16: int) -> int:
        """Keeps the upcast and the cast; returns the output (the layer's norms' outputs are
        saved by the projections after them, the per-head norms' only feed rotary)."""
        kept[f"{name} fp32"], kept[f"{name} normed"], out = norm_saving(t, n16, f"{p} {name}")
        return out

    kept["input norm out"] = norm("input norm", z.row)
    q = t.alloc(z.q, f"{p} q before rotary")
    if z.qk_norms:
        q = _then_free(norm("q norm", z.q), t, q)
    k = t.alloc(z.kv, f"{p} k before rotary")
    if z.qk_norms:
        k = _then_free(norm("k norm", z.kv), t, k)
    keep("v")
    roped_q, roped_k = rotary_forward(t, q, z.q, p + " q"), rotary_forward(t, k, z.kv, p + " k")
    kept["q"], kept["k"] = roped_q, roped_k
    t.free(q, k)
    keep("attention out, lse, rstd")
    projected = t.alloc(z.row, f"{p} o_proj out")
    mid = t.alloc(z.row, f"{p} residual after attention")
    t.free(projected)
    kept["post norm out"] = norm("post norm", z.row)
    for name in ("gate", "silu", "up", "product"):
        keep(name)
    t.free(mid)
    return kept


# ------------------------------------------------------------------ backward


def layer_backward(t: Trace, job: Job, i: int, s: dict[str, int], grad_out: int | None,
                   weight_grad: Callable[[str], None], layer_input: tuple[int | None, ...] = ()) -> int:
    """Layer i's backward from the gradient of its output; `s` its saved tensors (recomputed or
    kept from the forward), all freed on the way, with `layer_input` (what the checkpoint held);
    `weight_grad(name)` stores a parameter's gradient. Returns the gradient of the layer's input."""
    z, p = LayerSizes.of(job), f"layer {i}"
    grad_mid = _mlp_backward(t, z, p, s, grad_out, weight_grad)
    grad_q, grad_k, grad_v = _attention_backward(t, z, p, s, weight_grad)
    weight_grad("v_proj")
    grad_x = t.alloc(z.row, f"{p} grad through v_proj")
    t.free(grad_v)
    grad_k = _qk_norm_backward(t, z, s, grad_k, z.kv, p, "k")
    weight_grad("k_proj")
    through_k = t.alloc(z.row, f"{p} grad through k_proj")
    t.free(grad_k)
    summed = t.alloc(z.row, f"{p} grad of input norm out (v, k)")
    t.free(grad_x, through_k)
    grad_q = _qk_norm_backward(t, z, s, grad_q, z.q, p, "q")
    weight_grad("q_proj")
    through_q = t.alloc(z.row, f"{p} grad through q_proj")
    t.free(s["input norm out"], grad_q)
    grad_normed = t.alloc(z.row, f"{p} grad of input norm out")
    t.free(summed, through_q)
    grad_in = norm_backward(t, grad_normed, s["input norm fp32"], s["input norm normed"], z.row, f"{p} input norm",
                            lambda: None, also_free=layer_input)
    out = t.alloc(z.row, f"{p} grad of input")
    t.free(grad_mid, grad_in)
    return out


def _mlp_backward(t: Trace, z: LayerSizes, p: str, s: dict[str, int], grad_out: int | None,
                  weight_grad: Callable[[str], None]) -> int:
    """down_proj, the SwiGLU product, up_proj and gate_proj, the post-attention norm and the
    residual; returns the gradient of the residual after attention."""
    weight_grad("down_proj")
    grad_product = t.alloc(z.wide, f"{p} grad of product")
    t.free(s["product"])
    grad_act, grad_up = t.alloc(z.wide, f"{p} grad of silu"), t.alloc(z.wide, f"{p} grad of up")
    t.free(s["silu"], s["up"], grad_product)
    weight_grad("up_proj")
    through_up = t.alloc(z.row, f"{p} grad through up_proj")
    t.free(grad_up)
    grad_gate = t.alloc(z.wide, f"{p} grad of gate")
    t.free(s["gate"], grad_act)
    weight_grad("gate_proj")
    through_gate = t.alloc(z.row, f"{p} grad through gate_proj")
    t.free(s["post norm out"], grad_gate)
    grad_normed = t.alloc(z.row, f"{p} grad of post norm out")
    t.free(through_up, through_gate)
    grad_norm = norm_backward(t, grad_normed, s["post norm fp32"], s["post norm normed"], z.row, f"{p} post norm",
                              lambda: weight_grad("norms and biases"))
    grad_mid = t.alloc(z.row, f"{p} grad of residual after attention")
    t.free(grad_out, grad_norm)
    return grad_mid


def _attention_backward(t: Trace, z: LayerSizes, p: str, s: dict[str, int],
                        weight_grad: Callable[[str], None]) -> tuple[int, int, int]:
    """o_proj, flash attention's backward, rotary; returns the gradients of q and k before
    rotary and of v."""
    weight_grad("o_proj")
    grad_attention = t.alloc(z.q, f"{p} grad of attention out")
    dq, dk, dv = t.alloc(z.q, f"{p} dq"), t.alloc(z.kv, f"{p} dk"), t.alloc(z.kv, f"{p} dv")
    scratch = [t.alloc(FP32 * z.T * z.heads, f"{p} flash softmax_d"), t.alloc(2 * z.q, f"{p} flash dq accumulator fp32")]
    if z.kv != z.q:
        scratch += [t.alloc(z.q, f"{p} flash dk expanded"), t.alloc(z.q, f"{p} flash dv expanded")]
    t.free(*reversed(scratch))
    t.free(s["attention out, lse, rstd"], s["v"], s["q"], s["k"], grad_attention)
    grad_k = rotary_backward(t, dk, z.kv, f"{p} k")
    grad_q = rotary_backward(t, dq, z.q, f"{p} q")
    return grad_q, grad_k, dv


def _qk_norm_backward(t: Trace, z: LayerSizes, s: dict[str, int], grad: int, n16: int, p: str, which: str) -> int:
    """Qwen3's per-head norm of q or k (none: the gradient goes on as it is; its weight's
    gradient is in the layer's "norms and biases"); the result is made contiguous again for the
    projection's reshape."""
    if not z.qk_norms:
        return grad
    grad_in = norm_backward(t, grad, s[f"{which} norm fp32"], s[f"{which} norm normed"], n16, f"{p} {which} norm",
                            lambda: None)
    out = t.alloc(n16, f"{p} {which} norm grad contiguous")
    t.free(grad_in)
    return out
