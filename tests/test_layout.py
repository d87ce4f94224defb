"""layout.resolve: tp checks, auto tp from the target weights, accumulation."""

import pytest

from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.layout import resolve


def job(**kw):
    return resolve(RunSpec(**kw))


def test_auto_tp_keeps_weights_under_half_a_gpu():
    # Llama-3.1-70B: 70.55e9 x 2 B = 131.4 GiB; half an H100 is 39.6 GiB -> tp 4 (32.9 GiB)
    assert job(model="llama-3.1-70b", gpus="8xH100").tp == 4
    # gpt-oss-120b packed: 60.8 GiB -> tp 2 (30.4 GiB); bf16 (217.6 GiB) -> tp 8 (27.2 GiB)
    assert job(model="gpt-oss-120b", gpus="8xH100", target_weights="mxfp4", runtime="specforge").tp == 2
    assert job(model="gpt-oss-120b", gpus="8xH100").tp == 8
    assert job(model="llama-3.1-8b", gpus="8xH100").tp == 1  # 15 GiB fits one GPU


def test_tp_errors_list_accepted_sizes():
    with pytest.raises(FitplanError, match="accepted: 1, 2, 4, 8"):
        job(model="llama-3.1-8b", gpus="8xH100", tp=3)
    with pytest.raises(FitplanError, match="28 attention heads"):
        job(model="qwen2.5-7b", gpus="8xH100", tp=8)
    with pytest.raises(FitplanError, match="for sft use --sharding"):
        job(model="llama-3.1-8b", workload="sft", tp=2)


def test_accumulation_from_global_batch():
    assert job(model="llama-3.1-8b", gpus="4xH100", global_batch=32, micro_batch=2).accum == 4
    with pytest.raises(FitplanError, match="contradict"):
        job(model="llama-3.1-8b", gpus="4xH100", global_batch=32, micro_batch=2, accum=2)
    with pytest.raises(FitplanError, match="not a multiple"):
        job(model="llama-3.1-8b", gpus="4xH100", global_batch=6, micro_batch=2)


def test_warnings():
    assert any("exceeds" in w for w in job(model="llama-3.2-1b", seq=200_000).warnings)
    assert any("no effect" in w for w in job(model="llama-3.1-8b", output_sharding="all-to-all").warnings)
