"""The Eagle3 draft: one Llama-style decoder layer over three target hidden states.

Parameter names follow the checkpoint layout SGLang and vLLM load for `LlamaForCausalLMEagle3`
(`fc`, `midlayer.*`, `norm`, `lm_head`, `embed_tokens`, `d2t`, `t2d`), so the state dict *is*
the export.

Training-time test (TTT): step 0 feeds `fc(aux hidden)`; step k feeds the draft's own output
of step k-1 and the input token one further along. The query at position t in step k attends
causally to the keys of step 0 (positions <= t) and to the keys at position t of steps 1..k
(the draft's own earlier guesses for that position), as at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from trainer.embedding_projection import EmbeddingProjection, StepEmbedding
from trainer.head_loss import DraftHead
from trainer.lean_ops import SwiGLUDown, compiled_on_cuda, triton_module
from trainer.norm_project import heads_project, norm_kernels, norm_project
from trainer.recompute_mlp import norm_swiglu_down
from trainer.step_grads import StepGrads
from trainer.ttt_attention import ttt_attention


@dataclass(frozen=True)
class DraftConfig:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # target vocab: rows of the frozen embedding
    draft_vocab: int
    target_hidden: int
    aux_layers: tuple[int, ...]
    rms_eps: float = 1e-6
    rope_theta: float = 500000.0
    max_positions: int = 131072

    @classmethod
    def from_hf(cls, cfg: dict) -> "DraftConfig":
        """Read back an exported config.json (its aux layers in fitplan's numbering: trainer/export.py)."""
        from trainer.export import aux_layers_from_hf

        return cls(
            hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], heads=cfg["num_attention_heads"],
            kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"], vocab=cfg["vocab_size"],
            draft_vocab=cfg["draft_vocab_size"], target_hidden=cfg["target_hidden_size"],
            aux_layers=aux_layers_from_hf(cfg), rms_eps=cfg["rms_norm_eps"],
            rope_theta=cfg["rope_theta"], max_positions=cfg["max_position_embeddings"],
        )

    def to_hf(self) -> dict:
        """config.json of the exported draft (the keys SGLang/vLLM read for Eagle3)."""
        from trainer.export import sglang_aux_ids, vllm_aux_ids

        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "vocab_size": self.vocab,
            "draft_vocab_size": self.draft_vocab,
            "target_hidden_size": self.target_hidden,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            # vLLM and speculators: the target saves the INPUT of each listed layer, so the output
            # of our aux layer i is id i + 1 (trainer/export.py)
            "eagle_aux_hidden_state_layer_ids": vllm_aux_ids(self.aux_layers),
            # SGLang: set_eagle3_layers_to_capture adds the 1 itself, so our ids as they are
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": sglang_aux_ids(self.aux_layers)},
        }


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves only its input and an fp32 rstd per row, on every device.

    torch's own rms_norm decomposes into several saved fp32 temporaries on some devices; one
    known saved set keeps the draft's activation memory the same on CPU and GPU.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        normalize, _, _ = norm_kernels(x.device.type)
        out, rstd = normalize(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        _, _, norm_backward = norm_kernels(x.device.type)
        grad_x, grad_weight = norm_backward(grad, x, weight, rstd)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


@lru_cache(maxsize=None)
def rope_kernel(device_type: str):
    """apply_rope(x, cos, sin): on CUDA the Triton kernel (trainer/rope_kernel.py: a token's heads
    per program, contiguous loads) where triton imports and the shapes fit it, else compiled into
    one kernel each way, where eagerly the negation, the concatenation, two products and the sum
    are five passes over q and k (and as many in backward); as it is on CPU."""
    compiled = compiled_on_cuda(device_type, _apply_rope)[0]
    triton_rope = triton_module("rope_kernel") if device_type == "cuda" else None
    if triton_rope is None:
        return compiled

    def apply_rope(x, cos, sin):
        return triton_rope.apply_rope(x, cos, sin) if triton_rope.fits(x, cos, sin) else compiled(x, cos, sin)

    return apply_rope


def rope(seq: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ------------------------------------------------------------------ attention kernels


def ttt_mask(q_idx, kv_idx, seq: int):
    """Step 0's keys: causal. Later steps' keys: only the same position (the diagonal)."""
    return torch.where(kv_idx < seq, kv_idx <= q_idx, (kv_idx % seq) == q_idx)


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=64)
def _ttt_block_mask(seq: int, kv_len: int, device: torch.device):
    """The TTT mask as flex's block-sparse index, built once per shape.

    When seq is a whole number of flex blocks the index is written down directly (ttt_block_index):
    no dense mask and no compilation. create_block_mask otherwise, compiled on CUDA: eager it
    materialises the dense [seq, kv_len] mask and int64 temporaries (56 GiB at seq 32k, ttt 7;
    measured on an H200), and compiling it cost ~40 s of the first step.
    """
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask, create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return ttt_mask(q_idx, kv_idx, seq)

    if seq % _DEFAULT_SPARSE_BLOCK_SIZE == 0 and kv_len % seq == 0:
        partial, full = ttt_block_index(seq // _DEFAULT_SPARSE_BLOCK_SIZE, kv_len // seq, device)
        return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), mask_mod=mask_mod, seq_lengths=(seq, kv_len))
    return create_block_mask(mask_mod, None, None, seq, kv_len, device=device, _compile=device.type == "cuda")


def ttt_block_index(q_blocks: int, steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which [q block, kv block] tiles of the TTT mask are partial and which are full.

    The keys are `steps` copies of the sequence. In the first (causal) copy, tiles left of the
    diagonal are full and the diagonal tile is partial; in every later copy only the diagonal
    tile has entries (a query sees its own position), so it is partial. Everything else is empty.
    """
    q = torch.arange(q_blocks, device=device)[:, None]
    kv = torch.arange(q_blocks * steps, device=device)[None, :]
    partial = (kv % q_blocks) == q
    full = kv < q
    return partial, full


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[q, kv] tile booleans -> (count per q block, kv block indices, used ones first), [1, 1, ...]."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


# Each kernel takes step k's queries and the keys and values of steps 0..k as lists.


def flex(q, keys, values, seq: int):
    k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    block = _ttt_block_mask(seq, k.shape[2], q.device)
    # compiled: the fused kernel never materialises the scores (torch has no flex backward on CPU)
    return _compiled_flex()(q, k, v, block_mask=block, enable_gqa=True)


def _dense_mask(seq: int, kv_len: int, device) -> torch.Tensor:
    q_idx = torch.arange(seq, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return ttt_mask(q_idx, kv_idx, seq)


def sdpa(q, keys, values, seq: int):
    k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(seq, k.shape[2], q.device), enable_gqa=True)


def eager(q, keys, values, seq: int):
    """Materialised scores in fp32: quadratic memory, the reference for the fused kernels."""
    k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~_dense_mask(seq, k.shape[2], q.device), float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


def split(q, keys, values, seq: int):
    """Step 0's keys on a causal kernel, each later step's folded in at its own position
    (trainer/ttt_attention.py): no concatenation, each step's keys and values kept once."""
    return ttt_attention(q, keys, values)


ATTENTION = {"flex": flex, "sdpa": sdpa, "eager": eager, "split": split}


# ------------------------------------------------------------------ the decoder layer


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig, kernel: str):
        super().__init__()
        d, h2 = cfg.head_dim, 2 * cfg.hidden
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, d
        self.q_proj = nn.Linear(h2, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(h2, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h2, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)
        self.kernel = ATTENTION[kernel]

    def projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj.weight, self.k_proj.weight, self.v_proj.weight

    def forward(self, x, cos, sin, past_k: list, past_v: list, lean: bool = False, grads: StepGrads | None = None):
        """x: the 2h-wide input (plain), or its (q, k, v) projections already made (lean)."""
        q, k, v = x if lean else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        b, s, _ = q.shape
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        apply_rope = rope_kernel(q.device.type)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.kernel(q, [*past_k, k], [*past_v, v], s)
        if lean:
            return heads_project(out, self.o_proj.weight, grads), k, v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig, lean: bool):
        super().__init__()
        self.lean = lean
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x):
        if self.lean:
            return self.down(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def down(self, gate, up, grads: StepGrads | None = None):
        """down_proj(silu(gate) * up), keeping gate and up only (the lean draft)."""
        if grads is None:
            return SwiGLUDown.apply(gate, up, self.down_proj.weight)
        return SwiGLUDown.apply(gate, up, self.down_proj.weight, grads, "down_proj")


class DecoderLayer(nn.Module):
    """Llama decoder layer whose attention reads cat(normed embedding, normed hidden): 2h wide.

    With fused norms (the lean draft's `recompute_norms`), each RMSNorm is fused with the
    projections reading it (trainer/norm_project.py): the layer keeps the norms' inputs, not their
    outputs, and o_proj reads the attention output as the kernel returns it.
    """

    def __init__(self, cfg: DraftConfig, kernel: str, lean: bool, fused_norms: bool, recompute_mlp: bool = False):
        super().__init__()
        self.fused_norms = fused_norms
        self.recompute_mlp = fused_norms and recompute_mlp  # trainer/recompute_mlp.py
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.hidden_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg, kernel)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg, lean)

    def forward(self, emb, hidden, cos, sin, past_k, past_v, grads: StepGrads | None = None):
        """`grads`: the unroll's summed weight gradients (fused norms only; trainer/step_grads.py).
        `emb`: the step's embedding, or with those its rows of the unroll's embedding projection
        (trainer/embedding_projection.py)."""
        if self.fused_norms:
            return self._fused_forward(emb, hidden, cos, sin, past_k, past_v, grads)
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(hidden)), dim=-1)
        attn, k, v = self.self_attn(x, cos, sin, past_k, past_v)
        hidden = hidden + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, k, v

    def _fused_forward(self, emb, hidden, cos, sin, past_k, past_v, grads):
        norms = (self.input_layernorm.weight, self.hidden_norm.weight)
        if isinstance(emb, StepEmbedding):  # the embedding's half made once per unroll
            qkv = emb.project(hidden, self.hidden_norm.weight, self.input_layernorm.weight, self.self_attn.projections(),
                              grads)
        else:
            qkv = norm_project((emb, hidden), norms, self.input_layernorm.eps, self.self_attn.projections(), grads,
                               ("input_layernorm", "hidden_norm", "q_proj", "k_proj", "v_proj"))
        attn, k, v = self.self_attn(qkv, cos, sin, past_k, past_v, lean=True, grads=grads)
        hidden = hidden + attn
        post, mlp = self.post_attention_layernorm, self.mlp
        if self.recompute_mlp:
            out = norm_swiglu_down(hidden, post.weight, post.eps, mlp.gate_proj.weight, mlp.up_proj.weight,
                                   mlp.down_proj.weight, grads)
            return hidden + out, k, v
        gate_up = norm_project((hidden,), (post.weight,), post.eps, (mlp.gate_proj.weight, mlp.up_proj.weight),
                               grads, ("post_attention_layernorm", "gate_proj", "up_proj"))
        return hidden + mlp.down(*gate_up, grads=grads), k, v


def _frozen_embedding(cfg: DraftConfig, shared: torch.Tensor | None) -> torch.Tensor:
    """The target's tensor, or a random [V, h] drawn aside from the global generator: the
    trained weights then draw the same numbers from a seed whether the embedding is shared or
    copied (the copy overwrites this draw), so both train alike."""
    if shared is not None:
        return shared
    weight = torch.empty(cfg.vocab, cfg.hidden)
    with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
        return weight.normal_()


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig, attention: str = "flex", checkpoint_layer: bool = False, lean: bool = True,
                 recompute_norms: bool = True, embedding: torch.Tensor | None = None, sum_step_grads: bool = True,
                 recompute_mlp: bool = False, head_grad_in_forward: bool = True, project_embedding_once: bool = True):
        super().__init__()
        self.cfg = cfg
        self.lean = lean  # RunSpec.draft_memory: the fused head + loss and the lean SwiGLU
        # RunSpec.recompute_norms: norms fused with their projections, the final one inside the
        # head, and a teacher of logits
        self.fused_norms = lean and recompute_norms
        # RunSpec.sum_step_grads: the fused functions sum each weight's gradient over the steps
        # in one buffer (trainer/step_grads.py)
        self.sum_step_grads = self.fused_norms and sum_step_grads
        # RunSpec.head_grad_in_forward: the fused head makes its gradients in forward, into the
        # summed step gradients (trainer/head_loss.py)
        self.head_grad_in_forward = self.sum_step_grads and head_grad_in_forward
        # layout.projects_embedding_once: with summed step gradients the embedding's half of
        # q/k/v is projected once per unroll (trainer/embedding_projection.py)
        self.project_embedding_once = self.sum_step_grads and project_embedding_once
        self.checkpoint_layer = checkpoint_layer
        # frozen: the target's own [V, h] when given (RunSpec.share_embedding), else a copy made later
        self.shares_embedding = embedding is not None
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, _weight=_frozen_embedding(cfg, embedding), _freeze=True)
        self.fc = nn.Linear(3 * cfg.target_hidden, cfg.hidden, bias=False)
        # RunSpec.recompute_mlp: with fused norms, the MLP keeps only its input (trainer/recompute_mlp.py)
        self.midlayer = DecoderLayer(cfg, attention, lean, self.fused_norms, recompute_mlp)
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = DraftHead(cfg.hidden, cfg.draft_vocab)  # applied inside the loss (trainer/head_loss.py)
        # d2t[i]: target id of draft id i, as an offset (SGLang/vLLM convention); t2d: target ids kept.
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab, dtype=torch.bool))

    def forward(self, aux: torch.Tensor, input_ids: torch.Tensor, ttt: int, teacher):
        """(weighted loss over the unroll, per-step top-1 accuracy) against `teacher`.

        The training step enters the draft here, so that a sharded draft's root runs its FSDP
        hooks first (its units, the final norm grouped with the lm_head, then gather and reduce
        under it)."""
        from trainer.loss import unroll_loss

        grads = StepGrads(ttt) if self.sum_step_grads else None
        return unroll_loss(self.unroll(aux, input_ids, ttt, grads), self, teacher, grads)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def unroll(self, aux: torch.Tensor, input_ids: torch.Tensor, ttt: int, grads: StepGrads | None = None):
        """Yield each TTT step's output [B, S, h] for the loss (trainer/loss.py unroll_loss): the
        final-norm output, or with fused norms the layer output before the final norm, which the
        fused head applies itself. No step's logits outlive its loss.

        `input_ids` is [B, S + ttt]: step k embeds the tokens at positions t + k + 1. `grads`:
        where the fused layer sums its weights' gradients over the steps (None: autograd does);
        with them the embedding's half of q/k/v is projected once for every step.
        """
        seq = aux.shape[1]
        dtype = self.fc.weight.dtype if not torch.is_autocast_enabled(aux.device.type) else torch.bfloat16
        cos, sin = rope(seq, self.cfg.head_dim, self.cfg.rope_theta, aux.device, dtype)
        hidden = self.fc(aux)
        past_k: list[torch.Tensor] = []
        past_v: list[torch.Tensor] = []
        shared = None
        if self.project_embedding_once and grads is not None:
            layer = self.midlayer
            shared = EmbeddingProjection(self.embed_tokens.weight, input_ids[:, 1 : seq + ttt], layer.input_layernorm,
                                         layer.self_attn.projections(), hidden.dtype, ttt)
        for k in range(ttt):
            if shared is not None:
                emb = StepEmbedding(shared, k)
            else:
                with torch.no_grad():
                    emb = self.embed_tokens(input_ids[:, k + 1 : k + 1 + seq]).to(hidden.dtype)
            if self.checkpoint_layer:
                # tuples: the recomputation in backward must see the caches as they were here.
                # Recomputed whole: stopping early raises out of a saved-tensor hook inside the
                # fused functions' apply, which torch 2.11 on CUDA turned into a SystemError
                with set_checkpoint_early_stop(False):
                    hidden, key, value = checkpoint(
                        self.midlayer, emb, hidden, cos, sin, tuple(past_k), tuple(past_v), grads, use_reentrant=False
                    )
            else:
                hidden, key, value = self.midlayer(emb, hidden, cos, sin, past_k, past_v, grads)
            past_k.append(key)
            past_v.append(value)
            yield hidden if self.fused_norms else self.norm(hidden)
