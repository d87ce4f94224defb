"""Running a Triton kernel on the CPU through Triton's interpreter, for the kernels' tests.

Triton picks interpreted or compiled when each @triton.jit runs, its own library's included, so
TRITON_INTERPRET must be set before triton is first imported: the kernel runs in a fresh process,
its cases handed over and its results back through torch.save files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def interpreter_loops() -> bool:
    """Triton's interpreter before 3.8 cannot loop over a runtime bound under numpy 2.4 (the torch
    a GPU machine has pins such a triton; the kernels run there compiled, not interpreted)."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split(".")[:2])

    return major_minor(triton.__version__) >= (3, 8) or major_minor(numpy.__version__) < (2, 4)


def run_interpreted(script: str, cases, folder: Path):
    """`script` run interpreted with argv [cases file, results file]: what it saved. Skips where
    this triton's interpreter cannot run the kernels; fails with the child's error."""
    import torch

    if not interpreter_loops():
        pytest.skip("this triton's interpreter cannot run the kernels under numpy 2.4 (triton 3.8 or later can)")
    torch.save(cases, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, str(folder / "cases.pt"), str(folder / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"the interpreted kernel failed: {done.stderr[-3000:]}")
    return torch.load(folder / "out.pt")
