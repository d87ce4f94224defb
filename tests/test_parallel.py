"""The multi-GPU layer in one process: refusals before anything loads, world 1, the launcher."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fitplan.errors import FitplanError
from trainer import parallel
from trainer.parallel import (
    check_tp_for_model,
    collect_target_outputs,
    gather_measurements,
    group_batch,
    init_distributed,
    launch_workers,
    shard_draft,
    torchrun_command,
)


@pytest.fixture
def env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


class HeadsConfig:
    def __init__(self, heads, kv_heads, vocab=1024, intermediate=512):
        self.num_attention_heads, self.num_key_value_heads = heads, kv_heads
        self.vocab_size, self.intermediate_size = vocab, intermediate


def test_world_one_without_torchrun_needs_no_process_group(env):
    ctx = init_distributed(tp=1)
    assert (ctx.rank, ctx.world, ctx.tp, ctx.tp_rank, ctx.dp, ctx.distributed) == (0, 1, 1, 0, 1, False)
    assert not dist.is_initialized()
    ids = torch.ones(2, 3, dtype=torch.long)
    assert group_batch(ids, ids, ctx)[0] is ids
    logits, aux = torch.randn(2, 3, 8), torch.randn(2, 3, 4)
    assert collect_target_outputs(logits, aux, ctx, "all-to-all")[0] is logits
    draft = nn.Linear(2, 2)
    assert shard_draft(draft, ctx, "zero3") is draft
    parallel.set_micro_step(draft, final=False)  # a plain module: nothing to switch off
    got = gather_measurements({"peak": 7, "device": "cpu"}, ctx)
    assert got.max == {"peak": 7, "device": "cpu"} and got.imbalanced == {}


def test_world_not_divisible_by_tp_is_refused_before_joining(env):
    env.setenv("WORLD_SIZE", "6")
    with pytest.raises(FitplanError, match="tp 4 does not divide the world size 6") as exc:
        init_distributed(tp=4)
    _one_line(exc)
    assert not dist.is_initialized()


def test_launch_with_fewer_ranks_than_the_plan_is_refused(env):
    env.setenv("WORLD_SIZE", "4")
    with pytest.raises(FitplanError, match="the plan needs 8 ranks but 4 were launched"):
        init_distributed(tp=2, plan_world=8)


def test_missing_gpus_are_refused(env):
    short = torch.cuda.device_count() + 1
    with pytest.raises(FitplanError, match="GPU") as exc:
        init_distributed(tp=1, gpus_per_node=short)
    _one_line(exc)


def test_missing_nccl_is_refused(env):
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_WORLD_SIZE", "2")
    env.setattr(torch.cuda, "is_available", lambda: True)
    env.setattr(torch.cuda, "device_count", lambda: 2)
    env.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(FitplanError, match="no NCCL"):
        init_distributed(tp=2, gpus_per_node=2)


def test_tp_beyond_the_kv_heads_is_refused_with_the_sizes_that_work(env):
    # 32 heads, 8 KV heads (Llama-3-8B / Qwen3-8B): tp must divide both -> 1, 2, 4, 8.
    with pytest.raises(FitplanError, match="accepted: 1, 2, 4, 8$") as exc:
        check_tp_for_model(HeadsConfig(32, 8), 16)
    _one_line(exc)
    with pytest.raises(FitplanError, match="24 attention heads"):
        check_tp_for_model(HeadsConfig(24, 8), 16)
    check_tp_for_model(HeadsConfig(32, 8), 8)


def test_tp_not_dividing_vocab_or_mlp_is_refused():
    with pytest.raises(FitplanError, match="vocabulary of 1001"):
        check_tp_for_model(HeadsConfig(8, 8, vocab=1001), 2)
    with pytest.raises(FitplanError, match="intermediate_size 100"):
        check_tp_for_model(HeadsConfig(8, 8, intermediate=100), 8)


def test_model_config_is_checked_inside_init(env):
    env.setenv("WORLD_SIZE", "4")
    with pytest.raises(FitplanError, match="2 KV heads"):
        init_distributed(tp=4, model_config=HeadsConfig(32, 2))


def test_bad_output_mode_and_sharding_are_refused(env):
    ctx = init_distributed(tp=1)
    with pytest.raises(FitplanError, match="accepted: gather, all-to-all"):
        collect_target_outputs(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), ctx, "scatter")
    with pytest.raises(FitplanError, match="accepted: zero2, zero3"):
        shard_draft(nn.Linear(2, 2), ctx, "zero1")


def test_torchrun_command_single_node_and_multi_node():
    local = torchrun_command(["-m", "fitplan.cli", "train", "--plan", "p.yaml"], nproc=4)
    assert local[1:] == ["-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=4", "--max-restarts=0",
                         "--standalone", "--module", "fitplan.cli", "train", "--plan", "p.yaml"]
    multi = torchrun_command(["train.py"], nproc=8, nnodes=2, rdzv_endpoint="node0:29500", rdzv_id="job7")
    assert multi[3:] == ["--nnodes=2", "--nproc-per-node=8", "--max-restarts=0", "--rdzv-backend=c10d",
                         "--rdzv-endpoint=node0:29500", "--rdzv-id=job7", "train.py"]
    with pytest.raises(FitplanError, match="rdzv_endpoint"):
        torchrun_command(["train.py"], nproc=8, nnodes=2)


FAILING_WORKER = textwrap.dedent(
    """
    import os
    import torch.distributed as dist
    from trainer.parallel import init_distributed, inside_worker, record

    @record
    def main():
        assert inside_worker()
        ctx = init_distributed(tp=1)
        if ctx.rank == 1:
            raise RuntimeError("draft exploded on rank 1")
        dist.barrier()  # rank 0 waits here until torchrun stops it
        print("rank 0 passed the barrier")

    main()
    """
)


def test_a_failing_worker_stops_the_job_and_its_error_is_shown(tmp_path, capfd, env):
    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER)
    env.setenv("PYTHONPATH", ":".join(p for p in sys.path if p))
    env.setenv("OMP_NUM_THREADS", "1")
    code = launch_workers([str(script)], nproc=2)
    out, err = capfd.readouterr()
    assert code != 0
    assert "draft exploded on rank 1" in err
    root_cause = err.split("Root Cause")[-1]  # torchrun's summary of the first failure
    assert re.search(r"rank\s*:\s*1 ", root_cause) and "draft exploded on rank 1" in root_cause
    assert "passed the barrier" not in out + err
