"""Activation and logits terms of the sft workload: an HF Llama/Qwen-style decoder in bf16.

Counted from what autograd saves in transformers' LlamaDecoderLayer with SDPA (flash-style
kernels: no [S, S] matrix; GQA passed to SDPA, K/V not repeated), per token, in bytes, and
checked against the saved tensors of the real code (tests/test_estimator_sft_saved.py):
- each RMSNorm (2 per layer): its fp32 upcast of the input (4h), fp32 rstd (4), the bf16
  normalized tensor the weight multiply saves (2h), its output that the next linears save (2h)
- attention: SDPA saves q (2*H*d), k and v (2 x 2*Hkv*d), its output, which is o_proj's input
  (2*H*d), and the fp32 logsumexp (4*H)
- Qwen3 / Gemma 3 per-head q/k RMSNorms: fp32 upcast + bf16 normalized + fp32 rstd of q and k
- SwiGLU MLP: SiLU's input, its output, up_proj's output, the product down_proj saves: 8*I
Dropout is 0 in these models, so it saves nothing. Once per model: input ids and labels
(int64), the final norm, and the rotary cos/sin [S, d] (bf16).
"""

from __future__ import annotations

from fitplan.layout import Job
from fitplan.units import BF16, FP32

INT64 = 8


def _tokens(job: Job) -> int:
    return job.spec.micro_batch * job.spec.seq


def _mlp_width(job: Job) -> int:
    """SwiGLU width a token runs through: the dense I, or k experts' widths (+ shared)."""
    m = job.model
    if m.is_moe:
        return (m.experts_per_token + m.shared_experts) * m.expert_intermediate
    return m.intermediate


def _norm_bytes_per_token(job: Job) -> int:
    return 8 * job.model.hidden + FP32


def layer_saved_bytes_per_token(job: Job) -> int:
    m = job.model
    norms = 2 * _norm_bytes_per_token(job)
    attention = BF16 * (2 * m.heads + 2 * m.kv_heads) * m.head_dim + FP32 * m.heads
    if m.model_type.startswith(("qwen3", "gemma3")):
        attention += (FP32 + BF16) * (m.heads + m.kv_heads) * m.head_dim + FP32 * (m.heads + m.kv_heads)
    mlp = 8 * _mlp_width(job)
    router = FP32 * m.experts * 2 if m.is_moe else 0  # fp32 router logits and softmax
    return norms + attention + mlp + router


def activation_bytes(job: Job) -> int:
    """Saved for backward at the end of the forward (all layers, plus the final norm).

    With checkpointing (every decoder layer, use_reentrant=False) each layer keeps only its
    bf16 input hidden state.
    """
    m, tokens = job.model, _tokens(job)
    once = (_norm_bytes_per_token(job) + 2 * INT64) * tokens + 2 * BF16 * job.spec.seq * m.head_dim
    if job.spec.ac:
        return BF16 * m.hidden * tokens * m.layers + once
    return layer_saved_bytes_per_token(job) * tokens * m.layers + once


def first_layer_bytes(job: Job) -> int:
    """At the end of backward the first layer's saved tensors are live: still saved without
    checkpointing, recomputed with it (its input is the embedding output, counted here too)."""
    return layer_saved_bytes_per_token(job) * _tokens(job)


def once_in_backward_bytes(job: Job) -> int:
    """Live to the end of backward once per model: input ids and the shifted labels nll_loss
    saves (int64), the rotary cos and sin."""
    return 2 * INT64 * _tokens(job) + 2 * BF16 * job.spec.seq * job.model.head_dim


def first_layer_mlp_backward_bytes(job: Job) -> int:
    """The busiest instant of the first layer's backward (its weights' gradients but down_proj's
    not made yet): when SwiGLU's product backward makes the gradients of SiLU's output and of
    up_proj's output beside the product's gradient (bf16 [T, I] each), the product itself freed;
    the layer's saved (or recomputed) tensors, the gradient coming from the layer above and,
    under checkpointing, the layer's input the checkpoint holds ([T, h] bf16 each)."""
    rows = 2 if job.spec.ac else 1
    return (layer_saved_bytes_per_token(job) + 2 * BF16 * _mlp_width(job) + rows * BF16 * job.model.hidden) * _tokens(job)


def layer_grad_working_bytes(job: Job) -> int:
    """Gradients flowing through one layer's backward: SwiGLU grads and q/k/v/out grads, bf16."""
    m = job.model
    return BF16 * _tokens(job) * (3 * _mlp_width(job) + 4 * m.heads * m.head_dim + 2 * m.hidden)


def forward_logits_bytes(job: Job) -> int:
    """During the loss: bf16 logits [B,S,V], the fp32 upcast transformers' loss makes, and the
    fp32 log-softmax cross_entropy saves: 10 bytes per token per vocab entry."""
    return (BF16 + FP32 + FP32) * _tokens(job) * job.model.vocab


def backward_logits_bytes(job: Job) -> int:
    """Start of backward: the saved log-softmax, the gradient arriving at it and the gradient of
    its input, all fp32: 12 B per entry. The bf16 logits are gone: the training loop keeps only
    `.loss` of the model output (trainer/sft_step.py, and HF Trainer's compute_loss likewise).
    Measured at steps >= 2 on H200 (tests/data/gpu/validation/h200x1/h200x1-sft-*.json): the
    backward peak minus params, moments and checkpointed inputs is 12.2 B per entry at qwen3-8b
    8k b1 and at 9984 b4; counting the bf16 logits too (14 B) over-predicted by 2-9%."""
    return 3 * FP32 * _tokens(job) * job.model.vocab
