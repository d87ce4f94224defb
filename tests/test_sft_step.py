"""trainer.sft_step on CPU: a tiny Llama trains 2 steps under the live-storage tracker and reports phases."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from trainer import sft_step

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}  # fmt: skip
# Parameters by hand (head_dim 64 / 4 = 16, KV width 2 * 16 = 32):
#   embedding 512*64 = 32768, lm_head (untied) 32768, final norm 64
#   per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; MLP 3*64*128 = 24576; 2 norms 128 -> 36992
#   total 32768 + 32768 + 64 + 2 * 36992 = 139584
PARAMS = 139584


def _run(tmp_path, **spec):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    values = {"model": str(tmp_path / "tiny.json"), "workload": "sft", "seq": 32, "micro_batch": 2, **spec}
    (tmp_path / "row.yaml").write_text(yaml.safe_dump(values))
    code = sft_step.main(["--config", str(tmp_path / "row.yaml"), "--steps", "2", "--report", str(tmp_path / "r.json")])
    return code, json.loads((tmp_path / "r.json").read_text()) if code == 0 else None


def test_two_bf16_steps_report_every_phase(tmp_path):
    code, report = _run(tmp_path, precision="bf16", ac=True)
    assert code == 0
    step1, step2 = report["steps"]
    assert list(report["load"]) == ["load"]
    assert list(step1["phases"]) == list(step2["phases"]) == ["forward", "backward", "optimizer_step"]
    assert step2["seconds"] > 0 and step2["tokens_per_s"] > 0
    # random init: the logits are nearly uniform, so the loss is close to ln(vocab) = ln 512 = 6.238
    assert abs(step1["loss"] - math.log(512)) < 0.3
    # load holds the bf16 parameters (2 B each) plus the rotary inv_freq buffers (tens of bytes)
    assert 2 * PARAMS <= report["load"]["load"]["allocated"] <= 2 * PARAMS + 1024
    # Adam creates its bf16 moments (2 x 2 B/param) inside step 1's optimizer step, so step 2's forward
    # holds them and step 1's did not (plus a scalar step count per parameter tensor)
    grown = step2["phases"]["forward"]["allocated"] - step1["phases"]["forward"]["allocated"]
    assert 4 * PARAMS <= grown <= 4 * PARAMS + 4096
    assert report["world"] == 1 and report["device"] == "cpu"
    assert "prediction" in report


@pytest.mark.parametrize("split_master, state_bytes", [(False, 12), (None, 10)])
def test_bf16_master_keeps_its_master_and_moments(tmp_path, split_master, state_bytes):
    code, report = _run(tmp_path, precision="bf16-master", split_master=split_master)
    assert code == 0
    step1, step2 = report["steps"]
    # the master (whole: 4 B fp32; split: its 2 B low bits) and fp32 moments (8 B) appear in step
    # 1's optimizer step: 12 or 10 B/param more in step 2
    grown = step2["phases"]["forward"]["allocated"] - step1["phases"]["forward"]["allocated"]
    assert state_bytes * PARAMS <= grown <= state_bytes * PARAMS + 4096


def test_wrong_workload_is_refused(tmp_path, capsys):
    code, _ = _run(tmp_path, workload="eagle3")
    assert code == 2
    assert "runs workload sft" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_level_is_above_reserved_is_above_allocated(tmp_path):
    code, report = _run(tmp_path, precision="bf16", seq=128)
    assert code == 0
    phases = report["steps"][-1]["phases"]["backward"]
    # the CUDA context alone is hundreds of MiB outside the allocator
    assert phases["device_used"] > phases["reserved"] >= phases["allocated"] > 0


@pytest.mark.parametrize("model,cuda,cpu", [("llama-3.1-8b", "sdpa", "sdpa"), ("gpt-oss-20b", "flex_attention", "eager")])
def test_attention_kernel_follows_what_the_model_class_supports(model, cuda, cpu):
    # transformers refuses sdpa for gpt-oss (attention sinks); flex has no backward on CPU
    config = sft_step.hf_config(model)
    assert sft_step.attention_kernel(config, torch.device("cuda")) == cuda
    assert sft_step.attention_kernel(config, torch.device("cpu")) == cpu


def test_mixed_precision_runs_the_mixed_recipe(tmp_path):
    # `mixed` = bf16 params, fp32 masters, fp32 grads accumulated beside them, fp32 Adam (18 B/param);
    # before this was checked it silently ran plain bf16 AdamW (8 B/param)
    from trainer.optim import MasterWeightAdamW

    code, report = _run(tmp_path, precision="mixed")
    assert code == 0 and all(math.isfinite(s["loss"]) for s in report["steps"])
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    spec = sft_step.load_spec(tmp_path / "row.yaml")
    optimizer = sft_step.build_optimizer(model, spec, torch.device("cpu"))
    assert isinstance(optimizer, MasterWeightAdamW) and optimizer.fp32_grads
