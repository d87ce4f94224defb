"""SpecForge's offline Eagle3 step on one H200 (docs/data/vs_specforge_fsdp.json, tool specforge-fsdp:
SpecForge 0.2.0's OnlineEagle3Model, FSDP1 over a one-rank group, BF16Optimizer; llama-3.1-8b
shapes, B 1, S 2048 / 4096 / 8192) against the estimator (fitplan/estimator/specforge_runtime.py,
specforge_terms.py; fitplan/validation/specforge_fsdp.py).

The terms were studied on S 2048 and 8192; S 4096 is held out. The measured numbers are read from
the committed JSON; what the benchmark holds beside the step is computed by hand below and checked
in its recording.
"""

from __future__ import annotations

from collections import Counter

import pytest

from fitplan.allocator.trace import load_snapshot
from fitplan.validation import specforge_fsdp

ROWS = specforge_fsdp.rows()


def test_the_three_measured_runs_are_read():
    assert [(r.batch, r.seq) for r in ROWS] == [(1, 2048), (1, 4096), (1, 8192)]
    assert [r.studied for r in ROWS] == [True, False, True]


def test_what_the_benchmark_holds_beside_the_step_by_hand():
    # llama-3.1-8b's draft: V 128256, h 4096, Vd 32000
    job = specforge_fsdp.bench_job(2048)
    assert specforge_fsdp.benchmark_held_tensors(job) == [2 * 128256 * 4096, 8 * 32000, 8 * 32000, 128256]
    assert sum(specforge_fsdp.benchmark_held_tensors(job)) == 1_051_313_408


@pytest.mark.parametrize("seq", [2048, 4096, 8192])
def test_the_benchmarks_copies_live_through_its_whole_recording(seq):
    """Made before the draft (make_tensors: the target lm_head, then the embedding copy and the
    maps) and never freed: two [V, h] bf16 tensors, the lm_head TargetHead uses and the copy."""
    snapshot = load_snapshot(specforge_fsdp.TRACES / f"specforge-fsdp-1x{seq}.snapshot.pickle.gz")
    never_freed = _never_freed_before_the_first_step(snapshot["device_traces"][0])
    held = specforge_fsdp.benchmark_held_tensors(specforge_fsdp.bench_job(seq))
    assert never_freed[held[0]] == 2
    assert never_freed[held[1]] >= 2 and never_freed[held[3]] >= 1


def _never_freed_before_the_first_step(entries: list[dict]) -> Counter:
    live: dict[int, int] = {}
    for entry in entries:
        if entry.get("user_metadata"):
            break
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry["size"]
    freed = {e["addr"] for e in entries if e["action"] == "free_requested"}
    return Counter(size for addr, size in live.items() if addr not in freed)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"s{r.seq}")
def test_peak_allocated_is_within_two_percent(row):
    assert abs(row.allocated_error) <= 0.02, (row.seq, row.allocated_error)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"s{r.seq}")
def test_each_measured_phase_peak_is_within_one_percent(row):
    predicted = row.predicted_phases
    for phase, measured in row.measured_phases.items():
        assert abs(predicted[phase] / measured - 1) <= 0.01, (row.seq, phase, predicted[phase], measured)


# ------------------------------------------------------------------ reserved bytes: the written step replayed


def test_reserved_bytes_against_the_measured_runs():
    """The issue's bar: |error| median <= 3%, never under by more than 3%. Met; the max (6%) is
    not: S 2048 is over by 12% (next test: when the GPU gives blocks back)."""
    errors = {r.seq: r.reserved_error for r in ROWS}
    assert sorted(abs(e) for e in errors.values())[1] <= 0.03  # the median of three
    assert min(errors.values()) >= -0.03
    assert abs(errors[4096]) <= 0.03  # held out
    assert abs(errors[8192]) <= 0.03
    assert 0 < errors[2048] <= 0.13


@pytest.fixture(scope="module", params=ROWS, ids=lambda r: f"s{r.seq}")
def recorded(request):
    row = request.param
    job = specforge_fsdp.bench_job(row.seq)
    snapshot = load_snapshot(specforge_fsdp.snapshot_path(row.seq))
    return (row, specforge_fsdp.recorded_phases(snapshot)[2], specforge_fsdp.recorded_reserved(snapshot, job)[2],
            specforge_fsdp.recorded_reserved(snapshot, job, retired_return_with_backward=True)[2],
            specforge_fsdp.written_reserved(job))


def test_the_allocator_model_replaying_the_recorded_requests_makes_its_segments(recorded):
    """Each recorded free taken where its block came back, and an empty_cache where the history
    releases segments unasked: the model's peak reserved in each phase of step 2 is the real one."""
    _, real, exact, _, _ = recorded
    assert {phase: exact[phase] for phase in real} == {phase: r for phase, (_, r) in real.items()}


def test_the_written_step_reserves_what_the_recorded_requests_do_under_its_rule(recorded):
    """The written step returns a block freed while FSDP's stream still reads it when backward
    ends. The recorded requests under that rule reserve, per phase of step 2, what the written
    steady step does, within 1%: the 12% at S 2048 is that rule, not the tensors. There the GPU
    kept closer to the CPU (backward: 25 ms of dispatch for 53 ms of kernels, against 44 for
    195 at S 8192) and gave the embedding's gradients back before the step ended."""
    _, _, _, deferred, written = recorded
    for phase, labels in specforge_fsdp.WRITTEN_PHASES.items():
        ours = max(written[f"steady.{label}"] for label in labels)
        assert abs(ours / deferred[phase] - 1) <= 0.01, (phase, ours, deferred[phase])


def test_the_segments_backward_makes_are_the_recorded_ones(recorded):
    """Segments made in step 2's backward (MiB, stream): on FSDP's unshard stream the same at
    every shape (each step weight's gradient sum: lm_head 250, gate/up/down 112, o 32, k, v 16,
    q 64; the flat gradient 1814); on the compute stream the recording's are among the written
    ones (the embedding's 1002 MiB gradients), the same at S 8192; at 4096 the written step
    makes one more, as the recording's steps 3 and 4 do; at 2048 more, the blocks it keeps
    until backward ends."""
    row = recorded[0]
    snapshot = load_snapshot(specforge_fsdp.snapshot_path(row.seq))
    real = specforge_fsdp.recorded_segments(snapshot, 2, "backward")
    ours = specforge_fsdp.written_segments(specforge_fsdp.bench_job(row.seq), "steady.backward")
    unshard = {key: n for key, n in real.items() if key[1] == 1}
    assert unshard == {key: n for key, n in ours.items() if key[1] == 1}
    assert unshard == {(16, 1): 2, (32, 1): 1, (64, 1): 1, (112, 1): 3, (250, 1): 1, (1814, 1): 1}
    assert not real - ours
    extra = ours - real
    assert {8192: not extra, 4096: extra == Counter({(1002, 0): 1}), 2048: bool(extra)}[row.seq]
