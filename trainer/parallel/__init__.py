"""The trainer's multi-GPU layer: functions over plain modules and tensors that the loop calls.

    ctx = init_distributed(tp, plan_world=..., gpus_per_node=..., model_config=hf_config)
    parallelize_target(target, ctx)                      # TP: lm_head output stays [.., V/tp]
    ids, mask = group_batch(ids, mask, ctx)              # the TP group's micro-batches
    logits, aux = collect_target_outputs(local_logits, aux, ctx, "gather" | "all-to-all")
    shard_draft(draft, ctx, "zero2" | "zero3"); optimizer = AdamW(draft.parameters())
    set_micro_step(draft, final=is_last_micro_step)
    report = gather_measurements(peaks, ctx)             # max over ranks, imbalance > 5%
"""

from trainer.parallel.context import DistContext, check_tp_for_model, init_distributed, shutdown_distributed
from trainer.parallel.draft_sharding import FSDP_SHARDINGS, set_micro_step, shard_draft
from trainer.parallel.launch import inside_worker, launch_workers, record, relaunch, torchrun_command
from trainer.parallel.measurements import Gathered, gather_measurements
from trainer.parallel.outputs import MODES, collect_target_outputs, group_batch
from trainer.parallel.tensor_parallel import full_tensor, parallelize_layer, parallelize_root, parallelize_target

__all__ = [
    "DistContext", "FSDP_SHARDINGS", "Gathered", "full_tensor", "MODES", "check_tp_for_model", "collect_target_outputs", "gather_measurements",
    "group_batch", "init_distributed", "inside_worker", "launch_workers", "parallelize_layer", "parallelize_root",
    "parallelize_target", "record", "relaunch",
    "set_micro_step", "shard_draft", "shutdown_distributed", "torchrun_command",
]
