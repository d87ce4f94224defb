"""`fitplan train`'s outputs and resumes: checked before work, locked, surviving full or read-only
disks mid-run, and resuming from the last good state (tiny Llama target on CPU)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_trainer import configs, options  # noqa: E402,F401  (configs: the module's fixture)
from trainer import checkpoint, loop  # noqa: E402
from trainer.loop import run  # noqa: E402

SMALL = dict(seq=16, ttt=2, micro_batch=1, attention="eager")


def small(configs, output: Path, steps: int, save_every: int = 0, **changes):
    opts = options(configs, output, **SMALL)
    opts.steps, opts.save_every, opts.lr = steps, save_every, 1e-3
    for k, v in changes.items():
        setattr(opts, k, v)
    return opts


def cli(configs, *args: str):
    from typer.testing import CliRunner

    from fitplan.cli import app

    target, draft = configs
    return CliRunner().invoke(app, [
        "train", "--model", target, "--draft", draft, "--device", "cpu", "--attention", "eager", "--seq", "16",
        "--ttt", "2", "--tp", "1", "--micro-batch", "1", "--random-weights", "--synthetic-data", *args])


def one_error_line(result, code: int = 2) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the target is loaded: refusals must come before any model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_target", refuse)


@pytest.fixture(scope="module")
def base(configs, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(small(configs, out, steps=4, save_every=2))
    return out


def copy_of(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


# ------------------------------------------------------------------ refused before anything loads


@pytest.mark.parametrize("args,flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--warmup", "9", "--steps", "4"], "--warmup"), (["--warmup", "-1"], "--warmup"),
    (["--seed", str(2**70)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--save-every", "-1"], "--save-every"),
])
def test_out_of_range_numbers_are_one_line_before_loading(configs, tmp_path, no_load, args, flag):
    line = one_error_line(cli(configs, "-o", str(tmp_path / "run"), *args))
    assert flag in line and ("above 0" in line or " to " in line or "or more" in line or "or a positive" in line)
    assert not (tmp_path / "run").exists()


def test_outputs_that_cannot_take_a_run_are_refused_before_loading(configs, tmp_path, no_load, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in one_error_line(cli(configs, "-o", str(afile)))
    assert "cannot create" in one_error_line(cli(configs, "-o", "/proc/x"))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        (readonly / "probe").write_text("")
        (readonly / "probe").unlink()
        writer = checkpoint.write_file  # root writes anyway: make the folder refuse writes as a read-only mount does

        def read_only(path, fill):
            if Path(path).parent == readonly:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return writer(path, fill)

        monkeypatch.setattr(checkpoint, "write_file", read_only)
    except PermissionError:
        pass
    line = one_error_line(cli(configs, "-o", str(readonly)))
    assert "cannot write there" in line and str(readonly) in line
    assert list(readonly.iterdir()) == []
    readonly.chmod(0o755)


HOLDER = """
import fcntl, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode())
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_busy_output_is_refused_and_a_stale_lock_taken_over(configs, tmp_path, no_load, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / checkpoint.LOCK
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        line = one_error_line(cli(configs, "-o", str(out), "--steps", "2"))
        assert "in use" in line and f"PID {holder.pid}" in line and str(lock) in line
    finally:
        holder.kill()  # dies holding it: its lock file stays, naming a PID that is gone
        holder.wait()
    assert lock.read_text().split()[0] == str(holder.pid)
    # a lock file naming a live process that does not hold flock (another kind of file system) still refuses
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")
    assert f"PID {os.getppid()}" in one_error_line(cli(configs, "-o", str(out)))
    lock.write_text(f"{holder.pid} {socket.gethostname()}\n")
    with checkpoint.claim_output(out, print):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert f"stale lock {lock}" in capsys.readouterr().out
    assert not lock.exists()  # released


def test_leftovers_of_interrupted_writes_are_cleared_when_the_output_is_claimed(tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".tmp-step-000009").mkdir(parents=True)
    (out / ".tmp-step-000009" / "model.safetensors").write_bytes(b"half")
    (out / ".old-step-000004").mkdir()  # moved aside, its replacement never renamed in: it comes back
    (out / ".old-step-000004" / "training_state.pt").write_bytes(b"x")
    with checkpoint.claim_output(out, print):
        assert sorted(p.name for p in out.iterdir()) == [checkpoint.LOCK, "step-000004"]
    assert ".tmp-step-000009" in capsys.readouterr().out


# ------------------------------------------------------------------ resume finds the last good state


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated state": lambda d: truncate(d / checkpoint.STATE),
    "empty state": lambda d: (d / checkpoint.STATE).write_bytes(b""),
    "garbage state": lambda d: (d / checkpoint.STATE).write_bytes(os.urandom(4096)),
    "missing weights": lambda d: (d / "model.safetensors").unlink(),
    "truncated weights": lambda d: truncate(d / "model.safetensors"),
    "garbage config": lambda d: (d / "config.json").write_text("{not json"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_skips_a_broken_newest_checkpoint_for_the_newest_intact_one(configs, base, tmp_path, capsys,
                                                                          corruption):
    out = copy_of(base, tmp_path)
    CORRUPTIONS[corruption](out / "step-000004")
    found = checkpoint.find(out, loop.fingerprint(small(configs, out, 6)), notice=print)
    assert found.path == out / "step-000002" and found.step == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "skipping" in lines[0] and str(out / "step-000004") in lines[0]
    if corruption == "truncated state":  # the whole resume, once: steps 3..6 retrained, 3 and 4 kept as replaced
        report = run(small(configs, out, steps=6, save_every=2, resume=True))
        assert [s["step"] for s in report["steps"]] == [1, 2, 3, 4, 5, 6]
        assert [s["step"] for s in report["replaced_steps"]] == [3, 4]
        assert report["segments"][-1]["resumed_from"] == str(out / "step-000002")
        assert checkpoint.find(out, loop.fingerprint(small(configs, out, 6))).step == 6


def test_resume_without_an_intact_checkpoint_is_one_line(configs, base, tmp_path, no_load):
    out = copy_of(base, tmp_path)
    CORRUPTIONS["empty state"](out / "step-000004")
    CORRUPTIONS["missing weights"](out / "step-000002")
    line = one_error_line(cli(configs, "-o", str(out), "--resume", "--steps", "6"))
    assert "no intact checkpoint" in line and "step-000004" in line and "step-000002" in line


def test_resume_appends_to_the_report_and_extends_the_schedule(configs, tmp_path, capsys):
    out = tmp_path / "run"
    first = run(small(configs, out, steps=4, warmup=2))
    resumed = run(small(configs, out, steps=8, warmup=2, resume=True))
    assert "schedule extended from 4 to 8 steps" in capsys.readouterr().out
    fresh = run(small(configs, tmp_path / "fresh", steps=8, warmup=2))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["steps"] == resumed["steps"]
    assert [s["step"] for s in on_disk["steps"]] == list(range(1, 9))
    assert [s["segment"] for s in on_disk["steps"]] == [0] * 4 + [1] * 4
    assert [s["loss"] for s in on_disk["steps"][:4]] == [s["loss"] for s in first["steps"]]
    assert [(g["first_step"], g["last_step"]) for g in on_disk["segments"]] == [(1, 4), (5, 8)]
    assert on_disk["segments"][1]["resumed_from"] == str(out / "step-000004")
    # the learning rate each of steps 5..8 trained with is a fresh 8-step run's
    for got, want in zip(on_disk["steps"][4:], fresh["steps"][4:]):
        assert math.isclose(got["lr"], want["lr"], rel_tol=1e-9), (got["step"], got["lr"], want["lr"])
    assert on_disk["steps"][4]["lr"] > 0  # the 4-step schedule had decayed to 0 there
    with pytest.raises(checkpoint.FitplanError, match="at step 8 and --steps is 8"):
        run(small(configs, out, steps=8, warmup=2, resume=True))


# ------------------------------------------------------------------ storage failing mid-run


def failing_writer(monkeypatch, code: int, when) -> list:
    """checkpoint.write_file raising OSError(code) for the paths `when` picks; returns the failures."""
    writer, failed = checkpoint.write_file, []

    def write(path, fill):
        if when(Path(path)):
            failed.append(Path(path))
            raise OSError(code, os.strerror(code))
        return writer(path, fill)

    monkeypatch.setattr(checkpoint, "write_file", write)
    return failed


def dev_full(monkeypatch, when) -> list:
    """The real thing: the chosen files are opened on /dev/full (the kernel answers ENOSPC)."""
    failed = []

    def opener(path, mode="r", *args, **kwargs):
        if "w" in mode and when(Path(path)):
            failed.append(Path(path))
            return open("/dev/full", mode, *args, **kwargs)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", opener, raising=False)
    return failed


def failing_report(monkeypatch, code: int, nth: int) -> list:
    """The report writer raising OSError(code) at its nth call."""
    writer, calls = loop.write_measurement, []

    def write(path, report):
        calls.append(path)
        if len(calls) == nth:
            raise OSError(code, os.strerror(code), str(path))
        return writer(path, report)

    monkeypatch.setattr(loop, "write_measurement", write)
    return calls


def report_on_dev_full(monkeypatch, nth: int) -> list:
    """The report writer's nth file opened on /dev/full (the kernel answers ENOSPC)."""
    from fitplan import records

    calls = []

    def opener(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith("report.json.tmp"):
            calls.append(path)
            if len(calls) == nth:
                return open("/dev/full", mode, *args, **kwargs)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(records, "open", opener, raising=False)
    return calls


STEP4 = lambda p: ".tmp-step-000004" in str(p)  # noqa: E731
FAULTS = {
    "disk full writing a checkpoint's weights": (lambda m: failing_writer(
        m, errno.ENOSPC, lambda p: STEP4(p) and p.name == "model.safetensors"), "step-000002", "No space left"),
    "read-only writing a checkpoint's state": (lambda m: failing_writer(
        m, errno.EROFS, lambda p: STEP4(p) and p.name == checkpoint.STATE), "step-000002", "Read-only"),
    "/dev/full under a checkpoint's state": (lambda m: dev_full(
        m, lambda p: STEP4(p) and p.name == checkpoint.STATE), "step-000002", "No space left"),
    "disk full before any checkpoint": (lambda m: failing_writer(
        m, errno.ENOSPC, lambda p: ".tmp-step-000002" in str(p)), None, "No space left"),
    "disk full writing the report at a checkpoint": (lambda m: failing_report(m, errno.ENOSPC, 2), "step-000004",
                                                     "No space left"),
    "read-only writing the final report": (lambda m: failing_report(m, errno.EROFS, 3), "step-000006", "Read-only"),
    "/dev/full under the report at a checkpoint": (lambda m: report_on_dev_full(m, 1), "step-000002",
                                                   "No space left"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_disk_failing_mid_run_stops_in_one_line_and_keeps_every_checkpoint(configs, tmp_path, monkeypatch,
                                                                             fault):
    inject, kept, reason = FAULTS[fault]
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        failed = inject(m)
        result = cli(configs, "-o", str(out), "--steps", "6", "--save-every", "2", "--json")
    assert failed, "the fault was never hit"
    line = one_error_line(result, code=1)
    assert "cannot write" in line and reason in line
    if kept:
        assert f"the last checkpoint kept is {out / kept}" in line
    else:
        assert "no checkpoint was kept" in line
    assert not list(out.glob(".tmp-*")) and not list(out.glob("*.tmp")) and not (out / checkpoint.LOCK).exists()
    if (out / "report.json").exists():  # whole: the one of the last checkpoint, or with what followed it
        assert json.loads((out / "report.json").read_text())["steps"]
    written = [p for p in checkpoint.step_dirs(out)]
    for step in written:  # every checkpoint that was completed is intact
        assert checkpoint._state_problem(step, step / checkpoint.STATE)[0] is None, step
    assert [p.name for p in written][:1] == ([kept] if kept else [])
    if kept is None or kept == "step-000006":
        return
    # the disk has room again: the resume continues from the checkpoint kept and finishes
    resumed = cli(configs, "-o", str(out), "--steps", "6", "--save-every", "2", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [1, 2, 3, 4, 5, 6]
    assert report["segments"][-1]["resumed_from"] == str(out / kept)


def test_a_rewritten_step_folder_survives_a_failed_rewrite(configs, base, tmp_path, monkeypatch):
    """A step folder is replaced only once its successor is complete."""
    out = copy_of(base, tmp_path)
    before = sorted((p.name, p.stat().st_size) for p in (out / "step-000004").iterdir())
    failing_writer(monkeypatch, errno.ENOSPC, lambda p: p.name == checkpoint.STATE)
    opts = small(configs, out, steps=4)
    ctx = loop.parallel.init_distributed(1, plan_world=1, gpus_per_node=None,
                                         model_config=loop.hf_config(opts.spec.model), cpu=True)
    with loop.Meter(torch.device("cpu")) as meter:
        r = loop.build(opts, meter, loop.resolve(opts.spec), ctx)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(out, 4, r.draft, r.optimizer, r.scheduler, 0, loop.fingerprint(opts))
    assert sorted((p.name, p.stat().st_size) for p in (out / "step-000004").iterdir()) == before
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


def test_a_multi_rank_resume_that_cannot_work_is_refused_before_torchrun(configs, base, tmp_path, monkeypatch):
    """One line from the launcher, not a traceback from every rank: a 2-rank resume of a 1-rank
    run (rank 1's state is missing), of another config's run, or of nothing."""
    from trainer import parallel

    def no_torchrun(*args, **kwargs):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(parallel, "relaunch", no_torchrun)
    output = copy_of(base, tmp_path)
    two_ranks = ["--gpus", "2xH100", "--steps", "8", "--resume", "--lr", "0.001"]
    line = one_error_line(cli(configs, *two_ranks, "--output", str(output)))
    assert "step-000004: training_state-rank1.pt missing" in line, line
    for step in checkpoint.step_dirs(output):  # every rank's file there, but written by a 1-GPU job
        shutil.copy(step / checkpoint.STATE, step / "training_state-rank1.pt")
    line = one_error_line(cli(configs, *two_ranks, "--output", str(output)))
    assert "was trained with a different config" in line and "gpus" in line, line
    line = one_error_line(cli(configs, *two_ranks, "--output", str(tmp_path / "empty")))
    assert "no checkpoint under" in line, line


def test_a_run_resumes_with_memory_knobs_changed_but_not_with_another_lr(configs, base, tmp_path):
    """A run that ran out of memory continues with a leaner layout: recompute_mlp, activation
    checkpointing and a per-parameter optimizer step change where memory goes, not what is
    trained; the learning rate is part of what is trained."""
    out = copy_of(base, tmp_path)
    leaner = small(configs, out, steps=6, save_every=2, resume=True)
    leaner.spec = leaner.spec.replace(recompute_mlp=True, ac=True, optimizer_per_param=False)
    report = run(leaner)
    assert [s["step"] for s in report["steps"]] == [1, 2, 3, 4, 5, 6]
    assert report["segments"][-1]["resumed_from"] == str(out / "step-000004")
    other = small(configs, out, steps=8, resume=True)
    other.lr = 2e-3
    with pytest.raises(checkpoint.FitplanError, match=r"different config \(lr differ\)"):
        run(other)
    # a checkpoint whose fingerprint predates a memory-only key still resumes
    assert checkpoint.config_changes({k: v for k, v in loop.fingerprint(leaner).items() if k != "recompute_mlp"},
                                     loop.fingerprint(leaner)) == []
    # split masters hold other optimizer state: a run resumes only into the masters it saved,
    # whole ones for a checkpoint from before the key existed
    whole = leaner.spec.replace(split_master=False)
    assert checkpoint.config_changes(loop.fingerprint(leaner), {**loop.fingerprint(leaner), "split_master": False}) \
        == ["split_master"]
    predating = {k: v for k, v in loop.fingerprint(leaner).items() if k != "split_master"}
    assert checkpoint.config_changes(predating, loop.fingerprint(leaner)) == ["split_master"]
    leaner.spec = whole
    assert checkpoint.config_changes(predating, loop.fingerprint(leaner)) == []
