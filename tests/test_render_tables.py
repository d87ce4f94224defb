"""natural_width counts a table's width from its cells' text; rich's own measurement is the reference."""

from __future__ import annotations

import itertools

import pytest
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from fitplan.render.tables import natural_width


def rich_width(table: Table) -> int:
    console = Console(width=10_000)
    return Measurement.get(console, console.options, table).maximum


def test_width_by_hand():
    table = Table(box=box.HEAVY_HEAD)
    table.add_column("component")
    table.add_column("target\nforward *")
    table.add_row("draft.params", "1.77")
    # columns: 'draft.params' 12 and 'forward *' 9, each with one space either side (default
    # padding (0, 1)); rules: an edge either side and one between the columns
    assert natural_width(table) == (12 + 2) + (9 + 2) + 3


def test_markup_and_emoji_count_as_printed():
    table = Table()
    table.add_column("[bold]ab[/]")  # the tag is not printed: 2 cells
    table.add_row(":smile:")  # an emoji two cells wide
    assert natural_width(table) == (2 + 2) + 2 == rich_width(table)


@pytest.mark.parametrize(("pad_edge", "collapse", "show_edge", "table_box", "padding", "header"), list(
    itertools.product((True, False), (True, False), (True, False), (box.HEAVY_HEAD, None),
                      ((0, 1), (0, 2, 0, 1), 0), (True, False))))
def test_same_as_rich(pad_edge, collapse, show_edge, table_box, padding, header):
    table = Table(pad_edge=pad_edge, collapse_padding=collapse, show_edge=show_edge, box=table_box,
                  padding=padding, show_header=header)
    table.add_column("a [bold]b[/]\nccc", min_width=9)
    table.add_column(":smile: x", max_width=3)
    table.add_column(Text("hdr"))
    table.add_row("[red]long text here[/] [B*S, V]", "xx:yy", Text("a\nbbbbbbb"))
    table.add_row("日本語テキスト", "", "")
    assert natural_width(table) == rich_width(table)


def test_other_renderables_are_measured_by_rich():
    inner = Table()
    inner.add_column("nested column")
    outer = Table()
    outer.add_column("x")
    outer.add_row(inner)
    assert natural_width(outer) == rich_width(outer)
