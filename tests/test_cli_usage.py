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
