"""fitplan check (the CI gate) and fitplan diff (what moved between two configs)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer
from rich.console import Console

from fitplan.check import check_configs, component_deltas, phase_deltas
from fitplan.commands.common import (
    MARGIN_HELP,
    clean_errors,
    margin_fraction,
    spec_flags,
)
from fitplan.config import load_spec
from fitplan.errors import FitplanError
from fitplan.render.check import check_markdown, print_check_table, print_diff

FORMATS = ("table", "markdown", "json")


@clean_errors
@spec_flags
def check_command(
    configs: List[str] = typer.Argument(..., help="Config files (YAML, plans, or SpecForge launch scripts)."),
    against: Optional[str] = typer.Option(None, "--against", help="Git revision to compare each file with (e.g. main)."),
    margin: float = typer.Option(0.0, "--margin", help=MARGIN_HELP + " Fitting with less headroom fails too."),
    output_format: str = typer.Option("table", "--format", help="table, markdown (for CI summaries) or json."),
    *,
    flags: dict,
) -> None:
    """Gate configs in CI: exit 0 when all fit, 1 when any is predicted to OOM (or is under the margin)."""
    if output_format not in FORMATS:
        raise FitplanError(f"--format {output_format!r} is not one of: {', '.join(FORMATS)}")
    rows = check_configs(configs, flags, margin_fraction(margin), against)
    passed = all(r.passed for r in rows)
    if output_format == "json":
        print(json.dumps({"passed": passed, "rows": [r.to_json() for r in rows]}, indent=2))
    elif output_format == "markdown":
        print(check_markdown(rows))
    else:
        print_check_table(rows, against is not None, Console(highlight=False))
    sys.exit(0 if passed else 1)


@clean_errors
def diff_command(
    old: str = typer.Argument(..., help="The old config (or plan) file."),
    new: str = typer.Argument(..., help="The new config (or plan) file."),
    as_json: bool = typer.Option(False, "--json", help="Print the deltas as JSON."),
) -> None:
    """Per-component and per-phase memory deltas between two configs."""
    from fitplan.estimator import estimate_spec

    a, b = estimate_spec(load_spec(old)), estimate_spec(load_spec(new))
    comps, phases = component_deltas(a, b), phase_deltas(a, b)
    peak = b.peak_reserved_bytes - a.peak_reserved_bytes
    if as_json:
        print(json.dumps({"peak_reserved_delta_bytes": peak, "components": comps, "phases": phases}, indent=2))
        return
    print_diff(a, b, comps, phases, Console(highlight=False))


def register(app: typer.Typer) -> None:
    app.command("check")(check_command)
    app.command("diff")(diff_command)
