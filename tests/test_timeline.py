"""`fitplan estimate --timeline`: the replayed step drawn, and its bad inputs refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from fitplan.allocator import Event  # noqa: E402
from fitplan.render.timeline import allocated_over_time, largest_request  # noqa: E402

SNAPSHOT = Path(__file__).parent / "data" / "allocator" / "c_train_step.pickle.gz"
JOB = ["--model", "llama-3.2-1b", "--gpus", "1xH200", "--seq", "1024"]


def fitplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitplan.cli", "estimate", *args], capture_output=True, text=True)


def test_allocated_and_largest_by_hand():
    events = [Event("alloc", 1, 100), Event("alloc", 2, 300), Event("free", 1), Event("alloc", 3, 50), Event("free", 2)]
    # 100, 100 + 300, 400 - 100, 300 + 50, 350 - 300
    assert allocated_over_time(events) == [(0, 100), (1, 400), (2, 300), (3, 350), (4, 50)]
    assert largest_request(events) == (1, 300)


def test_html_timeline_holds_the_figure_and_the_replay(tmp_path):
    out = tmp_path / "step.html"
    done = fitplan(*JOB, "--timeline", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "<svg" in text and "peak reserved (replay)" in text and "retries" in text
    assert f"timeline written to {out}" in done.stdout


def test_png_timeline_with_a_measured_snapshot(tmp_path):
    out = tmp_path / "step.png"
    done = fitplan(*JOB, "--timeline", str(out), "--snapshot", str(SNAPSHOT))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,says", [
    (["--snapshot", str(SNAPSHOT)], "give --timeline FILE too"),
    (["--timeline", "{tmp}/t.html", "--snapshot", "{tmp}/none.pickle"], "no such file"),
    (["--timeline", "{tmp}/t.docx"], "accepted suffixes"),
    (["--timeline", "{tmp}/nodir/t.png"], "does not exist"),
    (["--timeline", "{tmp}/t.png", "--gpus", "2xH200", "--tp", "2"], "--timeline"),
])
def test_bad_timeline_input_is_one_line_exit_2(tmp_path, args, says):
    done = fitplan(*JOB, *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
