"""`fitplan estimate` (per-GPU memory of a job, by phase) and `fitplan profiles` (what is known)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fitplan.commands.common import FROM_SPECFORGE_HELP, FROM_SPECULATORS_HELP, clean_errors, job_spec, spec_flags
from fitplan.errors import FitplanError


def estimate_command(
    config: Optional[Path] = typer.Argument(
        None, help="YAML config (keys = flag names with underscores), a plan, or a SpecForge launch script."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Also draw the breakdown to this PNG file (.svg, .pdf, .jpg too; no suffix: .png is added)."
    ),
    timeline: Optional[Path] = typer.Option(
        None, "--timeline", help="Also draw the memory over load, step 1 and a steady step as the caching "
        "allocator model replays them (allocated, reserved, phases, the largest request) to this file: .html "
        "(inline SVG) or an image. One-GPU Eagle3 jobs of fitplan's trainer."),
    snapshot: Optional[Path] = typer.Option(
        None, "--snapshot", help="With --timeline: a measured allocator snapshot (`fitplan train "
        "--memory-snapshot` writes one) drawn below the prediction."),
    from_specforge: Optional[str] = typer.Option(None, "--from-specforge", help=FROM_SPECFORGE_HELP),
    from_speculators: Optional[str] = typer.Option(None, "--from-speculators", help=FROM_SPECULATORS_HELP),
    samples: Optional[int] = typer.Option(
        None, "--samples", help="Also estimate the disk and generation time of an offline run's features for N "
        "samples (each at --seq tokens, or the first N of --samples-from)."),
    samples_from: Optional[Path] = typer.Option(
        None, "--samples-from", help="Conversation JSONL (ShareGPT 'conversations' or 'messages') whose samples' "
        "features to estimate; token counts approximated as UTF-8 bytes / 4 unless --tokenizer is given."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="A local tokenizer.json to count the tokens of --samples-from exactly."),
    *,
    flags: dict,
) -> None:
    """Predict per-GPU peak memory of a training job, phase by phase, and whether it fits."""
    from fitplan.estimator import estimate
    from fitplan.layout import resolve

    if plot is not None:  # a path it cannot write is refused before anything is computed
        from fitplan.render.plot import output_path

        plot = output_path(plot)
    timeline = check_timeline_flags(timeline, snapshot)
    check_feature_flags(samples, samples_from, tokenizer)
    job_input = job_spec(config, flags, from_specforge, from_speculators)
    spec, warnings = job_input.spec, job_input.warnings
    job = resolve(spec)
    features = feature_estimate(job, job_input, samples, samples_from, tokenizer)
    for w in warnings:  # on stderr: --json prints one JSON object and nothing else
        typer.echo(f"warning: {w}", err=True)
    est = estimate(job)
    servers = None
    if job_input.servers:  # a SpecForge v0.3 run's managed capture servers, on the trainers' GPU type
        from fitplan.estimator.capture_server import estimate_servers

        servers = estimate_servers(job.model, spec, job_input.servers, job.cluster.gpu)
    if plot is not None:
        from fitplan.render.plot import plot_estimate

        plot = plot_estimate(est, plot, spec=spec)
    if timeline is not None:
        from fitplan.render.timeline import draw

        timeline = draw(job, est, timeline, snapshot)
    if as_json:
        config_out = {**spec.to_dict(), "tp": job.tp, "accum": job.accum}
        out = {**est.to_json(), "config": config_out}
        if servers is not None:
            out["server"] = servers.to_json()
        if features is not None:
            out["features"] = features.to_json()
        print(json.dumps(out))
        return
    from fitplan.render.estimate import render, render_features, render_servers

    render(est)
    if servers is not None:
        render_servers(servers)
    if features is not None:
        render_features(features)
    if plot is not None:
        typer.echo(f"plot written to {plot}")
    if timeline is not None:
        typer.echo(f"timeline written to {timeline}")


def check_timeline_flags(timeline: Optional[Path], snapshot: Optional[Path]) -> Optional[Path]:
    """--timeline's file and --snapshot's, before anything is computed."""
    if snapshot is not None and timeline is None:
        raise FitplanError("--snapshot is drawn on the --timeline figure; give --timeline FILE too")
    if snapshot is not None and not snapshot.is_file():
        raise FitplanError(f"--snapshot {snapshot}: no such file (a torch.cuda.memory._dump_snapshot pickle)")
    if timeline is None:
        return None
    from fitplan.render.timeline import timeline_path

    return timeline_path(timeline)


def check_feature_flags(samples: Optional[int], samples_from: Optional[Path], tokenizer: Optional[Path]) -> None:
    """Before anything is read: the feature flags' own values."""
    from fitplan.config import MAX_INT

    if samples is not None and not 1 <= samples <= MAX_INT:
        raise FitplanError(f"--samples must be a positive integer (at most {MAX_INT}), got {samples}")
    if tokenizer is not None and samples_from is None:
        raise FitplanError("--tokenizer counts the tokens of --samples-from FILE.jsonl; give that file too")


def feature_estimate(job, job_input, samples: Optional[int], samples_from: Optional[Path], tokenizer: Optional[Path]):
    """The offline features of --samples / --samples-from for the job's target, or None."""
    if samples is None and samples_from is None:
        return None
    from fitplan.offline_features import estimate_features, lengths_from_jsonl, lengths_from_samples

    if job.draft is None:
        raise FitplanError("--samples / --samples-from: the hidden-state features of an Eagle3 offline run; "
                           "the sft workload stores none (accepted with --workload eagle3)")
    seq = job.spec.seq
    lengths = (lengths_from_jsonl(samples_from, seq, samples, tokenizer) if samples_from is not None
               else lengths_from_samples(samples, seq))
    return estimate_features(job, lengths, streamed=job_input.streams_features)


def profiles_command() -> None:
    """List the models, Eagle3 drafts and GPUs fitplan knows."""
    from rich.console import Console

    from fitplan.render.profiles import profile_tables

    console = Console(highlight=False)
    for table in profile_tables():
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("estimate")(clean_errors(spec_flags(estimate_command)))
    app.command("profiles")(clean_errors(profiles_command))
