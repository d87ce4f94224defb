"""`fitplan check` and `fitplan diff`: the gate's rows as a table, markdown or blocks."""

from __future__ import annotations

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from fitplan.check import CheckRow
from fitplan.estimator.result import Estimate
from fitplan.render.tables import fit_columns, markdown_table
from fitplan.units import GIB


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


def title(rows: list[CheckRow]) -> str:
    failed = sum(not r.passed for r in rows)
    verdict = f"{failed} of {len(rows)} config(s) fail" if failed else f"all {len(rows)} config(s) fit"
    return f"fitplan check: {verdict}"


def check_markdown(rows: list[CheckRow]) -> str:
    """For CI summaries (GitHub's job summary, a PR comment)."""
    return f"### {title(rows)}\n\n{markdown_table(COLUMNS, [row_cells(r) for r in rows])}"


def print_check_table(rows: list[CheckRow], with_deltas: bool, console: Console) -> None:
    """One row per config, its path whole on one line: the other columns wrap to make room; when
    they cannot (a long path on a narrow terminal), one block per config instead of the table."""
    heading = title(rows)
    columns = COLUMNS if with_deltas else COLUMNS[:4]
    cells = [[Text(c) for c in row_cells(r)[: len(columns)]] for r in rows]
    for cell, r in zip(cells, rows):
        cell[1] = verdict_text(r)
    table = rich_table(columns, cells, heading, no_wrap=("config",))
    if fit_columns(table, console.width):
        console.print(table)
        return
    console.print(Text(heading))
    for r, cell in zip(rows, cells):
        console.print(Text(r.path), soft_wrap=True)  # whole, even past the terminal's edge
        details = cell[1].copy().append(f": peak {cell[2].plain} GiB, headroom {cell[3].plain} GiB")
        if with_deltas:
            details.append(f", delta {cell[4].plain} GiB, moved most {cell[5].plain}")
        console.print(Padding(details, (0, 0, 0, 2)))


def print_diff(a: Estimate, b: Estimate, components: dict[str, int], phases: dict[str, int], console: Console) -> None:
    """`fitplan diff`: the device-level peak, then per component and per phase, old -> new."""
    peak = b.peak_reserved_bytes - a.peak_reserved_bytes
    console.print(f"device-level peak: {gib(a.peak_reserved_bytes)} -> {gib(b.peak_reserved_bytes)} GiB "
                  f"({gib(peak, signed=True)}); peak phase {a.peak_phase} -> {b.peak_phase}")
    comp_rows = [[n, gib(a.components.get(n, 0)), gib(b.components.get(n, 0)), gib(d, True)]
                 for n, d in components.items()]
    console.print(rich_table(("component (at peak)", "old", "new", "delta"), comp_rows, "components"))
    phase_rows = [[p, gib(a.phase_allocated(p) if p in a.phases else 0),
                   gib(b.phase_allocated(p) if p in b.phases else 0), gib(d, True)] for p, d in phases.items()]
    console.print(rich_table(("phase", "old", "new", "delta"), phase_rows, "phases (allocated)"))
