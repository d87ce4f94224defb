"""Render an Estimate: a rich table (components x phases) with the verdict, or markdown."""

from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from fitplan.estimator.result import Estimate, Verdict
from fitplan.units import GIB


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def _cell(nbytes: int) -> str:
    return gib(nbytes) if nbytes else "-"


def component_names(est: Estimate) -> list[str]:
    """Every component of any phase, in first-seen order (phases in time order)."""
    names: dict[str, None] = {}
    for components in est.phases.values():
        names.update(dict.fromkeys(components))
    return list(names)


def verdict(est: Estimate) -> str:
    if est.verdict == Verdict.FITS:
        return f"FITS with {gib(est.headroom_bytes)} GiB headroom"
    if est.verdict == Verdict.AT_RISK:
        short = est.required_if_fragmented_bytes - est.gpu_total_bytes
        return (f"AT RISK: fits only if fragmentation spares its largest request ({gib(short)} GiB short if a "
                f"{gib(est.stranded_block_bytes)} GiB block stays cached); set expandable_segments: true")
    return f"OOM by {gib(-est.headroom_bytes)} GiB: {est.dominant_component} dominates"


# Words of phase names shortened, in this order, until the table fits the terminal (the full
# names when it is wide enough; `peak phase:` under the table always names the phase in full).
ABBREVIATIONS = (("optimizer", "optim"), ("checkpoint", "ckpt"), ("forward", "fwd"), ("backward", "bwd"))


def phase_header(phase: str, level: int = 0, peak: bool = False) -> str:
    """A phase's column header: one word a line (`target_forward` -> `target` / `forward`), with the
    first `level` ABBREVIATIONS applied and ` *` after the peak phase's last word."""
    short = dict(ABBREVIATIONS[:level])
    return "\n".join(short.get(word, word) for word in phase.split("_")) + (" *" if peak else "")


def breakdown_table(est: Estimate, title: str = "", width: int | None = None) -> Table:
    """Components as rows, phases as columns. Given the terminal's `width`, the phase headers are
    shortened only as far as needed to fit it whole (never split mid-word)."""
    levels = range(len(ABBREVIATIONS) + 1) if width else [0]
    for level in levels:
        table = _breakdown_table(est, title, level)
        if not width:
            return table
        excess = natural_width(table) - width
        if excess <= 0:
            return table
    # narrower still: the component names fold (to no less than 6 characters), not the figures
    names = table.columns[0]
    names.width = max(6, max(map(len, component_names(est)), default=0) - excess)
    return table


def natural_width(renderable: Table) -> int:
    """The width a table takes when nothing has to wrap."""
    console = Console(width=10_000)
    return Measurement.get(console, console.options, renderable).maximum


def _breakdown_table(est: Estimate, title: str, level: int) -> Table:
    peak = est.peak_phase
    table = Table(title=title or "Per-GPU memory (GiB) by phase, steady state (step >= 2)", title_justify="left")
    # on a terminal too narrow even for the shortest headers, component names fold, not the figures
    table.add_column("component", overflow="fold")
    for p in est.phases:
        table.add_column(phase_header(p, level, p == peak), justify="right", style="bold" if p == peak else None,
                         no_wrap=True)
    for name in component_names(est):
        table.add_row(name, *(_cell(est.phases[p].get(name, 0)) for p in est.phases))
    table.add_section()
    table.add_row("allocated", *(gib(est.phase_allocated(p)) for p in est.phases), style="bold")
    table.add_row("step 1", *(gib(est.phase_allocated(p, step1=True)) for p in est.phases), style="dim")
    return table


def summary_lines(est: Estimate) -> list[str]:
    color = "green" if est.fits else "red"
    return [
        f"peak phase: {est.peak_phase} (marked *); step-1 peak allocated {gib(est.step1_peak_allocated_bytes)} GiB",
        f"largest allocation: {gib(est.largest_allocation_bytes)} GiB ({escape(est.largest_allocation_name)})",
        device_peak_line(est),
        f"device total {gib(est.gpu_total_bytes)} GiB, headroom {gib(est.headroom_bytes)} GiB",
        f"[bold {color}]{verdict(est)}[/]",
    ]


def device_peak_line(est: Estimate) -> str:
    parts = (f"allocated {gib(est.peak_allocated_bytes)} + allocator reserve {gib(est.allocator_reserve_bytes)}"
             f" + outside allocator {gib(est.outside_allocator_bytes)}")  # fmt: skip
    unconstrained = est.unconstrained_peak_bytes
    if est.peak_reserved_bytes == unconstrained:
        return f"device peak {gib(est.peak_reserved_bytes)} GiB = {parts}"
    if est.verdict != Verdict.OOM:  # squeezed: the allocator gives cached blocks back first
        return (f"device peak {gib(est.peak_reserved_bytes)} GiB (the device, full: {parts} = {gib(unconstrained)},"
                f" and the allocator frees cached blocks first; the job needs {gib(est.required_bytes)})")  # fmt: skip
    return f"device peak {gib(est.peak_reserved_bytes)} GiB needed = allocated + the reserve's floor + outside ({parts} with room)"


def render(est: Estimate, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    layout = est.layout
    if layout:
        console.print(escape(
            f"{layout.get('model')} on {est.world}x{layout.get('gpu')}: tp {layout.get('tp')}, "
            f"dp {layout.get('dp')}, accum {layout.get('accum')}, global batch {layout.get('global_batch')}"
        ))
    console.print(breakdown_table(est, width=console.width))
    for note in est.notes:
        console.print(f"[yellow]warning: {escape(note)}[/]")
    for line in summary_lines(est):
        console.print(line)


def markdown(est: Estimate) -> str:
    """The same breakdown as a markdown table plus the verdict (for docs and reports)."""
    phases = list(est.phases)
    header = "| component | " + " | ".join(f"**{p}**" if p == est.peak_phase else p for p in phases) + " |"
    rule = "|---|" + "---:|" * len(phases)
    rows = [
        f"| {name} | " + " | ".join(gib(est.phases[p].get(name, 0)) for p in phases) + " |"
        for name in component_names(est)
    ]
    rows.append("| **allocated** | " + " | ".join(gib(est.phase_allocated(p)) for p in phases) + " |")
    return "\n".join([header, rule, *rows, "", f"**{verdict(est)}** (device peak {gib(est.peak_reserved_bytes)} "
                      f"of {gib(est.gpu_total_bytes)} GiB)"])


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


def profile_tables(width: int | None = None) -> list[Table]:
    """`fitplan profiles`: the models, drafts and GPUs the profiles hold, wrapped (never cut) to
    `width`, the terminal's when not given."""
    from fitplan.shapes import count_params
    from fitplan.profiles import (
        draft_names,
        gpu_names,
        load_draft,
        load_gpu,
        load_model,
        model_names,
    )

    loaded = {name: load_model(name) for name in model_names()}
    packed: dict[str, list[str]] = {}
    for name, m in loaded.items():
        if m.packed_format:
            packed.setdefault(m.packed_format, []).append(name)
    caption = "; ".join(f"{fmt}-packed weights (--target-weights {fmt}): {', '.join(names)}"
                        for fmt, names in packed.items())
    models = Table(title="Models", title_justify="left", caption=caption or None, caption_justify="left")
    for col in ("name", "params", "layers", "hidden", "heads (kv)", "vocab", "MoE experts (active)"):
        models.add_column(col, no_wrap=col == "name", justify="left" if col == "name" else "right")
    for name, m in loaded.items():
        moe = f"{m.experts} ({m.experts_per_token})" if m.is_moe else "-"
        models.add_row(name, f"{count_params(m).total / 1e9:.2f}B", str(m.layers), str(m.hidden),
                       f"{m.heads} ({m.kv_heads})", str(m.vocab), moe)

    drafts = Table(title="Eagle3 drafts (--draft)", title_justify="left")
    for col in ("name", "for model", "hidden", "MLP", "draft vocab", "params: trainable + frozen embedding"):
        drafts.add_column(col, no_wrap=col == "name", justify="left" if col in ("name", "for model") else "right")
    for name in draft_names():
        target = next((m for m in loaded.values() if load_draft("auto", m).name == name), None)
        if target is None:
            continue  # a draft whose target has no model profile cannot be sized
        d = load_draft(name, target)
        drafts.add_row(name, target.name, str(d.hidden), str(d.intermediate), str(d.draft_vocab),
                       f"{d.trainable_params() / 1e6:.0f}M + {d.frozen_params() / 1e6:.0f}M")

    gpus = Table(title="GPUs (--gpus COUNTxNAME)", title_justify="left")
    for col in ("name", "memory (GiB, as torch reports)", "bf16 dense TFLOPs", "memory TB/s", "aliases"):
        gpus.add_column(col, no_wrap=col == "name", justify="left" if col in ("name", "aliases") else "right")
    for name in gpu_names():
        g = load_gpu(name)
        gpus.add_row(g.id, gib(g.total_bytes), f"{g.bf16_tflops:.0f}", f"{g.memory_tbps:.2f}", ", ".join(dict.fromkeys(a for a in g.aliases if a != g.id)))
    tables = [models, drafts, gpus]
    width = width or Console().width
    for table in tables:
        fit_columns(table, width)
    return tables
