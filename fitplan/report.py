"""Render an Estimate: a rich table (components x phases) with the verdict, or markdown."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fitplan.estimator.result import Estimate

GIB = 1 << 30


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
    if est.verdict == "fits":
        return f"FITS with {gib(est.headroom_bytes)} GiB headroom"
    if est.verdict == "at risk":
        short = est.required_if_fragmented_bytes - est.gpu_total_bytes
        return (f"AT RISK: fits only if fragmentation spares its largest request ({gib(short)} GiB short if a "
                f"{gib(est.stranded_block_bytes)} GiB block stays cached); set expandable_segments: true")
    return f"OOM by {gib(-est.headroom_bytes)} GiB: {est.dominant_component} dominates"


def breakdown_table(est: Estimate, title: str = "") -> Table:
    peak = est.peak_phase
    table = Table(title=title or "Per-GPU memory (GiB) by phase, steady state (step >= 2)", title_justify="left")
    table.add_column("component", no_wrap=True)
    for p in est.phases:
        header = p.replace("_", "\n") + (" *" if p == peak else "")
        table.add_column(header, justify="right", style="bold" if p == peak else None, min_width=6, overflow="fold")
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
    if est.verdict != "OOM":  # squeezed: the allocator gives cached blocks back first
        return (f"device peak {gib(est.peak_reserved_bytes)} GiB (the device, full: {parts} = {gib(unconstrained)},"
                f" and the allocator frees cached blocks first; the job needs {gib(est.required_bytes)})")  # fmt: skip
    return f"device peak {gib(est.peak_reserved_bytes)} GiB needed = allocated + the reserve's floor + outside ({parts} with room)"


def render(est: Estimate, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    layout = est.layout
    if layout:
        console.print(
            f"{layout.get('model')} on {est.world}x{layout.get('gpu')}: tp {layout.get('tp')}, "
            f"dp {layout.get('dp')}, accum {layout.get('accum')}, global batch {layout.get('global_batch')}"
        )
    console.print(breakdown_table(est))
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


def profile_tables() -> list[Table]:
    """`fitplan profiles`: the models, drafts and GPUs the profiles hold."""
    from fitplan.estimator.params import count_params
    from fitplan.profiles import draft_names, gpu_names, load_draft, load_gpu, load_model, model_names

    models = Table(title="Models", title_justify="left")
    for col in ("name", "params", "layers", "hidden", "heads (kv)", "vocab", "MoE experts (active)", "packed"):
        models.add_column(col, no_wrap=col == "name", justify="left" if col == "name" else "right")
    loaded = {name: load_model(name) for name in model_names()}
    for name, m in loaded.items():
        moe = f"{m.experts} ({m.experts_per_token})" if m.is_moe else "-"
        models.add_row(name, f"{count_params(m).total / 1e9:.2f}B", str(m.layers), str(m.hidden),
                       f"{m.heads} ({m.kv_heads})", str(m.vocab), moe, m.packed_format or "-")

    drafts = Table(title="Eagle3 drafts (--draft)", title_justify="left")
    for col in ("name", "for model", "hidden", "MLP", "draft vocab", "trainable", "frozen embedding"):
        drafts.add_column(col, no_wrap=col == "name", justify="left" if col in ("name", "for model") else "right")
    for name in draft_names():
        target = next((m for m in loaded.values() if load_draft("auto", m).name == name), None)
        if target is None:
            continue  # a draft whose target has no model profile cannot be sized
        d = load_draft(name, target)
        drafts.add_row(name, target.name, str(d.hidden), str(d.intermediate), str(d.draft_vocab),
                       f"{d.trainable_params() / 1e6:.0f}M", f"{d.frozen_params() / 1e6:.0f}M")

    gpus = Table(title="GPUs (--gpus COUNTxNAME)", title_justify="left")
    for col in ("name", "memory (GiB, as torch reports)", "bf16 dense TFLOPs", "memory TB/s", "aliases"):
        gpus.add_column(col, no_wrap=col == "name", justify="left" if col in ("name", "aliases") else "right")
    for name in gpu_names():
        g = load_gpu(name)
        gpus.add_row(g.id, gib(g.total_bytes), f"{g.bf16_tflops:.0f}", f"{g.memory_tbps:.2f}", ", ".join(dict.fromkeys(a for a in g.aliases if a != g.id)))
    return [models, drafts, gpus]
