"""The estimator against the measured multi-GPU trainer runs (2 and 4 H200, current trainer).

Each JSONL line of tests/data/gpu/multi_train_x{2,4}.jsonl is one `fitplan train` run (its
command and its measured peaks, max over ranks). The device-level goal of docs/validation.md:
never under-predict by more than the gpt-oss-120b gather check's 2.3% (an under-prediction is
an OOM the user was told would not happen), and over-predict by at most 8%.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from fitplan.config import RunSpec
from fitplan.estimator import estimate_spec

DATA = Path(__file__).parent / "data" / "gpu"
RUNS = [json.loads(line) for name in ("multi_train_x2.jsonl", "multi_train_x4.jsonl")
        for line in (DATA / name).read_text().splitlines() if line.strip()]


def spec_of(command: str) -> RunSpec:
    words = shlex.split(command)
    flags = {w[2:].replace("-", "_"): v for w, v in zip(words, words[1:]) if w.startswith("--") and not v.startswith("--")}
    # these runs predate the lean draft and split masters: the trainer ran torch's composition
    # (draft_memory plain) and whole fp32 masters
    return RunSpec(model=flags["model"], gpus=flags["gpus"], tp=int(flags["tp"]), seq=int(flags["seq"]),
                   micro_batch=int(flags["micro_batch"]), output_sharding=flags["output_sharding"],
                   draft_memory="plain", split_master=False)


@pytest.mark.parametrize("run", RUNS, ids=[r["run"] for r in RUNS])
def test_device_level_within_goal(run):
    est = estimate_spec(spec_of(run["command"]))
    error = (run["meas_device"] * 2**30 - est.peak_reserved_bytes) / est.peak_reserved_bytes
    assert -0.08 <= error <= 0.025, f"{run['run']}: device error {100 * error:+.1f}%"


@pytest.mark.parametrize("run", RUNS, ids=[r["run"] for r in RUNS])
def test_peak_allocated_within_two_percent(run):
    est = estimate_spec(spec_of(run["command"]))
    error = (run["meas_alloc"] * 2**30 - est.peak_allocated_bytes) / est.peak_allocated_bytes
    assert abs(error) <= 0.02, f"{run['run']}: allocated error {100 * error:+.1f}%"
