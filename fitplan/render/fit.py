"""`fitplan fit`: the fix ladder's trail and the chosen plan, in words."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from fitplan.estimator.result import Verdict
from fitplan.ladder import FitResult
from fitplan.units import GIB


def trail_table(result: FitResult) -> Table:
    table = Table(title="fix ladder", title_justify="left")
    for col in ("rung", "change", "peak (GiB)", "fits", "slowdown"):
        table.add_column(col, justify="right" if col in ("peak (GiB)", "slowdown") else "left")
    marks = {Verdict.FITS: "[yellow]tight[/]", Verdict.AT_RISK: "[yellow]at risk[/]", Verdict.OOM: "[red]no[/]"}
    for e in result.trail:
        mark = "[green]yes[/]" if e.fits else marks[e.verdict]  # not fitting: short of margin, or worse
        table.add_row(e.rung, e.change, f"{e.peak_reserved_bytes / GIB:.1f}", mark, f"{e.slowdown:+.1%}")
    return table


def summary_lines(result: FitResult, specforge_changes: list[str] | None = None) -> list[str]:
    """The plan in words; `specforge_changes`: its changes as SpecForge flags or run-config keys,
    for a job written for SpecForge."""
    gpu_gib = result.original.estimate.gpu_total_bytes / GIB
    if result.chosen is None:
        lines = [f"[bold red]Nothing on the fix ladder fits[/] within a {result.margin:.0%} margin of {gpu_gib:.2f} GiB."]
        lines.append(f"Largest seq that would fit: {result.max_seq}" if result.max_seq else "No shorter seq fits either.")
        batch = result.original.job.global_batch
        lines.append(f"Smallest GPU count that would fit: {result.min_gpus}" if result.min_gpus
                     else f"No larger GPU count of this type fits a global batch of {batch} either "
                          "(every GPU takes whole samples; --global-batch sets it).")
        lines.append("(suggestions only: both change the job, so fit does not apply them)")
        return lines + refused_lines(result)
    c = result.chosen
    changes = "; ".join(result.changes) or "none (fits as given)"
    lines = [
        f"[bold green]Plan[/]: {changes}",
        f"peak {c.estimate.peak_reserved_bytes / GIB:.1f} of {gpu_gib:.2f} GiB "
        f"(headroom {c.estimate.headroom_bytes / GIB:.1f} GiB, margin {result.margin:.0%})",
        f"predicted step time {c.time.step_s:.2f} s, {c.time.tokens_per_s:,.0f} tokens/s "
        "(step-time model: median error 5% over the H100/H200 validation matrix, 60% at worst; "
        "docs/validation.md)",
    ]
    if specforge_changes is not None:
        lines.append("SpecForge: " + ("; ".join(specforge_changes) if specforge_changes else "no changes"))
    return lines


def refused_lines(result: FitResult) -> list[str]:
    """Rungs the job's rules ruled out: when nothing fits, the user learns why a known remedy
    was not tried (when a plan fits, they would only have been slower)."""
    reasons = dict.fromkeys(reason for _, reason in result.refused)
    return [f"[dim]not tried: {escape(reason)}[/]" for reason in reasons]


def server_fix_lines(fix) -> list[str]:
    """A SpecForge v0.3 run's capture servers (fitplan.server_fit.ServerFix): what changed and
    the servers after it, or why nothing fits."""
    from fitplan.render.estimate import server_lines

    margin = f"with a {fix.target.margin:.0%} margin"
    if not fix.fits:
        lines = [f"[bold red]Capture servers: nothing fits[/] {margin} (SGLang's documented sizing, not calibrated; "
                 "-o writes nothing):"]
        return lines + [f"  {escape(problem)}" for problem in fix.problems]
    if not fix.overrides:
        return [f"[bold green]Capture servers[/]: fit as given {margin}"] + server_lines(fix.fixed)[1:]
    lines = [f"[bold green]Capture servers[/]: {escape('; '.join(fix.notes))}"]
    lines += ["after the change, " + server_lines(fix.fixed)[0]] + server_lines(fix.fixed)[1:]
    lines.append("SpecForge (servers; a list entry cannot be overridden alone, so capture_servers is given whole): "
                 + escape("; ".join(fix.overrides)))
    return lines
