"""fitplan validate: measure the validation matrix on the local GPUs, or rebuild its report.

    fitplan validate --kind nvidia-h200-x2 --out results/        # run the rows for this machine
    fitplan validate --from-results results/ --calibrate          # tables, plot, constants (no GPU)
    fitplan validate --from-results tests/data/gpu/validation --trainer-reports tests/data/gpu --out docs/
    fitplan validate --list                                        # the matrix and its fit/check split
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fitplan.commands.common import clean_errors


def register(app: typer.Typer) -> None:
    @app.command("validate")
    @clean_errors
    def validate(
        out: Path = typer.Option(Path("validation-results"), "--out", "-o", help="Folder for rows.jsonl, runs/ and the report."),
        kind: Optional[str] = typer.Option(None, "--kind", help="Only the rows of one device kind, e.g. nvidia-h200-x2."),
        rows: Optional[str] = typer.Option(None, "--rows", help="Comma-separated row names or glob patterns."),
        from_results: Optional[Path] = typer.Option(None, "--from-results", help="Rebuild the report from *rows*.jsonl under this folder; runs nothing."),
        trainer_reports: Optional[Path] = typer.Option(None, "--trainer-reports", help="Also read the `fitplan train` report.json files in this folder as rows (e.g. tests/data/gpu)."),
        repredict: bool = typer.Option(True, "--repredict/--no-repredict", help="With --from-results: predict every row again with the current estimator (else: as predicted at run time)."),
        caveat: Optional[List[str]] = typer.Option(None, "--caveat", help="A line the report must show first (repeatable)."),
        calibrate: bool = typer.Option(False, "--calibrate", help="Fit the runtime constants on the calibration rows and check them on the rest."),
        timeout: float = typer.Option(300.0, "--timeout", help="Seconds allowed per row."),
        parallel: bool = typer.Option(False, "--parallel", help="Run rows side by side, each on its own GPUs (widest rows first): four 1-GPU rows at once on 4 GPUs."),
        list_rows: bool = typer.Option(False, "--list", help="Print the matrix rows and exit."),
    ) -> None:
        """Measure predicted vs actual peaks over the validation matrix (docs/validation-method.md)."""
        from rich.console import Console

        from fitplan.validation import matrix, report

        console = Console(highlight=False)
        chosen = matrix.select(matrix.MATRIX, kind, rows.split(",") if rows else None)
        if list_rows:
            _print_rows(console, chosen)
            return
        _writable_folder(out)  # before any row runs or any result is read
        if from_results is None and trainer_reports is None:
            from fitplan.validation.runner import run

            run(chosen, out, timeout_s=timeout, parallel=parallel, progress=lambda r: console.print(_progress_line(r)))
            from_results, repredict = out, False  # just predicted by the estimator as it is
        frame = report.load_results(from_results, trainer_reports, repredict=repredict)
        _report(console, frame, out, calibrate, tuple(caveat or ()))


def _writable_folder(out: Path) -> None:
    """--out must be a folder fitplan can write, or one it can make: else one line, before any work
    (nothing is made here; the report makes the folder when it writes)."""
    import os

    from fitplan.errors import FitplanError

    if out.exists() and not out.is_dir():
        raise FitplanError(f"--out {out} is a file; give a folder for the results and the report")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FitplanError(f"--out {out}: cannot make the folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FitplanError(f"--out {out}: {existing} is not writable")


def _progress_line(result: dict) -> str:
    colour = {"ran": "green", "skipped": "yellow", "oom": "magenta"}.get(result["status"], "red")
    reason = f"  {result['reason']}" if result.get("reason") else ""
    return f"[{colour}]{result['status']:8}[/] {result['name']}{reason}"


def _print_rows(console, chosen) -> None:
    from rich.table import Table

    table = Table(title=f"validation matrix: {len(chosen)} rows")
    table.add_column("row", overflow="fold")
    for column in ("kind", "split", "sequence"):
        table.add_column(column)
    for row in chosen:
        split = "fit (calibration)" if row.calibration else "check"
        size = f"{row.intent}: {row.search} chosen by the estimator" if row.search else str(row.spec["seq"])
        table.add_row(row.name, row.kind, split, size)
    console.print(table)


def _report(console, frame, out: Path, calibrate: bool, caveats: tuple[str, ...]) -> None:
    from rich.table import Table

    from fitplan.validation import report

    paths = report.write_report(frame, out, caveats)
    table = Table(title="summary (every measured row, step >= 2)")
    for column in ("figure", "value", "target", "rows", ""):
        table.add_column(column)
    for f in report.summary(frame):
        state = {True: "[green]met[/]", False: "[bold red]MISSED[/]", None: "[dim]no data[/]"}[f.met]
        value = "" if f.value is None else f"{f.value:.1f}"
        limit = ("≥ " if f.target.at_least else "≤ ") + f"{f.target.limit:g}"
        table.add_row(f.target.label, value, limit, str(f.rows), state)
    console.print(table)
    if calibrate:
        from fitplan.validation import calibrate as cal

        constants = cal.fit(frame)
        checked = cal.check(frame, constants)
        fitted_on = int((frame["calibration"].astype(bool) & (frame["status"] == "ran")).sum())
        text = cal.markdown(constants, checked, fitted_on)
        paths["calibration"] = out / "calibration.md"
        paths["calibration"].write_text(text)
        console.print(text)
    for name, path in paths.items():
        console.print(f"{name}: {path}")
