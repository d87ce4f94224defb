"""Run an ordered list of allocations and frees through the allocator model and summarise it."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from fitplan.allocator.allocator import Allocator, AllocatorOOM


class Event(NamedTuple):
    """One call of the caller: "alloc" (key, size, stream), "free" (key), "empty_cache", or
    "retire" (key): the caller lets go of a block another stream still uses (torch's free of a
    block with record_stream); it stays the caller's in the model until its "free", when that
    stream is done with it."""

    op: str
    key: Hashable = None
    size: int = 0
    stream: int = 0


@dataclass
class ReplaySummary:
    peak_reserved: int
    peak_allocated: int
    final_reserved: int
    final_allocated: int
    num_alloc_retries: int
    num_ooms: int
    oom_events: list[int] = field(default_factory=list)  # event indices of requests that failed
    retry_events: list[int] = field(default_factory=list)  # ... that needed the cache freed first
    reserved_over_time: list[tuple[int, int]] = field(default_factory=list)  # (event index, reserved) at changes
    segment_log: list[tuple[int, str, int, int]] = field(default_factory=list)  # (event, action, bytes, reserved)
    largest_free_at_request: list[int] = field(default_factory=list)  # per alloc: largest free block in its pool
    largest_free_at_peak: int = 0  # largest free block anywhere when reserved peaked

    @property
    def fits(self) -> bool:
        return self.num_ooms == 0


class _Replay:
    """The running state of one replay: handles by key and what the summary collects."""

    def __init__(self, allocator: Allocator):
        self.allocator = allocator
        self.handles: dict = {}
        self.failed: set = set()
        self.summary = ReplaySummary(0, 0, 0, 0, 0, 0)
        self.highest = 0  # highest reserved seen between events

    def step(self, index: int, event: Event) -> None:
        a = self.allocator
        retries, reserved, logged = a.num_alloc_retries, a.reserved, len(a.segment_log)
        self._apply(index, event)
        if a.num_alloc_retries != retries:
            self.summary.retry_events.append(index)
        if a.reserved != reserved:
            self.summary.reserved_over_time.append((index, a.reserved))
            if a.reserved > self.highest:
                self.highest = a.reserved
                self.summary.largest_free_at_peak = a.largest_free_block()
        self.summary.segment_log.extend((index, *entry[1:]) for entry in a.segment_log[logged:])

    def _apply(self, index: int, event: Event) -> None:
        if event.op == "alloc":
            self._alloc(index, event)
        elif event.op == "free":
            self._free(event.key)
        elif event.op == "empty_cache":
            self.allocator.empty_cache()
        elif event.op != "retire":
            raise ValueError(f"event {index}: unknown op {event.op!r}; accepted: alloc, free, empty_cache, retire")

    def _alloc(self, index: int, event: Event) -> None:
        try:
            self.handles[event.key] = self.allocator.malloc(event.size, event.stream)
        except AllocatorOOM:
            self.summary.oom_events.append(index)
            self.failed.add(event.key)
        self.summary.largest_free_at_request.append(self.allocator.last_largest_free)

    def _free(self, key) -> None:
        if key in self.handles:
            self.allocator.free(self.handles.pop(key))
        elif key in self.failed:
            self.failed.discard(key)  # the caller never got this block
        else:
            raise ValueError(f"free of {key!r}, which is not allocated")

    def finish(self) -> ReplaySummary:
        a, s = self.allocator, self.summary
        s.peak_reserved, s.peak_allocated = a.peak_reserved, a.peak_allocated
        s.final_reserved, s.final_allocated = a.reserved, a.allocated
        s.num_alloc_retries, s.num_ooms = a.num_alloc_retries, a.num_ooms
        return s


def replay(events: Iterable[Event], allocator: Allocator) -> ReplaySummary:
    """Apply the events in order; a request that fails is counted, not raised."""
    run = _Replay(allocator)
    for index, event in enumerate(events):
        run.step(index, event)
    return run.finish()
