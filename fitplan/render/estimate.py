"""Render an Estimate: a rich table (components x phases) with the verdict, or markdown."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fitplan.estimator.result import Estimate, Verdict
from fitplan.render.tables import natural_width
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
        return _at_risk(est)
    return f"OOM by {gib(-est.headroom_bytes)} GiB: {est.dominant_component} dominates"


def _at_risk(est: Estimate) -> str:
    """Why a job is at risk: the allocator model's retries where the step is replayed, else the
    fitted rule (its largest request's blocks stranded by fragmentation)."""
    if est.replay is not None:
        return (f"AT RISK: served only after the allocator freed its cache: {retries(est.replay.num_alloc_retries)}"
                " in the allocator model's replay of the step; fitplan fit looks for headroom")
    short = est.required_if_fragmented_bytes - est.gpu_total_bytes
    return (f"AT RISK: fits only if fragmentation spares its largest request ({gib(short)} GiB short if "
            f"{gib(est.stranded_block_bytes)} GiB of its freed blocks stay cached); set expandable_segments: true")


def retries(count: int) -> str:
    return f"{count} {'retry' if count == 1 else 'retries'}"


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
    reserve = "replayed allocator reserve" if est.replay is not None else "allocator reserve"
    parts = (f"allocated {gib(est.peak_allocated_bytes)} + {reserve} {gib(est.allocator_reserve_bytes)}"
             f" + outside allocator {gib(est.outside_allocator_bytes)}")  # fmt: skip
    unconstrained = est.unconstrained_peak_bytes
    if est.peak_reserved_bytes == unconstrained:
        return f"device peak {gib(est.peak_reserved_bytes)} GiB = {parts}"
    if est.replay is not None and est.verdict != Verdict.OOM:  # the replay on the device's memory
        return (f"device peak {gib(est.peak_reserved_bytes)} GiB as the allocator model replays the step on the"
                f" device ({parts} = {gib(unconstrained)} with room; it frees its cache to serve the step:"
                f" {retries(est.replay.num_alloc_retries)})")  # fmt: skip
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
        console.print(f"attention: {layout.get('attention')}")
    console.print(breakdown_table(est, width=console.width))
    for note in est.notes:
        console.print(f"[yellow]warning: {escape(note)}[/]")
    for line in summary_lines(est):
        console.print(line)


def server_lines(servers) -> list[str]:
    """The capture servers block (fitplan.estimator.capture_server.ServerEstimate): one line per
    server kind, every GPU of the kind alike."""
    lines = [f"[bold]capture servers[/] ({servers.gpus} GPU{'s' if servers.gpus != 1 else ''}; SGLang's documented "
             "sizing, not calibrated against a measurement): per GPU, GiB"]
    for g in servers.groups:
        color = "green" if g.fits else "red"
        verdict_text = f"FITS with {gib(g.gpu_total_bytes - g.peak_reserved_bytes)} GiB headroom" if g.fits \
            else f"OOM: {g.reason}"
        lines.append(
            f"  {g.gpus} GPU{'s' if g.gpus != 1 else ''} ({g.count} server{'s' if g.count != 1 else ''}, tp {g.tp}, "
            f"mem_fraction_static {g.mem_fraction}): weights {gib(g.weights_bytes)}, KV pool {gib(g.kv_pool_bytes)} "
            f"({g.kv_pool_tokens} tokens), activations {gib(g.activations_bytes)}, outside {gib(g.outside_bytes)}; "
            f"peak {gib(g.peak_reserved_bytes)} of {gib(g.gpu_total_bytes)}: [bold {color}]{escape(verdict_text)}[/]"
        )
    return lines


def render_servers(servers, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    for line in server_lines(servers):
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




def disk(nbytes: float) -> str:
    """Disk sizes in decimal units, as disks are sold (1 TB = 10^12 B)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def feature_lines(features) -> list[str]:
    """The offline features block (fitplan.offline_features.FeatureEstimate)."""
    a = features.assumed
    mean = features.stored_tokens / features.samples
    lines = [
        "[bold]offline features[/] (SpecForge's prepare_hidden_states.py files: aux states [N, 3h] and last "
        "hidden state [N, h] in bf16, input_ids and loss_mask int64, one uncompressed torch.save file a sample)",
        f"  {features.bytes_per_token:,} B per token; {disk(features.bytes_per_sample)} per sample at "
        f"{mean:,.0f} stored tokens (mean)",
        f"  {features.samples:,} samples, {features.stored_tokens:,} tokens stored "
        f"({features.content_tokens:,} before batch padding): [bold]{disk(features.total_bytes)}[/] on disk",
        f"  generation: {duration(features.generation_seconds)} on {a['gpus']}x{escape(a['gpu'])} (a model: the "
        f"target's prefill FLOPs at {a['prefill_efficiency']:.0%} of the bf16 peak, not measured)",
        f"  lengths: {escape(a['lengths'])}",
    ]
    return lines + [f"[yellow]warning: {escape(note)}[/]" for note in features.notes]


def render_features(features, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    for line in feature_lines(features):
        console.print(line)
