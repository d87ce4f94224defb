"""The multi-GPU layer run for real on CPU: gloo process groups of 2 and 4 spawned processes.

Each spawned job runs several checks and saves (actual, expected) tensors per rank; the tests
below compare them. Expected values come from the same model or module run unsharded in one
process, never from the code under test.
"""

from __future__ import annotations

import copy
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      CUDA_VISIBLE_DEVICES="")  # gloo on CPU, also on a GPU machine
    torch.set_num_threads(1)
    try:
        result = job(rank)
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    from trainer.parallel import shutdown_distributed

    shutdown_distributed()


def run_spawned(job, world: int, tmp_path) -> list[dict]:
    mp.start_processes(_worker, args=(world, _free_port(), job, str(tmp_path)), nprocs=world, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


# ---------------------------------------------------------------- world 2, tp 2: HF targets

def _tiny_models():
    from transformers import (Gemma2Config, Gemma3TextConfig, GptOssConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config, Qwen3MoeConfig)

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96)
    return {
        "llama-sdpa": (LlamaConfig(intermediate_size=96, **TINY), "sdpa"),
        "qwen3-sdpa": (Qwen3Config(intermediate_size=96, **TINY), "sdpa"),
        "qwen3-eager": (Qwen3Config(intermediate_size=96, **TINY), "eager"),
        # layer 1 dense, layer 0 sparse: both MLP kinds in one model
        "qwen3-moe": (Qwen3MoeConfig(mlp_only_layers=[1], norm_topk_prob=True, **moe, **TINY), "eager"),
        "gpt-oss": (GptOssConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                 sliding_window=4, **TINY), "eager"),
        # every other family the job rules let fitplan's trainer split (fitplan.layout.TRAINER_TP_FAMILIES)
        "llama-tied": (LlamaConfig(intermediate_size=96, tie_word_embeddings=True, **TINY), "sdpa"),
        "mistral": (MistralConfig(intermediate_size=96, sliding_window=None, **TINY), "sdpa"),
        "qwen2": (Qwen2Config(intermediate_size=96, **TINY), "sdpa"),  # q/k/v biases
        "gemma2": (Gemma2Config(intermediate_size=96, sliding_window=4, **TINY), "eager"),  # soft-capping
        "gemma3": (Gemma3TextConfig(intermediate_size=96, sliding_window=4, **TINY), "sdpa"),  # q/k norms
    }


def _randomize_zero_inits(model: nn.Module) -> None:
    """HF zero-initializes biases and sinks; random values make the sharding of each visible."""
    for name, param in model.named_parameters():
        if "bias" in name or name.endswith("sinks"):
            param.data.normal_(0, 0.5)


def tp_target_job(rank: int) -> dict:
    from transformers import AutoModelForCausalLM

    from trainer.parallel import init_distributed, parallelize_target

    ctx = init_distributed(tp=2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    result = {}
    for name, (config, attn) in _tiny_models().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()
        _randomize_zero_inits(model)
        reference = copy.deepcopy(model)
        parallelize_target(model, ctx)
        with torch.no_grad():
            want = reference(ids, output_hidden_states=True)
            got = model(ids, output_hidden_states=True)
        vocab_shard = config.vocab_size // ctx.tp
        own_vocab = slice(ctx.tp_rank * vocab_shard, (ctx.tp_rank + 1) * vocab_shard)
        result[name] = {
            "logits": (got.logits, want.logits[..., own_vocab]),
            "hidden": (torch.stack(got.hidden_states), torch.stack(want.hidden_states)),
            "one_embedding": model.lm_head.weight is model.get_input_embeddings().weight,
        }
    result["meta-shapes"] = _meta_build_shapes(ctx)
    return result


def _meta_build_shapes(ctx) -> dict:
    """A target too big for one GPU is built on meta, split, then materialized shard by shard."""
    from transformers import AutoModelForCausalLM

    from trainer.parallel import parallelize_target

    config, _ = _tiny_models()["qwen3-moe"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parallelize_target(model, ctx)
    model.to_empty(device="cpu")
    layer = model.model.layers[0]
    return {
        "q_proj": tuple(layer.self_attn.q_proj.weight.to_local().shape),
        "gate_up": tuple(layer.mlp.experts.gate_up_proj.shape),
        "down": tuple(layer.mlp.experts.down_proj.shape),
        "lm_head": tuple(model.lm_head.weight.to_local().shape),
        "embed": tuple(model.model.embed_tokens.weight.to_local().shape),
    }


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    return run_spawned(tp_target_job, 2, tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("name", ["llama-sdpa", "qwen3-sdpa", "qwen3-eager", "qwen3-moe", "gpt-oss", "llama-tied",
                                  "mistral", "qwen2", "gemma2", "gemma3"])
def test_tp_target_matches_unsharded_model(tp_results, name):
    for rank_result in tp_results:
        got, want = rank_result[name]["logits"]
        assert got.shape == (2, 12, 64)  # local vocab shard: 128 / tp 2
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        got, want = rank_result[name]["hidden"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_tied_target_keeps_one_embedding_shard(tp_results):
    for rank_result in tp_results:
        assert rank_result["llama-tied"]["one_embedding"] is True
        assert rank_result["llama-sdpa"]["one_embedding"] is False


def test_meta_built_target_materializes_only_its_shard(tp_results):
    # tp 2 of TINY (4 heads x 16, hidden 64, vocab 128) and 4 experts of intermediate 32:
    want = {"q_proj": (2 * 16, 64), "gate_up": (4, 2 * 16, 64), "down": (4, 64, 16),
            "lm_head": (64, 64), "embed": (64, 64)}
    for rank_result in tp_results:
        assert rank_result["meta-shapes"] == want


# ------------------------------------------- world 4, tp 2: outputs, FSDP2 draft, measurements

def _draft_like() -> nn.Module:
    """Eagle3-draft-shaped: frozen embedding, fc over 3 aux states, one block, lm_head."""

    class Draft(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 8)
            self.embed.weight.requires_grad_(False)
            self.fc = nn.Linear(24, 8)
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 8), nn.SiLU(), nn.Linear(8, 8))])
            self.lm_head = nn.Linear(8, 32, bias=False)

        def forward(self, ids, aux):
            h = torch.cat([self.embed(ids), self.fc(aux)], dim=-1)
            for layer in self.layers:
                h = layer(h)
            return self.lm_head(h)

    torch.manual_seed(0)
    return Draft()


def _draft_batch(rank: int, micro: int):
    g = torch.Generator().manual_seed(100 * rank + micro)
    return torch.randint(0, 32, (2, 5), generator=g), torch.randn(2, 5, 24, generator=g), torch.randint(0, 32, (2, 5), generator=g)


def _loss(draft, batch):
    ids, aux, labels = batch
    return nn.functional.cross_entropy(draft(ids, aux).flatten(0, 1), labels.flatten())


def _fsdp_grads(ctx, sharding: str, accum: int) -> dict:
    from trainer.parallel import set_micro_step, shard_draft

    draft = shard_draft(_draft_like(), ctx, sharding)
    grads_after_first = None
    for micro in range(accum):
        set_micro_step(draft, final=micro == accum - 1)
        _loss(draft, _draft_batch(ctx.rank, micro)).backward()
        if micro == 0:
            grads_after_first = [p.grad is None for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    grads = {n: p.grad.full_tensor() for n, p in draft.named_parameters() if p.requires_grad}
    optimizer.step()
    moment = optimizer.state[draft.fc.weight]["exp_avg"]
    return {"grads": grads, "no_grad_before_sync": grads_after_first,
            "moment_local_rows": moment.to_local().shape[0],
            "params": {n: p.full_tensor() for n, p in draft.named_parameters()}}


def _reference_grads(world: int, accum: int) -> dict:
    """One process, all ranks' micro-batches: the mean loss over ranks, summed over micro-steps."""
    draft = _draft_like()
    for micro in range(accum):
        loss = sum(_loss(draft, _draft_batch(r, micro)) for r in range(world)) / world
        loss.backward()
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.requires_grad}
    optimizer.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in draft.named_parameters()}}


def world4_job(rank: int) -> dict:
    from trainer.parallel import collect_target_outputs, gather_measurements, group_batch, init_distributed

    ctx = init_distributed(tp=2)
    batch, seq, vocab, aux_dim = 2, 3, 8, 6
    ids = torch.arange(batch * seq).view(batch, seq) + 1000 * rank
    grouped_ids, grouped_mask = group_batch(ids, torch.ones_like(ids), ctx)
    # The target's local output for the grouped rows: full logits = f(row ids), vocab shard tp_rank.
    full_logits = grouped_ids.unsqueeze(-1).float() + 0.01 * torch.arange(vocab)
    shard = vocab // ctx.tp
    local = full_logits[..., ctx.tp_rank * shard : (ctx.tp_rank + 1) * shard].contiguous()
    aux = grouped_ids.unsqueeze(-1).float().expand(-1, -1, aux_dim).contiguous()
    outputs = {mode: collect_target_outputs(local, aux, ctx, mode) for mode in ("gather", "all-to-all")}
    own_full = ids.unsqueeze(-1).float() + 0.01 * torch.arange(vocab)
    measured = gather_measurements({"peak": {"allocated": 100 + rank, "reserved": 100 + 10 * rank}, "device": "cpu"}, ctx)
    return {
        "tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank,
        "grouped_ids": grouped_ids, "grouped_mask_sum": int(grouped_mask.sum()),
        "outputs": outputs, "own_full": own_full, "own_aux": ids.unsqueeze(-1).float().expand(-1, -1, aux_dim),
        "measured": measured,
        "zero2": _fsdp_grads(ctx, "zero2", accum=2), "zero3": _fsdp_grads(ctx, "zero3", accum=2),
        "reference": _reference_grads(ctx.world, accum=2),
    }


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_spawned(world4_job, 4, tmp_path_factory.mktemp("w4"))


def test_mesh_puts_neighbouring_ranks_in_one_tp_group(world4):
    assert [(r["dp_rank"], r["tp_rank"]) for r in world4] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_group_batch_stacks_the_tp_groups_micro_batches_in_rank_order(world4):
    for rank, res in enumerate(world4):
        group = range(rank - rank % 2, rank - rank % 2 + 2)
        want = torch.cat([torch.arange(6).view(2, 3) + 1000 * r for r in group])
        assert torch.equal(res["grouped_ids"], want)
        assert res["grouped_mask_sum"] == 12  # 2 ranks x 2 samples x 3 tokens


@pytest.mark.parametrize("mode", ["gather", "all-to-all"])
def test_each_rank_gets_full_vocab_logits_and_aux_for_its_own_rows(world4, mode):
    for res in world4:
        logits, aux = res["outputs"][mode]
        assert logits.shape == (2, 3, 8)
        assert torch.equal(logits, res["own_full"])
        assert torch.equal(aux, res["own_aux"])


def test_gather_and_all_to_all_agree_bitwise(world4):
    for res in world4:
        assert torch.equal(res["outputs"]["gather"][0], res["outputs"]["all-to-all"][0])


def test_measurements_take_the_max_and_flag_imbalance(world4):
    # allocated 100..103: max 103, spread 3/103 = 2.9% (fine); reserved 100..130: 30/130 = 23% (flagged)
    for res in world4:
        m = res["measured"]
        assert m.max == {"peak": {"allocated": 103, "reserved": 130}, "device": "cpu"}
        assert set(m.imbalanced) == {"peak.reserved"}
        assert m.imbalanced["peak.reserved"] == pytest.approx(30 / 130)


@pytest.mark.parametrize("sharding", ["zero2", "zero3"])
def test_fsdp_draft_gradients_and_step_match_single_process(world4, sharding):
    ref = world4[0]["reference"]
    for res in world4:
        got = res[sharding]
        assert all(got["no_grad_before_sync"]), "a non-final micro-step reduced gradients"
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6)
        for name, param in ref["params"].items():
            torch.testing.assert_close(got["params"][name], param, rtol=1e-5, atol=1e-6)
        assert got["moment_local_rows"] == 2  # fc.weight [8, 24] sharded on dim 0 over 4 ranks
