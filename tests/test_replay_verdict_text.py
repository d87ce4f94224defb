"""The reason printed for a verdict: the allocator model's retries for a replayed job, the fitted
stranded-block rule for the others (fitplan/render/estimate.py, fitplan/explain.py).

Estimates are written by hand here (whole GiB) so every printed figure is worked out below.
"""

from __future__ import annotations

from fitplan.estimator.result import AllocatorReplay, Estimate
from fitplan.explain import replay_line
from fitplan.render.estimate import device_peak_line, verdict

GIB = 1 << 30


def hand_estimate(replay: AllocatorReplay | None, reserve_gib: int) -> Estimate:
    """70 GiB allocated at the peak, 1 GiB outside the allocator, an 80 GiB device; without a
    replay a 2 GiB reserve floor and 10 GiB of stranded blocks."""
    phases = {"backward": {"draft.activations": 70 * GIB}}
    return Estimate(phases=phases, step1_phases=phases, gpu_total_bytes=80 * GIB,
                    allocator_reserve_bytes=reserve_gib * GIB, outside_allocator_bytes=1 * GIB,
                    largest_allocation_bytes=5 * GIB, largest_allocation_name="logits",
                    reserve_floor_bytes=2 * GIB, stranded_block_bytes=10 * GIB, replay=replay)


def test_fitted_at_risk_names_the_stranded_blocks():
    # required 70 + min(2, 4) + 1 = 73 <= 80 < 73 + 10 = 83: at risk, 3 GiB short.
    est = hand_estimate(None, reserve_gib=4)
    text = verdict(est)
    assert text.startswith("AT RISK: fits only if fragmentation spares its largest request")
    assert "3.00 GiB short if 10.00 GiB of its freed blocks stay cached" in text
    assert "retr" not in text


def test_replayed_at_risk_names_the_retries_not_the_stranded_blocks():
    # Needs 84 reserved with room (reserve 84 - 70 = 14), 78 on the device after 2 retries.
    est = hand_estimate(AllocatorReplay(78 * GIB, 84 * GIB, num_alloc_retries=2, num_ooms=0), reserve_gib=14)
    text = verdict(est)
    assert text.startswith("AT RISK: served only after the allocator freed its cache: 2 retries")
    assert "fragmentation" not in text and "expandable" not in text
    # device peak 78 + 1 = 79; with room 70 + 14 + 1 = 85.
    line = device_peak_line(est)
    assert line.startswith("device peak 79.00 GiB as the allocator model replays the step")
    assert "replayed allocator reserve 14.00" in line and "= 85.00 with room" in line
    assert "2 retries" in line and "the job needs" not in line


def test_replayed_one_retry_is_singular():
    est = hand_estimate(AllocatorReplay(78 * GIB, 84 * GIB, num_alloc_retries=1, num_ooms=0), reserve_gib=14)
    assert ": 1 retry in the allocator model's replay" in verdict(est)


def test_replayed_oom_and_fits():
    # A failed request: the device peak is what the step needs, 84 + 1 = 85, 5 GiB over 80.
    oom = hand_estimate(AllocatorReplay(79 * GIB, 84 * GIB, num_alloc_retries=2, num_ooms=1), reserve_gib=14)
    assert verdict(oom) == "OOM by 5.00 GiB: draft.activations dominates"
    # 75 with room fits the device's 79: headroom 80 - 76 = 4, whatever the stranded blocks.
    fits = hand_estimate(AllocatorReplay(75 * GIB, 75 * GIB, num_alloc_retries=0, num_ooms=0), reserve_gib=5)
    assert verdict(fits) == "FITS with 4.00 GiB headroom"
    assert device_peak_line(fits).startswith("device peak 76.00 GiB = allocated 70.00 + replayed allocator reserve 5.00")


def test_explain_replay_line():
    assert replay_line(AllocatorReplay(79 * GIB, 84 * GIB, 2, 1)).endswith(
        "OOM, a request fails even after the cache is freed (2 retries).")
    assert replay_line(AllocatorReplay(78 * GIB, 84 * GIB, 1, 0)).endswith(
        "at risk, served only after the cache is freed (1 retry).")
    assert replay_line(AllocatorReplay(75 * GIB, 75 * GIB, 0, 0)).endswith("fits, no request waits for the cache "
                                                                           "to be freed (0 retries).")


OOM_TEXT = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
    "79.18 GiB of which 1.05 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. "
    "Of the allocated memory 75.40 GiB is allocated by PyTorch, and 1.95 GiB is reserved by PyTorch but unallocated."
)


def explain_output(*job: str) -> str:
    from typer.testing import CliRunner

    from fitplan.cli import app

    result = CliRunner().invoke(app, ["explain", "-", "--model", "llama-3.2-1b", *job], input=OOM_TEXT,
                                env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_explain_adds_the_replay_only_for_jobs_it_models():
    # one GPU, fitplan's trainer: replayed; two GPUs and SpecForge's runtime keep the fitted rule
    assert "The allocator model, replaying this job's step on the GPU: fits" in explain_output("--gpus", "1xH100")
    assert "allocator model" not in explain_output("--gpus", "2xH100")
    assert "allocator model" not in explain_output("--gpus", "1xH100", "--runtime", "specforge")
