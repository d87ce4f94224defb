"""Starting the workers: torchrun (torch.distributed.run) with the same command line per GPU.

`fitplan train` calls `launch_workers` once per node; torchrun starts one worker per local
GPU, and on a worker failure it stops the workers on every node and exits non-zero. Its
summary names the failing rank and shows that rank's traceback when the worker's entry
function is wrapped with `record` (torch's elastic error recorder, re-exported here).

Multi-node: run the same command on every node with nnodes, rdzv_endpoint (host:port of
one node, reachable from all) and the same rdzv_id; ranks are assigned at rendezvous.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from fitplan.errors import FitplanError

__all__ = ["launch_workers", "relaunch", "torchrun_command", "inside_worker", "record"]


def inside_worker() -> bool:
    """True in a process torchrun started: it must train, not launch again."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def relaunch(world: int, nodes: int, gpus_per_node: int, argv: Sequence[str]) -> Optional[int]:
    """Start torchrun's workers for a job of several ranks and return its exit code; None when
    this process trains the job itself (one rank, or already a worker)."""
    if world == 1 or inside_worker():
        return None
    if nodes > 1:
        raise FitplanError("multi-node plans are launched with torchrun on every node; run this under torchrun")
    return launch_workers(argv, gpus_per_node)


def torchrun_command(
    argv: Sequence[str],
    nproc: int,
    nnodes: int = 1,
    rdzv_endpoint: Optional[str] = None,
    rdzv_id: str = "fitplan",
) -> list[str]:
    """The torchrun command line. argv is what each worker runs: a script path or ["-m", module], then its args."""
    if nproc < 1 or nnodes < 1:
        raise FitplanError(f"nproc {nproc} and nnodes {nnodes} must be positive")
    if not argv:
        raise FitplanError("no worker command given: pass a script path or -m module, then its arguments")
    if nnodes == 1 and rdzv_endpoint is None:
        where = ["--standalone"]  # a free local port, no rendezvous server to name
    elif rdzv_endpoint is None:
        raise FitplanError(f"nnodes {nnodes} needs rdzv_endpoint HOST:PORT, the same on every node")
    else:
        where = ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    module = ["--module"] if argv[0] == "-m" else []
    program = list(argv[1:]) if module else list(argv)
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--max-restarts=0",
        *where, *module, *program,
    ]


def launch_workers(
    argv: Sequence[str],
    nproc: int,
    nnodes: int = 1,
    rdzv_endpoint: Optional[str] = None,
    rdzv_id: str = "fitplan",
) -> int:
    """Run the workers to completion; returns torchrun's exit code (non-zero if any rank failed).

    The environment is inherited, so NCCL settings made by the machine (NCCL_NVLS_ENABLE=0 ...)
    reach every worker.
    """
    command = torchrun_command(argv, nproc, nnodes, rdzv_endpoint, rdzv_id)
    return subprocess.run(command, check=False).returncode
