"""The `fitplan` program itself (its entry point, not the in-process app): a bad flag, an
unknown option or command is one `error:` line and exit 2, like every other bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    (["estimate", "--seq", "abc"], "Invalid value for '--seq'"),
    (["estimate", "--bogus"], "No such option '--bogus'"),
    (["bogus"], "No such command 'bogus'"),
    (["estimate"], "the target model is required: give --model"),
    (["fit", "--margin"], "Option '--margin' requires an argument"),
]


def fitplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitplan.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,words", CASES)
def test_usage_errors_are_one_line_exit_2(args, words):
    done = fitplan(*args)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr
    assert done.stdout == ""


def test_help_still_works():
    assert fitplan("estimate", "--help").returncode == 0
    bare = fitplan()
    assert bare.returncode == 2 and "Usage:" in bare.stdout and "COMMAND" in bare.stdout


@pytest.mark.parametrize("command", ["estimate", "fit", "check", "explain", "validate", "train", "profiles", "diff"])
def test_each_command_is_reached_by_name_as_a_real_process(command):
    """The program loads only the command module named first; it must still be `fitplan COMMAND`."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fitplan.cli", command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"fitplan.cli {command} [OPTIONS]" in " ".join(done.stdout.split())


def test_explain_reads_its_positional_log_as_a_real_process(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "oom.log"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                   "capacity of 79.19 GiB of which 3.00 GiB is free. Of the allocated memory 70.00 GiB is allocated "
                   "by PyTorch, and 5.00 GiB is reserved by PyTorch but unallocated.\n")
    done = subprocess.run([sys.executable, "-m", "fitplan.cli", "explain", str(log), "--model", "llama-3.1-8b",
                           "--gpus", "1xH100"], capture_output=True, text=True)
    assert "unexpected extra argument" not in done.stderr
    assert done.returncode in (0, 1), done.stderr
