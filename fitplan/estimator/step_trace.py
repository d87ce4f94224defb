"""The building blocks of a step's allocation sequence (step_events.py): the trace being written,
the shapes, and the trainer's persistent state with how parameter gradients arrive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fitplan.allocator import Event
from fitplan.estimator.recipes import TrainedState
from fitplan.layout import Job, sums_step_grads
from fitplan.units import FP32

# Event(op, key, size, stream) without NamedTuple's argument handling, which costs twice as much
# as the tuple: a step writes ten thousand and more events (the fields are given in full)
_new_event = tuple.__new__


@dataclass
class Trace:
    """Events as they are written, with the live bytes the estimator counts and the phases."""

    events: list[Event] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    phases: list[tuple[str, int]] = field(default_factory=list)  # (label, index of its first event)
    sizes: dict[int, int] = field(default_factory=dict)  # live key -> bytes

    def alloc(self, nbytes: int, name: str, stream: int = 0) -> int | None:
        """A tensor of `nbytes` on `stream` (0: the compute stream); None for an empty one
        (nothing is requested)."""
        nbytes = int(nbytes)
        if nbytes <= 0:
            return None
        key = len(self.names)
        self.names[key] = name
        self.sizes[key] = nbytes
        self.events.append(_new_event(Event, ("alloc", key, nbytes, stream)))
        return key

    def free(self, *keys: int | None) -> None:
        sizes, events = self.sizes, self.events
        for key in keys:
            if key is not None:
                del sizes[key]
                events.append(_new_event(Event, ("free", key, 0, 0)))

    def begin(self, label: str) -> None:
        self.phases.append((label, len(self.events)))

    @property
    def live(self) -> int:
        return sum(self.sizes.values())


@dataclass(frozen=True)
class StepEvents:
    events: tuple[Event, ...]
    names: dict[int, str]  # alloc key -> what the tensor is
    # (label, first event, end event): labels "load", "step1.<phase>", "steady.<phase>"
    phases: tuple[tuple[str, int, int], ...]

    def live_peaks(self) -> dict[str, int]:
        """Per phase label, the most bytes requested and not yet freed at once (its start included)."""
        sizes: dict[int, int] = {}
        live, peaks = 0, {}
        for label, first, end in self.phases:
            peak = live
            for event in self.events[first:end]:
                if event.op == "alloc":
                    sizes[event.key] = event.size
                    live += event.size
                    peak = max(peak, live)
                elif event.op != "empty_cache":  # a retired block's bytes leave at its retire, not its free
                    live -= sizes.pop(event.key, 0)
            peaks[label] = max(peaks.get(label, 0), peak)
        return peaks


def micro_steps(job: Job) -> int:
    """Micro-steps written per optimizer step: the pattern repeats after the second."""
    return min(job.accum, 2)


def write_steps(t: Trace, job: Job, micro_step: Callable[[str], None],
                optimizer_step: Callable[[bool], None]) -> StepEvents:
    """Step 1 and a steady step after the load `t` holds: each its micro-steps (`micro_step`
    given the step's label), then its optimizer step (given whether it is the first)."""
    for label in ("step1", "steady"):
        for _ in range(micro_steps(job)):
            micro_step(label)
        t.begin(f"{label}.optimizer_step")
        optimizer_step(label == "step1")
    return written(t)


def written(t: Trace) -> StepEvents:
    """What `t` holds as a finished sequence: each phase runs until the next one begins."""
    ends = [start for _, start in t.phases[1:]] + [len(t.events)]
    phases = tuple((label, start, end) for (label, start), end in zip(t.phases, ends))
    return StepEvents(tuple(t.events), t.names, phases)


@dataclass(frozen=True)
class Sizes:
    """The shapes the sequence needs, in elements (T = B*S tokens of one micro-batch)."""

    B: int
    S: int
    T: int
    L: int
    h: int
    I: int
    H: int
    Hkv: int
    d: int
    Vd: int

    @classmethod
    def of(cls, job: Job) -> Sizes:
        d, spec = job.draft, job.spec
        return cls(B=spec.micro_batch, S=spec.seq, T=spec.micro_batch * spec.seq, L=spec.ttt, h=d.hidden,
                   I=d.intermediate, H=d.heads, Hkv=d.kv_heads, d=d.head_dim, Vd=d.draft_vocab)


@dataclass
class State:
    """Persistent tensors between phases: parameters, grads, optimizer state, and the recipe."""

    job: Job
    sizes: Sizes
    trained: TrainedState
    params: list[tuple[str, int]]  # trained parameters (name, elements)
    grads: dict[str, int] = field(default_factory=dict)  # name -> key of its .grad (or master grad)
    masters: list[int] = field(default_factory=list)
    moments: list[int] = field(default_factory=list)
    # FSDP (fsdp_events.Sharded): this rank's shards, the gathered units and the sharded grads
    sharded: Any = None

    @property
    def stored(self) -> list[tuple[str, int]]:
        """What this rank stores of each trained parameter (name, elements): the whole tensor,
        or with FSDP its shard; masters, moments and grad copies are made in these sizes."""
        return self.sharded.shards if self.sharded is not None else self.params

    @property
    def recipe(self):
        return self.trained.recipe

    @property
    def numel(self) -> dict[str, int]:
        return dict(self.params)

    @property
    def on_device_optimizer(self) -> bool:
        return self.job.spec.offload == "none"

    @property
    def summed_step_grads(self) -> bool:
        return sums_step_grads(self.job)

    @property
    def fp32_grads(self) -> bool:
        """`mixed`: each bf16 gradient goes into an fp32 gradient as soon as it is accumulated."""
        return self.job.spec.precision == "mixed"


def accumulate_grad(t: Trace, state: State, name: str) -> None:
    """A parameter's gradient arrives, in the parameter's dtype (AccumulateGrad)."""
    incoming = t.alloc(state.numel[name] * state.recipe.param, f"grad of {name}")
    keep_grad(t, state, name, incoming)


def step_grad(t: Trace, state: State, name: str) -> None:
    """A weight's gradient from one TTT step's backward: arriving as a tensor of its own
    (accumulate_grad), or with summed step gradients (layout.sums_step_grads,
    trainer/step_grads.py) made once, at the first step's backward, and added into in place by
    the later ones, which make nothing."""
    if not (state.summed_step_grads and name in state.grads):
        accumulate_grad(t, state, name)


def step_grad_buffer(t: Trace, state: State, name: str) -> int | None:
    """The buffer a step's backward accumulates a weight's gradient into before it is kept
    (keep_step_grad): made for every step, or once with summed step gradients (None after)."""
    if state.summed_step_grads and name in state.grads:
        return None
    return t.alloc(state.numel[name] * state.recipe.param, f"grad of {name} (zeros_like)")


def keep_step_grad(t: Trace, state: State, name: str, buffer: int | None) -> None:
    if buffer is not None:
        keep_grad(t, state, name, buffer)


def keep_grad(t: Trace, state: State, name: str, incoming: int | None) -> None:
    """The first gradient of a parameter is kept as its .grad, later ones are added to it and
    freed; `mixed` adds each into an fp32 gradient (its master's, or on the GPU for the host
    optimizer) and frees the bf16 one."""
    if name in state.grads:
        t.free(incoming)
        return
    if state.fp32_grads:
        state.grads[name] = t.alloc(FP32 * state.numel[name], f"fp32 grad {name}")
        t.free(incoming)
    else:
        state.grads[name] = incoming


def loop_chunks(total: int, chunk: int) -> list[int]:
    """The sizes of a loop over `total` items `chunk` at a time, as the allocator sees them.

    A chunk whose tensors are allocated and freed with nothing else in between leaves the
    allocator as it found it once the first chunk of that size has made its segment (the free
    merges the block back; best fit then finds the same block), so one chunk of each size is
    written: the full one and the remainder."""
    sizes = [min(chunk, total)]
    if total > chunk and total % chunk:
        sizes.append(total % chunk)
    return sizes

