"""fitplan explain on realistic OOM texts. Expected figures are worked out from each message."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.estimator.result import Estimate
from fitplan.explain import config_lines, describe, matching_component, parse_ooms, segment_line
from fitplan.ladder import fit

GIB, MIB = 1 << 30, 1 << 20

# Large single request (torch >= 2.1 format), as printed by a SpecForge rank at the logits gather.
LARGE = """[rank3]: Traceback (most recent call last):
[rank3]:   File "scripts/train_eagle3.py", line 512, in <module>
[rank3]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 73.63 GiB. GPU 3 has a total capacity
of 79.18 GiB of which 4.12 GiB is free. Including non-PyTorch memory, this process has 75.05 GiB memory in use.
Of the allocated memory 60.02 GiB is allocated by PyTorch, and 14.20 GiB is reserved by PyTorch but unallocated.
If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid
fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)
"""
FRAGMENTED = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
    "79.18 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. "
    "Of the allocated memory 69.40 GiB is allocated by PyTorch, and 7.95 GiB is reserved by PyTorch but unallocated."
)
OTHER_PROCESS = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of "
    "79.18 GiB of which 612.00 MiB is free. Process 12345 has 30.00 GiB memory in use. Including non-PyTorch "
    "memory, this process has 48.58 GiB memory in use. Of the allocated memory 46.10 GiB is allocated by PyTorch, "
    "and 1.20 GiB is reserved by PyTorch but unallocated."
)
# Container variant: the driver lists our own pid, there is no "this process has" sentence.
OWN_PID_ONLY = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
    "79.15 GiB of which 22.81 MiB is free. Process 3417082 has 79.12 GiB memory in use. Of the allocated memory "
    "78.20 GiB is allocated by PyTorch, and 343.53 MiB is reserved by PyTorch but unallocated."
)
OLD = (
    "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; "
    "70.1 GiB already allocated; 1.2 GiB free; 75.3 GiB reserved in total by PyTorch)"
)
OLD_SMALL = (
    "RuntimeError: CUDA out of memory. Tried to allocate 512.00 MiB (GPU 1; 39.39 GiB total capacity; "
    "37.80 GiB already allocated; 301.19 MiB free; 38.02 GiB reserved in total by PyTorch)"
)


def test_large_single_request():
    (e,) = parse_ooms(LARGE)
    assert (e.gpu, e.requested, e.total) == (3, int(73.63 * GIB), int(79.18 * GIB))
    # 14.20 GiB cached < 73.63 requested: not fragmentation; 79.18 - 4.12 - 75.05 = 0.01 GiB elsewhere.
    assert e.cached_free == int(60.02 * GIB) + int(14.20 * GIB) - int(60.02 * GIB)
    assert e.held_elsewhere < 0.02 * GIB
    assert e.cause == "large-request"


def test_fragmentation():
    (e,) = parse_ooms(FRAGMENTED)
    # 7.95 GiB cached but unallocated >= the 2.50 GiB asked for.
    assert e.cause == "fragmentation"


SEGMENT_SHORT = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 MiB. GPU 0 has a total capacity of "
    "79.18 GiB of which 15.00 MiB is free. Including non-PyTorch memory, this process has 79.16 GiB memory in use. "
    "Of the allocated memory 78.50 GiB is allocated by PyTorch, and 100.00 MiB is reserved by PyTorch but unallocated."
)


def test_room_for_the_request_but_not_its_segment():
    # 4 MiB is over 1 MiB and under 10 MiB: the allocator maps a 20 MiB segment for it
    # (CUDACachingAllocator get_allocation_size: kLargeBuffer); 15 MiB free is not enough.
    (e,) = parse_ooms(SEGMENT_SHORT)
    line = segment_line(e)
    assert "4.0 MiB asked for (15.0 MiB free)" in line and "20.0 MiB segment" in line
    assert line in describe(e)
    # a request the free memory cannot hold in the first place: no such line
    (large,) = parse_ooms(LARGE)
    assert segment_line(large) is None


def test_other_process():
    (e,) = parse_ooms(OTHER_PROCESS)
    # used 79.18 - 0.598 = 78.58 GiB, ours 48.58 -> 30.00 GiB held elsewhere (pid 12345).
    assert abs(e.held_elsewhere - 30.0 * GIB) < 0.01 * GIB
    assert e.other_processes == ((12345, 30 * GIB),)
    assert e.cause == "other-process"


def test_own_pid_listed_is_not_another_process():
    (e,) = parse_ooms(OWN_PID_ONLY)
    # 79.12 GiB listed >= our 78.54 GiB reservation: that pid is us. 343.53 MiB cached is allocator
    # slack (< 2% of 79.15 GiB), so the GPU was simply full.
    assert e.held_elsewhere == 0
    assert e.cause == "exhausted"


def test_old_format():
    (e,) = parse_ooms(OLD)
    # reserved 75.3 - allocated 70.1 = 5.2 GiB cached >= 2.00 GiB requested.
    assert abs(e.cached_free - 5.2 * GIB) < 0.01 * GIB
    assert e.cause == "fragmentation"
    (small,) = parse_ooms(OLD_SMALL)
    # 38.02 - 37.80 = 0.22 GiB cached < 0.5 GiB requested; 0.5 GiB is 1.3% of 39.39: exhausted.
    assert small.cause == "exhausted"


def test_every_rank_is_found():
    assert len(parse_ooms(FRAGMENTED + "\n" + LARGE)) == 2


@pytest.mark.parametrize("text", ["all good, loss 1.23\n", "RuntimeError: CUDA out of memory.\n", ""])
def test_malformed_logs_are_errors(text):
    with pytest.raises(FitplanError):
        parse_ooms(text)


def test_cli_malformed_log_exit_2(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("RuntimeError: CUDA error: out of memory\n")
    result = CliRunner().invoke(app, ["explain", str(log)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert CliRunner().invoke(app, ["explain", str(tmp_path / "missing.log")]).exit_code == 2


def test_cli_without_config_explains_the_numbers():
    result = CliRunner().invoke(app, ["explain", "-"], input=OTHER_PROCESS)
    assert result.exit_code == 0
    assert "another process" in result.output and "12345" in result.output


def fake_estimate(job) -> Estimate:
    # Logits of the gather cascade: tp x micro_batch x seq x 0.5 MiB (a hand-made stand-in).
    s = job.spec
    components = {
        "target.weights": 16 * GIB,
        "logits.target": (job.tp if s.output_sharding == "gather" else 1) * s.micro_batch * s.seq * MIB // 2,
        "activations.draft": s.micro_batch * s.seq * MIB,
    }
    return Estimate(phases={"target_forward": components}, step1_phases={"target_forward": components},
                    gpu_total_bytes=job.cluster.gpu.total_bytes, allocator_reserve_bytes=0,
                    outside_allocator_bytes=0, largest_allocation_bytes=components["logits.target"],
                    largest_allocation_name="logits.target")


def test_with_config_names_the_component_and_the_cheapest_fix():
    spec = RunSpec(model="llama-3.1-8b", gpus="8xH100", tp=8, micro_batch=2, global_batch=16, seq=9216)
    result = fit(spec, estimate_fn=fake_estimate)
    (event,) = parse_ooms(LARGE)
    # logits.target = 8 x 2 x 9216 x 0.5 MiB = 72 GiB, nearest the 73.63 GiB request (weights 16,
    # activations 18). Cheapest rung that fits: micro_batch 1 (16 + 36 + 9 = 61 GiB <= 75.22).
    assert matching_component(event, result.original.estimate) == ("logits.target", 72 * GIB)
    lines = config_lines(event, result)
    assert "logits.target (72.00 GiB)" in lines[0]
    assert lines[-2].startswith("Cheapest fix: micro_batch 1, accum 2")
