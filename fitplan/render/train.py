"""`fitplan train`: the last step, the predicted-vs-measured table and where the report went."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from trainer.compare import MISS_FRACTION
from fitplan.units import GIB

# why `fitplan train` wrote an allocator snapshot (the report's snapshot_reason)
SNAPSHOT_REASONS = {
    "missed": f"[red]a phase missed its prediction by more than {100 * MISS_FRACTION:.0f}%[/]: ",
    "oom": "[red]out of memory[/]: ",
    "asked": "",
}


def comparison_table(table: list[dict]):
    from rich.table import Table

    t = Table(title="memory: predicted vs measured (allocated; device peak = total - free)")
    for col in ("phase", "when", "predicted GiB", "measured GiB", "error"):
        t.add_column(col, justify="left" if col in ("phase", "when") else "right")
    for r in table:
        err = r["error_pct"]
        text = "-" if err is None else f"{err:+.1f}%"
        if err is not None and abs(err) > 100 * MISS_FRACTION:
            text = f"[bold red]{text}[/]"
        pred = "-" if r["predicted"] is None else f"{r['predicted'] / GIB:.3f}"
        t.add_row(r["phase"], r["when"], pred, f"{r['measured'] / GIB:.3f}", text)
    return t


def show_report(report: dict, output: Path) -> None:

    console = Console(highlight=False)
    steps = report["steps"]
    if steps:
        last = steps[-1]
        mfu = f", MFU {100 * last['mfu']:.1f}%" if last.get("mfu") else ""
        acc = " ".join(f"{a:.2f}" for a in last["acc"])
        console.print(f"step {last['step']}: loss {last['loss']:.4f}, acc by depth [{acc}], "
                      f"{last['tokens_per_s']:.0f} tokens/s{mfu}")
    if report.get("skipped_lines"):
        console.print(f"[yellow]{report['skipped_lines']} data line(s) skipped (not JSON or no assistant turn)[/]")
    console.print(comparison_table(report["comparison"]))
    if "oom" in report:
        oom = report["oom"]
        console.print(f"[bold red]out of memory[/] at step {oom['step']}, phase {oom['phase']}: {oom['message']}")
        if report.get("prediction"):
            console.print(f"predicted device peak {report['prediction']['peak_reserved_bytes'] / (1 << 30):.2f} GiB")
        if oom.get("fit_suggestion"):
            console.print(f"`fitplan fit` would change: {oom['fit_suggestion']}")
    if report.get("snapshot"):
        why = SNAPSHOT_REASONS.get(report.get("snapshot_reason", "missed"), "")
        console.print(f"{why}allocator snapshot at {report['snapshot']} (open it at https://pytorch.org/memory_viz)")
    console.print(f"report: {output / 'report.json'}" + (f", checkpoint: {report['checkpoint']}" if report.get("checkpoint") else ""))
