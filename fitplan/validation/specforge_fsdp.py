"""SpecForge's offline Eagle3 step on one GPU, measured, against the estimator (docs/allocator.md,
"SpecForge's offline step on one GPU").

    python -m fitplan.validation.specforge_fsdp

Three calls of `benchmarks/vs_specforge.py --tools specforge-fsdp --memory-snapshot` on one H200
(SpecForge 0.2.0, torch 2.11; docs/vs-specforge.md): the llama-3.1-8b-shaped draft trained
offline, with its phase peaks of allocated bytes and its peak reserved bytes, and the allocator
histories of the same runs. Prints, per run, the measured and predicted peak allocated and
reserved bytes (GiB) and the per-phase peaks, then the reserved bytes replayed four ways.

The benchmark process of calls D and E held more than SpecForge's step: its make_tensors dict
(the draft embedding it copies into the draft, and the vocabulary maps) stayed alive for the
whole run. SpecForge's trainer loads the embedding straight into the draft, so the prediction is
for the trainer, and for those runs the comparison adds these bytes (and their segment) to it.
Call F ran after the benchmark stopped keeping them: nothing is added.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fitplan.allocator import Allocator, Event, replay
from fitplan.allocator.trace import load_snapshot
from fitplan.config import RunSpec
from fitplan.estimator import estimate, replayed, step_events
from fitplan.estimator.result import Estimate
from fitplan.layout import Job, resolve
from fitplan.units import GIB

# the checkout this module runs from; the tests pass their own (an installed fitplan has no data)
ROOT = Path(__file__).resolve().parents[2]
TOOL = "specforge-fsdp"


@dataclass(frozen=True)
class Call:
    """One call of the benchmark: its results, where its allocator histories are, and whether
    its process held the embedding copy beside the step."""

    name: str
    results: Path
    traces: Path
    copy_held: bool


def calls(root: Path = ROOT) -> tuple[Call, ...]:
    """The three calls' files under a checkout of the repository."""
    data, traces = root / "docs" / "data", root / "tests" / "data" / "gpu" / "trace" / "specforge"
    return (Call("D", data / "vs_specforge_fsdp.json", traces, True),
            Call("E", data / "vs_specforge_fsdp_b.json", traces, True),
            Call("F", data / "vs_specforge_fsdp_c.json", traces / "unleaked", False))


# The runs the SpecForge terms and the written step were studied on (call, B, S); every other
# run is held out, F's 1 x 2048 too: the shape was studied, that run (without the copy) was not.
STUDIED = {("D", 1, 2048), ("D", 1, 8192)}


def benchmark_held_tensors(job: Job) -> list[int]:
    """Bytes of the tensors the benchmark keeps beside SpecForge's step (module docstring): the
    embedding copy [V, h] bf16, the draft-vocab ids and the d2t map (int64 [Vd] each), the t2d
    mask (bool [V])."""
    d = job.draft
    return [2 * d.vocab * d.hidden, 8 * d.draft_vocab, 8 * d.draft_vocab, d.vocab]


def written_events(job: Job, copy_held: bool) -> tuple[list[Event], list[tuple[str, int, int]]]:
    """The written step (step_events.build), after the benchmark's own tensors where it held
    them (it made them first and kept them): (events, phases as (label, first event, end event))."""
    built = step_events.build(job)
    sizes = benchmark_held_tensors(job) if copy_held else []
    held = [Event("alloc", ("benchmark", i), size) for i, size in enumerate(sizes)]
    shift = len(held)
    return held + list(built.events), [(label, first + shift, end + shift) for label, first, end in built.phases]


def _device_allocator(job: Job, addresses: list[int] | None = None) -> Allocator:
    """The allocator model on the job's device less what lives outside the allocator."""
    return Allocator(replayed.capacity_bytes(job), device_total_bytes=job.cluster.gpu.total_bytes,
                     segment_addresses=addresses)


@lru_cache(maxsize=32)
def written_reserved(job: Job, copy_held: bool) -> dict[str, int]:
    """Per phase label of the written step, the model's peak reserved bytes (written_events)."""
    events, phases = written_events(job, copy_held)
    over_time = tuple(replay(events, _device_allocator(job)).reserved_over_time)
    return {label: replayed._peak_between(over_time, first, end) for label, first, end in phases}


# ------------------------------------------------------------------ the recording


def recorded_phases(snapshot: dict) -> dict[int, dict[str, tuple[int, int]]]:
    """Per step of the recording (0 for the first), per phase (forward, backward, optimizer): the
    most bytes allocated at once (a block leaves at its free request, as torch counts) and the
    most reserved. The benchmark labels its phases on the training thread; backward's entries,
    made on autograd's thread, carry none: an unlabelled run after a forward entry is backward,
    one between two entries of one phase is that phase."""
    entries = snapshot["device_traces"][0]
    labels = _filled_labels(entries)
    out: dict[int, dict[str, list[int]]] = {}
    sizes: dict[int, int] = {}
    allocated = reserved = 0
    for entry, label in zip(entries, labels):
        action = entry["action"]
        if action == "alloc":
            sizes[entry["addr"]] = entry["size"]
            allocated += entry["size"]
        elif action == "free_requested":
            allocated -= sizes.pop(entry["addr"], 0)
        elif action == "segment_alloc":
            reserved += entry["size"]
        elif action == "segment_free":
            reserved -= entry["size"]
        if label is None:
            continue
        step, phase = label
        peaks = out.setdefault(step, {}).setdefault(phase, [0, 0])
        peaks[0], peaks[1] = max(peaks[0], allocated), max(peaks[1], reserved)
    return {step: {phase: (a, r) for phase, (a, r) in phases.items()} for step, phases in out.items()}


def _step_label(raw: str) -> tuple[int, str] | None:
    if not raw:
        return None
    step, _, phase = raw.rpartition(".")
    return (int(step.removeprefix("step")) if step else 0), phase


def _filled_labels(entries: list[dict]) -> list[tuple[int, str] | None]:
    raw = [_step_label(e.get("user_metadata", "")) for e in entries]
    out: list[tuple[int, str] | None] = list(raw)
    i = 0
    while i < len(raw):
        if raw[i] is not None:
            i += 1
            continue
        end = i
        while end < len(raw) and raw[end] is None:
            end += 1
        before = raw[i - 1] if i else None
        after = raw[end] if end < len(raw) else None
        if before is not None and before[1] == "forward" and after != before:
            fill = (before[0], "backward")
        else:
            fill = before
        for j in range(i, end):
            out[j] = fill
        i = end
    # the training thread's own entries inside backward (it waits there) are backward's too
    return [(label[0], "backward") if label is not None and label[1] == "backward" else label for label in out]


def recorded_requests(snapshot: dict, retired_return_with_backward: bool = False) -> tuple[list[Event], list]:
    """The recording's requests as events for the allocator model, with an "empty_cache" where
    the history releases segments unasked (OnlineEagle3Model's torch.cuda.empty_cache(), which
    the history does not record), and each free where its block came back (free_completed).
    `retired_return_with_backward`: a block freed while another stream still used it (its free
    completed after a later request) comes back at the end of its step's backward instead, the
    written step's rule. Returns (events, the filled phase label of each event)."""
    entries = snapshot["device_traces"][0]
    labels = _filled_labels(entries)
    ends = _backward_ends(labels)
    deferred: dict[int, list[int]] = {}  # entry index -> keys whose blocks come back before it
    requested: dict[int, int] = {}  # addr -> entry index of the free request
    keys: dict[int, int] = {}
    events: list[Event] = []
    event_labels: list = []
    previous = None
    for i, (entry, label) in enumerate(zip(entries, labels)):
        for key in deferred.pop(i, ()):
            events.append(Event("free", key))
            event_labels.append(label)
        action = entry["action"]
        if action == "alloc":
            keys[entry["addr"]] = i
            events.append(Event("alloc", i, entry["size"], entry["stream"]))
            event_labels.append(label)
        elif action == "free_requested":
            requested[entry["addr"]] = i
        elif action == "free_completed" and entry["addr"] in keys:
            key = keys.pop(entry["addr"])
            asked = requested.pop(entry["addr"], i)
            late = any(e["action"] == "alloc" for e in entries[asked:i])
            end = ends.get(asked)
            if retired_return_with_backward and late and end is not None and end > i:
                deferred.setdefault(end, []).append(key)
            else:
                events.append(Event("free", key))
                event_labels.append(label)
        elif action == "segment_free" and previous not in ("segment_free", None) and previous != "oom":
            events.append(Event("empty_cache"))
            event_labels.append(label)
        previous = action
    return events, event_labels


def _backward_ends(labels: list) -> dict[int, int]:
    """Per entry inside a backward, the index of the first entry after that backward."""
    out: dict[int, int] = {}
    start = None
    for i, label in enumerate(labels + [None]):
        inside = label is not None and label[1] == "backward"
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            out.update((j, i) for j in range(start, i))
            start = None
    return out


def recorded_reserved(snapshot: dict, job: Job, *, retired_return_with_backward: bool = False,
                      recorded_addresses: bool = False) -> dict[int, dict[str, int]]:
    """The allocator model's peak reserved bytes per recorded step and phase, replaying the
    recording's requests (recorded_requests) on the job's device. `recorded_addresses`: the
    segments start where the recording's cudaMalloc put them, which decides best fit's ties
    (two free blocks of one stream and size: the lower address wins); otherwise they start where
    the model puts them, as in the written step."""
    events, labels = recorded_requests(snapshot, retired_return_with_backward)
    addresses = [e["addr"] for e in snapshot["device_traces"][0] if e["action"] == "segment_alloc"]
    summary = replay(events, _device_allocator(job, addresses if recorded_addresses else None))
    out: dict[int, dict[str, int]] = {}
    reserved, changes = 0, dict(summary.reserved_over_time)
    for i, label in enumerate(labels):
        reserved = changes.get(i, reserved)
        if label is not None:
            phases = out.setdefault(label[0], {})
            phases[label[1]] = max(phases.get(label[1], 0), reserved)
    return out


def steady(per_step: dict[int, dict[str, int]]) -> dict[str, int]:
    """Per phase, the most over the recorded steps from the third on (step 2, counting from 0),
    the steps the written steady step stands for."""
    out: dict[str, int] = {}
    for step, phases in per_step.items():
        if step >= 2:
            for phase, value in phases.items():
                out[phase] = max(out.get(phase, 0), value)
    return out


def recorded_segments(snapshot: dict, step: int, phase: str) -> Counter:
    """Segments the recording made (cudaMalloc) in one phase of one step: (MiB, stream 0 or 1)."""
    entries = snapshot["device_traces"][0]
    return Counter((e["size"] >> 20, int(bool(e["stream"]))) for e, label in zip(entries, _filled_labels(entries))
                   if e["action"] == "segment_alloc" and label == (step, phase))


def written_segments(job: Job, label: str, copy_held: bool) -> Counter:
    """Segments the written step's replay makes in one phase (a label of step_events.build):
    (MiB, stream)."""
    events, phases = written_events(job, copy_held)
    first, end = next((f, e) for name, f, e in phases if name == label)
    summary = replay(events, _device_allocator(job))
    return Counter((size >> 20, events[i].stream) for i, action, size, _ in summary.segment_log
                   if action == "segment_alloc" and first <= i < end)


def bench_job(seq: int, batch: int = 1) -> Job:
    return resolve(RunSpec(model="llama-3.1-8b", gpus="1xH200", runtime="specforge", offline=True, seq=seq,
                           micro_batch=batch))


# ------------------------------------------------------------------ the rows


@dataclass(frozen=True)
class Row:
    call: str
    batch: int
    seq: int
    copy_held: bool  # the benchmark's embedding copy beside the step (calls D and E)
    snapshot: Path
    measured_allocated: int
    measured_reserved: int
    measured_phases: dict[str, int]  # forward (teacher and draft), backward, optimizer
    predicted: Estimate

    @property
    def job(self) -> Job:
        return bench_job(self.seq, self.batch)

    @property
    def studied(self) -> bool:
        return (self.call, self.batch, self.seq) in STUDIED

    @property
    def label(self) -> str:
        if self.studied:
            return "studied"
        if any((batch, seq) == (self.batch, self.seq) for _, batch, seq in STUDIED):
            return "held out (studied shape, new run)"
        return "held out"

    @property
    def held(self) -> int:
        """Bytes the benchmark held beside the step."""
        return sum(benchmark_held_tensors(self.job)) if self.copy_held else 0

    @property
    def predicted_allocated(self) -> int:
        return self.predicted.peak_allocated_bytes + self.held

    @property
    def predicted_phases(self) -> dict[str, int]:
        p = self.predicted
        return {"forward": max(p.phase_allocated("target_forward"), p.phase_allocated("draft_forward")) + self.held,
                "backward": p.phase_allocated("backward") + self.held,
                "optimizer": p.phase_allocated("optimizer_step") + self.held}

    @property
    def allocated_error(self) -> float:
        return self.predicted_allocated / self.measured_allocated - 1

    @property
    def predicted_reserved(self) -> int:
        """The written step's replay, the benchmark's tensors made first where it held them."""
        return max(written_reserved(self.job, self.copy_held).values())

    @property
    def reserved_error(self) -> float:
        return self.predicted_reserved / self.measured_reserved - 1


def measured_results(call: Call) -> list[dict]:
    results = json.loads(call.results.read_text())["results"]
    return [r for r in results if r["tool"] == TOOL and r["ok"]]


def rows(root: Path = ROOT) -> list[Row]:
    """A row per run of the three calls, in call order, sorted by shape within a call. A run
    repeating an earlier call's shape with the copy held alike (E's 1 x 2048, D's peaks to the
    byte) is left out."""
    out: list[Row] = []
    for call in calls(root):
        for r in sorted(measured_results(call), key=lambda r: (r["batch"], r["seq"])):
            if any((row.batch, row.seq, row.copy_held) == (r["batch"], r["seq"], call.copy_held) for row in out):
                continue
            out.append(Row(call.name, r["batch"], r["seq"], call.copy_held, call.traces / r["snapshot"],
                           r["peak_allocated"], r["peak_reserved"], r["phase_peak_allocated"],
                           estimate(bench_job(r["seq"], r["batch"]))))
    return out


def summary(errors: list[float]) -> tuple[float, float, float]:
    """(median |error|, max |error|, most under as a positive fraction, 0 when never under)."""
    absolute = [abs(e) for e in errors]
    return statistics.median(absolute), max(absolute), -min(0.0, min(errors))


# ------------------------------------------------------------------ the tables


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def table(found: list[Row]) -> str:
    header = ("| call | B x S | copy | run | allocated: measured / predicted | reserved: measured / predicted "
              "| phases fwd / bwd / opt: measured | predicted |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in found:
        m, p = row.measured_phases, row.predicted_phases
        measured = " / ".join(_gib(m[k]) for k in ("forward", "backward", "optimizer"))
        predicted = " / ".join(_gib(p[k]) for k in ("forward", "backward", "optimizer"))
        lines.append(f"| {row.call} | {row.batch} x {row.seq} | {'yes' if row.copy_held else 'no'} | {row.label} "
                     f"| {_gib(row.measured_allocated)} / {_gib(row.predicted_allocated)} ({_pct(row.allocated_error)}) "
                     f"| {_gib(row.measured_reserved)} / {_gib(row.predicted_reserved)} ({_pct(row.reserved_error)}) "
                     f"| {measured} | {predicted} |")
    lines.append("")
    for which, chosen in (("all runs", found), ("held out", [r for r in found if not r.studied])):
        for name, errors in (("allocated", [r.allocated_error for r in chosen]),
                             ("reserved", [r.reserved_error for r in chosen])):
            median, most, under = summary(errors)
            lines.append(f"- {which}, {name}: |error| median {100 * median:.1f}%, max {100 * most:.1f}%, "
                         f"most under {100 * under:.1f}%")
    return "\n".join(lines)


def replay_table(found: list[Row]) -> str:
    """Per run and steady phase (the most over the recorded steps from step 2 on), the peak
    reserved bytes (GiB): the recording's real segments; the allocator model replaying the
    recorded requests, each block back when its free completed, with the recorded segment
    addresses and with the model's; the same with blocks other streams used back when backward
    ends (the written step's rule); and the written step."""
    header = ("| call | B x S | phase | real | model, recorded requests and addresses | same, model's addresses "
              "| same, blocks back when backward ends | written |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in found:
        snapshot = load_snapshot(row.snapshot)
        real = steady({step: {phase: r for phase, (_, r) in phases.items()}
                       for step, phases in recorded_phases(snapshot).items()})
        exact = steady(recorded_reserved(snapshot, row.job, recorded_addresses=True))
        model = steady(recorded_reserved(snapshot, row.job))
        deferred = steady(recorded_reserved(snapshot, row.job, retired_return_with_backward=True))
        written = written_reserved(row.job, row.copy_held)
        for phase, labels in WRITTEN_PHASES.items():
            ours = max(written[f"steady.{label}"] for label in labels)
            lines.append(f"| {row.call} | {row.batch} x {row.seq} | {phase} | {_gib(real[phase])} | {_gib(exact[phase])} "
                         f"| {_gib(model[phase])} | {_gib(deferred[phase])} | {_gib(ours)} |")
    return "\n".join(lines)


# the benchmark's phases and the written step's
WRITTEN_PHASES = {"forward": ("target_forward", "draft_forward"), "backward": ("backward",),
                  "optimizer": ("optimizer_step",)}


def main() -> int:
    found = rows()
    print(table(found))
    print()
    print(replay_table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
