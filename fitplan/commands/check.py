"""fitplan check (the CI gate) and fitplan diff (what moved between two configs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fitplan.check import CheckRow, check_configs, component_deltas, phase_deltas, spec_from_file
from fitplan.commands.common import clean_errors, spec_flags
from fitplan.commands.fit import MARGIN_HELP, margin_fraction
from fitplan.errors import FitplanError

GIB = 1 << 30
FORMATS = ("table", "markdown", "json")
COLUMNS = ("config", "verdict", "peak (GiB)", "headroom (GiB)", "delta (GiB)", "moved most")


def gib(n: int | None, signed: bool = False) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:+.2f}" if signed else f"{n / GIB:.2f}"


def row_cells(row: CheckRow) -> list[str]:
    moved = row.moved_most
    return [
        row.path,
        row.verdict,
        f"{gib(row.estimate.peak_reserved_bytes)} / {gib(row.estimate.gpu_total_bytes)}",
        gib(row.estimate.headroom_bytes),
        gib(row.delta_bytes, signed=True),
        f"{moved[0]} ({gib(moved[1], signed=True)})" if moved else "-",
    ]


def markdown_table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(header: tuple[str, ...], rows: list[list[str]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in header:
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    return table


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
    else:
        cells = [row_cells(r) for r in rows]
        failed = sum(not r.passed for r in rows)
        verdict = f"{failed} of {len(rows)} config(s) fail" if failed else f"all {len(rows)} config(s) fit"
        if output_format == "markdown":
            print(f"### fitplan check: {verdict}\n\n{markdown_table(COLUMNS, cells)}")
        else:
            Console(highlight=False).print(rich_table(COLUMNS, cells, f"fitplan check: {verdict}"))
    sys.exit(0 if passed else 1)


@clean_errors
def diff_command(
    old: str = typer.Argument(..., help="The old config (or plan) file."),
    new: str = typer.Argument(..., help="The new config (or plan) file."),
    as_json: bool = typer.Option(False, "--json", help="Print the deltas as JSON."),
) -> None:
    """Per-component and per-phase memory deltas between two configs."""
    from fitplan.estimator import estimate_spec

    a, b = estimate_spec(spec_from_file(old, {})), estimate_spec(spec_from_file(new, {}))
    comps, phases = component_deltas(a, b), phase_deltas(a, b)
    peak = b.peak_reserved_bytes - a.peak_reserved_bytes
    if as_json:
        print(json.dumps({"peak_reserved_delta_bytes": peak, "components": comps, "phases": phases}, indent=2))
        return
    console = Console(highlight=False)
    console.print(f"device-level peak: {gib(a.peak_reserved_bytes)} -> {gib(b.peak_reserved_bytes)} GiB "
                  f"({gib(peak, signed=True)}); peak phase {a.peak_phase} -> {b.peak_phase}")
    comp_rows = [[n, gib(a.components.get(n, 0)), gib(b.components.get(n, 0)), gib(d, True)] for n, d in comps.items()]
    console.print(rich_table(("component (at peak)", "old", "new", "delta"), comp_rows, "components"))
    phase_rows = [[p, gib(a.phase_allocated(p) if p in a.phases else 0), gib(b.phase_allocated(p) if p in b.phases else 0),
                   gib(d, True)] for p, d in phases.items()]
    console.print(rich_table(("phase", "old", "new", "delta"), phase_rows, "phases (allocated)"))


def register(app: typer.Typer) -> None:
    app.command("check")(check_command)
    app.command("diff")(diff_command)
