"""What a model's memory and FLOPs depend on: its shape, and the parameters that shape holds.

`ModelShape` is a target transformer (dense, MoE, multi-head latent attention, tied embeddings,
MXFP4-packed experts), `DraftShape` an Eagle3 draft. Parameter counts follow the HF modeling
code of each family: Llama/Qwen/Mistral (SwiGLU MLP, GQA, RMSNorm), Qwen2 (q/k/v biases), Qwen3
(q/k RMSNorm per head), Gemma 2/3 (norms before and after each block), gpt-oss (attention and
expert biases, attention sinks, router bias), DeepSeek-V3 (MLA attention, shared experts,
leading dense layers, router correction bias).

Profiles and config files become shapes in fitplan.profiles; the layout rules, the estimator,
the step-time model and the trainer all read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitplan.units import BF16, MXFP4


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformer that memory and FLOPs depend on."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int  # dense MLP width (also the dense layers of an MoE model)
    max_positions: int | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    # Mixture of experts (0 experts: dense)
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_experts: int = 0
    dense_layers: int = 0  # leading dense layers of an MoE model (DeepSeek's first_k_dense_replace)
    # Quantized checkpoint format of the expert weights ("mxfp4" for gpt-oss), None if plain
    packed_format: str | None = None
    # Gemma 2 soft-caps its output logits (tanh(logits / c) * c): a transient copy of them
    final_logit_softcap: bool = False
    # Multi-head latent attention (DeepSeek): per-layer attention parameter count override
    mla_attention_params: int | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    def default_aux_layers(self) -> tuple[int, int, int]:
        """Eagle3's captured layers: [1, n/2 - 1, n - 4], as SpecForge picks them.

        A target too shallow for those to be distinct (fewer than 7 layers) gets its first,
        middle and last layers instead.
        """
        n = self.layers
        usual = (1, n // 2 - 1, n - 4)
        return usual if usual[0] < usual[1] < usual[2] else (0, n // 2, n - 1)


@dataclass(frozen=True)
class DraftShape:
    """An Eagle3 draft: one Llama-style decoder layer over target features."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # the target's vocab (the frozen embedding's rows)
    draft_vocab: int
    target_hidden: int  # fc input is 3 x this
    aux_layers: tuple[int, ...]

    def trainable_params(self) -> int:
        """fc + attention (2h-wide input) + MLP + norms + lm_head (docs/estimate.md, "Trained state")."""
        h, d = self.hidden, self.head_dim
        fc = 3 * self.target_hidden * h
        attn = 2 * h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h
        mlp = 3 * h * self.intermediate
        norms = 4 * h
        return fc + attn + mlp + norms + h * self.draft_vocab

    def frozen_params(self) -> int:
        return self.vocab * self.hidden

    def largest_trained_tensor(self) -> int:
        """Elements of the largest trained weight: fc, lm_head, an MLP projection or q_proj."""
        h = self.hidden
        return max(3 * self.target_hidden * h, h * self.draft_vocab, h * self.intermediate, 2 * h * self.heads * self.head_dim)


# ---------------------------------------------------------------- parameter counts


@dataclass(frozen=True)
class ParamCounts:
    expert_weights: int  # MoE expert weight matrices (what MXFP4 packs)
    other: int  # everything else: embeddings, attention, norms, routers, dense MLPs, biases
    largest_tensor: int  # parameters in the largest single weight tensor
    largest_tensor_name: str
    largest_is_expert: bool

    @property
    def total(self) -> int:
        return self.expert_weights + self.other


def attention_params(m: ModelShape) -> int:
    if m.mla_attention_params is not None:
        return m.mla_attention_params
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    weights = m.hidden * (q + 2 * kv) + q * m.hidden
    if m.attention_bias:  # Llama-style attention_bias / gpt-oss: q, k, v and o biases
        weights += q + 2 * kv + m.hidden
    elif m.model_type == "qwen2" or m.raw.get("attention_bias_qkv"):
        weights += q + 2 * kv
    if m.model_type.startswith(("qwen3", "gemma3")):  # per-head q_norm, k_norm
        weights += 2 * m.head_dim  # q_norm, k_norm
    if m.model_type == "gpt_oss":
        weights += m.heads  # attention sinks
    return weights


def _norms_per_layer(m: ModelShape) -> int:
    """Gemma 2/3 norm both before and after attention and MLP; the others only before."""
    return 4 if m.model_type.startswith(("gemma2", "gemma3")) else 2


def _expert_mlp(m: ModelShape) -> tuple[int, int]:
    """(weight-matrix params, bias params) of one routed expert."""
    weights = 3 * m.hidden * m.expert_intermediate
    biases = 2 * m.expert_intermediate + m.hidden if m.model_type == "gpt_oss" else 0
    return weights, biases


def _router(m: ModelShape) -> int:
    bias = m.experts if m.model_type in ("gpt_oss", "deepseek_v3") else 0  # gpt-oss bias, DeepSeek correction bias
    return m.hidden * m.experts + bias


def embedding_params(m: ModelShape) -> int:
    """The input embedding [V, h]."""
    return m.vocab * m.hidden


def lm_head_params(m: ModelShape) -> int:
    """The LM head's own parameters: none when tied (tie_word_embeddings), where lm_head.weight
    *is* the embedding tensor, one [V, h] allocation. This is the one place the tie is decided:
    count_params (target.weights, model.params, their optimizer state) and the sft root unit
    read it, so a tied [V, h] is counted once in every phase."""
    return 0 if m.tie_embeddings else m.vocab * m.hidden


def count_params(m: ModelShape) -> ParamCounts:
    embed = embedding_params(m)
    head = lm_head_params(m)
    norms = _norms_per_layer(m) * m.hidden * m.layers + m.hidden
    dense_mlp = 3 * m.hidden * m.intermediate
    expert_w, expert_b = _expert_mlp(m) if m.is_moe else (0, 0)
    shared = 3 * m.hidden * m.expert_intermediate * m.shared_experts
    dense_layers = m.layers - m.moe_layers
    other = (
        embed + head + norms + m.layers * attention_params(m) + dense_layers * dense_mlp
        + m.moe_layers * (m.experts * expert_b + _router(m) + shared)
    )
    experts = m.moe_layers * m.experts * expert_w
    # Largest single tensor: a fused expert weight [E, 2*Ie, h] (gpt-oss gate_up_proj) or one
    # expert's MLP matrix, against the embedding.
    if m.is_moe:
        fused = m.experts * 2 * m.expert_intermediate * m.hidden
        per_tensor = fused if m.model_type == "gpt_oss" else m.expert_intermediate * m.hidden
        if per_tensor * MXFP4 > embed * BF16 or per_tensor > embed:
            return ParamCounts(experts, other, per_tensor, "expert gate_up weight", True)
    return ParamCounts(experts, other, embed, "embedding [V, h]", False)


def weight_bytes(m: ModelShape, packed: bool) -> int:
    """Frozen target weight bytes, unsharded: bf16, or MXFP4 experts when `packed`."""
    c = count_params(m)
    expert_bytes = c.expert_weights * (MXFP4 if packed else BF16)
    return int(expert_bytes) + c.other * BF16
