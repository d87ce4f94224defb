"""The Eagle3 training loop, measured phase by phase.

    load -> for each step: [target_forward -> draft_forward -> backward] x accum
            -> optimizer_step -> (checkpoint)

One process is the world-1 case of the multi-GPU layout: the trainer.parallel calls
(group_batch, collect_target_outputs, shard_draft) are identities there. Under torchrun every
rank runs this loop on its own B samples: the TP group runs the target on all its ranks'
samples, the draft is FSDP2-sharded over every rank, and rank 0 writes the report with each
memory figure's max over ranks.

The output folder is claimed (created, write-tested, locked) before anything loads; a resume
picks its checkpoint (the newest intact one) before the model loads too. OUTPUT/report.json
holds every step of every segment of a run (a segment: one start or resume) and is rewritten
at each checkpoint. A write that fails mid-run stops the run with one line naming the file and
the last checkpoint kept (checkpoint.OutputError).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fitplan.errors import FitplanError
from fitplan.layout import (
    Job,
    fused_norms,
    head_grads_in_forward,
    lean_draft,
    projects_embedding_once,
    recomputes_mlp,
    resolve,
    shares_target_embedding,
    sums_step_grads,
)
from fitplan.records import write_measurement
from trainer import checkpoint, compare, data, features, optim, parallel, vocab
from trainer.draft import DraftConfig, Eagle3Draft
from trainer.loss import Teacher, make_teacher
from trainer.measure import Meter
from trainer.options import TrainOptions
from trainer.target import TappedTarget, hf_config, load_target, load_tokenizer
from trainer.target_head import FrozenHead, load_head

VOCAB_SAMPLES_SYNTHETIC = 64  # synthetic data: the draft vocab is counted over this many samples


@dataclass
class Run:
    opts: TrainOptions
    job: Job
    ctx: parallel.DistContext
    device: torch.device
    target: TappedTarget | FrozenHead  # the head alone when training from stored features
    draft: Eagle3Draft
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: data.Batches
    draft_ids: torch.Tensor  # target ids of the draft vocab, on the device
    skipped_lines: int = 0
    last_checkpoint: Path | None = None  # the newest checkpoint on disk (written, or resumed from)
    teach: Callable | None = None  # (run, ids, mask) -> (aux, ids padded by ttt, teacher): `teach` or features.teach


# ------------------------------------------------------------------ building


def draft_config(job: Job, hf) -> DraftConfig:
    shape = job.draft
    if shape.hidden != job.model.hidden:
        raise FitplanError(
            f"draft hidden size {shape.hidden} differs from the target's {job.model.hidden}: "
            "the draft's embedding is a frozen copy of the target's"
        )
    rope = getattr(hf, "rope_parameters", None) or {}
    return DraftConfig(
        hidden=shape.hidden, intermediate=shape.intermediate, heads=shape.heads, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, vocab=shape.vocab, draft_vocab=shape.draft_vocab,
        target_hidden=shape.target_hidden, aux_layers=tuple(shape.aux_layers),
        rms_eps=getattr(hf, "rms_norm_eps", 1e-6),
        rope_theta=float(getattr(hf, "rope_theta", None) or rope.get("rope_theta", 10000.0)),
        max_positions=getattr(hf, "max_position_embeddings", None) or 131072,
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build parameters directly in the recipe's dtype (no fp32 copy at load)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_draft(job: Job, hf, target: torch.nn.Module, draft_ids: torch.Tensor, device: torch.device) -> Eagle3Draft:
    """The draft, whole on this rank (the same on every rank: same seed); sharding comes after."""
    spec = job.spec
    source = target.get_input_embeddings().weight
    shared = source.detach() if shares_target_embedding(job) else None
    with torch.device(device), default_dtype(optim.param_dtype(spec.precision)):
        draft = Eagle3Draft(draft_config(job, hf), spec.attention_impl, checkpoint_layer=spec.ac,
                            lean=lean_draft(spec), recompute_norms=fused_norms(job), embedding=shared,
                            sum_step_grads=sums_step_grads(job), recompute_mlp=recomputes_mlp(job),
                            head_grad_in_forward=head_grads_in_forward(job),
                            project_embedding_once=projects_embedding_once(job))
    with torch.no_grad():
        if shared is None:  # a copy, kept in the target's bf16 whatever the recipe
            draft.embed_tokens.to(torch.bfloat16)
            draft.embed_tokens.weight.copy_(parallel.full_tensor(source))
        d2t, t2d = vocab.mapping(draft_ids.cpu(), draft.cfg.vocab)
        draft.d2t.copy_(d2t)
        draft.t2d.copy_(t2d)
    return draft


def load_samples(opts: TrainOptions, job: Job, ctx) -> tuple[data.Batches, torch.Tensor, int]:
    """(Batches of this rank, draft vocab target ids, skipped lines)."""
    spec, shape = job.spec, job.draft
    ranks = dict(rank=ctx.rank, world=ctx.world)
    if opts.hidden_states is not None:
        prepared = features.prepare(opts.hidden_states, job)
        return features.FeatureBatches(prepared, spec.micro_batch, opts.seed, **ranks), prepared.draft_ids, 0
    if opts.synthetic_data:
        batches = data.Batches([], spec.micro_batch, opts.seed, synthetic=(spec.seq, shape.vocab), **ranks)
        counted = (data.synthetic_sample(i, spec.seq, shape.vocab, opts.seed) for i in range(VOCAB_SAMPLES_SYNTHETIC))
        return batches, vocab.top_tokens(counted, shape.vocab, shape.draft_vocab), 0
    if opts.data is None:
        raise FitplanError("give --data FILE.jsonl, or --synthetic-data for a memory check")
    loaded = data.load_jsonl(opts.data, load_tokenizer(spec.model), spec.seq)
    cache = vocab.cache_path(opts.data, shape.vocab, shape.draft_vocab, spec.seq)
    ids = vocab.load_or_build(loaded.samples, shape.vocab, shape.draft_vocab, cache)
    return data.Batches(loaded.samples, spec.micro_batch, opts.seed, **ranks), ids, loaded.skipped


def fingerprint(opts: TrainOptions) -> dict:
    """What a resumed run must share with the checkpoint it continues (not the step count)."""
    return {**opts.spec.to_dict(), "lr": opts.lr, "warmup": opts.warmup, "seed": opts.seed,
            "data": str(opts.data) if opts.data else None, "synthetic_data": opts.synthetic_data,
            **({"hidden_states": str(opts.hidden_states)} if opts.hidden_states else {})}


def build(opts: TrainOptions, meter: Meter, job: Job, ctx) -> Run:
    spec = job.spec
    torch.manual_seed(opts.seed)
    batches, draft_ids, skipped = load_samples(opts, job, ctx)
    hf = hf_config(spec.model)
    with meter.phase("load"):
        if opts.hidden_states is None:
            model = load_target(spec.model, opts.random_weights, meter.device, ctx)
            target, teacher = TappedTarget(model, tuple(job.draft.aux_layers)), teach
        else:  # stored features: of the target only its lm_head, and its embedding for the draft's copy
            model = target = load_head(spec.model, opts.random_weights, meter.device)
            teacher = features.teach
        draft = build_draft(job, hf, model, draft_ids, meter.device)
        if opts.hidden_states is not None:
            target.release_embedding()
        if ctx.distributed:
            draft = parallel.shard_draft(draft, ctx, spec.sharding)
        # after sharding: the optimizer's state is made from (and sharded like) the sharded parameters
        optimizer = optim.job_optimizer(draft.trainable(), spec, opts.lr)
        scheduler = optim.cosine_with_warmup(optimizer, opts.warmup, opts.steps)
    return Run(opts, job, ctx, meter.device, target, draft, optimizer, scheduler, batches,
               draft_ids.to(meter.device), skipped, teach=teacher)


# ------------------------------------------------------------------ one step


def teach(run: Run, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Teacher]:
    """Target forward: (aux hidden, input ids padded by ttt, teacher). The full logits die here."""
    spec = run.job.spec
    group_ids, _ = parallel.group_batch(ids, mask, run.ctx)
    aux, logits = run.target(group_ids)
    logits, aux = parallel.collect_target_outputs(logits, aux, run.ctx, spec.output_sharding)
    teacher = make_teacher(logits, mask, run.draft_ids, run.draft.t2d, spec.ttt, as_logits=run.draft.fused_norms)
    return aux, F.pad(ids, (0, spec.ttt)), teacher


def train_step(run: Run, meter: Meter) -> dict:
    spec, accum = run.job.spec, run.job.accum
    losses, accuracy, tokens, seqs = [], [], 0, []
    for micro in range(accum):
        ids, mask = (t.to(run.device) for t in run.batches.next())
        tokens += ids.numel()
        seqs.append(ids.shape[1])
        parallel.set_micro_step(run.draft, final=micro == accum - 1)
        with meter.phase("target_forward"):
            aux, ids_ext, teacher = run.teach(run, ids, mask)
        with meter.phase("draft_forward"), optim.autocast(spec.precision, run.device):
            loss, acc = run.draft(aux, ids_ext, spec.ttt, teacher)
        if run.draft.head_grad_in_forward:
            teacher = None  # scored, its gradients made: backward does not read it
        with meter.phase("backward"):
            (loss / accum).backward()
        losses.append(loss.detach())  # read after the optimizer is launched: no wait for the device here
        accuracy.append(acc)
        del aux, ids_ext, teacher, loss  # nothing of this micro-step outlives it
    with meter.phase("optimizer_step"):
        grad_norm = optim.clip(run.optimizer, run.opts.max_grad_norm)
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this step trains with
        run.optimizer.step()
        run.scheduler.step()
        run.draft.zero_grad(set_to_none=True)
    means = torch.cat([torch.stack(losses).float().mean().view(1), torch.stack(accuracy).mean(0)])
    loss, *acc = _mean_over_ranks(means, run.ctx)
    return {
        "loss": loss,
        "acc": acc,
        "grad_norm": float(grad_norm),
        "lr": lr,
        "tokens": tokens * run.ctx.world,  # the global batch: every rank trains on its own samples
        "seq": max(seqs),
    }


def _mean_over_ranks(values: torch.Tensor, ctx) -> list[float]:
    """The global batch's loss and accuracies (each rank's are over its own samples), read to the host."""
    if not ctx.distributed:
        return values.tolist()
    import torch.distributed as dist

    t = values.to(device=ctx.device, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / ctx.world).tolist()


def step_flops(job: Job, seq: int) -> float:
    """Target forward + draft forward/backward FLOPs of one optimizer step at this padded length."""
    from fitplan.steptime import draft_flops, target_forward_flops

    at = resolve(job.spec.replace(seq=seq, tp=job.tp))
    return job.accum * (target_forward_flops(at) + draft_flops(at))


# ------------------------------------------------------------------ the run


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint and stops after the step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def predict(job: Job) -> dict:
    from fitplan.estimator import estimate

    return estimate(job).to_json()


def suggestion(spec) -> str | None:
    """What `fitplan fit` would change to make this job fit, for an OOM report."""
    from fitplan.ladder import fit

    chosen = fit(spec).chosen
    return chosen.change if chosen is not None else None


def run_here(opts: TrainOptions, progress: bool = False) -> dict:
    """`run` in this process; in a torchrun worker, with torch's error recorder (a failing rank's
    traceback reaches the launcher's summary) and the process group shut down after."""
    if not parallel.inside_worker():
        return run(opts, progress)
    report = parallel.record(run)(opts, progress=progress)
    parallel.shutdown_distributed()
    return report


def run(opts: TrainOptions, progress: bool = False) -> dict:
    """Train; returns the report (rank 0 also writes it to OUTPUT/report.json)."""
    job = resolve(opts.spec)
    if opts.spec.expandable_segments:  # read when CUDA's allocator starts, i.e. before the first allocation
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cpu = opts.device == "cpu" or (opts.device is None and not torch.cuda.is_available())
    ctx = parallel.init_distributed(
        job.tp, plan_world=job.world, gpus_per_node=None if cpu else job.cluster.gpus_per_node,
        model_config=hf_config(opts.spec.model), cpu=cpu,
    )
    device = torch.device("cpu") if cpu else ctx.device
    if cpu and opts.spec.attention_impl == "flex":
        raise FitplanError("flex attention has no backward on CPU; use --attention sdpa or eager there")
    optim.check_available(opts.spec.optimizer)
    say = opts.notice if ctx.rank == 0 else _silent
    with _claim(opts, ctx, say):
        found, change = None, None
        if opts.resume:  # before the model loads: a broken or foreign checkpoint costs no load
            found = checkpoint.find(opts.output, fingerprint(opts), ctx, say)
            if found.step >= opts.steps:
                raise FitplanError(f"--resume: {found.path} is at step {found.step} and --steps is {opts.steps}; "
                                   f"give --steps above {found.step} to train further")
            change = checkpoint.schedule_change(found, opts.steps)
            say(f"--resume: continuing from {found.path} after step {found.step}" + (f"; {change}" if change else ""))
        ledger = Ledger(opts.output, found, opts.steps, change, say, lead=ctx.rank == 0)
        return _train(opts, job, ctx, device, found, ledger, progress)


def _train(opts: TrainOptions, job: Job, ctx, device: torch.device, found, ledger: "Ledger", progress: bool) -> dict:
    snapshot = device.type == "cuda" and opts.snapshot_on_miss and ctx.rank == 0
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    # the attention it ran, not None: the default depends on the length and has changed
    config = {**opts.spec.to_dict(), "attention": opts.spec.attention_impl}
    report = {"config": config, "world": ctx.world, "device": _device_name(device), "steps": []}
    prediction = predict(job)
    report["prediction"] = prediction
    r = None
    with Meter(device) as meter, StopRequest() as stop:
        try:
            r = build(opts, meter, job, ctx)
            report["load"] = meter.new_step()
            report["skipped_lines"] = r.skipped_lines
            first = 1
            if found is not None:
                done, r.batches.position = checkpoint.restore(found, r.draft, r.optimizer, r.scheduler, ctx)
                r.last_checkpoint, first = found.path, done + 1
            _loop(r, meter, stop, first, report, progress, ledger)
        except torch.OutOfMemoryError as exc:
            report["oom"] = {"step": len(report["steps"]) + 1, "phase": meter.current,
                             "message": str(exc).splitlines()[0], "fit_suggestion": suggestion(opts.spec),
                             "allocator": meter.allocator_events()}
            if ctx.distributed:
                # the other ranks wait in a collective: write this rank's report, then fail so torchrun stops them
                _finish(report, opts, prediction, snapshot, f"report-rank{ctx.rank}.json", ledger, None)
                raise
        # still under StopRequest: a stop that comes after the last step waits for the report
        if ctx.distributed:
            _fold_ranks(report, ctx)
        return _finish(report, opts, prediction, snapshot, "report.json" if ctx.rank == 0 else None, ledger,
                       r.last_checkpoint if r is not None else None)


def _silent(message: str) -> None:
    pass


def _claim(opts: TrainOptions, ctx, say) -> checkpoint.Claim:
    """Rank 0 claims the output folder (a no-op where `fitplan train` or its launcher holds it);
    every rank fails with it."""
    claim, error = checkpoint.Claim(opts.output), None
    if ctx.rank == 0:
        try:
            claim = checkpoint.claim_output(opts.output, say)
        except FitplanError as exc:
            error = exc
    if _any_rank(error is not None, ctx):
        raise error or FitplanError(f"--output {opts.output}: rank 0 cannot use it")
    return claim


class Ledger:
    """report.json over every segment of a run (a segment: one start, or one resume).

    A resume keeps the steps up to the checkpoint it continues from (each with its step number
    and its segment's index), moves any later ones (trained after that checkpoint, then lost)
    to "replaced_steps", and appends its segment to "segments": first and last step, the
    checkpoint it resumed from, the schedule's length, the broken checkpoints it skipped."""

    def __init__(self, output: Path, found, steps: int, change: str | None, say, lead: bool):
        self.path = output / "report.json"
        self.steps: list[dict] = []
        self.segments: list[dict] = []
        self.replaced: list[dict] = []
        if found is not None and lead:
            self._load(found.step, say)
        self.segment = {
            "segment": len(self.segments), "first_step": found.step + 1 if found else 1, "last_step": None,
            "resumed_from": str(found.path) if found else None, "schedule_steps": steps, "schedule_change": change,
            "skipped_checkpoints": list(found.skipped) if found else [],
        }

    def _load(self, done: int, say) -> None:
        if not self.path.is_file():
            return
        try:
            old = json.loads(self.path.read_text())
            if not isinstance(old, dict) or not isinstance(old.get("steps"), list):
                raise ValueError("not a trainer report")
        except (OSError, ValueError) as exc:
            aside = self.path.with_name("report.unreadable.json")
            with contextlib.suppress(OSError):
                self.path.replace(aside)
            say(f"--resume: {self.path} is unreadable ({str(exc)[:80]}); kept as {aside}, the report starts anew")
            return
        steps = [s for s in old["steps"] if isinstance(s, dict)]
        for s in steps:
            s.setdefault("segment", 0)
        self.steps = [s for s in steps if s.get("step", 0) <= done]
        self.replaced = list(old.get("replaced_steps") or []) + [s for s in steps if s.get("step", 0) > done]
        self.segments = list(old.get("segments") or [])
        if not self.segments and steps:  # a report written before segments were recorded
            self.segments = [{"segment": 0, "first_step": steps[0].get("step", 1), "last_step": steps[-1].get("step"),
                              "resumed_from": None}]

    def compose(self, report: dict) -> dict:
        """The whole run's report: earlier segments' steps, then this one's."""
        own = report["steps"]
        segment = {**self.segment, "last_step": own[-1]["step"] if own else None,
                   **{k: report[k] for k in ("stopped_at", "stopped_by") if k in report}}
        if "oom" in report:
            segment["oom_step"] = report["oom"]["step"]
        out = {**report, "steps": self.steps + own, "segments": self.segments + [segment]}
        if self.replaced:
            out["replaced_steps"] = self.replaced
        return out

    def write(self, report: dict, name: str = "report.json") -> None:
        write_measurement(self.path.with_name(name), self.compose(report))


def _stopped_by_storage(exc: OSError, r: Run, step: int, report: dict, ledger: Ledger) -> checkpoint.OutputError:
    """The one-line error of a write that failed mid-run; the report gets what it can."""
    what = exc.filename or str(r.opts.output)
    kept = (f"the last checkpoint kept is {r.last_checkpoint} (continue from it with --resume once the disk "
            f"has room and is writable)" if r.last_checkpoint else "no checkpoint was kept")
    message = f"cannot write {what} ({exc.strerror or exc}): the run stopped after step {step}; {kept}"
    report["stopped_by"] = message
    if r.ctx.rank == 0:
        with contextlib.suppress(OSError):
            ledger.write(report)  # best effort: the report of the last checkpoint stays if this fails too
    return checkpoint.OutputError(message)


def _fold_ranks(report: dict, ctx) -> None:
    """Each phase's memory becomes its max over ranks; a spread over 5% is listed under "imbalanced"."""
    peaks = {"load": report["load"], "steps": {str(i): s["phases"] for i, s in enumerate(report["steps"])}}
    gathered = parallel.gather_measurements(peaks, ctx)
    report["load"] = gathered.max["load"]
    for i, step in enumerate(report["steps"]):
        step["phases"] = gathered.max["steps"][str(i)]
    report["imbalanced"] = gathered.imbalanced
    report["per_rank"] = gathered.per_rank


def _finish(report: dict, opts: TrainOptions, prediction, snapshot: bool, name: str | None, ledger: Ledger,
            last_checkpoint: Path | None) -> dict:
    report = ledger.compose(report)
    report["comparison"] = compare.rows(report["steps"], report.get("load", {}), prediction)
    if snapshot:
        reason = "oom" if "oom" in report else "missed" if compare.missed(report["comparison"]) else None
        if reason or opts.memory_snapshot:
            path = opts.output / "memory_snapshot.pickle"
            try:
                torch.cuda.memory._dump_snapshot(str(path))
                report["snapshot"] = str(path)
                report["snapshot_reason"] = reason or "asked"
            except OSError as exc:
                report["snapshot_error"] = f"cannot write {path} ({exc.strerror})"
        torch.cuda.memory._record_memory_history(enabled=None)
    if name is not None:
        try:
            write_measurement(opts.output / name, report)
        except OSError as exc:
            kept = f"the last checkpoint kept is {last_checkpoint}" if last_checkpoint else "no checkpoint was kept"
            steps = report["steps"][-1]["step"] if report["steps"] else 0
            raise checkpoint.OutputError(f"cannot write {exc.filename or opts.output / name} ({exc.strerror or exc}): "
                                         f"the run stopped after step {steps}; {kept}") from None
    return report


def _loop(r: Run, meter: Meter, stop: StopRequest, first: int, report: dict, progress: bool, ledger: Ledger) -> None:
    opts, job = r.opts, r.job
    peak = job.cluster.gpu.bf16_tflops * 1e12 if r.device.type == "cuda" else None
    bar = _progress(progress and r.ctx.rank == 0)
    task = bar.add_task("training", total=opts.steps, completed=first - 1)
    with bar:
        for step in range(first, opts.steps + 1):
            start = time.perf_counter()
            record = train_step(r, meter)
            seconds = time.perf_counter() - start
            stopping = _any_rank(stop.requested, r.ctx)  # every rank must take the same path (collectives)
            saved, failure = None, None
            due = step == opts.steps or stopping or bool(opts.save_every and step % opts.save_every == 0)
            if due:
                with meter.phase("checkpoint"):
                    try:
                        saved = checkpoint.save(opts.output, step, r.draft, r.optimizer, r.scheduler,
                                                r.batches.position, fingerprint(opts), r.ctx, schedule_steps=opts.steps)
                    except OSError as exc:  # every rank gets it (checkpoint.save agrees over ranks)
                        failure = exc
                if saved is not None:
                    r.last_checkpoint = saved
                    report["checkpoint"] = str(saved)
            flops = step_flops(job, record.pop("seq"))
            record.update(step=step, segment=ledger.segment["segment"], phases=meter.new_step(),
                          allocator=meter.allocator_events(), seconds=seconds,
                          tokens_per_s=record["tokens"] / seconds, mfu=flops / seconds / peak if peak else None)
            report["steps"].append(record)
            bar.update(task, advance=1, description=f"loss {record['loss']:.4f} acc0 {record['acc'][0]:.3f}")
            if saved is not None and r.ctx.rank == 0 and step < opts.steps and not stopping:
                try:
                    ledger.write(report)  # the report as of this checkpoint (the last one is written by _finish)
                except OSError as exc:
                    failure = exc
            if due and _any_rank(failure is not None, r.ctx):
                raise _stopped_by_storage(failure or OSError(errno.EIO, "rank 0 could not write the report"),
                                          r, step, report, ledger)
            if stopping:
                report["stopped_at"] = step
                break


def _any_rank(flag: bool, ctx) -> bool:
    if not ctx.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

