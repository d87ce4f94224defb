"""OOM-log diagnosis: read PyTorch's CUDA out-of-memory message and say what it means.

PyTorch prints two formats. Since 2.1:
  "CUDA out of memory. Tried to allocate 73.63 GiB. GPU 0 has a total capacity of 79.18 GiB of
  which 4.12 GiB is free. [Process 123 has 30.00 GiB memory in use. ]Including non-PyTorch
  memory, this process has 75.05 GiB memory in use. Of the allocated memory 60.02 GiB is
  allocated by PyTorch, and 14.20 GiB is reserved by PyTorch but unallocated."
Before:
  "Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; 70.1 GiB already allocated;
  1.2 GiB free; 75.3 GiB reserved in total by PyTorch)"
The numbers tell three causes apart: one request larger than anything the job could free
(a big tensor: logits, teacher probabilities), fragmentation (the allocator holds enough free
cached memory, just not in one piece), and memory held by another process.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fitplan.errors import FitplanError
from fitplan.estimator.result import Estimate
from fitplan.units import GIB

UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE = r"([\d.]+) ?(B|bytes|KiB|MiB|GiB|TiB)"

NEW_FORMAT = re.compile(
    rf"Tried to allocate {_SIZE}\. GPU (\d{{1,6}}) has a total capac?ity of {_SIZE} of which {_SIZE} is free\."
    rf"(?P<procs>(?: Process \d{{1,12}} has {_SIZE} memory in use\.)*)"
    rf"(?: Including non-PyTorch memory, this process has {_SIZE} memory in use\.)?"
    rf" Of the allocated memory {_SIZE} is allocated by PyTorch, and {_SIZE} is reserved by PyTorch but unallocated"
)
OLD_FORMAT = re.compile(
    rf"Tried to allocate {_SIZE} \(GPU (\d{{1,6}}); {_SIZE} total capacity; {_SIZE} already allocated; "
    rf"{_SIZE} free; {_SIZE} reserved in total by PyTorch\)"
)
PROCESS = re.compile(rf"Process (\d{{1,12}}) has {_SIZE} memory in use")
THIS_PROCESS = re.compile(rf"this process has {_SIZE} memory in use")
OOM_MARKER = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)

# Thresholds of the diagnosis, as fractions of the GPU's capacity.
OTHER_PROCESS_FRACTION = 0.05  # memory neither ours nor free: another process (or a leaked context)
LARGE_REQUEST_FRACTION = 0.10  # one request of a tenth of the GPU is a single big tensor
FRAGMENTATION_FRACTION = 0.02  # cached-but-free memory below this is ordinary allocator slack


# No GPU holds a pebibyte: a size beyond it in an OOM message is a corrupted or edited log.
MAX_BYTES = 1 << 50


def _bytes(number: str, unit: str) -> int:
    """'73.63', 'GiB' -> bytes; a size that is not one decimal number, or beyond any GPU, is an error."""
    text = f"{number[:24]}{'...' if len(number) > 24 else ''} {unit}"
    if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", number):
        raise FitplanError(f"the OOM message has an unreadable size {text!r}; expected a number such as 73.63 GiB")
    value = float(number) * UNITS[unit] if len(number) <= 40 else math.inf
    if not value <= MAX_BYTES:
        raise FitplanError(
            f"the OOM message has an impossible size {text!r}; accepted: up to 1 PiB (no GPU holds more)"
        )
    return int(value)


@dataclass(frozen=True)
class OomEvent:
    """The numbers of one CUDA OOM message, in bytes."""

    gpu: int
    requested: int
    total: int
    free: int
    allocated: int  # live tensors (PyTorch)
    reserved: int  # held by the caching allocator: allocated + cached free blocks
    this_process: int | None  # device memory of the failing process (new format only)
    other_processes: tuple[tuple[int, int], ...]  # (pid, bytes) listed by the driver

    @property
    def cached_free(self) -> int:
        """Reserved but unallocated: free memory the allocator holds in pieces."""
        return self.reserved - self.allocated

    @property
    def held_elsewhere(self) -> int:
        """Used memory that is neither this process's allocator nor its CUDA context."""
        if self.this_process is not None:
            return max(0, self.total - self.free - self.this_process)
        # Without "this process has", the driver's list may include us (containers hide our
        # pid mapping): the first entry at least as large as our allocator's reservation is us.
        listed = [b for _, b in self.other_processes]
        ours = next((b for b in sorted(listed) if b >= self.reserved), 0)
        return sum(listed) - ours

    @property
    def cause(self) -> str:
        if self.held_elsewhere >= OTHER_PROCESS_FRACTION * self.total:
            return "other-process"
        if self.requested == 0:  # no size to compare: whatever was live filled the GPU
            return "exhausted"
        if self.cached_free >= max(self.requested, FRAGMENTATION_FRACTION * self.total):
            return "fragmentation"
        if self.requested >= LARGE_REQUEST_FRACTION * self.total:
            return "large-request"
        return "exhausted"


def parse_ooms(text: str) -> list[OomEvent]:
    """Every OOM message in a log, in order; a log with none (or unreadable ones) is an error."""
    joined = _one_line(text)
    found = [(m.start(), _new_event, m) for m in NEW_FORMAT.finditer(joined)]
    found += [(m.start(), _old_event, m) for m in OLD_FORMAT.finditer(joined)]
    events = []
    for number, (_, read, m) in enumerate(sorted(found, key=lambda f: f[0]), 1):
        try:
            events.append(_checked(read(m)))
        except FitplanError as exc:
            which = f"OOM message {number} of {len(found)}" if len(found) > 1 else "OOM message"
            raise FitplanError(str(exc).replace("the OOM message", f"the {which}", 1)) from None
    if events:
        return events
    if OOM_MARKER.search(text):
        raise FitplanError(
            "found an out-of-memory line but not PyTorch's numbers; expected "
            "'Tried to allocate X GiB. GPU 0 has a total capacity of ...' or '(GPU 0; X GiB total capacity; ...)'"
        )
    raise FitplanError("no CUDA out-of-memory message in the log; expected PyTorch's 'CUDA out of memory. Tried to allocate ...'")


def _checked(event: OomEvent) -> OomEvent:
    """Refuse numbers no GPU can report: they come from an edited log or another tool's message."""
    def problem() -> str | None:
        if event.total <= 0:
            return "a total capacity of 0"
        if event.free > event.total:
            return f"{gib(event.free)} free of a {gib(event.total)} total"
        if event.reserved > event.total:
            return f"{gib(event.reserved)} reserved by PyTorch on a {gib(event.total)} GPU"
        if event.allocated > event.reserved:
            return f"{gib(event.allocated)} allocated but only {gib(event.reserved)} reserved"
        if event.this_process is not None and event.this_process > event.total:
            return f"this process using {gib(event.this_process)} of a {gib(event.total)} GPU"
        return None

    found = problem()
    if found:
        raise FitplanError(f"the OOM message has impossible numbers ({found}); "
                           "expected PyTorch's message as printed, with free and in-use memory within the total")
    return event


def _one_line(text: str) -> str:
    """Messages are sometimes wrapped or prefixed per rank; join lines so the patterns match."""
    return re.sub(r"\s*\n\s*(?:\[rank\d+\]:?\s*)?", " ", text)


def _new_event(m: re.Match) -> OomEvent:
    g = m.groups()
    procs = tuple((int(pid), _bytes(n, u)) for pid, n, u in PROCESS.findall(m.group("procs") or ""))
    this = THIS_PROCESS.search(m.group(0))
    allocated, cached = _bytes(*g[-4:-2]), _bytes(*g[-2:])
    return OomEvent(
        gpu=int(g[2]),
        requested=_bytes(g[0], g[1]),
        total=_bytes(g[3], g[4]),
        free=_bytes(g[5], g[6]),
        allocated=allocated,
        reserved=allocated + cached,
        this_process=_bytes(*this.groups()) if this else None,
        other_processes=procs,
    )


def _old_event(m: re.Match) -> OomEvent:
    g = m.groups()
    return OomEvent(
        gpu=int(g[2]),
        requested=_bytes(g[0], g[1]),
        total=_bytes(g[3], g[4]),
        allocated=_bytes(g[5], g[6]),
        free=_bytes(g[7], g[8]),
        reserved=_bytes(g[9], g[10]),
        this_process=None,
        other_processes=(),
    )


# ---------------------------------------------------------------- explanation


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def describe(event: OomEvent) -> list[str]:
    """What the numbers say, without any job config."""
    lines = [
        f"GPU {event.gpu}: asked for {gib(event.requested)} with {gib(event.free)} free "
        f"of {gib(event.total)}.",
        f"PyTorch held {gib(event.reserved)}: {gib(event.allocated)} in live tensors, "
        f"{gib(event.cached_free)} cached but unallocated.",
    ]
    if event.requested == 0:
        lines.append("The failed request is 0 B: its size says nothing about the cause; the other numbers do.")
    if event.held_elsewhere:
        lines.append(f"{gib(event.held_elsewhere)} is used outside this process's allocator "
                     "(CUDA context, NCCL, or other processes).")
    lines.append(CAUSES[event.cause](event))
    return lines


CAUSES = {
    "other-process": lambda e: (
        f"Cause: another process holds memory ({gib(e.held_elsewhere)}"
        + (", pids " + ", ".join(str(p) for p, _ in e.other_processes) if e.other_processes else "")
        + "). Free the GPU (nvidia-smi; a stale job or a second rank on the same device) before changing the config."
    ),
    "fragmentation": lambda e: (
        f"Cause: fragmentation. The allocator had {gib(e.cached_free)} cached, more than the "
        f"{gib(e.requested)} asked for, but not in one block. Fix: "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (fitplan: --expandable-segments)."
    ),
    "large-request": lambda e: (
        f"Cause: one large allocation ({gib(e.requested)}, {e.requested / e.total:.0%} of the GPU): "
        "a single big tensor such as full-vocab logits or teacher probabilities."
    ),
    "exhausted": lambda e: (
        "Cause: the job's working set filled the GPU; the failing request is small, so the "
        "memory went to everything live before it."
    ),
}


def matching_component(event: OomEvent, estimate: Estimate) -> tuple[str, int]:
    """The predicted allocation or component whose size is nearest the request (by ratio)."""
    sizes = {estimate.largest_allocation_name: estimate.largest_allocation_bytes}
    for phase in estimate.phases.values():
        for name, size in phase.items():
            if size > 0:
                sizes[name] = max(size, sizes.get(name, 0))
    sizes = {n: b for n, b in sizes.items() if b > 0}
    if not sizes:
        return estimate.largest_allocation_name, 0
    wanted = max(event.requested, 1)  # a 0 B request: the smallest component is nearest
    name = min(sizes, key=lambda n: abs(math.log(sizes[n] / wanted)))
    return name, sizes[name]


def config_lines(event: OomEvent, result) -> list[str]:
    """With the job's config: which component made the request, and the cheapest rung that fixes it.

    `result` is the fix ladder's FitResult for the job (its original candidate holds the estimate).
    """
    estimate = result.original.estimate
    name, size = matching_component(event, estimate)
    predicted = (f"Predicted for this job: peak {gib(estimate.peak_reserved_bytes)} of "
                 f"{gib(estimate.gpu_total_bytes)} ({estimate.peak_phase})")
    if event.requested == 0:
        lines = [f"{predicted}; the failing request is 0 B, so it matches no component."]
    else:
        lines = [f"{predicted}; the failing {gib(event.requested)} request best matches {name} ({gib(size)})."]
    if event.cause == "other-process":
        lines.append("No config change needed if the GPU is freed; the ladder below assumes a GPU of its own.")
    if event.cause == "fragmentation" and not result.original.spec.expandable_segments:
        lines.append("Cheapest fix: expandable_segments on (fragmentation only; nearly free).")
        return lines
    first_fix = next((e for e in result.trail if e.fits), None)
    if first_fix is None:
        suggestion = f"largest seq that fits: {result.max_seq}" if result.max_seq else "no shorter seq fits"
        more = f"; or {result.min_gpus}" if result.min_gpus else ""
        lines.append(f"Nothing on the fix ladder fits ({suggestion}{more}).")
    elif first_fix.rung == "original":
        lines.append("The estimate says this config fits: check the GPU count/type and the other flags of the run.")
    else:
        lines.append(f"Cheapest fix: {first_fix.change} (rung {first_fix.rung}, predicted peak "
                     f"{gib(first_fix.peak_reserved_bytes)}, {first_fix.slowdown:+.0%} step time).")
        if result.chosen is not None and result.chosen.change != first_fix.change:
            lines.append(f"Fastest plan that fits: {result.chosen.change} (fitplan fit).")
    return lines
