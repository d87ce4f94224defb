"""The analytic memory model: `estimate(job)` -> Estimate, pure Python, no torch.

One module per term: params (counts and weight bytes), recipes (state per parameter, sharding),
target_terms / draft_terms / sft_terms (working sets), runtime (measured constants); eagle3,
specforge_runtime and sft lay the terms on each workload's timeline of phases.
"""

from __future__ import annotations

from fitplan.config import RunSpec
from fitplan.estimator import (
    eagle3,
    runtime,
    sft,
    specforge_runtime,
    speculators_runtime,
)
from fitplan.estimator.result import Estimate
from fitplan.layout import Job, resolve

__all__ = ["Estimate", "estimate", "estimate_spec"]


def _timeline(job: Job):
    if job.spec.workload == "sft":
        return sft.timeline(job)
    if job.spec.runtime == "specforge":
        return specforge_runtime.timeline(job)
    if job.spec.runtime == "speculators":
        return speculators_runtime.timeline(job)
    return eagle3.timeline(job)


def _layout(job: Job) -> dict:
    return {
        "world": job.world,
        "tp": job.tp,
        "dp": job.dp,
        "accum": job.accum,
        "global_batch": job.global_batch,
        "model": job.model.name,
        "draft": job.draft.name if job.draft else None,
        "gpu": job.cluster.gpu.id,
        "attention": job.spec.attention_impl,  # resolved: its default depends on the workload and seq
    }


def _replay(job: Job):
    """fitplan's trainer on one GPU: its step replayed through the caching allocator model (None
    elsewhere; the model is imported only then, so other jobs start no slower): Eagle3 and sft
    alike (draft_events.py, sft_events.py); SpecForge's offline step on one GPU too
    (specforge_events.py)."""
    if job.world != 1 or job.spec.runtime not in ("fitplan", "specforge"):
        return None
    from fitplan.estimator import replayed

    return replayed.allocator_replay(job) if replayed.modelled(job) else None


def _past_the_device(job: Job, peak_allocated: int) -> bool:
    """The tensors alone outgrow the device: out of memory whatever the allocator does."""
    return peak_allocated + runtime.outside_allocator_bytes(job) > job.cluster.gpu.total_bytes


def estimate(job: Job, replay_past_the_device: bool = True) -> Estimate:
    """`replay_past_the_device` False: a job whose tensors alone outgrow the device is not
    replayed (the replay, the costly part, would not change its verdict; its device level is then
    the fitted reserve's): what `fit` asks for the candidates it tries."""
    t = _timeline(job)
    peak_allocated = max(sum(components.values()) for components in t.steady.values())
    largest_bytes, largest_name = max(t.largest)
    skip = not replay_past_the_device and _past_the_device(job, peak_allocated)
    replay = None if skip else _replay(job)
    if replay is None:
        reserve = runtime.allocator_reserve_bytes(job, peak_allocated)
    else:
        reserve = max(0, replay.needed_reserved_bytes - peak_allocated)
    return Estimate(
        phases=t.steady,
        step1_phases=t.step1,
        gpu_total_bytes=job.cluster.gpu.total_bytes,
        allocator_reserve_bytes=reserve,
        outside_allocator_bytes=runtime.outside_allocator_bytes(job) + speculators_runtime.extra_outside_bytes(job),
        reserve_floor_bytes=runtime.reserve_floor_bytes(job, peak_allocated),
        stranded_block_bytes=runtime.stranded_block_bytes(job, largest_bytes),
        largest_allocation_bytes=largest_bytes,
        largest_allocation_name=largest_name,
        world=job.world,
        notes=tuple(job.warnings) + tuple(t.notes),
        layout=_layout(job),
        replay=replay,
    )


def estimate_spec(spec: RunSpec) -> Estimate:
    return estimate(resolve(spec))
