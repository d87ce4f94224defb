"""The allocator replay against the fitted reserve, on one-GPU runs of fitplan's trainer (docs/allocator.md).

    python -m fitplan.validation.replay_table

For every committed one-GPU report of the trainer (tests/data/gpu/lean, knobs, profiles) and
every one-GPU Eagle3 and sft row of the validation matrix (tests/data/gpu/validation, the latest
result of each row): the peak reserved and device level the estimator predicts with the step replayed
through the caching allocator model (fitplan/estimator/replayed.py) and with the fitted reserve
it used before (runtime.allocator_reserve_bytes), against what was measured, and the verdict of
each against what happened. Prints markdown.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from fitplan.config import RunSpec
from fitplan.estimator import estimate, runtime
from fitplan.estimator.result import Estimate
from fitplan.layout import resolve
from fitplan.records import read_measurement, spec_as_committed
from fitplan.units import GIB
from fitplan.validation.figures import measured

# the committed GPU data of a source checkout (the tests pass their own folder)
DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "gpu"
# One-GPU trainer reports: the lean draft (draft_memory lean) and, before it, the plain one.
REPORTS = {"lean": ("lean", "knobs"), "plain": ("profiles",)}


@dataclass(frozen=True)
class Compared:
    name: str
    draft: str
    outcome: str  # "ran" or "oom"
    replayed: Estimate | None  # None: the step is not replayed for this job (fitted reserve only)
    fitted: Estimate
    meas_reserved: int | None = None
    meas_device: int | None = None
    why_not: str = ""

    def device_error(self, est: Estimate | None) -> float | None:
        if est is None or not self.meas_device:
            return None
        return 100.0 * (est.peak_reserved_bytes - self.meas_device) / self.meas_device

    def reserved_error(self, est: Estimate | None) -> float | None:
        if est is None or not self.meas_reserved:
            return None
        predicted = est.peak_reserved_bytes - est.outside_allocator_bytes
        return 100.0 * (predicted - self.meas_reserved) / self.meas_reserved


def fitted_estimate(est: Estimate, job) -> Estimate:
    """The same estimate with the fitted reserve and the stranded-block verdict (no replay)."""
    return replace(est, replay=None, allocator_reserve_bytes=runtime.allocator_reserve_bytes(job, est.peak_allocated_bytes))


def replayed_estimate(est: Estimate, job) -> Estimate:
    """The same estimate with the device level and verdict of the replay (as the estimator takes
    them where it replays the job), also for a job the estimator does not yet replay."""
    from fitplan.estimator import replayed

    if est.replay is not None:
        return est
    replay = replayed.allocator_replay(job)
    return replace(est, replay=replay, allocator_reserve_bytes=max(0, replay.needed_reserved_bytes - est.peak_allocated_bytes))


def compare(job, name: str, outcome: str, meas_reserved: int | None, meas_device: int | None,
            written: bool = False) -> Compared:
    """`written`: replay every job whose sequence is written, also where the estimate keeps the
    fitted reserve (the several-GPU rows, to say how the replay would do there)."""
    from fitplan.estimator.step_events import sequence_unsupported, unsupported

    est = estimate(job)
    why = (sequence_unsupported if written else unsupported)(job) or ""
    return Compared(name, draft_kind(job.spec), outcome, None if why else replayed_estimate(est, job),
                    fitted_estimate(est, job), meas_reserved, meas_device, why)


def draft_kind(spec: RunSpec) -> str:
    """The report's draft as its folder names it: plain where asked, else lean (auto's draft)."""
    return spec.draft_memory or "lean"


def report_rows(kind: str, data: Path = DATA) -> list[Compared]:
    out = []
    for folder in REPORTS[kind]:
        for path in sorted((data / folder).glob("*.report.json")):
            m = read_measurement(path)
            if m is None or m.world != 1 or draft_kind(m.config) != kind:
                continue
            spec = spec_as_committed(m, path)
            figures = measured(m.raw)
            out.append(compare(resolve(spec), path.name, "ran", figures["meas_reserved"], figures["meas_device"]))
    return out


def matrix_rows(data: Path = DATA, workload: str = "eagle3", written: bool = False) -> list[Compared]:
    """One-GPU rows of the validation matrix for `workload` (each row's latest result; busy GPUs
    set aside); `written` as in compare."""
    from fitplan.validation.report import load_results
    from fitplan.validation.repredict import spec_of

    frame = load_results(data / "validation")
    out = []
    for record in frame.to_dict("records"):
        if record.get("world") != 1 or record.get("workload") != workload or record["status"] not in ("ran", "oom"):
            continue
        spec = spec_of(record)
        if spec is None:
            continue
        out.append(compare(resolve(spec), record["name"], record["status"],
                           _bytes(record.get("meas_reserved")), _bytes(record.get("meas_device")), written))
    return out


# `fitplan train` runs on 2 and 4 H200s outside the matrix: each line a command and its measured
# peaks (max over ranks), tests/data/gpu/multi_train_x{2,4}.jsonl
MULTI_RUNS = ("multi_train_x2.jsonl", "multi_train_x4.jsonl")


def train_run_spec(command: str) -> RunSpec:
    """The RunSpec of a recorded `fitplan train` command line (the flags those runs used)."""
    words = shlex.split(command)
    flags = {w[2:].replace("-", "_"): v for w, v in itertools.pairwise(words) if w.startswith("--") and not v.startswith("--")}
    # these runs predate the lean draft: the trainer ran torch's composition (draft_memory plain)
    return RunSpec(model=flags["model"], gpus=flags["gpus"], tp=int(flags["tp"]), seq=int(flags["seq"]),
                   micro_batch=int(flags["micro_batch"]), output_sharding=flags["output_sharding"],
                   draft_memory="plain")


def multi_rows(data: Path = DATA) -> list[Compared]:
    """Several-GPU Eagle3 runs of the trainer: the `fitplan train` runs, then the matrix's rows,
    with the replay of their written sequence beside the fitted reserve the estimate uses."""
    from fitplan.validation.report import load_results
    from fitplan.validation.repredict import spec_of

    out = []
    for name in MULTI_RUNS:
        for line in (data / name).read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                out.append(compare(resolve(train_run_spec(run["command"])), run["run"], "ran", None,
                                   int(run["meas_device"] * GIB), written=True))
    for record in load_results(data / "validation").to_dict("records"):
        if record.get("world", 1) <= 1 or record.get("workload") != "eagle3" or record["status"] not in ("ran", "oom"):
            continue
        spec = spec_of(record)
        if spec is not None:
            out.append(compare(resolve(spec), record["name"], record["status"], _bytes(record.get("meas_reserved")),
                               _bytes(record.get("meas_device")), written=True))
    return out


def _bytes(value) -> int | None:
    """A measured figure of a result row; None where it is missing (NaN in the frame)."""
    return None if value is None or math.isnan(value) else int(value)


# ------------------------------------------------------------------ markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _gib(value: int | None) -> str:
    return "-" if not value else f"{value / GIB:.2f}"


def _verdict(est: Estimate | None) -> str:
    if est is None:
        return "-"
    replay = est.replay
    retries = f" ({replay.num_alloc_retries} retries)" if replay is not None and replay.num_alloc_retries else ""
    return f"{est.verdict.value}{retries}"


def reports_table(rows: list[Compared]) -> str:
    head = ("| report | measured reserved | replay | fitted | measured device | device: replay | device: fitted |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        replay = "not replayed" if r.replayed is None else (
            f"{_gib(r.replayed.peak_reserved_bytes - r.replayed.outside_allocator_bytes)} "
            f"({_pct(r.reserved_error(r.replayed))})")
        fitted = f"{_gib(r.fitted.peak_reserved_bytes - r.fitted.outside_allocator_bytes)} ({_pct(r.reserved_error(r.fitted))})"
        lines.append(f"| {r.name} | {_gib(r.meas_reserved)} | {replay} | {fitted} | {_gib(r.meas_device)} | "
                     f"{_pct(r.device_error(r.replayed))} | {_pct(r.device_error(r.fitted))} |")
    return "\n".join(lines)


def matrix_table(rows: list[Compared]) -> str:
    head = ("| row | outcome | device: replay | device: fitted | verdict: replay | verdict: fitted |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.name} | {r.outcome} | {_pct(r.device_error(r.replayed))} | {_pct(r.device_error(r.fitted))} | "
                     f"{_verdict(r.replayed) if r.replayed else 'not replayed: ' + r.why_not} | {_verdict(r.fitted)} |")
    return "\n".join(lines)


def summary(rows: list[Compared]) -> str:
    """Median and largest |device error|, the largest under-prediction, on the rows both predict
    and that ran; verdicts right."""
    both = [r for r in rows if r.replayed is not None and r.meas_device]
    out = []
    for label, pick in (("replay", lambda r: r.replayed), ("fitted", lambda r: r.fitted)):
        errors = [abs(r.device_error(pick(r))) for r in both]
        right = sum(_right(pick(r), r.outcome) for r in rows if r.replayed is not None)
        judged = sum(1 for r in rows if r.replayed is not None)
        under = [-r.device_error(pick(r)) for r in both if r.device_error(pick(r)) < -3.0]
        if errors:
            out.append(f"{label}: device-level |error| median {statistics.median(errors):.1f}%, "
                       f"max {max(errors):.1f}% over {len(errors)} runs; under by more than 3% on {len(under)}"
                       f"{f' (at most {max(under):.1f}%)' if under else ''}; verdict right on {right} of {judged}")
    return "\n".join(f"- {line}" for line in out)


def _right(est: Estimate, outcome: str) -> bool:
    """A verdict is right when `fits` ran or a job not predicted to fit OOMed (`at risk` that ran is wrong, safe)."""
    return est.fits == (outcome == "ran")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m fitplan.validation.replay_table",
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    for kind in REPORTS:
        rows = report_rows(kind)
        print(f"### One-GPU trainer reports, {kind} draft\n\n{reports_table(rows)}\n\n{summary(rows)}\n")
    rows = matrix_rows()
    print(f"### One-GPU Eagle3 rows of the validation matrix (plain draft)\n\n{matrix_table(rows)}\n\n{summary(rows)}\n")
    rows = matrix_rows(workload="sft", written=True)
    print(f"### One-GPU sft rows of the validation matrix (trainer/sft_step.py; the estimate takes the replay)\n\n{matrix_table(rows)}\n\n{summary(rows)}\n")
    rows = multi_rows()
    print(f"### Several GPUs (FSDP2 zero2 draft, TP target; the estimate keeps the fitted reserve)\n\n"
          f"{matrix_table(rows)}\n\n{summary(rows)}\n")


if __name__ == "__main__":
    main()
