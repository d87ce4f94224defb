"""Stops: SIGTERM or SIGINT to any process of a two-rank run (gloo on CPU) — the `fitplan`
launcher, torchrun, one worker — stops every rank after the current step, keeps a checkpoint of
the last completed step, writes the report and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_trainer import DRAFT, TARGET

pytest.importorskip("torch")

STARTUP_TIMEOUT_S = 180
STOP_TIMEOUT_S = 90


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "target.json").write_text(json.dumps(TARGET))
    (tmp_path / "draft.json").write_text(json.dumps(DRAFT))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fitplan.cli", "train", "--model", str(tmp_path / "target.json"),
           "--draft", str(tmp_path / "draft.json"), "--gpus", "2xH100", "--tp", "1", "--seq", "32", "--ttt", "2",
           "--attention", "sdpa", "--random-weights", "--synthetic-data", "--steps", "100000", "--save-every", "1",
           "--device", "cpu", "--output", str(out), "--json"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (out / "step-000002").is_dir():
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            raise AssertionError(f"the run did not reach step 2: {launcher.communicate()[1][-3000:]!r}")
        time.sleep(0.2)
    return launcher, out


@pytest.mark.slow
@pytest.mark.parametrize("target,sig", [("launcher", signal.SIGTERM), ("torchrun", signal.SIGTERM),
                                        ("worker", signal.SIGTERM), ("launcher", signal.SIGINT)])
def test_a_stop_to_any_process_stops_every_rank_and_keeps_the_work(tmp_path, target, sig):
    launcher, out = start_run(tmp_path)
    torchrun = children(launcher.pid)
    assert len(torchrun) == 1
    workers = children(torchrun[0])
    assert len(workers) == 2
    pid = {"launcher": launcher.pid, "torchrun": torchrun[0], "worker": workers[1]}[target]
    os.kill(pid, sig)
    try:
        launcher.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if launcher.poll() is None:  # leave nothing behind even when the test fails
            os.killpg(launcher.pid, signal.SIGKILL)
            for p in torchrun:
                os.killpg(p, signal.SIGKILL)
    for p in torchrun + workers:
        deadline = time.monotonic() + 10
        while alive(p) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(p), f"process {p} outlived the run"
    report = json.loads((out / "report.json").read_text())
    last = report["steps"][-1]["step"]
    assert report["stopped_at"] == last
    assert (out / f"step-{last:06d}").is_dir()  # a checkpoint of the last step that completed


LATE_STOP = '''
import os, signal, sys
from trainer import loop
finish = loop._finish
def stopped_then_finish(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives after the last step, before the report
    return finish(*args, **kwargs)
loop._finish = stopped_then_finish
from fitplan.cli import main
sys.argv = ["fitplan", *sys.argv[1:]]
main()
'''


def test_a_stop_after_the_last_step_still_writes_the_report(tmp_path):
    (tmp_path / "target.json").write_text(json.dumps(TARGET))
    (tmp_path / "draft.json").write_text(json.dumps(DRAFT))
    script = tmp_path / "late_stop.py"
    script.write_text(LATE_STOP)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(script), "train", "--model", str(tmp_path / "target.json"), "--draft",
         str(tmp_path / "draft.json"), "--seq", "32", "--ttt", "2", "--attention", "sdpa", "--random-weights",
         "--synthetic-data", "--steps", "2", "--device", "cpu", "--output", str(out), "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [1, 2] and report["comparison"]
