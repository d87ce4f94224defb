"""The GPUs of a SpecForge v0.3 run's managed SGLang capture servers, from SGLang's own sizing.

A MODEL OF SGLANG'S DOCUMENTED SIZING, NOT CALIBRATED AGAINST A MEASUREMENT (docs/estimate.md,
"Capture servers"). SpecForge launches each managed_local server as `sglang.launch_server
--tp-size T --mem-fraction-static F --context-length C [--max-total-tokens N]
--chunked-prefill-size -1 --enable-spec-capture ...`; SGLang then sizes its memory itself
(ModelRunner.profile_max_num_token in public SGLang; not re-read for the pinned v0.5.14):

- its static share is F x the GPU's total: the target's weights (1/T of them per GPU) plus the
  KV pool fill it, so the pool gets F x total - weights; when that is <= 0 SGLang refuses to
  start;
- the pool holds pool bytes / (KV bytes per token) tokens, at most --max-total-tokens;
- a request longer than the pool can never be scheduled;
- everything else (the prefill's activations, the CUDA context, NCCL) must fit in the rest.

Per server GPU: peak = max(static, weights + KV pool) + activations + outside the allocator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from fitplan.config import RunSpec
from fitplan.estimator.runtime import (
    CUDA_CONTEXT_BYTES,
    FIRST_KERNELS_BYTES,
    KERNELS_AFTER_NCCL_BYTES,
    NCCL_FIRST_COLLECTIVE_BYTES,
)
from fitplan.estimator.target_terms import mlp_working_per_token
from fitplan.layout import AUX_LAYER_COUNT, target_weight_bytes
from fitplan.profiles import GpuSpec
from fitplan.shapes import BF16, ModelShape
from fitplan.units import GIB

# SGLang's KV cache dtype is the model's ("auto"): bf16, the default model.torch_dtype.
KV_BYTES = BF16
# MLA (DeepSeek): SGLang caches the compressed latent and the rope key per token and layer
# (kv_lora_rank + qk_rope_head_dim values), the same on every TP rank; qk_rope_head_dim's usual
# value when the config leaves it out.
MLA_ROPE_DIM_DEFAULT = 64


def kv_bytes_per_token(model: ModelShape, tp: int) -> int:
    """KV pool bytes per token on one server GPU.

    Standard attention: layers x 2 (K and V) x ceil(kv_heads / tp) x head_dim x 2 B (SGLang
    replicates KV heads when tp exceeds them). MLA models: the latent size when the shape has one
    (raw `kv_lora_rank`): layers x (kv_lora_rank + qk_rope_head_dim) x 2 B, not split by tp;
    an MLA shape without it falls back to the standard formula.
    """
    rank = model.raw.get("kv_lora_rank") if model.raw else None
    if rank:
        rope = model.raw.get("qk_rope_head_dim") or MLA_ROPE_DIM_DEFAULT
        return model.layers * (int(rank) + int(rope)) * KV_BYTES
    kv_heads = -(-model.kv_heads // tp)
    return model.layers * 2 * kv_heads * model.head_dim * KV_BYTES


def prefill_working_bytes(model: ModelShape, tp: int, tokens: int) -> int:
    """One decoder layer's transient working set for a prefill of `tokens` on one TP shard, bf16
    per token (target_terms.forward_working_bytes' terms, for a server's one request):
    - 3h: the residual stream, its normed copy and the layer output (replicated over TP);
    - attention: q and its output on heads/tp heads, k and v on ceil(kv_heads/tp) heads, head_dim
      each (2 (heads/tp) d + 2 ceil(kv_heads/tp) d; flashinfer / flash attention keep no score
      matrix);
    - dense MLP: gate, up and their product on intermediate/tp (3 I / tp);
    - MoE: each token visits k experts (their input and SwiGLU tensors on the shard) and the router
      keeps fp32 logits over the experts.
    """
    d = model.head_dim
    per_token = 3 * model.hidden
    per_token += 2 * (model.heads // tp) * d  # q and the attention output
    per_token += 2 * -(-model.kv_heads // tp) * d  # k and v, replicated where tp exceeds them
    return BF16 * (per_token + mlp_working_per_token(model, tp)) * tokens


def captured_bytes(model: ModelShape, tokens: int) -> int:
    """What the capture patch returns instead of logits: the aux states [tokens, 3h] and the last
    hidden state [tokens, h], bf16."""
    return BF16 * (AUX_LAYER_COUNT + 1) * model.hidden * tokens


def outside_allocator_bytes(tp: int) -> int:
    """The trainer's measured CUDA context and first kernels (runtime.py), and NCCL's first
    collective and the kernels after it when the server's TP group communicates."""
    total = CUDA_CONTEXT_BYTES + FIRST_KERNELS_BYTES
    if tp > 1:
        total += NCCL_FIRST_COLLECTIVE_BYTES + KERNELS_AFTER_NCCL_BYTES
    return total


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


@dataclass(frozen=True)
class ServerGroup:
    """One kind of capture server: `count` servers of `tp` GPUs each, every GPU alike."""

    tp: int
    mem_fraction: float
    count: int
    context_length: int
    max_total_tokens: int | None
    gpu_total_bytes: int
    static_bytes: int
    weights_bytes: int
    kv_pool_bytes: int
    kv_bytes_per_token: int
    kv_pool_tokens: int
    activations_bytes: int
    outside_bytes: int

    @property
    def gpus(self) -> int:
        return self.tp * self.count

    @property
    def starts(self) -> bool:
        return self.static_bytes > self.weights_bytes

    @property
    def holds_request(self) -> bool:
        return self.kv_pool_tokens >= self.context_length

    @property
    def peak_reserved_bytes(self) -> int:
        return max(self.static_bytes, self.weights_bytes + self.kv_pool_bytes) + self.activations_bytes \
            + self.outside_bytes

    @property
    def fits(self) -> bool:
        return self.starts and self.holds_request and self.peak_reserved_bytes <= self.gpu_total_bytes

    @property
    def verdict(self) -> str:
        return "FITS" if self.fits else "OOM"

    @property
    def reason(self) -> str:
        """Why it does not fit ('' when it does)."""
        if not self.starts:
            return (f"mem_fraction_static {self.mem_fraction} x {_gib(self.gpu_total_bytes)} GiB = "
                    f"{_gib(self.static_bytes)} GiB does not hold the target weights ({_gib(self.weights_bytes)} GiB "
                    f"per GPU at tp {self.tp}): SGLang refuses to start (no room for a KV pool); raise "
                    f"mem_fraction_static above {self.weights_bytes / self.gpu_total_bytes:.3f} or the tp size")
        if not self.holds_request:
            cap = " (capped by model.sglang_max_total_tokens)" if self.max_total_tokens is not None and \
                self.kv_pool_tokens == self.max_total_tokens else ""
            return (f"the KV pool holds {self.kv_pool_tokens} tokens{cap}, fewer than one request of "
                    f"context_length {self.context_length}: requests cannot be scheduled")
        if self.peak_reserved_bytes > self.gpu_total_bytes:
            return (f"peak {_gib(self.peak_reserved_bytes)} GiB exceeds the GPU's {_gib(self.gpu_total_bytes)} GiB "
                    f"by {_gib(self.peak_reserved_bytes - self.gpu_total_bytes)} GiB: the static share "
                    f"(mem_fraction_static {self.mem_fraction}) leaves too little for the prefill and the runtime")
        return ""

    def to_json(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "mem_fraction_static": self.mem_fraction,
            "servers": self.count,
            "gpus": self.gpus,
            "context_length": self.context_length,
            "max_total_tokens": self.max_total_tokens,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "gpu_total_bytes": self.gpu_total_bytes,
            "static_bytes": self.static_bytes,
            "outside_allocator_bytes": self.outside_bytes,
            "fits": self.fits,
            "verdict": self.verdict,
            "reason": self.reason,
            "components": {
                "target.weights": self.weights_bytes,
                "target.kv_pool": self.kv_pool_bytes,
                "target.activations": self.activations_bytes,
            },
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_pool_tokens": self.kv_pool_tokens,
        }


@dataclass(frozen=True)
class ServerEstimate:
    groups: tuple[ServerGroup, ...]

    @property
    def gpus(self) -> int:
        return sum(g.gpus for g in self.groups)

    @property
    def worst(self) -> ServerGroup:
        """The group that fits least: a failing one first, then the highest peak."""
        return max(self.groups, key=lambda g: (not g.fits, g.peak_reserved_bytes))

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "gpus": self.gpus,
            "groups": [g.to_json() for g in self.groups],
            "peak_reserved_bytes": worst.peak_reserved_bytes,
            "gpu_total_bytes": worst.gpu_total_bytes,
            "fits": all(g.fits for g in self.groups),
        }


def estimate_group(model: ModelShape, spec: RunSpec, server: Any, gpu: GpuSpec) -> ServerGroup:
    """One server kind (fitplan.specforge_yaml.ManagedServer: tp, mem_fraction, count,
    context_length, max_total_tokens) on `gpu`."""
    tp, total = server.tp, gpu.total_bytes
    weights = -(-target_weight_bytes(model, spec) // tp)
    static = int(server.mem_fraction * total)
    per_token = kv_bytes_per_token(model, tp)
    pool = max(0, static - weights)
    if server.max_total_tokens is not None:
        pool = min(pool, server.max_total_tokens * per_token)
    tokens = server.context_length
    activations = prefill_working_bytes(model, tp, tokens) + captured_bytes(model, tokens)
    return ServerGroup(
        tp=tp, mem_fraction=server.mem_fraction, count=server.count, context_length=tokens,
        max_total_tokens=server.max_total_tokens, gpu_total_bytes=total, static_bytes=static,
        weights_bytes=weights, kv_pool_bytes=pool, kv_bytes_per_token=per_token,
        kv_pool_tokens=pool // per_token, activations_bytes=activations, outside_bytes=outside_allocator_bytes(tp),
    )


def estimate_servers(model: ModelShape, spec: RunSpec, servers: Iterable[Any], gpu: GpuSpec) -> ServerEstimate | None:
    """Every managed capture server kind on `gpu` (the trainers' GPU type); None without servers."""
    groups = tuple(estimate_group(model, spec, s, gpu) for s in servers)
    return ServerEstimate(groups) if groups else None
