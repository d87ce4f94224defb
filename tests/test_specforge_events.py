"""SpecForge's offline step on one GPU as ordered allocations (fitplan/estimator/specforge_events.py)
and its replay, which gives such estimates their device level and verdict.

- Consistency: the step is written from specforge_terms' sizes, so the most bytes live at once in
  each phase (a retired block's bytes leaving at its retire) is the estimator's phase sum.
- Sizes and structure by hand from llama-3.1-8b's shapes.
- What is and is not written.
The measured runs are in tests/test_specforge_fsdp.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
from step_checks import case_ids, live_after, phase_total

from fitplan.config import RunSpec
from fitplan.estimator import estimate, replayed, specforge_events, step_events
from fitplan.estimator.result import Verdict
from fitplan.layout import resolve

GIB = 2**30


def job(**kw):
    return resolve(RunSpec(**{"model": "llama-3.1-8b", "gpus": "1xH200", "runtime": "specforge", "offline": True,
                              "seq": 2048, **kw}))


CASES = [
    {},
    {"seq": 8192},
    {"micro_batch": 2, "seq": 1024},  # each step's teacher slices are copies
    {"ttt": 1},
    {"ttt": 2},
    {"ttt": 3, "seq": 4096},
    {"model": "qwen3-8b", "seq": 4096},
    {"model": "llama-3.2-1b", "seq": 16384},
    {"expandable_segments": True},
    {"gpus": "1xH100", "ac": True},  # SpecForge has no checkpointing: the same step
]


@pytest.mark.parametrize("kw", CASES, ids=case_ids(CASES))
def test_live_bytes_at_each_phase_peak_are_the_estimators_phase_sum(kw):
    j = job(**kw)
    est, built = estimate(j), step_events.build(j)
    peaks = built.live_peaks()
    assert {label.split(".")[0] for label in peaks} == {"load", "step1", "step2", "steady"}
    for label, live in peaks.items():
        assert live == phase_total(est, label), (label, live, phase_total(est, label))


@pytest.mark.parametrize("kw", CASES[:4], ids=case_ids(CASES[:4]))
def test_after_the_steady_step_what_persists_is_the_checkpoints(kw):
    """Weights, flat parameter, masters, moments, both cuBLAS workspaces and the flat gradient,
    which FSDP drops at the next step's pre-forward."""
    j = job(**kw)
    assert live_after(step_events.build(j)) == estimate(j).phase_allocated("checkpoint")


def sizes_named(built, name: str) -> list[tuple[int, int]]:
    return [(e.size, e.stream) for e in built.events if e.op == "alloc" and built.names[e.key] == name]


def test_tensor_sizes_by_hand():
    # llama-3.1-8b: V 128256, h 4096 (target and draft), Vd 32000, I 14336, 32 heads / 8 KV heads
    # of 128; B 1, S 2048, 7 TTT steps; three steps written
    built = step_events.build(job())
    assert sizes_named(built, "TargetHead logits [T, V] bf16") == [(2 * 2048 * 128256, 0)] * 3  # 525,336,576
    assert sizes_named(built, "target logits fp32") == [(4 * 2048 * 128256, 0)] * 3
    assert sizes_named(built, "target_p_padded") == [(4 * (2048 + 7) * 32000, 0)] * 3  # 263,040,000
    # DynamicCache's concatenations: 2 B x 8 x 128 x 2048 x (k + 1)
    assert [s for s, _ in sizes_named(built, "keys of steps 0..k")[:7]] == [4_194_304 * (k + 1) for k in range(7)]
    assert set(sizes_named(built, "gate")) == {(2 * 2048 * 14336, 0)}
    assert set(sizes_named(built, "draft logits [T, Vd] bf16")) == {(2 * 2048 * 32000, 0)}
    # every draft tensor in bf16, the frozen [V, h] embedding included: 2 x (424,689,664 + 525,336,576)
    assert sizes_named(built, "FSDP flat parameter") == [(1_900_052_480, 0)]
    assert sizes_named(built, "FSDP flat gradient") == [(1_900_052_480, 1)] * 3  # on the unshard stream
    assert sizes_named(built, "grad of embed_tokens [V, h]") == [(2 * 128256 * 4096, 0)] * 21  # every step


def test_each_step_weights_gradients_are_summed_once_on_the_unshard_stream():
    """lm_head's gradient arrives from each of the 7 steps: the first kept, the second summed
    with it on FSDP's stream (one [Vd, h] bf16 there per step), the rest added in place."""
    built = step_events.build(job())
    assert sizes_named(built, "grad of lm_head") == [(2 * 32000 * 4096, 0)] * 21
    assert sizes_named(built, "grad of lm_head (sum)") == [(2 * 32000 * 4096, 1)] * 3
    assert sizes_named(built, "grad of fc") == [(2 * 3 * 4096 * 4096, 0)] * 3  # fc runs once: no sum
    assert sizes_named(job_built := step_events.build(job(ttt=1)), "grad of lm_head (sum)") == []
    assert len(sizes_named(job_built, "grad of lm_head")) == 3


def test_an_empty_cache_ends_each_teacher_and_retired_blocks_come_back_when_backward_ends():
    built = step_events.build(job())
    phases = {label: (first, end) for label, first, end in built.phases}
    ops = [e.op for e in built.events]
    assert ops.count("empty_cache") == 3
    for step in ("step1", "step2", "steady"):
        first, end = phases[f"{step}.target_forward"]
        assert ops[end - 1] == "empty_cache"
        first, end = phases[f"{step}.backward"]
        retired = {e.key for e in built.events[first:end] if e.op == "retire"}
        freed = Counter(e.key for e in built.events[first:end] if e.op == "free")
        assert retired and all(freed[key] == 1 for key in retired)
        # all of them after the flat gradient, the last thing backward makes
        flat = max(i for i, e in enumerate(built.events[first:end], first)
                   if e.op == "alloc" and built.names[e.key] == "FSDP flat gradient")
        assert all(i > flat for i, e in enumerate(built.events[first:end], first) if e.op == "free" and e.key in retired)


@pytest.mark.parametrize("kw, why", [
    ({"offline": False}, "online"),
    ({"gpus": "2xH200"}, "several GPUs"),
    ({"attention": "sdpa"}, "sdpa attention"),
    ({"global_batch": 2}, "gradient accumulation"),
])
def test_what_is_not_written_keeps_the_fitted_reserve(kw, why):
    j = job(**kw)
    assert why.split()[0] in step_events.unsupported(j)
    assert estimate(j).replay is None
    with pytest.raises(ValueError):
        specforge_events.build(j)


def test_the_estimate_takes_its_device_level_and_verdict_from_the_replay():
    est = estimate(job())
    assert est.replay is not None and est.verdict is Verdict.FITS
    assert est.allocator_reserve_bytes == est.replay.needed_reserved_bytes - est.peak_allocated_bytes
    assert est.replay.needed_reserved_bytes == replayed.replay_step(job()).peak_reserved
    # on an 80 GB H100 S 32768 needs more than the device: the replay fails a request
    big = estimate(job(gpus="1xH100", seq=32768))
    assert big.verdict is Verdict.OOM and big.replay.num_ooms == 1
