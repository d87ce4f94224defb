"""fitplan explain: decode a CUDA OOM log, and with the job's config name the culprit and the fix.

What only looks like an OOM (Triton's shared-memory limit, an asynchronous kernel fault, the host's
OOM killer) gets its own explanation; the first failure in the log is the one explained.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fitplan.commands.common import FROM_SPECFORGE_HELP, FROM_SPECULATORS_HELP, MARGIN_HELP, clean_errors, job_spec, margin_fraction, spec_flags
from fitplan.errors import FitplanError
from fitplan.explain import config_lines, describe_failure, job_lines, parse_failures, summary_line
from fitplan.ladder import fit
from fitplan.layout import resolve


def read_log(log: Optional[str]) -> str:
    if log in (None, "-"):
        if sys.stdin.isatty():
            raise FitplanError("no log given: pass a file (fitplan explain oom.log) or pipe it on stdin")
        return sys.stdin.read()
    path = Path(log)
    if path.is_dir():
        raise FitplanError(f"{log} is a directory; give the log file holding the OOM message")
    if not path.is_file():
        raise FitplanError(f"log file {log!r} does not exist")
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise FitplanError(f"log file {log!r} cannot be read ({exc.strerror})") from None


@clean_errors
@spec_flags
def explain_command(
    log: Optional[str] = typer.Argument(None, help="Log file holding the OOM message ('-' or omitted: stdin)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The job's YAML config (or plan) file."),
    from_specforge: Optional[str] = typer.Option(None, "--from-specforge", help=FROM_SPECFORGE_HELP),
    from_speculators: Optional[str] = typer.Option(None, "--from-speculators", help=FROM_SPECULATORS_HELP),
    margin: float = typer.Option(0.05, "--margin", help=MARGIN_HELP),
    *,
    flags: dict,
) -> None:
    """Explain a CUDA out-of-memory error (large request, fragmentation or another process) and the fix;
    also Triton's shared-memory limit, a kernel fault and a host-memory kill, which only look like one."""
    failures = parse_failures(read_log(log))
    first = next(f for f in failures if f.kind != "cuda-oom-unread")
    spec, warnings = None, []
    if config is not None or from_specforge is not None or from_speculators is not None or "model" in flags:
        spec, warnings, _ = job_spec(config, flags, from_specforge, from_speculators)
        resolve(spec)  # the job's rules refuse a bad job before anything is printed
    fraction = margin_fraction(margin)
    console = Console(highlight=False)
    summary = summary_line(failures)
    if first.kind == "cuda-oom":
        if summary:
            console.print(summary, markup=False, soft_wrap=True)
        for line in describe_failure(first):
            console.print(line)
        if spec is not None:
            for w in warnings:
                console.print(f"[yellow]warning:[/] {w}")
            for line in config_lines(first.detail, fit(spec, fraction)):
                console.print(line)
        return
    # Lines that quote the log (a traceback frame, a process name) are printed as plain text.
    for line in ([summary] if summary else []) + describe_failure(first):
        console.print(line, markup=False, soft_wrap=True)
    if spec is not None:
        for w in warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}")
        for line in job_lines(first, spec):
            console.print(line, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("explain")(explain_command)
