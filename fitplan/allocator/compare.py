"""Replay a recorded trace through the allocator model and list where the two part ways."""

from __future__ import annotations

from fitplan.allocator.allocator import Allocator
from fitplan.allocator.replay import ReplaySummary, replay
from fitplan.allocator.trace import RecordedTrace
from fitplan.units import MIB


def replay_recorded(trace: RecordedTrace, capacity_bytes: int, allowed_bytes: int | None = None,
                    device_total_bytes: int | None = None) -> ReplaySummary:
    """The model's run of the recorded caller events, under the recorded settings and limits."""
    allocator = Allocator(capacity_bytes, settings=trace.settings, allowed_bytes=allowed_bytes,
                          device_total_bytes=device_total_bytes, segment_addresses=trace.segment_addresses)
    return replay(trace.events, allocator)


def differences(trace: RecordedTrace, model: ReplaySummary) -> list[str]:
    """One line per disagreement: the first differing segment event, peak reserved, the failed requests."""
    found = []
    recorded = [entry[:3] for entry in trace.segment_log]
    modelled = [entry[:3] for entry in model.segment_log]
    if recorded != modelled:
        found.append(_first_difference(recorded, modelled))
    if trace.peak_reserved != model.peak_reserved:
        found.append(f"peak reserved: recorded {trace.peak_reserved / MIB:.1f} MiB, "
                     f"model {model.peak_reserved / MIB:.1f} MiB")
    if trace.oom_events != model.oom_events:
        found.append(f"failed requests: recorded at events {trace.oom_events[:5]}, model at {model.oom_events[:5]}")
    return found


def _first_difference(recorded: list, modelled: list) -> str:
    for i, (want, got) in enumerate(zip(recorded, modelled)):
        if want != got:
            return f"segment event {i}: recorded {_say(want)}, model {_say(got)}"
    shorter = "model" if len(modelled) < len(recorded) else "recording"
    i = min(len(recorded), len(modelled))
    extra = (recorded if shorter == "model" else modelled)[i]
    return f"segment event {i}: the {shorter} ends; the other has {_say(extra)}"


def _say(entry: tuple) -> str:
    event, action, size = entry
    return f"{action} {size / MIB:.1f} MiB in event {event}"
