"""Starting the workers: torchrun (torch.distributed.run) with the same command line per GPU.

`fitplan train` calls `launch_workers` once per node; torchrun starts one worker per local
GPU, and on a worker failure it stops the workers on every node and exits non-zero. Its
summary names the failing rank and shows that rank's traceback when the worker's entry
function is wrapped with `record` (torch's elastic error recorder, re-exported here).

Multi-node: run the same command on every node with nnodes, rdzv_endpoint (host:port of
one node, reachable from all) and the same rdzv_id; ranks are assigned at rendezvous.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
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
    # Its own session: torchrun and its workers can be stopped as one group, nothing left behind.
    proc = subprocess.Popen(command, start_new_session=True)
    with _forwarded_stops(proc):
        return _wait(proc)


# After a stop is forwarded, torchrun and its workers finish or abandon the current step, save
# and report; past this, what is left of them is killed so nothing outlives the launcher.
STOP_GRACE_S = 120


@contextlib.contextmanager
def _forwarded_stops(proc: subprocess.Popen):
    """SIGTERM / SIGINT to the launcher (a container stop, a scheduler, `kill`) go to torchrun,
    which passes them to every worker; the launcher then waits for them to stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped_at: list[float] = []

    def forward(signum, frame):
        stopped_at.append(time.monotonic())
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    proc.stopped_at = stopped_at  # read by _wait
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(proc: subprocess.Popen) -> int:
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            stopped_at = getattr(proc, "stopped_at", [])
            if stopped_at and time.monotonic() - stopped_at[0] > STOP_GRACE_S:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
