"""fitplan check (the CI gate) and fitplan diff (what moved between two configs)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from fitplan.check import CheckRow, check_configs, component_deltas, phase_deltas, spec_from_file
from fitplan.commands.common import clean_errors, spec_flags
from fitplan.commands.fit import MARGIN_HELP, margin_fraction
from fitplan.errors import FitplanError
from fitplan.report import fit_columns
from fitplan.units import GIB

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


def rich_table(header: tuple[str, ...], rows: list[list[str]], title: str, no_wrap: tuple[str, ...] = ()) -> Table:
    """Cells are shown verbatim (a path with [brackets] is not markup)."""
    table = Table(title=Text(title), title_justify="left")
    for col in header:
        numeric = "(GiB)" in col or col in ("old", "new", "delta")
        table.add_column(col, no_wrap=col in no_wrap, justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in r))
    return table


def verdict_text(row: CheckRow) -> Text:
    return Text(row.verdict, style="green" if row.passed else "bold red")


def print_check_table(rows: list[CheckRow], title: str, with_deltas: bool, console: Console) -> None:
    """One row per config, its path whole on one line: the other columns wrap to make room; when
    they cannot (a long path on a narrow terminal), one block per config instead of the table."""
    columns = COLUMNS if with_deltas else COLUMNS[:4]
    cells = [[Text(c) for c in row_cells(r)[: len(columns)]] for r in rows]
    for cell, r in zip(cells, rows):
        cell[1] = verdict_text(r)
    table = rich_table(columns, cells, title, no_wrap=("config",))
    if fit_columns(table, console.width):
        console.print(table)
        return
    console.print(Text(title))
    for r, cell in zip(rows, cells):
        console.print(Text(r.path), soft_wrap=True)  # whole, even past the terminal's edge
        details = cell[1].copy().append(f": peak {cell[2].plain} GiB, headroom {cell[3].plain} GiB")
        if with_deltas:
            details.append(f", delta {cell[4].plain} GiB, moved most {cell[5].plain}")
        console.print(Padding(details, (0, 0, 0, 2)))


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
            print_check_table(rows, f"fitplan check: {verdict}", against is not None, Console(highlight=False))
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
