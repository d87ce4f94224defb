"""The whole input space answers: every model profile x every GPU kind x 1, 2 and 8 GPUs x
eagle3 and sft x both runtimes, through estimate, fit, check, diff and explain.

An answer is a result or a one-line refusal (FitplanError; on the command line exit 2 and one
`error:` line), never a traceback. The planner's entry points take the whole space (2,880
jobs); the command line takes a sample in which every value of every axis appears, so the
rendering of each model, GPU kind, count, workload and runtime runs too.
"""

from __future__ import annotations

import itertools

import pytest
import yaml
from typer.testing import CliRunner

from fitplan.check import CheckRow, component_deltas, phase_deltas
from fitplan.cli import app
from fitplan.commands.fit import result_json
from fitplan.render.fit import summary_lines
from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.estimator import estimate
from fitplan.explain import config_lines, parse_ooms
from fitplan.ladder import fit
from fitplan.layout import resolve
from fitplan.profiles import gpu_names, model_names

COUNTS = (1, 2, 8)
WORKLOADS = ("eagle3", "sft")
RUNTIMES = ("fitplan", "specforge")
OOM_LOG = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
    "79.19 GiB of which 1.20 GiB is free. Including non-PyTorch memory, this process has 77.98 GiB memory in "
    "use. Of the allocated memory 74.10 GiB is allocated by PyTorch, and 2.37 GiB is reserved by PyTorch but "
    "unallocated."
)


def space():
    return itertools.product(model_names(), gpu_names(), COUNTS, WORKLOADS, RUNTIMES)


def plan_one(model: str, gpu: str, count: int, workload: str, runtime: str) -> str:
    """Everything the five commands compute for one job; 'refused' or 'answered'."""
    spec = RunSpec(model=model, gpus=f"{count}x{gpu}", workload=workload, runtime=runtime)
    try:
        job = resolve(spec)
    except FitplanError as exc:
        assert "\n" not in str(exc)
        return "refused"
    est = estimate(job)
    assert est.peak_reserved_bytes > 0 and est.verdict in ("fits", "at risk", "OOM")
    shorter = estimate(resolve(spec.replace(seq=spec.seq // 2)))
    CheckRow("job.yaml", est, shorter, 0.05).to_json()  # check --against
    component_deltas(shorter, est), phase_deltas(shorter, est)  # diff
    result = fit(spec)  # fit
    result_json(result)
    summary_lines(result)
    config_lines(parse_ooms(OOM_LOG)[0], result)  # explain with the job
    return "answered"


def test_every_job_of_the_space_answers_through_the_planner():
    outcomes = {}
    for job in space():
        try:
            outcomes[job] = plan_one(*job)
        except Exception as exc:  # noqa: BLE001 - the point: any other exception is a defect
            pytest.fail(f"{job}: {type(exc).__name__}: {exc}")
    answered = sum(o == "answered" for o in outcomes.values())
    assert len(outcomes) == 16 * 15 * 3 * 2 * 2
    # Refusals are the rules at work (sft has no specforge runtime, tp that splits no model, ...),
    # not most of the space.
    assert answered > len(outcomes) / 2


def cli_sample() -> list[tuple[str, str, int, str, str]]:
    """Every value of every axis at least once: each axis cycles through 48 rows (by the Chinese
    remainder theorem the 12 count x workload x runtime combinations all appear too)."""
    axes = (model_names(), gpu_names(), COUNTS, WORKLOADS, RUNTIMES)
    rows = [tuple(axis[i % len(axis)] for axis in axes) for i in range(48)]
    for k, axis in enumerate(axes):
        assert {row[k] for row in rows} == set(axis)
    return rows


def assert_answered(result, what: str) -> None:
    """exit 0 or 1 with output, or exit 2 with exactly one `error:` line; never a traceback."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{what}: {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code in (0, 1, 2), what
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: {result.output}"
    else:
        assert result.output.strip(), what


@pytest.mark.parametrize("model,gpu,count,workload,runtime", cli_sample())
def test_every_command_answers_on_the_command_line(tmp_path, model, gpu, count, workload, runtime):
    runner = CliRunner()
    flags = ["--model", model, "--gpus", f"{count}x{gpu}", "--workload", workload, "--runtime", runtime]
    config = {"model": model, "gpus": f"{count}x{gpu}", "workload": workload, "runtime": runtime}
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(yaml.safe_dump(config))
    new.write_text(yaml.safe_dump({**config, "seq": 8192}))
    log = tmp_path / "oom.log"
    log.write_text(OOM_LOG)
    commands = {
        "estimate": ["estimate", *flags],
        "estimate --json": ["estimate", *flags, "--json"],
        "fit": ["fit", *flags],
        "check": ["check", str(old), str(new)],
        "diff": ["diff", str(old), str(new)],
        "explain": ["explain", str(log), *flags],
    }
    for what, args in commands.items():
        assert_answered(runner.invoke(app, args, env={"COLUMNS": "80"}), f"{what} {model} {count}x{gpu} {workload} {runtime}")
