"""SpecForge's offline Eagle3 step on one H200 (tool specforge-fsdp: SpecForge 0.2.0's
OnlineEagle3Model, FSDP1 over a one-rank group, BF16Optimizer; llama-3.1-8b shapes) against the
estimator (fitplan/estimator/specforge_runtime.py, specforge_terms.py, specforge_events.py;
fitplan/validation/specforge_fsdp.py).

Three calls of the benchmark: D (docs/data/vs_specforge_fsdp.json: B 1, S 2048 / 4096 / 8192),
E (vs_specforge_fsdp_b.json: B 2 S 4096, B 1 S 6144, and D's 1 x 2048 again), F
(vs_specforge_fsdp_c.json: B 1, S 2048 / 4096). D and E's benchmark process held its own copy of
the draft embedding beside the step; F's did not. The terms and the written step were studied on
D's 2048 and 8192; every other run is held out. The measured numbers are read from the committed
JSONs; what the benchmark holds beside the step is computed by hand below and checked in its
recordings.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import pytest

from fitplan.allocator.trace import load_snapshot
from fitplan.validation import specforge_fsdp

REPO = Path(__file__).resolve().parents[1]
ROWS = specforge_fsdp.rows(REPO)
HELD_OUT = [r for r in ROWS if not r.studied]


def _id(row) -> str:
    return f"{row.call}-{row.batch}x{row.seq}"


def test_the_runs_of_the_three_calls_are_read():
    assert [(r.call, r.batch, r.seq, r.copy_held, r.label) for r in ROWS] == [
        ("D", 1, 2048, True, "studied"),
        ("D", 1, 4096, True, "held out"),
        ("D", 1, 8192, True, "studied"),
        ("E", 1, 6144, True, "held out"),
        ("E", 2, 4096, True, "held out"),
        ("F", 1, 2048, False, "held out (studied shape, new run)"),
        ("F", 1, 4096, False, "held out"),
    ]


def test_the_repeated_run_left_out_measured_what_the_first_did():
    """E ran D's 1 x 2048 again, copy held alike: the same peaks to the byte, so one row."""
    def at_2048(name: str) -> dict:
        path = REPO / "docs" / "data" / name
        found = [r for r in json.loads(path.read_text())["results"]
                 if r["tool"] == "specforge-fsdp" and (r["batch"], r["seq"]) == (1, 2048)]
        assert len(found) == 1
        return {key: found[0][key] for key in ("peak_allocated", "peak_reserved", "phase_peak_allocated")}

    assert at_2048("vs_specforge_fsdp_b.json") == at_2048("vs_specforge_fsdp.json")


def test_what_the_benchmark_holds_beside_the_step_by_hand():
    # llama-3.1-8b's draft: V 128256, h 4096, Vd 32000
    job = specforge_fsdp.bench_job(2048)
    assert specforge_fsdp.benchmark_held_tensors(job) == [2 * 128256 * 4096, 8 * 32000, 8 * 32000, 128256]
    assert sum(specforge_fsdp.benchmark_held_tensors(job)) == 1_051_313_408
    assert [r.held for r in ROWS] == [1_051_313_408 if r.copy_held else 0 for r in ROWS]


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_the_copy_lives_through_the_recordings_of_calls_d_and_e_only(row):
    """Made before the draft (make_tensors: the target lm_head, then the embedding copy and the
    maps) and never freed: two [V, h] bf16 tensors in D and E, the lm_head TargetHead uses and
    the copy; in F only the lm_head."""
    snapshot = load_snapshot(row.snapshot)
    never_freed = _never_freed_before_the_first_step(snapshot["device_traces"][0])
    held = specforge_fsdp.benchmark_held_tensors(row.job)
    if row.copy_held:
        assert never_freed[held[0]] == 2
        assert never_freed[held[1]] >= 2 and never_freed[held[3]] >= 1
    else:
        assert never_freed[held[0]] == 1


def _never_freed_before_the_first_step(entries: list[dict]) -> Counter:
    live: dict[int, int] = {}
    for entry in entries:
        if entry.get("user_metadata"):
            break
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry["size"]
    freed = {e["addr"] for e in entries if e["action"] == "free_requested"}
    return Counter(size for addr, size in live.items() if addr not in freed)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_peak_allocated_is_within_two_percent(row):
    """Held out included: 0.07-0.16% under at every run."""
    assert abs(row.allocated_error) <= 0.02, (_id(row), row.allocated_error)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_each_measured_phase_peak_is_within_one_percent(row):
    """Every phase 0.03-0.16% under but B 2's backward, 0.95% over (held out: the terms were
    studied at B 1)."""
    predicted = row.predicted_phases
    for phase, measured in row.measured_phases.items():
        assert abs(predicted[phase] / measured - 1) <= 0.01, (_id(row), phase, predicted[phase], measured)


# ------------------------------------------------------------------ reserved bytes: the written step replayed

# Per run, the reserved error's bounds around what it measures (docs/allocator.md gives the table).
RESERVED_BOUNDS = {
    # FSDP's second-stream gradient blocks: the written step gives them back when backward ends;
    # at S 2048 the GPU kept close to the CPU and gave most back earlier (the replay tests below)
    ("D", 1, 2048): (0.11, 0.13),    # +12.3%
    ("F", 1, 2048): (0.17, 0.20),    # +18.5%: the same blocks, without the copy's segment beside them
    # the model's own segment addresses: the recorded requests reserve 2.5% more with them than
    # with the driver's (a best-fit tie between equal free blocks), and the written step 0.9% more
    ("E", 1, 6144): (0.03, 0.04),    # +3.4%
    ("D", 1, 4096): (-0.01, 0.01),   # -0.2%
    ("D", 1, 8192): (-0.01, 0.01),   # +0.4%
    ("E", 2, 4096): (-0.01, 0.01),   # -0.0%
    ("F", 1, 4096): (-0.01, 0.01),   # -0.2%
}


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_reserved_bytes_against_each_run(row):
    low, high = RESERVED_BOUNDS[(row.call, row.batch, row.seq)]
    assert low <= row.reserved_error <= high, (_id(row), row.reserved_error)


def test_reserved_bytes_against_the_issues_bar():
    """Issue 16's bar: |error| median <= 3%, max <= 6%, never under by more than 3%. Over all
    seven runs and over the five held out, the median and the under are met, the max is not:
    the two S 2048 runs (12.3%, 18.5%). Without them the max is 3.4% (S 6144)."""
    for chosen, median_bounds in ((ROWS, (0.003, 0.005)), (HELD_OUT, (0.001, 0.003))):
        errors = [r.reserved_error for r in chosen]
        median = statistics.median(abs(e) for e in errors)
        most = max(abs(e) for e in errors)
        under = max(0.0, -min(errors))
        assert median_bounds[0] <= median <= median_bounds[1] and median <= 0.03
        assert 0.18 <= most <= 0.19  # F's 1 x 2048, over the bar's 6%
        assert under <= 0.002  # at most 0.2% under
        assert specforge_fsdp.summary(errors) == (median, most, under)
    not_2048 = [abs(r.reserved_error) for r in ROWS if r.seq != 2048]
    assert 0.03 <= max(not_2048) <= 0.04


@pytest.fixture(scope="module", params=ROWS, ids=_id)
def recorded(request):
    """Per steady phase (the most over the recorded steps from step 2 on): the real segments'
    peak reserved, the model replaying the recorded requests with the recorded segment
    addresses, the same with the model's addresses, the same with blocks other streams used back
    when backward ends, and the written step."""
    row = request.param
    snapshot = load_snapshot(row.snapshot)
    real = {step: {phase: r for phase, (_, r) in phases.items()}
            for step, phases in specforge_fsdp.recorded_phases(snapshot).items()}
    exact = specforge_fsdp.recorded_reserved(snapshot, row.job, recorded_addresses=True)
    model = specforge_fsdp.steady(specforge_fsdp.recorded_reserved(snapshot, row.job))
    deferred = specforge_fsdp.steady(specforge_fsdp.recorded_reserved(snapshot, row.job,
                                                                      retired_return_with_backward=True))
    written = specforge_fsdp.written_reserved(row.job, row.copy_held)
    ours = {phase: max(written[f"steady.{label}"] for label in labels)
            for phase, labels in specforge_fsdp.WRITTEN_PHASES.items()}
    return row, snapshot, real, exact, model, deferred, ours


def test_the_allocator_model_replaying_the_recorded_requests_makes_its_segments(recorded):
    """Each recorded free taken where its block came back, an empty_cache where the history
    releases segments unasked, the segments at the recorded addresses: the model's peak reserved
    in each phase of every step is the real one."""
    _, _, real, exact, _, _, _ = recorded
    assert exact == real


# MiB the recorded requests reserve more with the model's segment addresses than the driver's
ADDRESS_TIE_MIB = {("E", 1, 6144): 892, ("E", 2, 4096): 96}


def test_the_segment_addresses_decide_best_fits_ties(recorded):
    """Best fit's tie between two equal free blocks of a stream goes to the lower address. With
    the model's addresses instead of the driver's the same requests reserve the same at five runs,
    more at two (at S 6144 a 112 MiB segment the driver's tie kept in use is given back at the
    first empty_cache, in setup, and the later segments differ from there on)."""
    row, _, real, _, model, _, _ = recorded
    more = ADDRESS_TIE_MIB.get((row.call, row.batch, row.seq), 0)
    steady_real = specforge_fsdp.steady(real)
    assert {phase: (model[phase] - steady_real[phase]) >> 20 for phase in steady_real} == dict.fromkeys(steady_real, more)


def test_the_written_step_reserves_what_the_recorded_requests_do_under_its_rule(recorded):
    """The written step returns a block freed while FSDP's stream still reads it when backward
    ends. The recorded requests under that rule (the model's addresses, as the written step has)
    reserve per steady phase what the written step does within 1.1% (S 6144's backward +1.01%,
    the rest within 0.74%): the 12% and 18% at S 2048 are that rule, not the tensors. There the
    GPU kept closer to the CPU (backward: 25 ms of dispatch for 53 ms of kernels, against 44 for
    195 at S 8192) and gave the embedding's gradients back before the step ended."""
    row, _, _, _, _, deferred, ours = recorded
    for phase in specforge_fsdp.WRITTEN_PHASES:
        assert abs(ours[phase] / deferred[phase] - 1) <= 0.011, (_id(row), phase, ours[phase], deferred[phase])


# Segments the written step's steady backward makes beyond the recording's step 2 (MiB, stream 0)
EXTRA_SEGMENTS = {
    ("D", 1, 2048): {(1002, 0): 2, (250, 0): 2, (112, 0): 2, (96, 0): 1},
    ("D", 1, 4096): {(1002, 0): 1},
    ("E", 1, 6144): {(1002, 0): 1},
    ("F", 1, 2048): {(1002, 0): 3, (250, 0): 2, (112, 0): 2, (96, 0): 1},
}


def test_the_segments_backward_makes_are_the_recorded_ones(recorded):
    """Segments made in step 2's backward (MiB, stream): on FSDP's unshard stream the same at
    every run (each step weight's gradient sum: lm_head 250, gate/up/down 112, o 32, k, v 16,
    q 64; the flat gradient 1814); on the compute stream the recording's are among the written
    ones (the embedding's 1002 MiB gradients), the same at D's 8192, E's 2 x 4096 and F's 4096;
    at D's 4096 and E's 6144 the written step makes one more embedding gradient segment (D's
    recording does in its steps 3 and 4); at S 2048 more, the blocks it keeps until backward
    ends."""
    row, snapshot, _, _, _, _, _ = recorded
    real = specforge_fsdp.recorded_segments(snapshot, 2, "backward")
    ours = specforge_fsdp.written_segments(row.job, "steady.backward", row.copy_held)
    unshard = {key: n for key, n in real.items() if key[1] == 1}
    assert unshard == {key: n for key, n in ours.items() if key[1] == 1}
    assert unshard == {(16, 1): 2, (32, 1): 1, (64, 1): 1, (112, 1): 3, (250, 1): 1, (1814, 1): 1}
    assert not real - ours
    assert dict(ours - real) == EXTRA_SEGMENTS.get((row.call, row.batch, row.seq), {})
