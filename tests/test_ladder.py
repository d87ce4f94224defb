"""The fix ladder, against a small hand-made memory model injected in place of the estimator.

The fake model (all per GPU): weights W GiB; activations micro_batch·seq·1 MiB (a quarter with
activation checkpointing); logits rows·seq·0.5 MiB where rows = tp·micro_batch with gather
output sharding and micro_batch with all-to-all. H100 total capacity 85,017,493,504 B =
79.18 GiB; with the default 5% margin a plan must peak at or below 0.95 x that = 75.22 GiB.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitplan.config import RunSpec
from fitplan.estimator import estimate_spec
from fitplan.estimator.result import Estimate
from fitplan.layout import resolve
from fitplan.ladder import fit
from fitplan.steptime import step_time

GIB, MIB = 1 << 30, 1 << 20
H100_TOTAL = 85_017_493_504


def fake_estimator(weights_gib: float):
    def estimate(job) -> Estimate:
        s = job.spec
        activations = s.micro_batch * s.seq * MIB // (4 if s.ac else 1)
        rows = s.micro_batch * (job.tp if s.output_sharding == "gather" else 1)
        components = {
            "target.weights": int(weights_gib * GIB),
            "activations.draft": activations,
            "logits.target": rows * s.seq * MIB // 2,
        }
        return Estimate(
            phases={"backward": components},
            step1_phases={"backward": components},
            gpu_total_bytes=job.cluster.gpu.total_bytes,
            allocator_reserve_bytes=0,
            outside_allocator_bytes=0,
            largest_allocation_bytes=max(components.values()),
            largest_allocation_name="logits.target",
        )

    return estimate


def job_spec(**changes) -> RunSpec:
    base = RunSpec(model="llama-3.1-8b", gpus="8xH100", tp=8, micro_batch=2, global_batch=16, seq=8192)
    return base.replace(**changes)


def run_fit(spec: RunSpec, weights_gib: float = 16, margin: float = 0.05):
    return fit(spec, margin=margin, estimate_fn=fake_estimator(weights_gib))


def test_profile_total_is_the_measured_h100_capacity():
    assert resolve(job_spec()).cluster.gpu.total_bytes == H100_TOTAL


def test_a_job_that_fits_is_left_as_given():
    # seq 4096, mb 2, gather: 16 + 2*4096 MiB (8 GiB) + 16*4096*0.5 MiB (32 GiB) = 56 GiB <= 75.22
    result = run_fit(job_spec(seq=4096))
    assert result.chosen is not None and result.changes == []
    assert result.chosen.estimate.peak_reserved_bytes == 56 * GIB


def test_picks_the_faster_of_two_fitting_plans():
    # Given: 16 + 16 + 64 = 96 GiB, OOM. Two single-rung fixes fit:
    #   micro_batch 1 (accum 2): 16 + 8 + 32 = 56 GiB;  all-to-all: 16 + 16 + 8 = 40 GiB.
    # Same FLOPs; all-to-all moves 8x fewer logit bytes and keeps half the micro-steps' collectives,
    # so it is the faster plan.
    result = run_fit(job_spec())
    fixes = {e.change: e.peak_reserved_bytes for e in result.trail if e.fits}
    assert fixes["micro_batch 1, accum 2"] == 56 * GIB
    assert fixes["output_sharding all-to-all"] == 40 * GIB
    assert result.changes == ["output_sharding all-to-all"]


def test_preserves_global_batch_seq_model_and_draft():
    given_spec = job_spec(seq=16384, micro_batch=4, global_batch=64)
    result = run_fit(given_spec)
    chosen = resolve(result.chosen.spec)
    assert chosen.global_batch == 64
    assert chosen.spec.seq == 16384
    assert (chosen.spec.model, chosen.spec.draft) == (given_spec.model, given_spec.draft)


def test_nothing_fits_suggests_the_largest_seq():
    # 70 GiB of weights leave 75.22 - 70 = 5.22 GiB (5345 MiB). The most memory-saving rungs
    # (mb 1, all-to-all, ac) cost seq/4 + seq/2 MiB = 0.75·seq MiB -> seq <= 7127 -> 6912 (27 x 256).
    # The fake's peak does not shrink with more GPUs, so no GPU count is suggested.
    result = run_fit(job_spec(seq=32768), weights_gib=70)
    assert result.chosen is None
    assert result.max_seq == 6912
    assert result.min_gpus is None
    assert not any(e.fits for e in result.trail)


@settings(max_examples=25, deadline=None)
@given(
    seq=st.sampled_from([1024, 4096, 8192, 16384, 32768, 65536]),
    micro_batch=st.sampled_from([1, 2, 4]),
    weights=st.floats(min_value=1, max_value=78),
    margin=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_never_returns_a_plan_over_the_margin(seq, micro_batch, weights, margin):
    result = run_fit(job_spec(seq=seq, micro_batch=micro_batch, global_batch=32), weights, margin)
    if result.chosen is not None:
        assert result.chosen.estimate.peak_reserved_bytes <= (1 - margin) * H100_TOTAL
        assert resolve(result.chosen.spec).global_batch == 32
    for entry in result.trail:
        assert entry.fits == (entry.peak_reserved_bytes <= (1 - margin) * H100_TOTAL)


def test_specforge_runtime_only_uses_rungs_specforge_can_express():
    result = run_fit(job_spec(runtime="specforge", seq=65536), weights_gib=60)
    assert {e.rung for e in result.trail} <= {"original", "micro_batch", "output_sharding",
                                               "expandable_segments", "attention", "tp"}


# ---------------------------------------------------------------- the optimizer and offload rungs

def moments_estimator(weights_gib: float):
    """The fake above plus Adam's moments: 8 GiB with adamw, 2 GiB with adamw-8bit (a quarter:
    1 byte per moment instead of 4), none on the GPU when offloaded."""
    base = fake_estimator(weights_gib)

    def estimate(job) -> Estimate:
        est = base(job)
        s = job.spec
        moments = 0 if s.offload != "none" else (2 if s.optimizer == "adamw-8bit" else 8) * GIB
        components = {**est.phases["backward"], "optimizer.moments": moments}
        return Estimate(phases={"backward": components}, step1_phases={"backward": components},
                        gpu_total_bytes=est.gpu_total_bytes, allocator_reserve_bytes=0, outside_allocator_bytes=0,
                        largest_allocation_bytes=est.largest_allocation_bytes,
                        largest_allocation_name=est.largest_allocation_name)

    return estimate


def one_gpu_job(**changes) -> RunSpec:
    # seq 1024, mb 1, tp 1: activations 1 GiB (0.25 with ac), logits 0.5 GiB
    return RunSpec(**{"model": "llama-3.1-8b", "gpus": "1xH100", "tp": 1, "seq": 1024, **changes})


def test_the_8bit_optimizer_is_chosen_where_only_it_or_offload_fits():
    # 70 + 1 + 0.5 + 8 = 79.5 GiB > 75.22 (ac: 78.75, still over); with ac, adamw-8bit: 72.75
    # fits, offload optimizer: 70.75 fits but moves the state over PCIe every step: slower
    result = fit(one_gpu_job(), estimate_fn=moments_estimator(70))
    assert result.changes == ["ac on", "optimizer adamw-8bit"]
    assert any(e.change == "ac on; offload optimizer" and e.fits for e in result.trail)


def test_offload_is_tried_beside_the_8bit_optimizer_not_on_top_of_it():
    # 73.5 + 0.25 (ac) + 0.5 + 2 = 76.25 GiB with 8-bit moments: over; offloaded: 74.25 <= 75.22.
    # The 8-bit candidates are the closest to fitting, and offload on top of them is refused:
    # the offload rung also extends what the optimizer rung started from.
    one = fit(one_gpu_job(), estimate_fn=moments_estimator(73.5))
    assert one.changes == ["ac on", "offload optimizer"]
    assert dict(one.refused)["offload optimizer"].startswith("optimizer adamw-8bit with offload optimizer")


def test_offload_is_refused_on_several_gpus():
    two = fit(one_gpu_job(gpus="2xH100"), estimate_fn=moments_estimator(73.5))
    assert "offloads the optimizer of one GPU" in dict(two.refused)["offload optimizer"]
    assert not any("offload" in e.change for e in two.trail)


def test_a_plain_draft_is_offered_the_lean_one_first():
    # llama-3.1-8b's draft (Vd 32000) at seq 32768, TTT 7, on one H100: the plain draft keeps each
    # step's fp32 log-softmax [S, Vd], 4 x 32768 x 32000 x 7 = 29.36 GB over the unroll, which the
    # lean draft does not keep; it fits without any other change.
    plain = RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=32768, draft_memory="plain")
    result = fit(plain)
    assert result.chosen is not None and result.changes == ["draft_memory lean"]
    assert result.chosen.spec.draft_memory == "lean" and result.chosen.spec.recompute_norms
    saved = result.original.estimate.peak_allocated_bytes - result.chosen.estimate.peak_allocated_bytes
    assert saved >= 4 * 32768 * 32000 * 7
    # at seq 49152 the lean draft without fused norms does not fit; with them it does: a step keeps
    # no norm outputs (cat 4h, MLP input 2h, final 2h bytes per token) nor o_proj's copy (2Hd):
    # 8 x 4096 + 2 x 32 x 128 = 40960 B per token per step, x 49152 tokens x 7 steps = 14.09 GB
    kept = plain.replace(seq=49152, draft_memory="lean", recompute_norms=False)
    result = fit(kept)
    assert result.chosen is not None and result.changes == ["recompute_norms on"]
    saved = result.original.estimate.peak_allocated_bytes - result.chosen.estimate.peak_allocated_bytes
    assert saved >= 40960 * 49152 * 7


def test_a_lean_draft_that_does_not_fit_is_offered_recompute_mlp_before_checkpointing():
    # llama-3.1-8b's draft (h 4096, I 14336) at seq 75776, TTT 7, on one H100: the lean draft keeps
    # each step's gate and up, 4 x 14336 x 75776 x 7 = 30.42 GB over the unroll; made again in
    # backward instead (two matmuls per step) the job fits with no other change, and faster than
    # checkpointing every step (a whole forward again per step). (At 73728 offloading the optimizer
    # with expandable segments also fits, at a smaller slowdown, and is chosen instead.)
    spec = RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=75776)
    result = fit(spec)
    assert result.original.estimate.verdict == "OOM"
    assert result.chosen is not None and result.changes == ["recompute_mlp on"]
    saved = result.original.estimate.peak_allocated_bytes - result.chosen.estimate.peak_allocated_bytes
    # most of it at the peak, which is in backward (the split attention's keys kept to it), where
    # the last step's gate and up are already let go: 6/7 of the sum, less the recompute's own
    assert saved >= 0.7 * 4 * 14336 * 73728 * 7
    checkpointed = resolve(spec.replace(ac=True))
    assert result.chosen.time.step_s < step_time(checkpointed).step_s
    # SpecForge's runtime has no such knob: fit never offers it there
    assert not any("recompute_mlp" in e.change for e in fit(spec.replace(runtime="specforge")).trail)


def test_an_sft_job_short_of_memory_is_offered_the_optimizer_a_parameter_at_a_time():
    # qwen2.5-7b sft (7.62e9 parameters) under bf16-master steps every tensor at once by default
    # (its hundreds of tensors cost one optimizer call each otherwise): the step holds every bf16
    # grad (2 B/param) and every fp32 copy (4 B/param). On one H200 that does not fit; fit turns
    # the knob on: one copy alive, the largest tensor's (the [152064, 3584] embedding, 545M
    # elements), so the step holds about 4 x (7.62e9 - 545M) = 28.3 GB less.
    # Whole fp32 masters (split_master false); split ones make no copy (below).
    spec = RunSpec(model="qwen2.5-7b", gpus="1xH200", workload="sft", seq=2048, precision="bf16-master",
                   split_master=False)
    result = fit(spec)
    assert not result.original.estimate.fits
    assert result.chosen is not None and result.changes == ["optimizer_per_param on"]
    saved = result.original.estimate.phase_allocated("optimizer_step") - result.chosen.estimate.phase_allocated(
        "optimizer_step")
    assert saved >= 0.9 * 4 * (7.62e9 - 545e6)


def test_split_masters_hold_six_bytes_a_parameter_less_at_the_step():
    # The same job with its masters split (the default): 2 B/param of low bits instead of a 4 B
    # fp32 master, and no 4 B fp32 gradient copy: 6 x 7.62e9 = 45.7 GB less at the step than
    # whole masters with every copy made at once, and no rung to step a parameter at a time.
    whole = RunSpec(model="qwen2.5-7b", gpus="1xH200", workload="sft", seq=2048, split_master=False)
    split = fit(whole.replace(split_master=None))
    saved = estimate_spec(whole).phase_allocated("optimizer_step") - split.original.estimate.phase_allocated("optimizer_step")
    assert 6 * 7.62e9 * 0.99 <= saved <= 6 * 7.62e9 * 1.01
    assert "optimizer_per_param on" not in split.changes


def test_the_head_rung_is_offered_where_the_head_makes_its_gradients_in_forward():
    """head_grad_in_forward off is a rung only where the head makes them in forward (one GPU,
    summed step gradients); the step-time model prices the logits made again in backward, one
    [B·S, h] x [h, Vd] matmul per TTT step, so the rung is never free."""
    from fitplan.ladder import RUNGS

    rung = dict(RUNGS)["head_grad_in_forward"]
    spec = RunSpec(model="llama-3.1-8b", gpus="1xH200", seq=8192)
    offered = list(rung(spec, resolve(spec)))
    assert [change for change, _ in offered] == ["head_grad_in_forward off"]
    off = resolve(offered[0][1])
    assert step_time(off).step_s > step_time(resolve(spec)).step_s
    for elsewhere in (spec.replace(gpus="2xH200"), spec.replace(precision="mixed"), spec.replace(draft_memory="plain"),
                      spec.replace(head_grad_in_forward=False)):
        assert list(rung(elsewhere, resolve(elsewhere))) == []


@pytest.mark.parametrize("gpus,kernel", [("1xH100", "split"), ("1xA100-80GB", "flex")])
def test_eager_attention_is_replaced_by_the_jobs_default_kernel_first(gpus, kernel):
    # llama-3.1-8b's draft at seq 8192 on eager attention keeps fp32 scores and bf16 probabilities
    # of every TTT step's keys, 6 x 32 heads x 8192 x 8192 x (k + 1) bytes: far past an 80 GB GPU.
    # The fused kernel alone fits and is faster, so fit changes nothing else; which one is the
    # job's own default (split on Hopper, flex before it).
    result = fit(RunSpec(model="llama-3.1-8b", gpus=gpus, seq=8192, attention="eager"))
    assert result.original.estimate.verdict == "OOM"
    assert result.changes == [f"attention {kernel}"]
