"""Predicted vs measured: the validation table (CSV, markdown), its summary figures and the scatter plot.

Input: the *rows*.jsonl files the runner wrote (any number, e.g. one per device call, gathered in
one folder), and optionally a folder of `fitplan train` reports (fitplan.validation.trainer_reports);
with `repredict`, every row the matrix or its config describes is estimated again by the current
estimator (fitplan.validation.repredict). Errors are signed, (predicted - measured) / measured: a negative device-level error
is an under-prediction, i.e. an OOM the user was told would not happen.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fitplan.errors import FitplanError
from fitplan.units import GIB


@dataclass(frozen=True)
class Target:
    """One figure the issue sets, computed by `statistic` over a column of the table."""

    label: str
    column: str
    statistic: str  # median_abs | max_abs | max_under | share_true
    limit: float
    at_least: bool = False  # the figure must reach the limit (verdict share) rather than stay under it


TARGETS = (
    Target("peak allocated error, median abs %", "alloc_err_pct", "median_abs", 3.0),
    Target("peak allocated error, max abs %", "alloc_err_pct", "max_abs", 8.0),
    Target("device-level peak error, median abs %", "device_err_pct", "median_abs", 5.0),
    Target("device-level peak error, max abs %", "device_err_pct", "max_abs", 10.0),
    Target("device-level under-prediction, max %", "device_err_pct", "max_under", 3.0),
    Target("fit/OOM verdict right, % of rows", "verdict_ok", "share_true", 100.0, at_least=True),
    # the verdict's unsafe side: a job `at risk` counts as not fitting, so a wrong one that ran is not here
    Target("told it fits, then OOMed, % of rows", "verdict_unsafe", "share_true", 0.0),
    Target("step-time error, median abs %", "step_err_pct", "median_abs", 15.0),
)


@dataclass(frozen=True)
class Figure:
    target: Target
    value: float | None  # None: no row has the data
    rows: int

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target.limit if self.target.at_least else self.value <= self.target.limit


# ---------------------------------------------------------------- the table


def load_results(folder: Path | None, trainer_reports: Path | None = None, repredict: bool = False) -> pd.DataFrame:
    """Every *rows*.jsonl under the folder, plus the trainer reports directly in `trainer_reports`;
    a row run twice keeps its latest result."""
    from fitplan.validation.repredict import repredict as current_predictions
    from fitplan.validation.trainer_reports import load_reports

    if folder is not None and not Path(folder).exists():
        raise FitplanError(f"--from-results {folder}: no such folder (give the --out folder of `fitplan validate`)")
    if folder is not None and Path(folder).is_file():
        files = [Path(folder)]  # one rows file given directly
    else:
        files = sorted(Path(folder).rglob("*rows*.jsonl")) if folder is not None else []
    if folder is not None and not files:
        raise FitplanError(f"{folder}: no *rows*.jsonl results (write them with `fitplan validate --out DIR`)")
    records = load_reports(trainer_reports) if trainer_reports is not None else []
    if not files and not records:
        raise FitplanError("no results: give a folder of *rows*.jsonl and/or one of trainer reports")
    for number, record in enumerate(records, 1):
        _check_row(record, str(record.get("source", f"{trainer_reports}: trainer report {number}")))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            raise FitplanError(f"{path}: cannot be read ({exc.strerror})") from None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError, ValueError):
                    raise FitplanError(f"{path}:{number}: not a JSON line") from None
                records.append(_check_row(record, f"{path}:{number}"))
    frame = pd.DataFrame.from_records(records).drop(columns=["estimate"], errors="ignore")
    for column in OPTIONAL_FIELDS:
        if column not in frame:
            frame[column] = None
    if "finished" in frame:  # the runner's time stamp orders results gathered from several calls
        order = pd.to_numeric(frame["finished"], errors="coerce")
        frame = frame.loc[order.sort_values(kind="stable", na_position="first").index]
    frame = frame.drop_duplicates("name", keep="last").reset_index(drop=True)
    return with_errors(set_aside_busy(current_predictions(frame) if repredict else frame))


# What every result row needs, with the JSON types accepted (the runner writes them all).
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "status": (str,), "calibration": (bool,),
}
# Columns the report reads that a row may leave out (a skipped row has no sequence).
OPTIONAL_FIELDS = ("seq", "micro_batch")
# Fields the report computes with or prints, when a row has them (null: not measured).
NUMBER_FIELDS = ("seq", "micro_batch", "pred_alloc", "meas_alloc", "pred_device", "meas_device", "pred_step_s",
                 "meas_step_s", "pred_reserve", "pred_outside", "meas_reserved", "gpu_total", "gpu_used_at_start_mib",
                 "finished")  # fmt: skip
BOOL_FIELDS = ("pred_fits", "observed_fits")
TEXT_FIELDS = ("workload", "reason", "intent", "pred_verdict")


def _check_row(record, where: str) -> dict:
    """A result row as the report reads it; anything else is a one-line error naming the row and field."""
    if not isinstance(record, dict):
        raise FitplanError(f"{where}: a result row must be a JSON object, got {type(record).__name__}")
    for field, types in REQUIRED_FIELDS.items():
        if field not in record or record[field] is None:
            raise FitplanError(f"{where}: the row has no {field!r}; every row needs {', '.join(REQUIRED_FIELDS)} "
                               "(as `fitplan validate --out` writes them)")
        value = record[field]
        if not isinstance(value, types) or (types == (str,) and not value.strip()):
            kind = "true or false" if bool in types else "a non-empty string"
            raise FitplanError(f"{where}: {field} must be {kind}, got {type(value).__name__}")
    for fields, types, kind in ((NUMBER_FIELDS, (int, float), "a number"), (BOOL_FIELDS, (bool,), "true or false"),
                                (TEXT_FIELDS, (str,), "a string")):  # fmt: skip
        for field in fields:
            value = record.get(field)
            if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
                raise FitplanError(f"{where}: {field} must be {kind} or null, got {type(value).__name__}")
    return record


def set_aside_busy(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that started on a GPU still holding another process's memory measured that memory too
    (device-level readings are per GPU): status `spoiled`, no measured figures, no verdict."""
    from fitplan.validation.figures import IDLE_GPU_MIB

    if "gpu_used_at_start_mib" not in frame:
        return frame
    frame = frame.copy()
    used = pd.to_numeric(frame["gpu_used_at_start_mib"], errors="coerce")
    busy = used > IDLE_GPU_MIB
    measured = [c for c in ("meas_alloc", "meas_reserved", "meas_device", "meas_step_s", "observed_fits") if c in frame]
    for column in [*measured, "reason"]:
        frame[column] = frame[column].astype(object) if column in frame else None  # None-able
        frame.loc[busy, column] = None
    frame.loc[busy, "status"] = "spoiled"
    frame.loc[busy, "reason"] = [f"{mib:.0f} MiB of another process on its GPU at start" for mib in used[busy]]
    return frame


def _pct(predicted: pd.Series, measured: pd.Series) -> pd.Series:
    return 100.0 * (predicted - measured) / measured


def with_errors(frame: pd.DataFrame) -> pd.DataFrame:
    """Add signed % errors and whether the fit/OOM verdict was right (NaN where not measurable)."""
    frame = frame.copy()
    for column in ("pred_alloc", "meas_alloc", "pred_device", "meas_device", "pred_step_s", "meas_step_s",
                   "pred_fits", "observed_fits"):  # fmt: skip
        if column not in frame:
            frame[column] = None
    numeric = {c: pd.to_numeric(frame[c], errors="coerce") for c in ("pred_alloc", "meas_alloc", "pred_device",
                                                                      "meas_device", "pred_step_s", "meas_step_s")}  # fmt: skip
    frame["alloc_err_pct"] = _pct(numeric["pred_alloc"], numeric["meas_alloc"])
    frame["device_err_pct"] = _pct(numeric["pred_device"], numeric["meas_device"])
    frame["step_err_pct"] = _pct(numeric["pred_step_s"], numeric["meas_step_s"])
    known = frame["pred_fits"].notna() & frame["observed_fits"].notna()
    frame["verdict_ok"] = (frame["pred_fits"] == frame["observed_fits"]).where(known)
    frame["verdict_unsafe"] = (frame["pred_fits"].astype(bool) & ~frame["observed_fits"].astype(bool)).where(known)
    return frame


def figure(frame: pd.DataFrame, target: Target) -> Figure:
    values = frame[target.column].dropna()
    if values.empty:
        return Figure(target, None, 0)
    if target.statistic == "median_abs":
        value = float(values.astype(float).abs().median())
    elif target.statistic == "max_abs":
        value = float(values.astype(float).abs().max())
    elif target.statistic == "max_under":
        value = float(max(0.0, -values.astype(float).min()))
    else:
        value = 100.0 * float(values.astype(bool).mean())
    return Figure(target, value, len(values))


def summary(frame: pd.DataFrame) -> list[Figure]:
    return [figure(frame, t) for t in TARGETS]


def missed_targets(row: pd.Series) -> list[str]:
    """The per-row bounds this row breaks (the matrix-wide max/under-prediction/verdict targets)."""
    missed = []
    if pd.notna(row["alloc_err_pct"]) and abs(row["alloc_err_pct"]) > 8.0:
        missed.append("allocated > 8%")
    if pd.notna(row["device_err_pct"]) and abs(row["device_err_pct"]) > 10.0:
        missed.append("device > 10%")
    if pd.notna(row["device_err_pct"]) and row["device_err_pct"] < -3.0:
        missed.append("device under-predicted > 3%")
    if pd.notna(row["verdict_ok"]) and not bool(row["verdict_ok"]):
        missed.append("verdict wrong" + (": OOM after 'fits'" if row["verdict_unsafe"] else ""))
    return missed


# ---------------------------------------------------------------- markdown


def _gib(value) -> str:
    return "" if pd.isna(value) else f"{float(value) / GIB:.2f}"


def _num(value, fmt: str = "{:+.1f}") -> str:
    return "" if value is None or pd.isna(value) else fmt.format(float(value))


def _verdict(value) -> str:
    return "" if value is None or pd.isna(value) else ("fits" if bool(value) else "OOM")


def _predicted_verdict(row: pd.Series) -> str:
    """fits / OOM / at risk (rows predicted before the verdict had three values: fits / OOM)."""
    verdict = row.get("pred_verdict")
    return _verdict(row["pred_fits"]) if verdict is None or pd.isna(verdict) else str(verdict)


def _short(reason: str, limit: int = 90) -> str:
    """A reason short enough for a table cell; of an OOM, the size of the failed request."""
    request = re.search(r"Tried to allocate [\d.]+ [KMG]iB", reason)
    text = request.group(0) if request else reason
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(figures: list[Figure]) -> str:
    rows = []
    for f in figures:
        verdict = {True: "met", False: "**MISSED**", None: "no data"}[f.met]
        limit = f"≥ {f.target.limit:g}" if f.target.at_least else f"≤ {f.target.limit:g}"
        rows.append([f.target.label, _num(f.value, "{:.1f}"), limit, str(f.rows), verdict])
    return md_table(["figure", "value", "target", "rows", ""], rows)


def rows_markdown(frame: pd.DataFrame) -> str:
    header = ["row", "fit/check", "status", "seq", "pred alloc GiB", "meas alloc GiB", "err %", "pred device GiB",
              "meas device GiB", "err %", "pred step s", "meas step s", "err %", "verdict pred/obs", "missed"]  # fmt: skip
    rows = []
    for _, r in frame.iterrows():
        reason = r.get("reason")
        status = r["status"] if pd.isna(reason) or not reason else f"{r['status']}: {_short(reason)}"
        rows.append([
            r["name"], "fit" if r["calibration"] else "check", status, _num(r["seq"], "{:.0f}"),
            _gib(r["pred_alloc"]), _gib(r["meas_alloc"]), _num(r["alloc_err_pct"]),
            _gib(r["pred_device"]), _gib(r["meas_device"]), _num(r["device_err_pct"]),
            _num(r["pred_step_s"], "{:.2f}"), _num(r["meas_step_s"], "{:.2f}"), _num(r["step_err_pct"]),
            f"{_predicted_verdict(r)}/{_verdict(r['observed_fits'])}", "; ".join(missed_targets(r)),
        ])  # fmt: skip
    return md_table(header, rows)


def placed_now_markdown(frame: pd.DataFrame) -> list[str]:
    """The near-limit rows measured where the committed estimator places them, and their verdicts."""
    if "placed_now" not in frame or not frame["placed_now"].any():
        return []
    rows = frame[frame["placed_now"].astype(bool)]
    right = int(rows["verdict_ok"].fillna(False).astype(bool).sum())
    table = [[r["name"], str(r["intent"]), _num(r["seq"], "{:.0f}"),
              f"{_predicted_verdict(r)}/{_verdict(r['observed_fits'])}"] for _, r in rows.iterrows()]  # fmt: skip
    return [
        "## Near-limit rows where the committed estimator places them",
        f"{len(rows)} measured, verdict right on {right}. (The other near-limit rows ran at sequences chosen "
        "by earlier estimators.)",
        md_table(["row", "intent", "seq", "verdict pred/obs"], table),
    ]


def markdown(frame: pd.DataFrame, caveats: tuple[str, ...] = ()) -> str:
    held_out = frame[~frame["calibration"].astype(bool)]
    counts = frame["status"].value_counts().to_dict()
    predicted = frame["prediction"].value_counts().to_dict() if "prediction" in frame else {"run time": len(frame)}
    per_workload = []
    for workload, rows in frame.groupby("workload") if "workload" in frame else ():
        per_workload += [f"## Summary, {workload} rows", summary_markdown(summary(rows))]
    return "\n\n".join([
        *(["## Read first", "\n".join(f"- {c}" for c in caveats)] if caveats else []),
        "Predictions: " + ", ".join(f"{k} estimator {v} rows" for k, v in sorted(predicted.items())) + ".",
        "## Summary, every row measured at step >= 2",
        summary_markdown(summary(frame)),
        "## Summary, check rows only (not used to fit the runtime constants)",
        summary_markdown(summary(held_out)),
        *per_workload,
        *placed_now_markdown(frame),
        "## Rows",
        "Status counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ". "
        "Errors are (predicted - measured) / measured; negative device-level errors are under-predictions.",
        rows_markdown(frame),
    ]) + "\n"  # fmt: skip


# ---------------------------------------------------------------- plot


def scatter(frame: pd.DataFrame, path: Path) -> None:
    """Predicted vs measured (GiB), allocated and device-level side by side, one marker per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(sorted(frame["kind"].unique()), "osD^vP*X"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (pred, meas, title) in zip(axes, [("pred_alloc", "meas_alloc", "peak allocated"),
                                              ("pred_device", "meas_device", "device-level peak")]):  # fmt: skip
        points = frame[[pred, meas, "kind"]].dropna()
        top = float(max(points[pred].max(), points[meas].max()) / GIB * 1.05) if len(points) else 1.0
        line = pd.Series([0.0, top])
        ax.fill_between(line, line * 0.95, line * 1.05, color="tab:green", alpha=0.15, label="±5%")
        ax.plot(line, line, color="black", linewidth=0.8, label="y = x")
        for kind, group in points.groupby("kind"):
            ax.scatter(group[meas] / GIB, group[pred] / GIB, marker=markers[kind], label=kind)
        ax.set(title=title, xlabel="measured GiB", ylabel="predicted GiB", xlim=(0, top), ylim=(0, top))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(frame: pd.DataFrame, dest: Path, caveats: tuple[str, ...] = ()) -> dict[str, Path]:
    """validation.csv, validation-matrix.md and validation.png in dest (validation-matrix.md, so
    that `--out docs/` leaves the hand-written docs/validation.md alone)."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {"csv": dest / "validation.csv", "markdown": dest / "validation-matrix.md", "png": dest / "validation.png"}
    frame.drop(columns=["config"], errors="ignore").to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(markdown(frame, caveats))
    scatter(frame, paths["png"])
    return paths
