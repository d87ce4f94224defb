"""The runner: skip reasons on machines without the right GPUs, reading child reports, near-limit rows."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.validation import matrix, runner
from fitplan.validation.matrix import MATRIX, near_limit_value, select
from fitplan.validation.runner import LocalGpus, outcome, run, run_row, skip_reason

GIB = 1 << 30
MIB = 1 << 20
H100_ROW = select(MATRIX, "nvidia-h100-x1")[0]
H200_X4_ROW = select(MATRIX, "nvidia-h200-x4")[0]


def test_no_gpu_skips_every_row_and_still_writes_the_table(tmp_path):
    rows = select(MATRIX, "nvidia-h200-x2")
    results = run(rows, tmp_path, gpus=LocalGpus("", 0))
    assert [r["status"] for r in results] == ["skipped"] * len(rows)
    assert {r["reason"] for r in results} == {"no GPU on this machine"}
    table = (tmp_path / "validation-matrix.md").read_text()
    assert all(r.name in table for r in rows)
    assert len((tmp_path / "validation.csv").read_text().splitlines()) == len(rows) + 1
    assert (tmp_path / "validation.png").stat().st_size > 0


def test_wrong_gpu_kind_and_too_few_gpus_are_named():
    assert skip_reason(H200_X4_ROW, LocalGpus("NVIDIA H100 80GB HBM3", 8)) == (
        "needs H200-SXM-141GB; this machine has NVIDIA H100 80GB HBM3"
    )
    assert skip_reason(H200_X4_ROW, LocalGpus("NVIDIA H200", 2)) == "needs 4 GPUs; this machine has 2"
    assert skip_reason(H200_X4_ROW, LocalGpus("NVIDIA H200", 4)) is None


def test_cli_on_this_gpu_less_machine(tmp_path):
    result = CliRunner().invoke(app, ["validate", "--kind", "nvidia-h100-x1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == len(select(MATRIX, "nvidia-h100-x1"))
    assert all(json.loads(line)["reason"] == "no GPU on this machine" for line in lines)


def test_cli_bad_filters_exit_2(tmp_path):
    for args in (["--kind", "nvidia-a100"], ["--rows", "no-such-row*"]):
        result = CliRunner().invoke(app, ["validate", "--out", str(tmp_path), *args])
        assert result.exit_code == 2
        assert "Traceback" not in result.output


# ---------------------------------------------------------------- what a child leaves behind


def _report(steps):
    return {"config": {"model": "llama-3.1-8b"}, "device": "gpu0",
            "steps": [{"step": n, "phases": phases, "seconds": t} for n, phases, t in steps]}


def test_measured_figures_are_the_steady_state_peaks(tmp_path):
    # step 1 is larger on purpose (a first-step spike must not count); steps 2 and 3 by hand:
    # allocated max(5, 7, 6, 4) = 7 GiB, reserved max = 8 GiB, device_used max = 9 GiB,
    # step time median(2.0, 4.0) = 3.0 s
    steps = [
        (1, {"forward": {"allocated": 50 * GIB, "reserved": 50 * GIB, "device_used": 51 * GIB}}, 10.0),
        (2, {"forward": {"allocated": 5 * GIB, "reserved": 6 * GIB, "device_used": 7 * GIB},
             "backward": {"allocated": 7 * GIB, "reserved": 8 * GIB, "device_used": 9 * GIB}}, 2.0),
        (3, {"forward": {"allocated": 6 * GIB, "reserved": 7 * GIB, "device_used": 8 * GIB},
             "backward": {"allocated": 4 * GIB, "reserved": 8 * GIB, "device_used": 9 * GIB}}, 4.0),
    ]  # fmt: skip
    (tmp_path / "report.json").write_text(json.dumps(_report(steps)))
    got = outcome(0, "", tmp_path)
    assert got["status"] == "ran" and got["observed_fits"] is True
    assert (got["meas_alloc"], got["meas_reserved"], got["meas_device"]) == (7 * GIB, 8 * GIB, 9 * GIB)
    assert got["meas_step_s"] == 3.0


def test_oom_from_a_rank_report_or_from_stderr(tmp_path):
    (tmp_path / "report.rank1.json").write_text(json.dumps({**_report([]), "oom": {"message": "CUDA out of memory."}}))
    assert outcome(1, "", tmp_path)["status"] == "oom"
    empty = tmp_path / "empty"
    empty.mkdir()
    text = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    got = outcome(1, text, empty)
    assert (got["status"], got["observed_fits"]) == ("oom", False)
    assert "Tried to allocate 2.00 GiB" in got["reason"]
    failed = outcome(1, "ValueError: bad shape\n", empty)
    assert failed["status"] == "failed" and "bad shape" in failed["reason"]


def _fake_child(monkeypatch, script: str):
    monkeypatch.setattr(runner, "command", lambda spec, world, plan, report: [sys.executable, "-c", script, str(report)])


def test_a_row_runs_in_a_fresh_process_and_is_read_back(tmp_path, monkeypatch):
    report = _report([(2, {"forward": {"allocated": 3 * GIB, "reserved": 4 * GIB, "device_used": 5 * GIB}}, 1.5)])
    script = (f"import sys, pathlib; p = pathlib.Path(sys.argv[1]); p.write_text({json.dumps(report)!r}); "
              "(p.parent / 'checkpoint').mkdir(); (p.parent / 'memory_snapshot.pickle').write_bytes(b'x')")
    _fake_child(monkeypatch, script)
    got = run_row(H100_ROW, LocalGpus("NVIDIA H100 80GB HBM3", 1), tmp_path)
    assert got["status"] == "ran", got
    assert (got["meas_alloc"], got["meas_device"], got["meas_step_s"]) == (3 * GIB, 5 * GIB, 1.5)
    workdir = tmp_path / "runs" / H100_ROW.name
    plan = (workdir / "plan.yaml").read_text()
    assert "fitplan_plan: 1" in plan and "model: llama-3.1-8b" in plan
    # checkpoints and snapshots are dropped; plan, report and output stay
    assert sorted(p.name for p in workdir.iterdir()) == ["plan.yaml", "report.json", "stderr.txt", "stdout.txt"]


def test_a_row_that_hangs_times_out(tmp_path, monkeypatch):
    _fake_child(monkeypatch, "import time; time.sleep(60)")
    got = run_row(H100_ROW, LocalGpus("NVIDIA H100 80GB HBM3", 1), tmp_path, timeout_s=1)
    assert got["status"] == "timeout" and got["wall_s"] < 30


# ---------------------------------------------------------------- matrix


def test_matrix_covers_what_the_issue_asks():
    names = [r.name for r in MATRIX]
    assert len(MATRIX) >= 30 and len(set(names)) == len(names)
    assert {r.kind for r in MATRIX} == set(matrix.KINDS)
    specs = [r.base_spec() for r in MATRIX]
    assert {s.workload for s in specs} == {"eagle3", "sft"}
    assert {s.model for s in specs} == {"llama-3.1-8b", "qwen3-8b", "gpt-oss-20b", "gpt-oss-120b"}
    assert {s.precision for s in specs} == {"mixed", "fp32-autocast", "bf16-master", "bf16"}
    assert {s.ac for s in specs} == {True, False}
    assert {s.output_sharding for s in specs if s.tp and s.tp > 1} == {"gather", "all-to-all"}
    assert {s.sharding for s in specs if s.workload == "sft" and r_world(s) > 1} == {"zero2", "zero3"}
    fixed = [r for r in MATRIX if r.search is None]
    assert min(r.spec["seq"] for r in fixed) == 1024 and max(r.spec["seq"] for r in fixed) == 32768
    assert {r.spec["micro_batch"] for r in fixed} >= {1, 8}
    assert sum(r.intent == "near-fit" for r in MATRIX) >= 5 and sum(r.intent == "near-oom" for r in MATRIX) >= 5
    calibration = [r for r in MATRIX if r.calibration]
    assert {r.world > 1 for r in calibration} == {True, False}  # both constants can be fitted
    assert not any(r.calibration for r in MATRIX if r.search)  # verdict rows are never fitted on


def r_world(spec: RunSpec) -> int:
    return int(spec.gpus.split("x")[0])


def _linear_estimate(spec: RunSpec):
    """A stand-in estimator: 10 MiB per token of seq on a 100 GiB device, 1 MiB more per token
    if fragmentation strands a block of the largest request."""
    return SimpleNamespace(required_bytes=spec.seq * 10 * MIB, required_if_fragmented_bytes=spec.seq * 11 * MIB,
                           gpu_total_bytes=100 * GIB)  # fmt: skip


def test_near_limit_seq_by_hand():
    spec = RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=256)
    # near-fit, by the fragmented need: seq * 11 MiB <= 0.97 * 100 GiB, i.e. seq <= 9029.8 -> 8960 (9216 is over)
    assert near_limit_value(spec, "seq", "near-fit", _linear_estimate) == 8960
    # near-oom, by the plain need: load(seq) = seq * 10 MiB / 100 GiB = seq / 10240.
    # near-oom: smallest multiple of 256 with seq / 10240 >= 1.03, i.e. seq >= 10547.2 -> 10752 (10496 is under)
    assert near_limit_value(spec, "seq", "near-oom", _linear_estimate) == 10752


def test_near_limit_out_of_range_is_a_clean_error():
    tiny = lambda spec: SimpleNamespace(required_bytes=spec.seq, gpu_total_bytes=100 * GIB)  # noqa: E731
    with pytest.raises(FitplanError, match="no seq in 256..32768 runs out of memory"):
        near_limit_value(RunSpec(model="llama-3.1-8b"), "seq", "near-oom", tiny)


def test_parallel_rows_get_disjoint_gpus_and_overlap(tmp_path, monkeypatch):
    # each fake child records the GPUs it was given and when it ran, then sleeps a little
    script = ("import json, os, sys, time, pathlib; t0 = time.time(); time.sleep(1.5); "
              "pathlib.Path(sys.argv[1]).write_text(json.dumps({'config': {'model': 'llama-3.1-8b'}, "
              "'device': os.environ['CUDA_VISIBLE_DEVICES'], "
              "'window': [t0, time.time()], 'steps': [{'step': 2, 'seconds': 1.0, 'phases': {'forward': "
              "{'allocated': 1, 'reserved': 1, 'device_used': 1}}}]}))")  # fmt: skip
    _fake_child(monkeypatch, script)
    x4, x2 = select(MATRIX, "nvidia-h200-x4")[0], select(MATRIX, "nvidia-h200-x2")[:2]
    x1 = select(MATRIX, "nvidia-h200")[:3]
    rows = [x4, *x2, *x1]
    results = run(rows, tmp_path, gpus=LocalGpus("NVIDIA H200", 4), parallel=True)
    assert [r["status"] for r in results].count("ran") == 6
    by_name = {r["name"]: r for r in results}
    assert by_name[x4.name]["gpu_ids"] == [0, 1, 2, 3]
    windows = {}
    for row in rows:
        report = json.loads((tmp_path / "runs" / row.name / "report.json").read_text())
        assert report["device"] == ",".join(map(str, by_name[row.name]["gpu_ids"]))
        windows[row.name] = (report["window"], set(by_name[row.name]["gpu_ids"]))
    # the two 2-GPU rows ran at the same time on different GPUs, after the 4-GPU row ended
    (a, ga), (b, gb) = windows[x2[0].name], windows[x2[1].name]
    assert ga.isdisjoint(gb) and a[0] < b[1] and b[0] < a[1]
    assert min(a[0], b[0]) >= windows[x4.name][0][1]
    # rows that overlapped in time never shared a GPU
    for name, (w, g) in windows.items():
        for other, (w2, g2) in windows.items():
            if name != other and w[0] < w2[1] and w2[0] < w[1]:
                assert g.isdisjoint(g2), (name, other)


def test_parallel_on_a_gpu_less_machine_skips_and_returns(tmp_path):
    rows = select(MATRIX, "nvidia-h200-x4")[:2] + select(MATRIX, "nvidia-h200")[:1]
    results = run(rows, tmp_path, gpus=LocalGpus("", 0), parallel=True)
    assert [r["reason"] for r in results] == ["no GPU on this machine"] * 3


def test_timeout_with_an_oom_in_stderr_is_an_oom(tmp_path, monkeypatch):
    # rank 1 ran out of memory, rank 0 hangs in a collective until the row's time is up
    _fake_child(monkeypatch, "import sys, time; print('torch.OutOfMemoryError: CUDA out of memory.', file=sys.stderr, flush=True); time.sleep(60)")
    got = run_row(H100_ROW, LocalGpus("NVIDIA H100 80GB HBM3", 1), tmp_path, timeout_s=2)
    assert got["status"] == "oom" and got["wall_s"] < 30


def test_kill_tree_reaches_workers_in_their_own_session(tmp_path):
    # like torchrun: the child starts a worker in a new session, so killing the child's process
    # group would leave the worker running
    import os
    import subprocess
    import time

    pid_file = tmp_path / "worker.pid"
    script = ("import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(60)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    assert worker in runner.descendants(child.pid)
    runner.kill_tree(child.pid)
    child.wait(timeout=10)
    for _ in range(100):  # the worker is reaped by init once killed
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        state = open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the worker survived")
