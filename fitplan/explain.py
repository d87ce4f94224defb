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

Three failures look like a GPU OOM and are not one (parse_failures finds them with the OOMs, in
log order): Triton's "out of resource: shared memory" (a compiled kernel's per-SM shared memory),
an asynchronous kernel fault ("an illegal memory access was encountered", "unspecified launch
failure") surfacing at a later call, and the host's OOM killer (SIGKILL, exit 137, "Killed
process N", OOMKilled): each has its own explanation and fix.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from dataclasses import dataclass

from fitplan.errors import FitplanError
from fitplan.estimator.result import AllocatorReplay, Estimate
from fitplan.render.estimate import retries
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
    events = [event for _, event in _oom_events(text)]
    if events:
        return events
    raise _nothing_found(text)


def _oom_events(text: str) -> list[tuple[int, OomEvent]]:
    """(offset in _one_line(text), event) of every OOM message; one with unreadable numbers is an error."""
    joined = _one_line(text)
    found = [(m.start(), _new_event, m) for m in NEW_FORMAT.finditer(joined)]
    found += [(m.start(), _old_event, m) for m in OLD_FORMAT.finditer(joined)]
    events = []
    for number, (start, read, m) in enumerate(sorted(found, key=lambda f: f[0]), 1):
        try:
            events.append((start, _checked(read(m))))
        except FitplanError as exc:
            which = f"OOM message {number} of {len(found)}" if len(found) > 1 else "OOM message"
            raise FitplanError(str(exc).replace("the OOM message", f"the {which}", 1)) from None
    return events


def _nothing_found(text: str) -> FitplanError:
    """The refusal for a log holding no failure explain can read."""
    if OOM_MARKER.search(text):
        return FitplanError(
            "found an out-of-memory line but not PyTorch's numbers; expected "
            "'Tried to allocate X GiB. GPU 0 has a total capacity of ...' or '(GPU 0; X GiB total capacity; ...)'"
        )
    return FitplanError("no CUDA out-of-memory message in the log; expected PyTorch's 'CUDA out of memory. Tried to allocate ...'")


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


LINE_JOIN = re.compile(r"\s*\n\s*(?:\[rank\d+\]:?\s*)?")


def _one_line(text: str) -> str:
    """Messages are sometimes wrapped or prefixed per rank; join lines so the patterns match."""
    return LINE_JOIN.sub(" ", text)


def _original_offsets(text: str, positions: list[int]) -> list[int]:
    """Offsets in _one_line(text) -> the same characters' offsets in text."""
    joined_starts, original_starts, removed = [0], [0], 0
    for m in LINE_JOIN.finditer(text):  # each join: the stretch after it starts here in both texts
        removed += m.end() - m.start() - 1
        joined_starts.append(m.end() - removed)
        original_starts.append(m.end())
    offsets = []
    for position in positions:
        i = bisect_right(joined_starts, position) - 1
        offsets.append(original_starts[i] + position - joined_starts[i])
    return offsets


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


# ---------------------------------------------------------------- failures that look like a GPU OOM

# Triton's compile-time check of a kernel's shared memory against the GPU's per-block limit.
SHARED_MEMORY = re.compile(r"out of resource: shared memory(?:,\s*Required:\s*(\d+),\s*Hardware limit:\s*(\d+))?")
# A kernel that faulted; CUDA reports it at the next synchronizing call. As CUDA spells them.
KERNEL_FAULT = re.compile(
    r"illegal memory access|cudaErrorIllegalAddress|unspecified launch failure|cudaErrorLaunchFailure"
    r"|device-side assert triggered|cudaErrorAssert"
)
# The host's OOM killer and what the launcher, shell or container runtime print when it struck. One
# pattern each, every one starting with literal text: re scans a 10 MB log for each in milliseconds
# (one case-insensitive alternation of them all takes seconds).
HOST_KILLS = {
    "killed_process": re.compile(
        r"[Oo]ut of memory: [Kk]ill(?:ed)? process (?P<pid>\d{1,12})(?: \((?P<name>[^)\n]{1,64})\))?"),
    "cgroup": re.compile(r"[Mm]emory cgroup out of memory"),
    "oom_killer": re.compile(r"(?:oom|OOM)[-_ ]?(?:kill|Kill|KILL)"),  # oom-kill, oom_kill_process, OOMKilled
    "exitcode": re.compile(r"exitcode\s*:\s*-9\b"),  # torchrun
    "sigkill": re.compile(r"Signal 9 \(SIGKILL\)|Signals\.SIGKILL: 9>"),  # torchrun; subprocess
    "exit137": re.compile(r"[Ee]xit(?:ed with)? (?:[Ss]tatus|[Cc]ode):?\s*137\b"),
    "shell": re.compile(r"^[ \t]*Killed\b|: line \d{1,9}:\s+\d{1,12}\s+Killed\b", re.MULTILINE),
}
HOST_EVIDENCE = {  # what each kind of line shows, as the explanation words it
    "killed_process": "the kernel's OOM killer ended a process",
    "cgroup": "a memory cgroup (the container's or job's limit) ran out",
    "oom_killer": "an oom-kill record (kernel or container runtime)",
    "exitcode": "torchrun: exitcode -9 (SIGKILL)",
    "sigkill": "signal 9 (SIGKILL) received",
    "exit137": "exit status 137 (128 + SIGKILL)",
    "shell": "the shell's 'Killed'",
}
OOM_KILLER_EVIDENCE = ("killed_process", "cgroup", "oom_killer")
# A GPU OOM line, to tell one PyTorch printed with its numbers from one without them.
GPU_OOM_LINE = re.compile(r"CUDA out of memory|CUDA error: out of memory|OutOfMemoryError")
TRACEBACK_FRAME = re.compile(r'File "([^"\n]{1,300})", line (\d{1,9}), in ([^\s]{1,100})')

# Traceback words that name the Triton kernel, most specific first.
KERNEL_FAMILIES = (
    ("flex", re.compile(r"flex_attention|flex_decoding|FlexAttention", re.IGNORECASE)),
    ("liger", re.compile(r"liger_kernel|\bliger\b", re.IGNORECASE)),
    ("fused-loss", re.compile(r"fused_linear_cross_entropy|fused_cross_entropy|cut_cross_entropy|chunked_ce", re.IGNORECASE)),
    ("inductor", re.compile(r"torch[/.]_inductor|BackendCompilerFailed|triton_(?:tem|per|red|poi)_", re.IGNORECASE)),
)
# Triton's shared-memory limit per block -> the GPUs that have it.
SHARED_MEMORY_GPUS = {
    232448: "H100/H200/B200 class (~228 KiB per SM)",
    166912: "A100 class (~164 KiB per SM)",
    101376: "L4/A10/RTX 4090 class (~100 KiB per SM)",
    98304: "V100 class (96 KiB per SM)",
    65536: "T4/RTX 20 class (64 KiB per SM)",
}
MAX_SHARED_MEMORY = 1 << 30  # no SM has a GiB of shared memory: a larger figure is an edited log
WINDOW_BEFORE, WINDOW_AFTER = 30_000, 5_000  # characters of the log read around a message


@dataclass(frozen=True)
class SharedMemoryLimit:
    """Triton's "out of resource: shared memory": a kernel's blocks need more than an SM has."""

    required: int | None  # bytes, when the message gives them
    limit: int | None
    family: str  # flex, liger, fused-loss, inductor or unknown: from the traceback around it


@dataclass(frozen=True)
class KernelFault:
    """An asynchronous CUDA kernel error: illegal memory access, launch failure, device assert."""

    what: str
    surfaced_at: str | None  # the last traceback frame before the message (where it surfaced)


@dataclass(frozen=True)
class HostKill:
    """The process was killed for host (CPU) memory: OOM killer, SIGKILL, exit 137, OOMKilled."""

    evidence: tuple[str, ...]  # what the log shows, in HOST_EVIDENCE's words
    oom_killer_seen: bool  # the kernel or the container runtime says so, not just a SIGKILL


@dataclass(frozen=True)
class Failure:
    """One failure in a log, at `position` (an offset in the log)."""

    kind: str  # cuda-oom, shared-memory, kernel-fault, host-kill, or cuda-oom-unread (no numbers)
    position: int
    detail: OomEvent | SharedMemoryLimit | KernelFault | HostKill | None  # None: only counted


KIND_NAMES = {  # (one, several)
    "cuda-oom": ("CUDA out-of-memory message", "CUDA out-of-memory messages"),
    "cuda-oom-unread": ("out-of-memory line without PyTorch's numbers", "out-of-memory lines without PyTorch's numbers"),
    "shared-memory": ("Triton shared-memory limit message", "Triton shared-memory limit messages"),
    "kernel-fault": ("asynchronous CUDA kernel error", "asynchronous CUDA kernel errors"),
    "host-kill": ("host-memory kill line", "host-memory kill lines"),
}


def parse_failures(text: str) -> list[Failure]:
    """Every failure explain knows in a log, in log order: CUDA OOMs and what only looks like one.

    The first failure other than an unread OOM line (the one explained) has its detail read from
    the log around it (kernel family, where it surfaced, the kill's evidence); the rest are only
    counted. A log with none is refused as parse_ooms refuses it; an OOM or Triton message with
    impossible numbers is refused wherever it is.
    """
    ooms = _oom_events(text)
    shared = [(m.start(), "shared-memory", _shared_memory(m, number))
              for number, m in enumerate(SHARED_MEMORY.finditer(text), 1)]
    faults = [(m.start(), "kernel-fault", m) for m in KERNEL_FAULT.finditer(text)]
    kills = [(m.start(), "host-kill", (key, m)) for key, m in _host_kills(text)]
    if not (shared or faults or kills):  # only CUDA OOMs, or nothing: exactly as before
        if not ooms:
            raise _nothing_found(text)
        return [Failure("cuda-oom", at, event) for at, event in ooms]
    decoded = _original_offsets(text, [at for at, _ in ooms]) if ooms else []  # sorted
    found = [(at, "cuda-oom", event) for at, (_, event) in zip(decoded, ooms)] + shared + faults + kills
    line_end = -1
    for m in GPU_OOM_LINE.finditer(text):  # a GPU OOM line with no numbers after it (or edited ones)
        if m.start() <= line_end:
            continue  # one per line: "torch.OutOfMemoryError: CUDA out of memory" is one line
        newline = text.find("\n", m.start())
        line_end = len(text) if newline < 0 else newline
        i = bisect_right(decoded, m.start() - 1)
        if i == len(decoded) or decoded[i] > m.end() + 300:
            found.append((m.start(), "cuda-oom-unread", None))
    found.sort(key=lambda f: f[0])
    first = next(i for i, (_, kind, _) in enumerate(found) if kind != "cuda-oom-unread")
    failures = [Failure(kind, at, detail if kind in ("cuda-oom", "shared-memory") else None)
                for at, kind, detail in found]
    failures[first] = _with_detail(*found[first], found, text)
    return failures


def _shared_memory(m: re.Match, number: int) -> SharedMemoryLimit:
    if m.group(1) is None:
        return SharedMemoryLimit(None, None, "unknown")
    required, limit = m.group(1), m.group(2)
    problem = None
    if len(required) > 10 or len(limit) > 10 or int(required) > MAX_SHARED_MEMORY or int(limit) > MAX_SHARED_MEMORY:
        problem = "a size beyond 1 GiB"
    elif int(limit) == 0:
        problem = "a hardware limit of 0"
    elif int(required) <= int(limit):
        problem = f"Required {int(required)} within the Hardware limit {int(limit)}"
    if problem:
        raise FitplanError(f"Triton's shared-memory message {number} has impossible numbers ({problem}); "
                           "expected 'out of resource: shared memory, Required: N, Hardware limit: M' as printed, N > M")
    return SharedMemoryLimit(int(required), int(limit), "unknown")


def _with_detail(at: int, kind: str, matched: object, found: list[tuple[int, str, object]], text: str) -> Failure:
    """The failure at `at`, with what the log says around it: the kernel family, where it surfaced, the kill's evidence.

    `found` is every failure as (offset, kind, what its pattern matched), in log order.
    """
    if kind == "shared-memory":
        window = text[_window_start(at, kind, found): _window_end(at, kind, found, len(text))]
        family = next((name for name, words in KERNEL_FAMILIES if words.search(window)), "unknown")
        return Failure(kind, at, SharedMemoryLimit(matched.required, matched.limit, family))
    if kind == "kernel-fault":
        word = matched.group(0).lower()
        if "illegal" in word:
            what = "an illegal memory access (cudaErrorIllegalAddress)"
        elif "assert" in word:
            what = "a device-side assert (cudaErrorAssert)"
        else:
            what = "an unspecified launch failure (cudaErrorLaunchFailure)"
        frames = list(TRACEBACK_FRAME.finditer(text, _window_start(at, kind, found), at))
        surfaced = None
        if frames:  # the last frame before the message, and its source line when the log has it
            path, line, function = frames[-1].groups()
            after = text[frames[-1].end():at].split("\n", 2)
            code = _RANK_PREFIX.sub("", after[1]).strip() if len(after) == 3 else ""
            surfaced = f'File "{path}", line {line}, in {function}' + (f": {code}" if 0 < len(code) <= 120 else "")
        return Failure(kind, at, KernelFault(what, _printable(surfaced) if surfaced else None))
    if kind == "host-kill":
        evidence, seen = [], False
        for key, m in (detail for _, other, detail in found if other == "host-kill"):
            seen = seen or key in OOM_KILLER_EVIDENCE
            words = HOST_EVIDENCE[key]
            if key == "oom_killer" and m.group(0).lower().startswith("oomkill"):
                words = "the container runtime: OOMKilled"
            if key == "killed_process":
                words = f"the kernel's OOM killer ended process {int(m.group('pid'))}" + (
                    f" ({_printable(m.group('name'))})" if m.group("name") else "")
            if words not in evidence:
                evidence.append(words)
        return Failure(kind, at, HostKill(tuple(evidence), seen))
    return Failure(kind, at, matched)  # a CUDA OOM: its numbers are all there is


def _host_kills(text: str) -> list[tuple[str, re.Match]]:
    found = []
    for key, pattern in HOST_KILLS.items():
        for m in pattern.finditer(text):
            if key == "oom_killer" and m.start() and text[m.start() - 1].isalnum():
                continue  # "room kill" is no OOM killer
            found.append((key, m))
    return found


_RANK_PREFIX = re.compile(r"^\s*\[rank\d+\]:?")


def _window_start(at: int, kind: str, found: list[tuple[int, str, object]]) -> int:
    """Where the text about a failure can begin: after the last failure of another kind before it."""
    before = [position for position, other, _ in found if position < at and other != kind]
    return max([at - WINDOW_BEFORE, *before[-1:], 0])


def _window_end(at: int, kind: str, found: list[tuple[int, str, object]], length: int) -> int:
    after = [position for position, other, _ in found if position > at and other != kind]
    return min([at + WINDOW_AFTER, *after[:1], length])


def _printable(text: str) -> str:
    """Log text shown back: no control characters, at most 200 characters."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= 200 else clean[:197] + "..."



# ---------------------------------------------------------------- explanation


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def describe(event: OomEvent) -> list[str]:
    """What the numbers say, without any job config."""
    lines = [
        f"GPU {event.gpu}: asked for {readable(event.requested)} with {readable(event.free)} free "
        f"of {gib(event.total)}.",
        f"PyTorch held {gib(event.reserved)}: {gib(event.allocated)} in live tensors, "
        f"{gib(event.cached_free)} cached but unallocated.",
    ]
    if event.requested == 0:
        lines.append("The failed request is 0 B: its size says nothing about the cause; the other numbers do.")
    if event.held_elsewhere:
        lines.append(f"{gib(event.held_elsewhere)} is used outside this process's allocator "
                     "(CUDA context, NCCL, or other processes).")
    segment = segment_line(event)
    if segment:
        lines.append(segment)
    lines.append(CAUSES[event.cause](event))
    return lines


def segment_line(event: OomEvent) -> str | None:
    """When the device had room for the request but not for the segment the caching allocator
    maps for it (fitplan.allocator.sizes, as CUDACachingAllocator.cpp sizes them): a request of
    up to 1 MiB takes a 2 MiB segment, one under 10 MiB a 20 MiB segment, a larger one its size
    rounded up to 2 MiB."""
    from fitplan.allocator.sizes import round_size, segment_bytes

    if event.requested == 0:
        return None
    needed = segment_bytes(round_size(event.requested))
    if not event.requested <= event.free < needed:
        return None
    return (f"The device had room for the {mib(event.requested)} asked for ({mib(event.free)} free) but not for "
            f"the {mib(needed)} segment the caching allocator maps for a request of that size.")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def readable(n: int) -> str:
    """GiB, or MiB below one GiB (a 4 MiB request is not '0.00 GiB')."""
    return gib(n) if n >= GIB else mib(n)


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
    if estimate.replay is not None:
        lines.append(replay_line(estimate.replay))
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


def replay_line(replay: AllocatorReplay) -> str:
    """The allocator model's verdict on the job's step (estimate.replay: one-GPU jobs of fitplan's
    trainer), the same replay `fitplan estimate` takes its verdict from."""
    count = retries(replay.num_alloc_retries)
    if replay.num_ooms:
        verdict = f"OOM, a request fails even after the cache is freed ({count})"
    elif replay.num_alloc_retries:
        verdict = f"at risk, served only after the cache is freed ({count})"
    else:
        verdict = "fits, no request waits for the cache to be freed (0 retries)"
    return f"The allocator model, replaying this job's step on the GPU: {verdict}."


# ---------------------------------------------------------------- explaining what only looks like an OOM

LARGER_SHARED_MEMORY = "H100/H200: ~228 KiB per SM; A100: ~164 KiB; L4/RTX 4090: ~100 KiB"
FAMILY_LINES = {  # (which kernel, the fix)
    "flex": (
        "Kernel: flex attention's compiled kernel (flex_attention under torch.compile / inductor), "
        "named in the traceback.",
        'Fix: smaller flex_attention kernel options (kernel_options={"BLOCK_M": 64, "BLOCK_N": 64, '
        '"num_stages": 1}; halve the blocks again if needed), or the draft\'s attention on sdpa or eager '
        f"(fitplan: --attention sdpa), or a GPU with more shared memory per SM ({LARGER_SHARED_MEMORY}).",
    ),
    "liger": (
        "Kernel: a Liger Triton kernel (liger_kernel: fused linear cross-entropy, RMSNorm, ...), named in the traceback.",
        "Fix: turn that Liger kernel off for this GPU (PyTorch's loss or norm instead), or a liger_kernel "
        f"release whose block sizes fit this GPU, or a GPU with more shared memory per SM ({LARGER_SHARED_MEMORY}).",
    ),
    "fused-loss": (
        "Kernel: a fused-loss Triton kernel (fused or chunked cross-entropy), named in the traceback.",
        "Fix: a smaller block or chunk size for the fused loss, or the unfused PyTorch loss, or a GPU with "
        f"more shared memory per SM ({LARGER_SHARED_MEMORY}).",
    ),
    "inductor": (
        "Kernel: a Triton kernel torch.compile (inductor) generated; the traceback names no flex_attention "
        "or Liger kernel.",
        "Fix: smaller block sizes or num_stages in that kernel's config (compile without max-autotune, or "
        f"that module eagerly), or a GPU with more shared memory per SM ({LARGER_SHARED_MEMORY}).",
    ),
    "unknown": (
        "Kernel: the log names none; in this field it is usually flex attention's compiled kernel "
        "(torch.compile of flex_attention) or a Liger/fused-loss Triton kernel.",
        "Fix: for flex attention, smaller kernel options (BLOCK_M/BLOCK_N, num_stages) or the draft's attention "
        "on sdpa or eager (fitplan: --attention sdpa); for a Liger/fused-loss kernel, that kernel off or a "
        f"smaller block; or a GPU with more shared memory per SM ({LARGER_SHARED_MEMORY}).",
    ),
}
FIRST_NAMES = {
    "cuda-oom": "a CUDA out-of-memory message",
    "shared-memory": "Triton's shared-memory limit",
    "kernel-fault": "an asynchronous CUDA kernel error",
    "host-kill": "a host-memory kill",
}


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def summary_line(failures: list[Failure]) -> str | None:
    """One line naming the failures besides the one explained; None when it is alone."""
    if all(f.kind == "cuda-oom" for f in failures):  # as before lookalikes were read
        return f"{len(failures)} OOM messages in the log; explaining the first." if len(failures) > 1 else None
    first = next(f for f in failures if f.kind != "cuda-oom-unread")
    counts: dict[str, list[int]] = {}  # kind -> [how many, how many before the first]
    for f in failures:  # the lines of the kill explained are its evidence, not more failures
        if f is not first and not (f.kind == first.kind == "host-kill"):
            n = counts.setdefault(f.kind, [0, 0])
            n[0] += 1
            n[1] += f.position < first.position
    if not counts:
        return None
    parts = []
    for kind, (n, before) in counts.items():
        one, several = KIND_NAMES[kind]
        name = one if n == 1 else several
        where = " (before it)" if before == n else f" ({before} before it)" if before else ""
        parts.append(f"{n} more {name}" if kind == first.kind else f"{n} {name}{where}")
    return f"First failure in the log: {FIRST_NAMES[first.kind]}; also in it: {', '.join(parts)}."


def describe_failure(failure: Failure) -> list[str]:
    """What the log says, without any job config: CUDA OOMs as describe(), the lookalikes each their own way."""
    if failure.kind == "cuda-oom":
        return describe(failure.detail)
    return {"shared-memory": _shared_memory_lines, "kernel-fault": _kernel_fault_lines,
            "host-kill": _host_kill_lines}[failure.kind](failure.detail)


def _shared_memory_lines(d: SharedMemoryLimit) -> list[str]:
    lines = ["Not GPU memory: a compiled Triton kernel needs more shared memory per block than an SM has "
             "(on-chip, per SM); the GPU's memory is not what ran short."]
    if d.required is not None:
        gpu = SHARED_MEMORY_GPUS.get(d.limit)
        lines.append(f"Shared memory: required {kib(d.required)}, hardware limit {kib(d.limit)} "
                     f"(over by {kib(d.required - d.limit)})" + (f"; that is the limit of the {gpu}" if gpu else "") + ".")
    else:
        lines.append("Shared memory: the message gives no Required / Hardware limit figures.")
    which, fix = FAMILY_LINES[d.family]
    lines += [which, fix,
              "A smaller batch or sequence does not change it: the limit is per kernel block, set by its block "
              "sizes and stages."]
    return lines


def _kernel_fault_lines(d: KernelFault) -> list[str]:
    lines = [f"Not an allocation failure: a CUDA kernel faulted: {d.what}.",
             "CUDA reports kernel errors asynchronously: the line the traceback shows is where the error surfaced "
             "(a later call such as synchronize() or .item()), not where it happened."]
    if d.surfaced_at:
        lines.append(f"It surfaced at {d.surfaced_at}.")
    lines += [
        "Usual causes: an out-of-bounds index (token ids >= the vocab size in an embedding or the loss, a bad "
        "label, position or mask index) or a bug in a kernel.",
        "Fix: rerun with CUDA_LAUNCH_BLOCKING=1 to stop at the kernel that faulted, and check the token ids "
        "against the vocab size (max(input_ids) < vocab_size, for the target's and the draft's vocab).",
        "Memory pressure can make it appear near the GPU's memory limit, but more memory (or a smaller batch) "
        "will not fix it.",
    ]
    return lines


def _host_kill_lines(d: HostKill) -> list[str]:
    lines = ["Not the GPU: host (CPU) memory, or the container's memory limit, ran out and the process was "
             "killed (SIGKILL, exit status 137).",
             f"In the log: {'; '.join(d.evidence)}."]
    if not d.oom_killer_seen:
        lines.append("Only the kill is in the log: a scheduler's time limit or a kill -9 looks the same; dmesg "
                     "(the kernel's 'Killed process' line) or kubectl describe pod (OOMKilled) confirms the OOM killer.")
    lines += [
        "Common culprits: every rank loading the full weights on CPU before moving them to the GPU, dataloader "
        "workers, CPU offload of optimizer state, pinned host buffers.",
        "Fix: load the weights with device_map (straight to each GPU) or initialize on the meta device (fitplan's "
        "trainer builds its random targets on meta), fewer dataloader workers (num_workers), or raise the "
        "container's memory limit (docker --memory, Kubernetes resources.limits.memory, Slurm --mem).",
    ]
    return lines


def job_lines(failure: Failure, spec) -> list[str]:
    """With the job's RunSpec, for a lookalike: what of the job bears on it (never a GPU-memory component)."""
    if failure.kind == "shared-memory":
        impl = spec.attention_impl
        if impl == "flex":
            default = ", the eagle3 default" if spec.attention is None else ""
            return [f"This job's draft attention is flex (--attention flex{default}): its compiled kernel is the "
                    "likely one; --attention sdpa avoids it (fitplan estimate shows what that costs in memory)."]
        return [f"This job's draft attention is {impl}, not flex: look at its other Triton kernels "
                "(Liger/fused loss, torch.compile)."]
    if failure.kind == "kernel-fault":
        return ["The job's GPU memory estimate does not bear on this: a kernel fault is not an allocation, so "
                "no component is matched and no rung of the fix ladder helps."]
    return ["The job's GPU memory estimate does not bear on this: the host ran short, not the GPU, so no "
            "component is matched."]
