"""Multi-GPU layer checks under NCCL: run with torchrun, one process per GPU.

    torchrun --standalone --nproc-per-node 2 -m fitplan.validation.multi_gpu_layers --out multi_gpu_layers.json

1. TP correctness on the GPUs: a small fp32 Qwen3 split over the TP group against the same
   model unsharded on each GPU (max abs difference of local logits and of hidden states).
2. Output collection memory: a Qwen3-8B-shaped target (8B's widths and vocabulary, fewer
   layers, random bf16 weights) run on the TP group's micro-batches; torch.cuda peak
   allocated above the level before collect_target_outputs, for "gather" and "all-to-all",
   and what each keeps while its outputs are alive.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from trainer.parallel import (
    collect_target_outputs,
    gather_measurements,
    group_batch,
    init_distributed,
    parallelize_target,
    record,
    shutdown_distributed,
)

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6)


def tp_correctness(ctx) -> dict:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(ctx.device).eval()
    reference = copy.deepcopy(model)
    parallelize_target(model, ctx)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    with torch.no_grad():
        want, got = reference(ids, output_hidden_states=True), model(ids, output_hidden_states=True)
    shard = config.vocab_size // ctx.tp
    want_logits = want.logits[..., ctx.tp_rank * shard : (ctx.tp_rank + 1) * shard]
    return {
        "logits_max_abs_diff": (got.logits - want_logits).abs().max().item(),
        "logits_max_abs": want_logits.abs().max().item(),
        "hidden_max_abs_diff": (torch.stack(got.hidden_states) - torch.stack(want.hidden_states)).abs().max().item(),
    }


def build_target(ctx, layers: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(num_hidden_layers=layers, **QWEN3_8B)
    torch.manual_seed(0)
    with ctx.device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    return parallelize_target(model, ctx), config


def collect_memory(ctx, model, config, batch: int, seq: int, aux_layers) -> dict:
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=ctx.device)
    ids, mask = group_batch(ids, torch.ones_like(ids), ctx)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i + 1] for i in aux_layers], dim=-1)
    logits_local = out.logits
    del out
    result = {"logits_local_bytes": logits_local.numel() * logits_local.element_size()}
    for mode in ("gather", "all-to-all"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        logits, own_aux = collect_target_outputs(logits_local, aux, ctx, mode)
        torch.cuda.synchronize()
        result[mode] = {
            "peak_above_before_bytes": torch.cuda.max_memory_allocated() - before,
            "held_bytes": torch.cuda.memory_allocated() - before,
            "seconds": time.perf_counter() - start,
            "logits_shape": list(logits.shape),
        }
        result.setdefault("checksum", {})[mode] = logits.float().sum().item()
        del logits, own_aux
    return result


@record
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seqs", default="4096,8192")
    args = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    ctx = init_distributed(tp=world, gpus_per_node=world)
    report = {"tp": ctx.tp, "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    import transformers

    report["transformers"] = transformers.__version__
    report["tp_correctness"] = tp_correctness(ctx)
    model, config = build_target(ctx, args.layers)
    for seq in map(int, args.seqs.split(",")):
        report[f"collect_B1_S{seq}"] = collect_memory(ctx, model, config, 1, seq, aux_layers=(0, 1, 2))
    gathered = gather_measurements(report, ctx)
    if ctx.rank == 0:
        print(json.dumps({"per_rank": gathered.per_rank, "imbalanced": gathered.imbalanced}, indent=1))
        with open(args.out, "w") as f:
            json.dump({"per_rank": gathered.per_rank, "max": gathered.max, "imbalanced": gathered.imbalanced}, f, indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main()
