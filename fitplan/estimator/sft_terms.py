"""Activation and logits terms of the sft workload: an HF Llama/Qwen-style decoder in bf16.

Counted from what autograd saves in transformers' LlamaDecoderLayer with SDPA on GPU
(flash / memory-efficient kernels: no [S, S] matrix), per token, in bytes:
- each RMSNorm (2 per layer): its fp32 upcast of the input (4h), the bf16 normalized tensor
  the weight multiply saves (2h), and its output that the next linears save (2h): 8h
- attention: SDPA saves q, k, v (k/v repeated to all H heads by repeat_kv) and its output
  (4 x 2*H*d) plus the fp32 logsumexp (4*H); o_proj saves its contiguous input (2*H*d)
- SwiGLU MLP: SiLU's input, its output, up_proj's output, the product down_proj saves: 8*I
Dropout is 0 in these models, so it saves nothing.
"""

from __future__ import annotations

from fitplan.layout import Job

BF16 = 2
FP32 = 4


def _tokens(job: Job) -> int:
    return job.spec.micro_batch * job.spec.seq


def _mlp_width(job: Job) -> int:
    """SwiGLU width a token runs through: the dense I, or k experts' widths (+ shared)."""
    m = job.model
    if m.is_moe:
        return (m.experts_per_token + m.shared_experts) * m.expert_intermediate
    return m.intermediate


def layer_saved_bytes_per_token(job: Job) -> int:
    m = job.model
    norms = 2 * 8 * m.hidden
    attention = 5 * BF16 * m.heads * m.head_dim + FP32 * m.heads
    mlp = 8 * _mlp_width(job)
    router = FP32 * m.experts * 2 if m.is_moe else 0  # fp32 router logits and softmax
    return norms + attention + mlp + router


def activation_bytes(job: Job) -> int:
    """Saved for backward at the end of the forward (all layers, plus the final norm).

    With checkpointing (every decoder layer, use_reentrant=False) each layer keeps only its
    bf16 input hidden state.
    """
    m, tokens = job.model, _tokens(job)
    final_norm = 8 * m.hidden * tokens
    if job.spec.ac:
        return BF16 * m.hidden * tokens * m.layers + final_norm
    return layer_saved_bytes_per_token(job) * tokens * m.layers + final_norm


def first_layer_bytes(job: Job) -> int:
    """At the end of backward the first layer's saved tensors are live: still saved without
    checkpointing, recomputed with it (its input is the embedding output, counted here too)."""
    return layer_saved_bytes_per_token(job) * _tokens(job)


def layer_grad_working_bytes(job: Job) -> int:
    """Gradients flowing through one layer's backward: SwiGLU grads and q/k/v/out grads, bf16."""
    m = job.model
    return BF16 * _tokens(job) * (3 * _mlp_width(job) + 4 * m.heads * m.head_dim + 2 * m.hidden)


def forward_logits_bytes(job: Job) -> int:
    """During the loss: bf16 logits [B,S,V], the fp32 upcast transformers' loss makes, and the
    fp32 log-softmax cross_entropy saves: 10 bytes per token per vocab entry."""
    return (BF16 + FP32 + FP32) * _tokens(job) * job.model.vocab


def backward_logits_bytes(job: Job) -> int:
    """Start of backward: bf16 logits (still referenced by the output), the saved log-softmax,
    the gradient arriving at it and the gradient of its input, all fp32: 14 B per entry."""
    return (BF16 + 3 * FP32) * _tokens(job) * job.model.vocab
