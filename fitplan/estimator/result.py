"""Estimate: what the estimator predicts for one GPU (the busiest rank) of a job.

A plain frozen dataclass shared by the CLI, the fix ladder, plans and the trainer's comparison.
Phase and component names are the shared vocabulary of docs/architecture.md: the trainer
reports measured peaks under the same phase names, so comparing is a join.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Phases of one training step, in time order, after `load`. The estimator predicts each for
# step 1 (no optimizer moments yet: Adam allocates them lazily in the first step) and for
# steady state (step >= 2); `phases` holds the steady-state ones, `step1_phases` step 1's.
PHASES = ("load", "target_forward", "draft_forward", "backward", "optimizer_step", "checkpoint")
SFT_PHASES = ("load", "forward", "backward", "optimizer_step", "checkpoint")


class Verdict(str, Enum):
    """Whether a job fits: the values compare and serialize as their strings."""

    FITS = "fits"
    AT_RISK = "at risk"
    OOM = "OOM"

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(frozen=True)
class AllocatorReplay:
    """The step's allocations and frees replayed through the caching allocator model
    (fitplan/estimator/replayed.py): where fitplan's trainer runs on one GPU, the device level
    and the verdict come from here instead of the fitted reserve and the stranded-block rule."""

    peak_reserved_bytes: int  # the most the allocator reserved, within what the driver can give
    needed_reserved_bytes: int  # what it would reserve with memory to spare (more than the device: OOM)
    num_alloc_retries: int  # requests served only after the cache was freed (up to the first failure)
    num_ooms: int  # 1 if a request failed even then (the replay stops there), else 0

    def to_json(self) -> dict[str, int]:
        return {"peak_reserved_bytes": self.peak_reserved_bytes, "needed_reserved_bytes": self.needed_reserved_bytes,
                "num_alloc_retries": self.num_alloc_retries, "num_ooms": self.num_ooms}


@dataclass(frozen=True)
class Estimate:
    # phase -> component -> bytes live at that phase's peak (allocator-level, per GPU)
    phases: dict[str, dict[str, int]]
    step1_phases: dict[str, dict[str, int]]
    gpu_total_bytes: int
    # device-level extras on top of allocated bytes at the peak
    allocator_reserve_bytes: int  # reserved - allocated (caching allocator rounding/fragmentation)
    outside_allocator_bytes: int  # CUDA context, cuBLAS, NCCL buffers
    largest_allocation_bytes: int
    largest_allocation_name: str
    world: int = 1
    # the part of the reserve the allocator cannot hand back when memory runs short (None: all of it)
    reserve_floor_bytes: int | None = None
    # freed blocks of the largest request's size that fragmentation can keep cached when memory
    # runs short (0 with expandable segments): the width of the band where the verdict is `at risk`
    stranded_block_bytes: int = 0
    notes: tuple[str, ...] = ()
    # resolved layout the numbers are for (tp, dp, accum, ...), for reports and plans
    layout: dict[str, Any] = field(default_factory=dict)
    # the allocator model's replay of the step, where it is modelled (None: the fitted reserve)
    replay: AllocatorReplay | None = None

    # -------------------------------------------------------------- derived figures

    def phase_allocated(self, phase: str, step1: bool = False) -> int:
        return sum((self.step1_phases if step1 else self.phases)[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_allocated)

    @property
    def peak_allocated_bytes(self) -> int:
        return self.phase_allocated(self.peak_phase)

    @property
    def step1_peak_allocated_bytes(self) -> int:
        return max(self.phase_allocated(p, step1=True) for p in self.step1_phases)

    @property
    def required_bytes(self) -> int:
        """What the job cannot run without: allocated + the reserve floor + memory outside the allocator."""
        floor = self.allocator_reserve_bytes if self.reserve_floor_bytes is None else self.reserve_floor_bytes
        return self.peak_allocated_bytes + min(floor, self.allocator_reserve_bytes) + self.outside_allocator_bytes

    @property
    def required_if_fragmented_bytes(self) -> int:
        """What the job needs when fragmentation strands blocks of its largest request's size."""
        return self.required_bytes + self.stranded_block_bytes

    @property
    def verdict(self) -> Verdict:
        """`fits`, `OOM`, or `at risk`: it needs no more than the device, but fragmentation can strand
        enough cached memory to fail its largest request (runtime.stranded_block_bytes). Where the
        step is replayed: `OOM` if a request failed after the cache was freed, `at risk` if one
        was served only after that."""
        if self.replay is not None:
            if self.replay.num_ooms:
                return Verdict.OOM
            return Verdict.AT_RISK if self.replay.num_alloc_retries else Verdict.FITS
        if self.required_bytes > self.gpu_total_bytes:
            return Verdict.OOM
        return Verdict.AT_RISK if self.required_if_fragmented_bytes > self.gpu_total_bytes else Verdict.FITS

    @property
    def peak_reserved_bytes(self) -> int:
        """Device-level peak: allocated + allocator reserve + memory outside the allocator.

        Near the device limit the reserve shrinks: before failing a request the caching allocator
        frees its cached blocks and retries, so a job that needs no more than `required_bytes` runs
        with its cached blocks squeezed to what is left of the device (the peak is then the total).
        One that needs more fails; its figure is what it needs. Where the step is replayed, the
        replay's peak reserved (what it needs when a request failed) + outside."""
        if self.replay is not None:
            reserved = self.replay.needed_reserved_bytes if self.replay.num_ooms else self.replay.peak_reserved_bytes
            return reserved + self.outside_allocator_bytes
        if self.required_bytes > self.gpu_total_bytes:
            return self.required_bytes
        return min(self.unconstrained_peak_bytes, self.gpu_total_bytes)

    @property
    def unconstrained_peak_bytes(self) -> int:
        """Allocated + the whole reserve + outside: the device-level peak when memory is ample."""
        return self.peak_allocated_bytes + self.allocator_reserve_bytes + self.outside_allocator_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_total_bytes - self.peak_reserved_bytes

    @property
    def fits(self) -> bool:
        """Runs whatever the allocator's luck: a job `at risk` does not count as fitting."""
        return self.verdict == Verdict.FITS

    def fits_with_margin(self, margin_fraction: float) -> bool:
        return self.fits and self.headroom_bytes >= margin_fraction * self.gpu_total_bytes

    @property
    def components(self) -> dict[str, int]:
        """Components at the peak phase."""
        return dict(self.phases[self.peak_phase])

    @property
    def dominant_component(self) -> str:
        comps = self.components
        return max(comps, key=comps.get)

    def to_json(self) -> dict[str, Any]:
        """The stable JSON interface (docs/cli.md): names here are a public contract."""
        return {
            "fits": self.fits,
            "verdict": self.verdict.value,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "gpu_total_bytes": self.gpu_total_bytes,
            "headroom_bytes": self.headroom_bytes,
            "largest_allocation_bytes": self.largest_allocation_bytes,
            "largest_allocation": self.largest_allocation_name,
            "peak_phase": self.peak_phase,
            "phases": {p: self.phase_allocated(p) for p in self.phases},
            "components": self.components,
            "step1_peak_allocated_bytes": self.step1_peak_allocated_bytes,
            "step1_phases": {p: self.phase_allocated(p, step1=True) for p in self.step1_phases},
            "allocator_reserve_bytes": self.allocator_reserve_bytes,
            "required_bytes": self.required_bytes,
            "required_if_fragmented_bytes": self.required_if_fragmented_bytes,
            "allocator_replay": self.replay.to_json() if self.replay is not None else None,
            "outside_allocator_bytes": self.outside_allocator_bytes,
            "phase_components": self.phases,
            "world": self.world,
            "layout": self.layout,
            "notes": list(self.notes),
        }
