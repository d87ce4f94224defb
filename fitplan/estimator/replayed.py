"""The device level of a step as the caching allocator model sees it: step_events replayed.

The events of load, step 1 and a steady step go through fitplan.allocator with the memory the
driver can give the process (the GPU's total less what lives outside the allocator,
runtime.outside_allocator_bytes). What comes back is the allocator's own figures: reserved
bytes over time and at their peak, the peak of allocated blocks, retries (the cache freed to
serve a request) and OOMs (a request that failed even then).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fitplan.allocator import Allocator, AllocatorOOM, replay
from fitplan.estimator import runtime, step_events
from fitplan.estimator.result import AllocatorReplay
from fitplan.layout import Job
from fitplan.units import TIB

# "memory to spare": larger than any device, so no request is ever refused
ROOM_BYTES = 64 * TIB


@dataclass(frozen=True)
class ReplayedStep:
    peak_reserved: int
    peak_allocated: int  # the allocator's blocks: requests rounded up, unsplit remainders counted
    num_alloc_retries: int
    num_ooms: int
    # (event index, reserved bytes) at every change of reserved
    reserved_over_time: tuple[tuple[int, int], ...]
    # (phase label, first event, end event, peak reserved within it): labels as step_events'
    phases: tuple[tuple[str, int, int, int], ...]
    capacity: int  # what the allocator could reserve at most

    @property
    def fits(self) -> bool:
        return self.num_ooms == 0

    def phase_reserved(self, label: str) -> int:
        return max(peak for name, _, _, peak in self.phases if name == label)


def capacity_bytes(job: Job) -> int:
    return job.cluster.gpu.total_bytes - runtime.outside_allocator_bytes(job)


def modelled(job: Job) -> bool:
    return step_events.unsupported(job) is None


@lru_cache(maxsize=256)
def replay_step(job: Job, capacity: int | None = None) -> ReplayedStep:
    """The replay of `job`'s load, step 1 and a steady step (modelled(job) must hold), with the
    memory the driver can give (`capacity`; default: the device's, capacity_bytes)."""
    built = _events(job)
    allocator = _allocator(job, capacity_bytes(job) if capacity is None else capacity)
    summary = replay(built.events, allocator)
    over_time = tuple(summary.reserved_over_time)
    return ReplayedStep(
        peak_reserved=summary.peak_reserved,
        peak_allocated=summary.peak_allocated,
        num_alloc_retries=summary.num_alloc_retries,
        num_ooms=summary.num_ooms,
        reserved_over_time=over_time,
        phases=tuple((label, first, end, _peak_between(over_time, first, end)) for label, first, end in built.phases),
        capacity=allocator.capacity,
    )


@lru_cache(maxsize=16)
def _events(job: Job) -> step_events.StepEvents:
    return step_events.build(job)


@lru_cache(maxsize=256)
def allocator_replay(job: Job) -> AllocatorReplay:
    """The estimate's view: what the step reserves with memory to spare, and, only where that is
    more than the device can give, the replay on the device's memory (the two are the same
    sequence of segments until the first segment that does not fit)."""
    needed = _peak_with_room(job)
    if needed <= capacity_bytes(job):
        return AllocatorReplay(needed, needed, num_alloc_retries=0, num_ooms=0)
    peak, retries, failed = _on_device(job)
    return AllocatorReplay(peak, needed, retries, failed)


def _peak_with_room(job: Job) -> int:
    allocator = _allocator(job, ROOM_BYTES)
    _run(allocator, _events(job).events)
    return allocator.peak_reserved


def _on_device(job: Job) -> tuple[int, int, int]:
    """(peak reserved, retries, 1 if a request failed) on the device's memory; a failed request
    decides the verdict, so the replay stops there."""
    allocator = _allocator(job, capacity_bytes(job))
    failed = not _run(allocator, _events(job).events)
    return allocator.peak_reserved, allocator.num_alloc_retries, int(failed)


def _allocator(job: Job, capacity: int) -> Allocator:
    """The model with the job's settings; expandable segments size their ranges by the device's
    memory, whatever the capacity (so a replay with room maps what the device's would)."""
    return Allocator(capacity, expandable=job.spec.expandable_segments, device_total_bytes=job.cluster.gpu.total_bytes,
                     track_largest_free=False)


def _run(allocator: Allocator, events) -> bool:
    """Apply the events; False at the first request that fails."""
    handles: dict = {}
    malloc, free, pop = allocator.malloc, allocator.free, handles.pop  # bound once: the loop is the replay's cost
    for op, key, size, stream in events:  # unpacked: cheaper than the Event's field names
        if op == "free":
            free(pop(key))
            continue
        if op != "alloc":  # "retire": the block is the caller's until its free; "empty_cache"
            if op == "empty_cache":
                allocator.empty_cache()
            continue
        try:
            handles[key] = malloc(size, stream)
        except AllocatorOOM:
            return False
    return True


def _peak_between(over_time: tuple[tuple[int, int], ...], first: int, end: int) -> int:
    """Highest reserved from event `first` up to (not including) `end`."""
    before = [reserved for index, reserved in over_time if index < first]
    inside = [reserved for index, reserved in over_time if first <= index < end]
    return max(before[-1:] + inside, default=0)
