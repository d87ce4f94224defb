"""fitplan fit: walk the fix ladder and print the trail, the chosen plan and its speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fitplan.commands.common import FROM_SPECFORGE_HELP, FROM_SPECULATORS_HELP, MARGIN_HELP, clean_errors, job_spec, margin_fraction, spec_flags
from fitplan.errors import FitplanError
from fitplan.ladder import Candidate, FitResult, fit
from fitplan.records import Plan, check_writable, write_plan
from fitplan.render.fit import server_fix_lines, summary_lines, trail_table
from fitplan.server_fit import NODE_GPUS, NODE_GPUS_FLAG, ServerFix, check_node_gpus, fit_servers
from fitplan.specforge import flag_changes
from fitplan.specforge_yaml import key_changes


def prediction(cand: Candidate) -> dict:
    """What a plan records as predicted: the estimate and the step time."""
    return {**cand.estimate.to_json(), **cand.time.to_json()}


def plan_of(result: FitResult) -> Plan:
    if result.chosen is None:
        raise FitplanError("no configuration fits, so there is no plan to write")
    return Plan(result.chosen.spec, prediction(result.chosen), tuple(e.to_json() for e in result.trail))


def write_output(result: FitResult, job_input, flags: dict, output: Path | None,
                 servers: ServerFix | None = None) -> str | None:
    """-o: a SpecForge v0.3 run config for a job read from one (SpecForge's own keys, the capture
    servers' changes included), else a fitplan plan; what was written, or None (no -o, or the
    trainers or the capture servers fit in no way)."""
    if output is None or result.chosen is None or (servers is not None and not servers.fits):
        return None
    if job_input.dialect == "specforge-yaml":
        from fitplan.specforge_write import write_run_config

        write_run_config(job_input.run, result.chosen.spec, flags, output, servers)
        return "SpecForge run config (PyYAML rewrite: comments not kept)"
    write_plan(plan_of(result), output)
    return "plan"


def specforge_changes(result: FitResult, dialect: str) -> list[str] | None:
    """The chosen plan's changes in the terms the job was written in (None: a fitplan job)."""
    if dialect == "fitplan":
        return None
    shown = result.chosen or result.original
    if dialect == "specforge-yaml":
        return key_changes(result.original.spec, shown.spec)
    return flag_changes(result.original.spec, shown.spec)


def server_fix(job_input, result: FitResult, margin: float, node_gpus: int | None) -> ServerFix | None:
    """A SpecForge v0.3 run's managed capture servers, changed until they fit (None: it has none)."""
    job = result.original.job
    return fit_servers(job_input.run, job.model, result.original.spec, job.cluster.gpu, margin, node_gpus)


def result_json(result: FitResult, dialect: str = "fitplan", servers: ServerFix | None = None) -> dict:
    shown = result.chosen or result.original
    out = {
        **prediction(shown),
        "fits": result.chosen is not None,
        "plan": plan_of(result).to_dict() if result.chosen else None,
        "trail": [e.to_json() for e in result.trail],
        "changes": result.changes,
        "suggestions": {"max_seq": result.max_seq, "min_gpus": result.min_gpus},
        "refused": [{"change": change, "reason": reason} for change, reason in result.refused],
    }
    changes = specforge_changes(result, dialect)
    if changes is not None:  # SpecForge's flags (launch script) or run-config keys (v0.3 YAML)
        out["specforge_changes"] = changes
    if servers is not None:  # the trainers' keys above; the capture servers' apart
        out.update(servers.to_json())
    return out


@clean_errors
@spec_flags
def fit_command(
    config: Optional[Path] = typer.Argument(None, help="YAML config (or plan) file; flags override it."),
    margin: float = typer.Option(0.05, "--margin", help=MARGIN_HELP),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Write the chosen plan YAML here (for a SpecForge v0.3 run config: the run "
        "config with the plan's keys changed)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (estimate keys + plan, trail)."),
    from_specforge: Optional[str] = typer.Option(None, "--from-specforge", help=FROM_SPECFORGE_HELP),
    from_speculators: Optional[str] = typer.Option(None, "--from-speculators", help=FROM_SPECULATORS_HELP),
    node_gpus: Optional[int] = typer.Option(
        None, NODE_GPUS_FLAG,
        help=f"GPUs on a SpecForge v0.3 run's managed_local node, where a larger capture server tp_size takes "
        f"the GPUs no trainer or server lists (default: {NODE_GPUS}, or more if the run config lists more)."),
    *,
    flags: dict,
) -> None:
    """Find the fastest configuration that fits: walk the fix ladder, never changing what is learned."""
    check_node_gpus(node_gpus)
    job_input = job_spec(config, flags, from_specforge, from_speculators)
    spec, warnings, dialect = job_input
    if output is not None:
        check_writable(output)
    result = fit(spec, margin_fraction(margin))
    servers = server_fix(job_input, result, margin_fraction(margin), node_gpus)
    written = write_output(result, job_input, flags, output, servers)
    if as_json:
        print(json.dumps(result_json(result, dialect, servers), indent=2))
    else:
        console = Console(highlight=False)
        for w in warnings:
            console.print(f"[yellow]warning:[/] {w}")
        console.print(trail_table(result))
        for line in summary_lines(result, specforge_changes(result, dialect)):
            console.print(line)
        for line in server_fix_lines(servers) if servers is not None else ():
            console.print(line)
        if written:
            console.print(f"{written} written to {output}")
        elif output is not None and result.chosen is not None:
            console.print(f"nothing written to {output}: a capture server fits in no way fit tries")
    sys.exit(0 if result.chosen is not None and (servers is None or servers.fits) else 1)


def register(app: typer.Typer) -> None:
    app.command("fit")(fit_command)
