"""The fix ladder: the cheapest changes that make a job fit, tried in cost order.

Rungs (docs/fit.md): a fused attention kernel in place of eager attention; the draft's memory
knobs; micro-batch down with accumulation up; all-to-all output sharding for a TP target;
activation checkpointing; expandable segments; more sharding and more TP within the GPUs given;
8-bit optimizer; CPU offload.
None of them changes what is learned: global batch, sequence length, model and draft stay as
given (a shorter sequence or more GPUs are only suggested when nothing fits). Each runtime is
offered only the rungs it can be told to take (RUNTIMES): a rung it would refuse whatever it is
told is not a plan for it.

The walk keeps a small frontier (the configurations closest to fitting and the fastest that
fit) and extends each with the next rung's options. The chosen plan is the configuration that
fits with the margin and has the best predicted throughput (fitplan.steptime).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from fitplan.config import CHOICES, RunSpec
from fitplan.errors import FitplanError
from fitplan.estimator.result import Estimate
from fitplan.layout import (
    SPECULATORS_SHARDINGS,
    Job,
    can_recompute_mlp,
    copies_every_grad,
    head_grads_in_forward,
    per_param_optimizer,
    resolve,
    tp_options,
)
from fitplan.steptime import StepTime, step_time

EstimateFn = Callable[[Job], Estimate]
# Configurations extended at each rung, of those that fail (lowest peaks) and of those that fit
# (fastest). Two of each keep the search well under a second while still combining rungs.
FRONTIER = 2
# Rungs SpecForge's train_eagle3.py can express (flags or the allocator environment variable).
SPECFORGE_RUNGS = ("micro_batch", "output_sharding", "expandable_segments", "attention", "tp")
# Rungs speculators' train.py can be told to take: the allocator environment variable,
# --draft-attn-impl and --fsdp-shard. It packs one sequence a step (no micro-batch to halve) and runs
# no activation checkpointing, no verifier to split or gather from, no 8-bit moments and no offload
# (fitplan.layout.SPECULATORS_KNOBS).
SPECULATORS_RUNGS = ("expandable_segments", "attention", "sharding")
# Rungs that replace an earlier rung rather than build on it: offloaded moments live in host
# memory, where 8 bits save nothing (fitplan.layout refuses the pair), so the offload rung also
# extends the configurations the optimizer rung started from.
ALTERNATIVE_TO = {"offload": "optimizer"}


@dataclass(frozen=True)
class Candidate:
    spec: RunSpec
    job: Job
    estimate: Estimate
    time: StepTime
    rung: str
    change: str


@dataclass(frozen=True)
class TrailEntry:
    rung: str
    change: str
    peak_reserved_bytes: int
    fits: bool  # with the margin
    verdict: str  # the estimate's: fits, at risk or OOM
    slowdown: float  # predicted step time / the original's, minus 1

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FitResult:
    original: Candidate
    chosen: Candidate | None
    trail: tuple[TrailEntry, ...]
    margin: float
    max_seq: int | None = None  # suggestions when nothing fits
    min_gpus: str | None = None
    # Rung options the job's rules refuse (change, reason), e.g. knobs the trainer cannot run.
    refused: tuple[tuple[str, str], ...] = ()

    @property
    def changes(self) -> list[str]:
        """The chosen plan's changes to the given configuration, one per rung applied."""
        if self.chosen is None or not self.chosen.change:
            return []
        return self.chosen.change.split("; ")


# ---------------------------------------------------------------- rungs: spec -> [(change, spec)]


def _draft_memory(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    """fitplan's trainer: the lean draft and its fused norms, which keep less for the same math."""
    if spec.workload != "eagle3":
        return
    if spec.draft_memory == "plain":
        yield "draft_memory lean", spec.replace(draft_memory="lean", recompute_norms=True)
    elif spec.recompute_norms is False:
        yield "recompute_norms on", spec.replace(recompute_norms=True)


def _recompute_mlp(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    """fitplan's lean draft: its MLP keeps only its input, gate and up made again in backward
    (two more matmuls per TTT step, some 5% of a step); only in the eagle3 draft with fused norms."""
    if not spec.recompute_mlp and can_recompute_mlp(spec):
        yield "recompute_mlp on", spec.replace(recompute_mlp=True)


def _head_grad_in_backward(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    """fitplan's lean draft with the head's gradients made in forward (the default where the
    steps' gradients are summed): made again in backward instead, which keeps no hidden's
    gradient per step and no head weight's gradient through forward (less at long sequences),
    at one more [B·S, h] x [h, Vd] matmul and softmax pass per TTT step."""
    if head_grads_in_forward(job):
        yield "head_grad_in_forward off", spec.replace(head_grad_in_forward=False)


def _optimizer_per_param(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    """fitplan's bf16-master step a parameter at a time where it is off (sft's default): one fp32
    gradient copy alive instead of all, at one optimizer call per tensor."""
    if copies_every_grad(spec) and not per_param_optimizer(spec):
        yield "optimizer_per_param on", spec.replace(optimizer_per_param=True)


def _micro_batch(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    mb = spec.micro_batch // 2
    while mb >= 1:
        if job.global_batch % (mb * job.dp) == 0:
            accum = job.global_batch // (mb * job.dp)
            yield f"micro_batch {mb}, accum {accum}", spec.replace(micro_batch=mb, accum=accum)
        mb //= 2


def _output_sharding(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    if spec.workload == "eagle3" and job.tp > 1 and spec.output_sharding == "gather":
        yield "output_sharding all-to-all", spec.replace(output_sharding="all-to-all")


def _switch(field: str) -> Callable[[RunSpec, Job], Iterator[tuple[str, RunSpec]]]:
    def rung(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
        if not getattr(spec, field):
            yield f"{field} on", spec.replace(**{field: True})

    return rung


def _attention(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    if spec.attention_impl == "eager":
        efficient = spec.replace(attention=None).attention_impl  # the job's default: a fused kernel
        yield f"attention {efficient}", spec.replace(attention=efficient)


def _sharding(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    stages = RUNTIMES[spec.runtime].shardings
    for stage in stages[stages.index(spec.sharding) + 1 :]:
        yield f"sharding {stage}", spec.replace(sharding=stage)


def _tp(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    if spec.workload == "eagle3" and not spec.offline:
        for tp in tp_options(job.model, job.cluster.gpus_per_node, spec.runtime):
            if tp > job.tp:
                yield f"tp {tp}", spec.replace(tp=tp)


def _optimizer(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    # the 8-bit AdamW steps fp32 masters of its own: split_master goes back to auto, off there
    if spec.optimizer == "adamw":
        yield "optimizer adamw-8bit", spec.replace(optimizer="adamw-8bit", split_master=_auto_if_on(spec.split_master))


def _offload(spec: RunSpec, job: Job) -> Iterator[tuple[str, RunSpec]]:
    # Off the GPU no fp32 copy of every gradient is made to step a parameter at a time: the knob
    # goes back to auto, which is off there (true is refused, fitplan.layout).
    # The same for split_master, which splits masters held on the GPU.
    off_gpu = {"optimizer_per_param": _auto_if_on(spec.optimizer_per_param), "split_master": _auto_if_on(spec.split_master)}
    if spec.offload == "none":
        yield "offload optimizer", spec.replace(offload="optimizer", **off_gpu)
    if spec.offload != "params":
        yield "offload params (zero3)", spec.replace(offload="params", sharding="zero3", **off_gpu)


def _auto_if_on(switch: bool | None) -> bool | None:
    """A switch given true, as auto (where a rung moves to a layout that refuses it true)."""
    return None if switch else switch


RUNGS: tuple[tuple[str, Callable[[RunSpec, Job], Iterator[tuple[str, RunSpec]]]], ...] = (
    # first: a fused kernel in place of eager attention is less memory and less time, no cost
    ("attention", _attention),
    ("draft_memory", _draft_memory),
    ("recompute_mlp", _recompute_mlp),
    ("head_grad_in_forward", _head_grad_in_backward),
    ("optimizer_per_param", _optimizer_per_param),
    ("micro_batch", _micro_batch),
    ("output_sharding", _output_sharding),
    ("ac", _switch("ac")),
    ("expandable_segments", _switch("expandable_segments")),
    ("sharding", _sharding),
    ("tp", _tp),
    ("optimizer", _optimizer),
    ("offload", _offload),
)


@dataclass(frozen=True)
class RuntimeMoves:
    """What fit may change in a runtime's job."""

    rungs: tuple[str, ...]  # the ladder rungs it can be told to take
    shardings: tuple[str, ...]  # its sharding stages, least sharded first
    accumulates: bool  # False: it steps the optimizer after each GPU's micro-batch (no accumulation)


RUNTIMES = {
    "fitplan": RuntimeMoves(tuple(name for name, _ in RUNGS), CHOICES["sharding"], accumulates=True),
    "specforge": RuntimeMoves(SPECFORGE_RUNGS, CHOICES["sharding"], accumulates=True),
    "speculators": RuntimeMoves(SPECULATORS_RUNGS, SPECULATORS_SHARDINGS, accumulates=False),
}


def rungs_for(spec: RunSpec) -> tuple[tuple[str, Callable], ...]:
    return tuple(r for r in RUNGS if r[0] in RUNTIMES[spec.runtime].rungs)


# ---------------------------------------------------------------- the walk


def _default_estimate(job: Job) -> Estimate:
    from fitplan.estimator import estimate

    return estimate(job, replay_past_the_device=False)


def resolved_spec(spec: RunSpec) -> RunSpec:
    """The spec with tp, accum and global batch written out, so every rung keeps them fixed."""
    job = resolve(spec)
    tp = job.tp if spec.workload == "eagle3" else spec.tp
    return spec.replace(tp=tp, accum=job.accum, global_batch=job.global_batch)


def _candidate(spec: RunSpec, rung: str, change: str, estimate_fn: EstimateFn) -> Candidate:
    job = resolve(spec)
    return Candidate(spec, job, estimate_fn(job), step_time(job), rung, change)


def fit(
    spec: RunSpec,
    margin: float = 0.05,
    estimate_fn: EstimateFn = _default_estimate,
) -> FitResult:
    base_spec = resolved_spec(spec)
    original = _candidate(base_spec, "original", "", estimate_fn)

    def fits(cand: Candidate) -> bool:
        return cand.estimate.fits_with_margin(margin)

    if fits(original):  # nothing to fix: the user's configuration is the plan
        return FitResult(original, original, (_entry(original, original, True),), margin)
    trail = [_entry(original, original, False)]
    fitting, failing = [], [original]
    refused: dict[str, str] = {}
    frontiers: dict[str, list[Candidate]] = {}
    for rung, options in rungs_for(base_spec):
        # Extend the configurations closest to fitting, and the fastest that fit already (a
        # later rung can make one faster: all-to-all output sharding moves fewer bytes).
        frontier = frontiers[rung] = _lowest_peaks(failing) + _fastest(fitting)
        if rung in ALTERNATIVE_TO:
            frontier = _distinct(frontiers.get(ALTERNATIVE_TO[rung], []) + frontier)
        for parent in frontier:
            for change, new_spec in options(parent.spec, parent.job):
                joined = "; ".join(c for c in (parent.change, change) if c)
                try:  # the job's rules, as every command checks them: fit proposes nothing train refuses
                    cand = _candidate(new_spec, rung, joined, estimate_fn)
                except FitplanError as exc:
                    refused.setdefault(change, str(exc))
                    continue
                if fits(parent) and not (fits(cand) and cand.time.step_s < parent.time.step_s):
                    continue  # a plan that fits is only worth changing to get faster
                trail.append(_entry(cand, original, fits(cand)))
                (fitting if fits(cand) else failing).append(cand)
    if fitting:
        return FitResult(original, _fastest(fitting)[0], tuple(trail), margin, refused=tuple(refused.items()))
    deepest = _lowest_peaks(failing)[0]
    return FitResult(
        original, None, tuple(trail), margin,
        max_seq=largest_fitting_seq(deepest.spec, margin, estimate_fn),
        min_gpus=smallest_fitting_gpus(deepest.spec, margin, estimate_fn),
        refused=tuple(refused.items()),
    )


def _distinct(cands: list[Candidate]) -> list[Candidate]:
    return list({id(c): c for c in cands}.values())


def _lowest_peaks(cands: list[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: c.estimate.peak_reserved_bytes)[:FRONTIER]


def _fastest(cands: list[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: -c.time.tokens_per_s)[:FRONTIER]


def _entry(cand: Candidate, original: Candidate, fits: bool) -> TrailEntry:
    return TrailEntry(
        rung=cand.rung,
        change=cand.change or "(as given)",
        peak_reserved_bytes=cand.estimate.peak_reserved_bytes,
        fits=fits,
        verdict=cand.estimate.verdict.value,
        slowdown=cand.time.step_s / original.time.step_s - 1,
    )


# ---------------------------------------------------------------- suggestions when nothing fits


def _fits(spec: RunSpec, margin: float, estimate_fn: EstimateFn) -> bool:
    try:
        job = resolve(spec)
    except FitplanError:  # a suggestion the job's rules refuse is no suggestion
        return False
    return estimate_fn(job).fits_with_margin(margin)


def largest_fitting_seq(spec: RunSpec, margin: float, estimate_fn: EstimateFn, step: int = 256) -> int | None:
    """Binary search, in multiples of `step`, below the given seq (peaks grow with seq)."""
    lo, hi = 0, spec.seq // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(spec.replace(seq=mid * step), margin, estimate_fn):
            lo = mid
        else:
            hi = mid - 1
    return lo * step or None


def _gpu_counts(per_node: int) -> Iterator[tuple[int, int]]:
    """(nodes, GPUs per node) in increasing total: fill one node, then whole nodes."""
    n = per_node * 2
    while n <= 8:
        yield 1, n
        n *= 2
    for nodes in (2, 4, 8, 16, 32, 64):
        yield nodes, max(per_node, 8)


def smallest_fitting_gpus(spec: RunSpec, margin: float, estimate_fn: EstimateFn) -> str | None:
    """More GPUs of the same type: the largest valid TP per node for a live target, keeping the
    global batch; data parallel only (tp 1) where no target runs to split (offline, speculators)."""
    job = resolve(spec)
    gpu = job.cluster.gpu.id
    for nodes, per_node in _gpu_counts(job.cluster.gpus_per_node):
        world = nodes * per_node
        if world <= job.world:
            continue
        label = f"{per_node}x{gpu}" if nodes == 1 else f"{nodes}x{per_node}x{gpu}"
        trial = _on_more_gpus(spec, job, label, per_node, world)
        if trial is not None and _fits(trial, margin, estimate_fn):
            return label
    return None


def _on_more_gpus(spec: RunSpec, job: Job, label: str, per_node: int, world: int) -> RunSpec | None:
    """The job on `world` GPUs, laid out to save the most memory per GPU; None where it cannot
    keep its global batch there."""
    moves = RUNTIMES[spec.runtime]
    if not moves.accumulates:
        # One sequence per GPU a step: the batch grows with the GPUs. Replicas save nothing, so
        # the trained model is sharded as far as the runtime shards it.
        return spec.replace(gpus=label, accum=1, global_batch=None, sharding=moves.shardings[-1])
    if job.global_batch % world:
        return None
    trial = spec.replace(gpus=label, micro_batch=1, accum=job.global_batch // world)
    if spec.workload == "eagle3" and not spec.offline:  # the most TP, with its logits sharded
        trial = trial.replace(tp=tp_options(job.model, per_node, spec.runtime)[-1], output_sharding="all-to-all")
    return trial
