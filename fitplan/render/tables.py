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


def natural_width(table: Table) -> int:
    """The width a table takes when nothing has to wrap, as rich measures it: each column's
    longest line plus its cell padding, plus the rules. Counted from the cells' text, because
    rich's own measurement renders every cell (a wide estimate table, measured at up to five
    header abbreviations, took about 25 ms of `fitplan estimate`'s 0.2 s); tables it cannot count
    (other renderables in cells, a fixed or expanding width) are measured by rich."""
    cells = [column.header for column in table.columns] + [c for column in table.columns for c in column.cells]
    countable = all(isinstance(c, (str, Text)) for c in cells) and (table.show_header or table.row_count)
    if table.width is not None or table.expand or not countable:
        console = Console(width=10_000)
        return Measurement.get(console, console.options, table).maximum
    widths = [_natural_column_width(table, i) for i in range(len(table.columns))]
    rules = (len(table.columns) - 1 + (2 if table.show_edge else 0)) if table.box else 0
    return max(sum(widths) + rules, table.min_width or 0)


def _natural_column_width(table: Table, index: int) -> int:
    """A column's widest cell (header included when shown) with the padding rich gives its cells."""
    column = table.columns[index]
    _, right, _, left = table.padding
    if table.collapse_padding and index > 0:
        left = max(0, left - right)
    if not table.pad_edge:
        left = 0 if index == 0 else left
        right = 0 if index == len(table.columns) - 1 else right
    pad = left + right
    if column.width is not None:
        return column.width + pad
    cells = ([column.header] if table.show_header else []) + list(column.cells)
    cells += [column.footer] if table.show_footer else []
    width = max(_text_width(cell) + pad for cell in cells)
    if column.min_width is not None:
        width = max(width, column.min_width + pad)
    return width if column.max_width is None else min(width, column.max_width + pad)


def _text_width(cell) -> int:
    """The longest line of a cell as rich prints it: markup and :emoji: codes rendered first
    (a plain string, the usual cell, is its own text)."""
    if isinstance(cell, Text):
        text = cell.plain
    elif "[" in cell or ":" in cell:
        text = Text.from_markup(cell).plain
    else:
        text = cell
    return max((cell_len(line) for line in text.splitlines()), default=0)


def markdown_table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join(lines)
