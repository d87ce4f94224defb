"""Read a PyTorch memory snapshot: the caller's allocations and frees, and what the allocator did.

A snapshot is what torch.cuda.memory._snapshot() returns and _dump_snapshot() pickles: a dict with
"segments" (the memory held at the end), "device_traces" (per device, the entries recorded since
_record_memory_history was turned on) and "allocator_settings". It holds only dicts, lists,
numbers and strings, so it is read here without torch, by an unpickler that refuses anything else.

From the trace entries this module takes:
- the caller's events for a replay: "alloc" (size as requested, stream), "free_completed" (the
  moment the block is back in the pool) and "oom" (a request that failed, size as rounded);
- the ground truth: "segment_alloc"/"segment_map" and "segment_free"/"segment_unmap" sizes, each
  filed under the caller event it happened in (the allocator records them before that event's
  "alloc" or "oom"), the reserved bytes after each, and the recorded cudaMalloc addresses.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from fitplan.allocator.replay import Event
from fitplan.allocator.settings import AllocatorSettings, from_snapshot_settings
from fitplan.errors import FitplanError

_UP = ("segment_alloc", "segment_map")
_DOWN = ("segment_free", "segment_unmap")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def load_snapshot(path: str | Path) -> dict:
    """A snapshot pickle (gzip-compressed if the name ends in .gz), as plain Python data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = _PlainUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise FitplanError(f"{path} is not a readable memory snapshot ({exc}); expected a pickle "
                           "written by torch.cuda.memory._dump_snapshot, optionally gzipped") from None
    if not isinstance(data, dict) or "device_traces" not in data:
        raise FitplanError(f"{path} holds no device_traces; record with torch.cuda.memory._record_memory_history first")
    return data


@dataclass
class RecordedTrace:
    events: list[Event] = field(default_factory=list)
    segment_log: list[tuple[int, str, int, int]] = field(default_factory=list)  # (event, action, bytes, reserved)
    oom_events: list[int] = field(default_factory=list)
    segment_addresses: list[int] = field(default_factory=list)  # cudaMalloc addresses in order
    settings: AllocatorSettings = field(default_factory=AllocatorSettings)
    held_at_end: int = 0  # bytes in the snapshot's segments of this device
    unmatched_frees: int = 0  # frees of blocks allocated before recording began
    late_segment_events: int = 0  # segment events after the last caller event (e.g. empty_cache)

    @property
    def reserved(self) -> int:
        return self.segment_log[-1][3] if self.segment_log else 0

    @property
    def peak_reserved(self) -> int:
        return max((entry[3] for entry in self.segment_log), default=0)

    @property
    def complete(self) -> bool:
        """Recording saw every segment from an empty cache on: its sum is what the device holds."""
        return self.reserved == self.held_at_end and self.unmatched_frees == 0


def read_trace(snapshot: dict, device: int | None = None) -> RecordedTrace:
    """The replayable events and the recorded segment history of one device."""
    device = _pick_device(snapshot["device_traces"], device)
    trace = RecordedTrace(settings=from_snapshot_settings(snapshot.get("allocator_settings") or {}))
    trace.held_at_end = sum(s["total_size"] for s in snapshot.get("segments", []) if s.get("device", device) == device)
    _Reader(trace).read(snapshot["device_traces"][device])
    return trace


def _pick_device(traces: list, device: int | None) -> int:
    recorded = [i for i, entries in enumerate(traces) if entries]
    if device is not None:
        if device not in range(len(traces)):
            raise FitplanError(f"the snapshot has no device {device}; it has devices 0..{len(traces) - 1}")
        return device
    if len(recorded) > 1:
        raise FitplanError(f"the snapshot has traces for devices {recorded}; name one")
    if not recorded:
        raise FitplanError("the snapshot's trace is empty; was _record_memory_history on while the job ran?")
    return recorded[0]


class _Reader:
    def __init__(self, trace: RecordedTrace):
        self.trace = trace
        self.live: dict[int, int] = {}  # address -> key of the allocation there
        self.next_key = 0
        self.reserved = 0

    def read(self, entries: list[dict]) -> None:
        for entry in entries:
            self._entry(entry)
        events = len(self.trace.events)
        self.trace.late_segment_events = sum(1 for e in self.trace.segment_log if e[0] >= events)

    def _entry(self, entry: dict) -> None:
        action = entry.get("action")
        if action == "alloc":
            self.live[entry["addr"]] = self._request(entry)
        elif action == "oom":
            self.trace.oom_events.append(len(self.trace.events))
            self._request(entry)
        elif action == "free_completed":
            self._free(entry["addr"])
        elif action in _UP or action in _DOWN:
            self._segment(action, entry)

    def _request(self, entry: dict) -> int:
        key, self.next_key = self.next_key, self.next_key + 1
        self.trace.events.append(Event("alloc", key, entry["size"], entry.get("stream", 0)))
        return key

    def _free(self, addr: int) -> None:
        key = self.live.pop(addr, None)
        if key is None:
            self.trace.unmatched_frees += 1
        else:
            self.trace.events.append(Event("free", key))

    def _segment(self, action: str, entry: dict) -> None:
        self.reserved += entry["size"] if action in _UP else -entry["size"]
        self.trace.segment_log.append((len(self.trace.events), action, entry["size"], self.reserved))
        if action == "segment_alloc":
            self.trace.segment_addresses.append(entry["addr"])
