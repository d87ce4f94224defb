"""`fitplan train`: run a job with the embedded Eagle3 trainer and compare measured memory with the prediction.

    fitplan train --plan plan.yaml --steps 50 --output runs/exp1
    fitplan train --auto --model llama-3.1-8b --random-weights --synthetic-data --steps 5

torch and the trainer are imported only here, inside the command.

Before anything is loaded or launched: the numeric flags are range-checked, and `--output` is
created, write-tested and locked (trainer.checkpoint.claim_output); the launcher of a
multi-GPU run holds the lock for its torchrun workers. A run stopped by its storage (disk
full, read-only) ends with one line naming the file and the last checkpoint kept, exit code 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from fitplan.commands.common import clean_errors, fail, spec_flags
from fitplan.errors import FitplanError


def local_gpus() -> str:
    """COUNTxNAME of this machine's GPUs, for --auto without --gpus."""
    import torch

    if not torch.cuda.is_available():
        raise FitplanError("--auto plans for the local GPUs but none is visible; give --gpus or run on CPU with --device cpu")
    return f"{torch.cuda.device_count()}x{torch.cuda.get_device_name(0)}"


def check_gpus_present(cluster, device: Optional[str]) -> None:
    """Refuse a plan for GPUs this machine does not have, before anything is launched or loaded."""
    import torch

    if device == "cpu":  # one CPU process per planned GPU (gloo): a functional check, not a memory one
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < cluster.gpus_per_node:
        raise FitplanError(
            f"the plan is for {cluster.label()} but this machine has {visible} GPU(s); "
            "re-plan with --auto or --gpus, or use --device cpu for a one-process check"
        )


def choose_spec(config: Optional[Path], plan: Optional[Path], auto: bool, flags: dict):
    from fitplan.config import load_spec

    if config is not None and plan is not None:
        raise FitplanError("give a config file or --plan, not both")
    if plan is not None:
        from fitplan.records import read_plan

        read_plan(plan)  # a plan must be one: versioned, with its config, prediction and trail
    spec = load_spec(plan or config, flags)
    if not auto:
        return spec
    from fitplan.ladder import fit

    if "gpus" not in flags and plan is None and config is None:
        spec = spec.replace(gpus=local_gpus())
    result = fit(spec)
    if result.chosen is None:
        raise FitplanError(
            f"no layout of {spec.model} fits {spec.gpus} (largest fitting seq: {result.max_seq}, "
            f"smallest fitting GPUs: {result.min_gpus}); see `fitplan fit`"
        )
    return result.chosen.spec


def train_command(
    config: Optional[Path] = typer.Argument(None, help="YAML config (keys = flag names with underscores)."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A plan written by `fitplan fit -o plan.yaml`."),
    auto: bool = typer.Option(False, "--auto", help="Fit a plan for these GPUs first (the fix ladder), then train it."),
    data: Optional[Path] = typer.Option(None, "--data", help="ShareGPT-style JSONL (conversations or messages)."),
    hidden_states: Optional[Path] = typer.Option(
        None, "--hidden-states", help="SpecForge offline features (prepare_hidden_states.py output): train from them; "
        "the target is not loaded, only its lm_head and embedding."),
    steps: int = typer.Option(10, "--steps", help="Optimizer steps to run (with --resume: the total, past ones included)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/<time>)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random target weights built on the GPU (no download)."),
    synthetic_data: bool = typer.Option(False, "--synthetic-data", help="Random token sequences of exactly --seq tokens."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (cosine decay after warmup)."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps (0 to --steps)."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint in --output."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and data order (0 to 2**32-1)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, or cuda (default: cuda when present)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report JSON instead of tables."),
    memory_snapshot: bool = typer.Option(
        False, "--memory-snapshot", help="On a GPU, write the allocator's recorded history to "
        "OUTPUT/memory_snapshot.pickle (also written unasked when a phase misses its prediction by >10%); "
        "`fitplan estimate --timeline FILE --snapshot` draws it under the prediction."),
    *,
    flags: dict,
) -> None:
    """Train an Eagle3 draft with the embedded trainer; measure memory per phase against the prediction."""
    from trainer.options import check_numbers

    check_numbers(steps, lr, warmup, seed, save_every)  # before anything loads or launches
    flags = _data_source(data, synthetic_data, hidden_states, flags)
    if device not in (None, "cpu", "cuda"):
        raise FitplanError(f"--device {device!r} is not one of: cpu, cuda")
    spec = choose_spec(config, plan, auto, flags)
    if spec.workload != "eagle3":
        raise FitplanError("fitplan train runs the eagle3 workload (sft runs are measured by trainer.sft_step)")
    if spec.runtime != "fitplan":
        trainer = {"specforge": "SpecForge's", "speculators": "vLLM speculators'"}[spec.runtime]
        raise FitplanError(f"runtime {spec.runtime}: this job is planned for {trainer} trainer; "
                           "fitplan train runs runtime fitplan (drop --runtime or set it to fitplan)")
    if spec.offline and hidden_states is None:
        raise FitplanError("offline: fitplan train reads an offline job's target features from --hidden-states DIR; "
                           "give it (or drop offline)")
    from fitplan.layout import resolve

    job = resolve(spec)
    check_draft_vocab(job)
    check_gpus_present(job.cluster, device)
    if hidden_states is not None:  # listed and checked before the output folder is claimed
        from trainer.features import prepare

        prepare(hidden_states, job)
    from trainer import checkpoint, parallel

    say = _to_stderr if as_json else print  # one-line notices; with --json stdout carries the report only
    argv = ["-m", "fitplan.cli", *sys.argv[1:]]
    if output is None:  # the workers must write where the launcher claimed, not at their own time
        output = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        argv += ["--output", str(output)]
    if _rank() == 0:
        claim = checkpoint.claim_output(output, say)
    else:  # the other ranks of a torchrun started outside fitplan: rank 0 holds the lock
        checkpoint.check_writable_folder(output)
        claim = checkpoint.Claim(output)
    from trainer.loop import fingerprint, run_here
    from trainer.options import TrainOptions

    opts = TrainOptions(
        spec=spec, output=output, steps=steps, data=data, hidden_states=hidden_states,
        synthetic_data=synthetic_data, random_weights=random_weights, lr=lr, warmup=warmup,
        save_every=save_every, resume=resume, seed=seed, device=device, say=say, memory_snapshot=memory_snapshot,
    )
    with claim, _environment(checkpoint.lock_env(claim)):
        if resume and job.world > 1 and not parallel.inside_worker():
            checkpoint.check_before_launch(output, fingerprint(opts), job.world)
        code = parallel.relaunch(job.world, job.cluster.nodes, job.cluster.gpus_per_node, argv)
        if code is not None:
            sys.exit(code)
        try:
            report = run_here(opts, progress=not as_json)
        except checkpoint.OutputError as exc:  # not bad input: the storage failed under the run
            if _rank() == 0:
                fail(str(exc), code=1)
            sys.exit(1)
    if _rank() != 0:  # one rank speaks for a multi-GPU run
        return
    if as_json:
        print(json.dumps(report, default=float))
    else:
        from fitplan.render.train import show_report

        show_report(report, opts.output)
    if "oom" in report:
        raise typer.Exit(1)


def _data_source(data: Optional[Path], synthetic: bool, hidden_states: Optional[Path], flags: dict) -> dict:
    """The job flags with `offline` set by --hidden-states; exactly one source of samples."""
    given = [name for name, on in (("--data", data is not None), ("--synthetic-data", synthetic),
                                   ("--hidden-states", hidden_states is not None)) if on]
    if not given:
        raise FitplanError("give --data FILE.jsonl, --hidden-states DIR (SpecForge's offline features), "
                           "or --synthetic-data for a memory check")
    if len(given) > 1:
        raise FitplanError(f"{' and '.join(given)}: give one source of samples (--data, --hidden-states "
                           "or --synthetic-data)")
    return {**flags, "offline": True} if hidden_states is not None else flags


def check_draft_vocab(job) -> None:
    """The draft predicts the target's tokens: its t2d spans the target vocabulary and its
    embedding is a copy of the target's, so the two vocabularies must be one."""
    if job.draft.vocab != job.model.vocab:
        raise FitplanError(f"draft {job.draft.name} has vocab_size {job.draft.vocab} but {job.model.name} has "
                           f"{job.model.vocab}: the draft's embedding is a copy of the target's (accepted: vocab_size "
                           f"{job.model.vocab})")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def _environment(values: dict):
    """Set `values` in os.environ (inherited by torchrun and its workers) for the block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def register(app: typer.Typer) -> None:
    app.command("train")(clean_errors(spec_flags(train_command)))
