"""fitplan fit: walk the fix ladder and print the trail, the chosen plan and its speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fitplan.commands.common import clean_errors, spec_flags
from fitplan.config import RunSpec, load_spec
from fitplan.errors import FitplanError
from fitplan.estimator.result import Verdict
from fitplan.ladder import Candidate, FitResult, fit
from fitplan.records import Plan, check_writable, write_plan
from fitplan.specforge import flag_changes, parse_command
from fitplan.units import GIB

FROM_SPECFORGE_HELP = "A SpecForge train_eagle3.py launch command (or a file holding the script) to read the job from."
MARGIN_HELP = "Safety margin of device memory: a fraction (0.05) or a percentage (5)."


def prediction(cand: Candidate) -> dict:
    """What a plan records as predicted: the estimate and the step time."""
    return {**cand.estimate.to_json(), **cand.time.to_json()}


def plan_of(result: FitResult) -> Plan:
    if result.chosen is None:
        raise FitplanError("no configuration fits, so there is no plan to write")
    return Plan(result.chosen.spec, prediction(result.chosen), tuple(e.to_json() for e in result.trail))


def margin_fraction(value: float) -> float:
    """--margin as a fraction: 0.05 and 5 both mean 5%."""
    if 0 <= value < 1:
        return value
    if 1 <= value < 100:
        return value / 100
    raise FitplanError(f"--margin {value} is out of range; accepted: a fraction in [0, 1) or a percentage in [1, 100)")


def job_spec(config: Optional[Path], flags: dict, from_specforge: Optional[str]) -> tuple[RunSpec, list[str]]:
    """The job from a config file, flags, or a SpecForge command line (flags override both)."""
    if from_specforge is None:
        return load_spec(config, flags), []
    if config is not None:
        raise FitplanError("give either a CONFIG file or --from-specforge, not both")
    command = parse_command(from_specforge)
    return command.spec(flags), list(command.warnings)


def trail_table(result: FitResult) -> Table:
    table = Table(title="fix ladder", title_justify="left")
    for col in ("rung", "change", "peak (GiB)", "fits", "slowdown"):
        table.add_column(col, justify="right" if col in ("peak (GiB)", "slowdown") else "left")
    marks = {Verdict.FITS: "[yellow]tight[/]", Verdict.AT_RISK: "[yellow]at risk[/]", Verdict.OOM: "[red]no[/]"}
    for e in result.trail:
        mark = "[green]yes[/]" if e.fits else marks[e.verdict]  # not fitting: short of margin, or worse
        table.add_row(e.rung, e.change, f"{e.peak_reserved_bytes / GIB:.1f}", mark, f"{e.slowdown:+.1%}")
    return table


def summary_lines(result: FitResult) -> list[str]:
    gpu_gib = result.original.estimate.gpu_total_bytes / GIB
    if result.chosen is None:
        lines = [f"[bold red]Nothing on the fix ladder fits[/] within a {result.margin:.0%} margin of {gpu_gib:.2f} GiB."]
        lines.append(f"Largest seq that would fit: {result.max_seq}" if result.max_seq else "No shorter seq fits either.")
        lines.append(f"Smallest GPU count that would fit: {result.min_gpus}" if result.min_gpus
                     else "No larger GPU count of this type fits either.")
        lines.append("(suggestions only: both change the job, so fit does not apply them)")
        return lines + refused_lines(result)
    c = result.chosen
    changes = "; ".join(result.changes) or "none (fits as given)"
    lines = [
        f"[bold green]Plan[/]: {changes}",
        f"peak {c.estimate.peak_reserved_bytes / GIB:.1f} of {gpu_gib:.2f} GiB "
        f"(headroom {c.estimate.headroom_bytes / GIB:.1f} GiB, margin {result.margin:.0%})",
        f"predicted step time {c.time.step_s:.2f} s, {c.time.tokens_per_s:,.0f} tokens/s "
        "(step-time model: median error 8% over the H100/H200 validation matrix, 60% at worst; "
        "docs/validation.md)",
    ]
    if c.spec.runtime == "specforge":
        flags = flag_changes(result.original.spec, c.spec)
        lines.append("SpecForge: " + ("; ".join(flags) if flags else "no flag changes"))
    return lines


def refused_lines(result: FitResult) -> list[str]:
    """Rungs the job's rules ruled out: when nothing fits, the user learns why a known remedy
    was not tried (when a plan fits, they would only have been slower)."""
    reasons = dict.fromkeys(reason for _, reason in result.refused)
    return [f"[dim]not tried: {escape(reason)}[/]" for reason in reasons]


def result_json(result: FitResult) -> dict:
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
    if shown.spec.runtime == "specforge":
        out["specforge_flags"] = flag_changes(result.original.spec, shown.spec)
    return out


@clean_errors
@spec_flags
def fit_command(
    config: Optional[Path] = typer.Argument(None, help="YAML config (or plan) file; flags override it."),
    margin: float = typer.Option(0.05, "--margin", help=MARGIN_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the chosen plan YAML here."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (estimate keys + plan, trail)."),
    from_specforge: Optional[str] = typer.Option(None, "--from-specforge", help=FROM_SPECFORGE_HELP),
    *,
    flags: dict,
) -> None:
    """Find the fastest configuration that fits: walk the fix ladder, never changing what is learned."""
    spec, warnings = job_spec(config, flags, from_specforge)
    if output is not None:
        check_writable(output)
    result = fit(spec, margin_fraction(margin))
    if output is not None and result.chosen is not None:
        write_plan(plan_of(result), output)
    if as_json:
        print(json.dumps(result_json(result), indent=2))
    else:
        console = Console(highlight=False)
        for w in warnings:
            console.print(f"[yellow]warning:[/] {w}")
        console.print(trail_table(result))
        for line in summary_lines(result):
            console.print(line)
        if output is not None and result.chosen is not None:
            console.print(f"plan written to {output}")
    sys.exit(0 if result.chosen is not None else 1)


def register(app: typer.Typer) -> None:
    app.command("fit")(fit_command)
