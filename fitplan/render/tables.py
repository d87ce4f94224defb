"""Table helpers shared by every rendering: fitting a rich table to the terminal without
cutting a word, and GitHub markdown tables."""

from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console
from rich.errors import MarkupError
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def _plain(cell) -> str:
    if isinstance(cell, Text):
        return cell.plain
    try:
        return Text.from_markup(str(cell)).plain
    except MarkupError:
        return str(cell)


def fit_columns(table: Table, width: int) -> bool:
    """Fix the table's column widths so that it fits `width` characters without cutting a word:
    headers wrap first, then the cells with the most room to wrap, none below its longest word
    (all of a no_wrap column). False, with the table left as it was, when even that is too wide."""
    mins, cells, maxs = [], [], []
    for column in table.columns:
        header = _plain(column.header).splitlines() or [""]
        body = [line for cell in column.cells for line in _plain(cell).splitlines()] or [""]
        floor = column.min_width or 0
        longest = max(max(cell_len(line) for line in header + body), floor)
        words = [cell_len(word) for line in header + body for word in line.split()] or [0]
        maxs.append(longest)
        cells.append(longest if column.no_wrap else max(max(cell_len(line) for line in body), max(words), floor))
        mins.append(longest if column.no_wrap else max(max(words), floor))
    n = len(table.columns)
    _, right, _, left = table.padding
    overhead = (left + right) * n - (0 if table.pad_edge else left + right)
    if table.box:
        overhead += n - 1 + (2 if table.show_edge else 0)
    room = width - overhead
    if sum(maxs) <= room:
        return True
    if sum(mins) > room:
        return False
    widths = list(maxs)
    for floors in (cells, mins):  # wrap the headers before any cell
        for _ in range(max(0, sum(widths) - room)):
            slack = [w - f for w, f in zip(widths, floors)]
            if max(slack) <= 0:
                break
            i = max(range(n), key=lambda k: (slack[k], widths[k]))
            widths[i] -= 1
    for column, w in zip(table.columns, widths):
        column.width = w
    return True


def natural_width(renderable: Table) -> int:
    """The width a table takes when nothing has to wrap."""
    console = Console(width=10_000)
    return Measurement.get(console, console.options, renderable).maximum


def markdown_table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join(lines)
