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
from fitplan.render.fit import summary_lines, trail_table
from fitplan.specforge import flag_changes
from fitplan.specforge_yaml import key_changes


def prediction(cand: Candidate) -> dict:
    """What a plan records as predicted: the estimate and the step time."""
    return {**cand.estimate.to_json(), **cand.time.to_json()}


def plan_of(result: FitResult) -> Plan:
    if result.chosen is None:
        raise FitplanError("no configuration fits, so there is no plan to write")
    return Plan(result.chosen.spec, prediction(result.chosen), tuple(e.to_json() for e in result.trail))


def write_output(result: FitResult, job_input, flags: dict, output: Path | None) -> str | None:
    """-o: a SpecForge v0.3 run config for a job read from one (SpecForge's own keys), else a
    fitplan plan; what was written, or None (no -o, or nothing fits)."""
    if output is None or result.chosen is None:
        return None
    if job_input.dialect == "specforge-yaml":
        from fitplan.specforge_write import write_run_config

        write_run_config(job_input.run, result.chosen.spec, flags, output)
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


def result_json(result: FitResult, dialect: str = "fitplan") -> dict:
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
    *,
    flags: dict,
) -> None:
    """Find the fastest configuration that fits: walk the fix ladder, never changing what is learned."""
    job_input = job_spec(config, flags, from_specforge, from_speculators)
    spec, warnings, dialect = job_input
    if output is not None:
        check_writable(output)
    result = fit(spec, margin_fraction(margin))
    written = write_output(result, job_input, flags, output)
    if as_json:
        print(json.dumps(result_json(result, dialect), indent=2))
    else:
        console = Console(highlight=False)
        for w in warnings:
            console.print(f"[yellow]warning:[/] {w}")
        console.print(trail_table(result))
        for line in summary_lines(result, specforge_changes(result, dialect)):
            console.print(line)
        if written:
            console.print(f"{written} written to {output}")
    sys.exit(0 if result.chosen is not None else 1)


def register(app: typer.Typer) -> None:
    app.command("fit")(fit_command)
