"""Set the step the estimator writes (fitplan/estimator/step_events.py) beside one the trainer recorded.

`fitplan train --memory-snapshot` on a GPU writes OUTPUT/memory_snapshot.pickle (the caching
allocator's history from before the load to the end of the run) and OUTPUT/report.json (the job).
trainer/measure.py labels every history entry with the phase it was made in ("load",
"step<k>.<phase>", k counted from the run's first step), so the recording splits into the same
phases as the written sequence: its step 1 is set beside the written step 1, its step 2 beside the
written steady step; later steps are not compared.

Per phase it prints, recorded against written: requests, bytes requested, the most bytes live at
once, the largest request, and the peak reserved bytes three ways: the real segments, the
allocator model replaying the recorded requests, the model replaying the written ones. Then the
requests of one side with no counterpart of the same size (within 1%) on the other, in the same
phase, largest first: the tensors the estimator leaves out, and those it makes up.

    python -m fitplan.validation.trace_compare OUTPUT/memory_snapshot.pickle OUTPUT/report.json
"""

from __future__ import annotations

import argparse
import bisect
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fitplan.allocator.compare import replay_recorded
from fitplan.allocator.replay import Event
from fitplan.allocator.trace import RecordedTrace, load_snapshot, read_trace
from fitplan.errors import FitplanError
from fitplan.estimator import replayed, step_events
from fitplan.estimator.replayed import _peak_between
from fitplan.estimator.step_trace import StepEvents
from fitplan.layout import Job, resolve
from fitplan.records import read_measurement, spec_as_committed
from fitplan.units import GIB, KIB, MIB

UNLABELLED = "(no phase)"  # entries made before the first phase, or a recording without labels
WHOLE = "whole run"  # the one phase of a recording without labels, set beside the whole written sequence
TOLERANCE = 0.01
_STEP_LABEL = re.compile(r"step(\d+)\.(\w+)")


@dataclass(frozen=True)
class Side:
    """One sequence of requests and frees split into phases, with the reserved bytes over it."""

    events: tuple[Event, ...]
    phases: tuple[tuple[str, int, int], ...]  # (label, first event, end event), in order, contiguous
    what: dict[int, str]  # alloc key -> what it is (a tensor's name, or where the trainer made it)
    reserved: dict[str, int] = field(default_factory=dict)  # label -> peak reserved (the model's)


@dataclass(frozen=True)
class PhaseRow:
    requests: int = 0
    requested: int = 0
    peak_live: int = 0
    largest: int = 0


# ------------------------------------------------------------------ the recorded side


def compared_label(raw: str) -> str:
    """A phase label as recorded -> the written sequence's: step 2 is its steady step."""
    found = _STEP_LABEL.fullmatch(raw)
    if raw == "load" or found is None:
        return raw if raw == "load" else UNLABELLED
    step, phase = int(found.group(1)), found.group(2)
    return f"steady.{phase}" if step == 2 else raw


def event_labels(entries: list[dict]) -> tuple[list[str], dict[int, str]]:
    """Per event of read_trace on these entries (it makes one per request, failed ones included,
    and one per free of a block allocated while recording), the phase label; and per request,
    the trainer frame it was made in, where the entries carry Python frames."""
    labels, where, live = [], {}, set()
    for entry, raw in zip(entries, thread_filled_labels(entries)):
        action = entry.get("action")
        if action in ("alloc", "oom"):
            where[len(labels)] = _trainer_frame(entry.get("frames") or [])
            labels.append(compared_label(raw))
            if action == "alloc":
                live.add(entry["addr"])
        elif action == "free_completed" and entry["addr"] in live:
            live.discard(entry["addr"])
            labels.append(compared_label(raw))
    return labels, where


def thread_filled_labels(entries: list[dict]) -> list[str]:
    """Each entry's recorded label, with the autograd thread's entries given the phase they ran in.

    The label is kept per thread: backward's allocations, made on autograd's device thread while
    the training thread waits inside the backward phase, carry none. A run of unlabelled entries
    with the same label on both sides happened inside that phase; other unlabelled runs (between
    phases) stay unlabelled."""
    raw = [entry.get("user_metadata") or "" for entry in entries]
    i = 0
    while i < len(raw):
        if raw[i]:
            i += 1
            continue
        end = i
        while end < len(raw) and not raw[end]:
            end += 1
        if 0 < i and end < len(raw) and raw[i - 1] == raw[end]:
            raw[i:end] = [raw[end]] * (end - i)
        i = end
    return raw


def _trainer_frame(frames: list[dict]) -> str:
    """The innermost frame in fitplan's trainer: which of its lines asked for the memory."""
    for frame in frames:
        filename = frame.get("filename", "")
        if "/trainer/" in filename:
            return f"trainer/{filename.rsplit('/trainer/', 1)[1]}:{frame.get('line')} {frame.get('name', '')}"
    return ""


def runs(labels: list[str]) -> tuple[tuple[str, int, int], ...]:
    """Consecutive events of one label as (label, first, end)."""
    out: list[list] = []
    for i, label in enumerate(labels):
        if out and out[-1][0] == label:
            out[-1][2] = i + 1
        else:
            out.append([label, i, i + 1])
    return tuple(tuple(run) for run in out)


def recorded_side(snapshot: dict, capacity: int, device_total: int | None = None,
                  device: int | None = None) -> tuple[Side, RecordedTrace, dict[str, int]]:
    """The recorded requests by phase, the model's peak reserved per phase replaying them, the
    trace as read, and the real segments' peak reserved per phase (none where no segment was recorded)."""
    trace = read_trace(snapshot, device)
    traces = snapshot["device_traces"]
    chosen = device if device is not None else next(i for i, entries in enumerate(traces) if entries)
    labels, where = event_labels(traces[chosen])
    if len(labels) != len(trace.events):
        raise AssertionError(f"{len(labels)} labels for {len(trace.events)} events")
    if set(labels) == {UNLABELLED}:
        labels = [WHOLE] * len(labels)
    phases = runs(labels)
    what = {trace.events[i].key: text for i, text in where.items()}
    model = replay_recorded(trace, capacity, device_total_bytes=device_total)
    real_over_time = tuple((event, reserved) for event, _, _, reserved in trace.segment_log)
    side = Side(tuple(trace.events), phases, what, peak_reserved(phases, tuple(model.reserved_over_time)))
    return side, trace, peak_reserved(phases, real_over_time) if real_over_time else {}


# ------------------------------------------------------------------ the written side


def written_side(job: Job, whole: bool = False) -> Side:
    """step_events.build(job) by phase, and its replay's peak reserved per phase; `whole`: one
    phase over all of it, for a recording without phase labels."""
    built = step_events.build(job)
    phases = ((WHOLE, 0, len(built.events)),) if whole else built.phases
    run = replayed.replay_step(job)
    return Side(built.events, phases, built.names, peak_reserved(phases, run.reserved_over_time))


# ------------------------------------------------------------------ per phase


def peak_reserved(phases, over_time: tuple[tuple[int, int], ...]) -> dict[str, int]:
    """Per label, the highest reserved bytes within its phases (`over_time`: (event, reserved) at changes)."""
    out: dict[str, int] = {}
    for label, first, end in phases:
        out[label] = max(out.get(label, 0), _peak_between(over_time, first, end))
    return out


def phase_rows(side: Side) -> dict[str, PhaseRow]:
    """Per label (its phases together): requests, bytes requested, the most live at once, the largest."""
    peaks = StepEvents(side.events, {}, side.phases).live_peaks()
    rows: dict[str, PhaseRow] = {}
    for label, first, end in side.phases:
        sizes = [e.size for e in side.events[first:end] if e.op == "alloc"]
        row = rows.get(label, PhaseRow())
        rows[label] = PhaseRow(row.requests + len(sizes), row.requested + sum(sizes), peaks[label],
                               max([row.largest, *sizes]))
    return rows


def requests(side: Side, min_bytes: int) -> dict[str, Counter]:
    """Per label, how many requests of each size (from `min_bytes` on)."""
    out: dict[str, Counter] = {}
    for label, first, end in side.phases:
        counts = out.setdefault(label, Counter())
        counts.update(e.size for e in side.events[first:end] if e.op == "alloc" and e.size >= min_bytes)
    return out


def unmatched(ours: Counter, theirs: Counter, tolerance: float = TOLERANCE) -> tuple[Counter, Counter]:
    """Pair each request with one of the other side's of the same size within `tolerance` (the
    nearest first, largest requests first); what is left of each side."""
    left_ours, left_theirs = Counter(), Counter(theirs)
    sizes = sorted(theirs)
    for size in sorted(ours, reverse=True):
        wanted = ours[size]
        lo, hi = bisect.bisect_left(sizes, size * (1 - tolerance)), bisect.bisect_right(sizes, size * (1 + tolerance))
        for other in sorted(sizes[lo:hi], key=lambda s: abs(s - size)):
            taken = min(wanted, left_theirs[other])
            left_theirs[other] -= taken
            wanted -= taken
        if wanted:
            left_ours[size] = wanted
    return left_ours, +left_theirs


def differences(recorded: Side, written: Side, min_bytes: int) -> tuple[dict, dict]:
    """Over the labels both sides have: (recorded left over, written left over), each
    size -> (count, labels)."""
    ours, theirs = requests(recorded, min_bytes), requests(written, min_bytes)
    missing: dict[int, list] = {}
    extra: dict[int, list] = {}
    for label in [label for label in ours if label in theirs]:
        left_ours, left_theirs = unmatched(ours[label], theirs[label])
        for found, left in ((missing, left_ours), (extra, left_theirs)):
            for size, count in left.items():
                entry = found.setdefault(size, [0, []])
                entry[0] += count
                entry[1].append(label)
    return missing, extra


# ------------------------------------------------------------------ the report


def size_text(n: int) -> str:
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n} B"


def table(recorded: Side, real: dict[str, int], written: Side) -> str:
    ours, theirs = phase_rows(recorded), phase_rows(written)
    labels = [label for label, _, _ in written.phases] + [label for label, _, _ in recorded.phases]
    labels = [label for i, label in enumerate(labels) if label not in labels[:i] and _compared(label)]
    head = ("phase", "requests rec / written", "requested rec / written", "peak live rec / written",
            "largest rec / written", "reserved real / model(rec) / model(written)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        a, b = ours.get(label), theirs.get(label)
        cells = [label, _pair(a, b, "requests", str), _pair(a, b, "requested"), _pair(a, b, "peak_live"),
                 _pair(a, b, "largest"),
                 " / ".join(_maybe(d.get(label)) for d in (real, recorded.reserved, written.reserved))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compared(label: str) -> bool:
    """Labels of the recorded steps set beside the written ones (step 3 on are left out)."""
    found = _STEP_LABEL.fullmatch(label)
    return found is None or int(found.group(1)) == 1


def _pair(a: PhaseRow | None, b: PhaseRow | None, name: str, say=size_text) -> str:
    return " / ".join("-" if row is None else say(getattr(row, name)) for row in (a, b))


def _maybe(n: int | None) -> str:
    return "-" if n is None else size_text(n)


def listing(title: str, left: dict, side: Side, top: int) -> str:
    """The sizes left over on `side`, each with its count, phases and what its first request is."""
    if not left:
        return f"{title}: none"
    named = _first_named(side)
    lines = [f"{title}, largest first:"]
    for size in sorted(left, reverse=True)[:top]:
        count, labels = left[size]
        lines.append(f"  {size_text(size):>12} x{count:<4} {', '.join(labels)}  {named.get(size, '')}".rstrip())
    if len(left) > top:
        lines.append(f"  ... and {len(left) - top} smaller sizes")
    return "\n".join(lines)


def _first_named(side: Side) -> dict[int, str]:
    """Per request size, what the first request of that size is."""
    named: dict[int, str] = {}
    for event in side.events:
        if event.op == "alloc" and event.size not in named and side.what.get(event.key):
            named[event.size] = side.what[event.key]
    return named


def notes(job: Job, trace: RecordedTrace, recorded: Side) -> list[str]:
    out = []
    if not trace.complete:
        out.append("the recording is incomplete (it started after the first segment, or the history's ring "
                   "buffer wrapped): the real reserved bytes miss what came before it")
    if any(label == WHOLE for label, _, _ in recorded.phases):
        out.append("the recording has no phase labels (a trainer or torch that does not set them): "
                   "the whole recording is set beside the whole written sequence (load, step 1, a steady step)")
    if job.accum > 2:
        out.append(f"accumulation {job.accum}: the written steps hold 2 micro-steps each, the recorded {job.accum}")
    return out


# ------------------------------------------------------------------ the command


def job_of(report: Path) -> Job:
    measurement = read_measurement(report)
    if measurement is None:
        raise FitplanError(f"{report}: not a trainer report (expected the report.json `fitplan train` writes)")
    job = resolve(spec_as_committed(measurement, report))
    reason = step_events.sequence_unsupported(job)
    if reason:
        raise FitplanError(f"{report}: the estimator writes no step sequence for this job ({reason})")
    return job


def compare(snapshot_path: Path, report: Path, min_bytes: int = MIB, top: int = 15) -> str:
    job = job_of(report)
    if not Path(snapshot_path).is_file():
        raise FitplanError(f"{snapshot_path}: no such file (a torch.cuda.memory._dump_snapshot pickle)")
    recorded, trace, real = recorded_side(load_snapshot(snapshot_path), replayed.capacity_bytes(job),
                                          job.cluster.gpu.total_bytes)
    written = written_side(job, whole=any(label == WHOLE for label, _, _ in recorded.phases))
    missing, extra = differences(recorded, written, min_bytes)
    parts = [table(recorded, real, written), "",
             listing(f"recorded requests of {size_text(min_bytes)} or more with no written one of their size (±1%)",
                     missing, recorded, top),
             listing("written requests with no recorded one of their size (±1%)", extra, written, top)]
    parts += [f"note: {line}" for line in notes(job, trace, recorded)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fitplan.validation.trace_compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", type=Path, help="memory_snapshot.pickle (or .pickle.gz) of `fitplan train --memory-snapshot`")
    parser.add_argument("report", type=Path, help="the report.json of the same run")
    parser.add_argument("--min-mib", type=float, default=1.0,
                        help="list requests from this size on (default 1: the estimator leaves out smaller ones)")
    parser.add_argument("--top", type=int, default=15, help="sizes listed per side (default 15)")
    args = parser.parse_args(argv)
    try:
        print(compare(args.snapshot, args.report, int(args.min_mib * MIB), args.top))
    except FitplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
