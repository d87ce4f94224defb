"""A vLLM server in a speculators launch script: does it share the trainer's GPUs, and with what
gpu_memory_utilization.

speculators generates missing hidden states through a vLLM server (its scripts/launch_vllm.py
passes everything after `--` to `vllm serve`). Its example scripts give that server GPUs of its
own (CUDA_VISIBLE_DEVICES="0,1" for vLLM, "2,3" for training: "online training needs separate GPUs
for vLLM and training"), or stop it before training (the offline example kills it first). A server
still running on GPUs the trainer also uses takes gpu_memory_utilization x each of them (vLLM
sizes its weights, KV cache, activations and CUDA graphs to that share; 0.9 when not given), and
the trainer gets the rest: the job fits only if that share + the trainer's peak <= the device.

The script is read, not run: the last vLLM launch before the train line counts unless a `kill`
line comes between them (one inside a shell function, such as a cleanup run by a trap on exit,
does not); each process sees the GPUs of the CUDA_VISIBLE_DEVICES on its own line, else of the
last assignment before it, else every GPU.
"""

from __future__ import annotations

import re

from fitplan.errors import FitplanError
from fitplan.shell_vars import unset_variable

# vLLM's --gpu-memory-utilization default (its CacheConfig.gpu_memory_utilization).
VLLM_DEFAULT_UTILIZATION = 0.9
SERVER = re.compile(r"launch_vllm\.py|\bvllm\s+serve\b|vllm\.entrypoints")
KILL = re.compile(r"^\s*(?:kill|pkill)\b")
FUNCTION = re.compile(r"^(?:function\s+)?[A-Za-z_][A-Za-z0-9_]*\s*\(\)\s*(?:\{|$)|^function\s+[A-Za-z_]")
UTILIZATION = re.compile(r"--gpu[-_]memory[-_]utilization(?:=|\s+)[\"']?([^\s\"']+)")
VISIBLE = re.compile(r"(?:^|\s)(?:export\s+)?CUDA_VISIBLE_DEVICES=(?:\"([^\"]*)\"|'([^']*)'|(\S*))")


def colocation(script: str) -> tuple[float | None, str | None]:
    """(the gpu_memory_utilization of a vLLM server that shares the trainer's GPUs, or None; a line
    saying what was found, or None when the script launches no server) of an expanded script."""
    lines = script.splitlines()
    live = _run_lines(lines)
    train = next((i for i, line in enumerate(lines) if live[i] and "--verifier-name-or-path" in line), None)
    servers = [i for i in range(train or 0) if live[i] and SERVER.search(lines[i])]
    if train is None or not servers:
        return None, None
    at = servers[-1]
    where = "the vLLM server the script launches before training"
    if any(live[i] and KILL.match(lines[i]) for i in range(at + 1, train)):
        return None, f"{where} is stopped first (a kill line): it holds no GPU memory while the trainer runs"
    server, trainer = _visible(lines, at), _visible(lines, train)
    unset = [unset_variable(v) for v in (server, trainer) if v is not None and unset_variable(v)]
    if unset:
        return None, (f"cannot tell whether {where} shares the trainer's GPUs: CUDA_VISIBLE_DEVICES uses ${unset[0]}, "
                      "which the script does not set; if it does, pass its gpu_memory_utilization as "
                      "--vllm-gpu-memory-utilization")
    shared = _shared(server, trainer)
    if not shared:
        return None, f"{where} runs on GPUs {server}, the trainer on {trainer}: the server is outside this estimate"
    fraction, given = _utilization(lines[at])
    return fraction, (f"{where} stays up on {shared} the trainer uses too: its gpu_memory_utilization {fraction}"
                      f"{'' if given else ' (vLLM default)'} of each is counted beside the trainer's peak")


def _run_lines(lines: list[str]) -> list[bool]:
    """Which lines run where they stand: not comments, not inside a shell function's body (the
    examples' `cleanup() { kill ...; }` runs on exit, through a trap)."""
    out, depth = [], 0
    for line in lines:
        text = line.strip()
        opens = FUNCTION.match(text) is not None or depth > 0
        if opens:
            depth = max(0, depth + text.count("{") - text.count("}"))
        out.append(not opens and not text.startswith("#"))
    return out


def _visible(lines: list[str], i: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES the process of line i sees (None: every GPU)."""
    for j in range(i, -1, -1):
        line = lines[j]
        if line.lstrip().startswith("#"):
            continue
        m = VISIBLE.search(line)
        standalone = m is not None and line.lstrip().startswith(("CUDA_VISIBLE_DEVICES=", "export "))
        if m is not None and (j == i or standalone and len(line.split()) <= 2):
            return next(g for g in m.groups() if g is not None)
    return None


def _shared(server: str | None, trainer: str | None) -> str:
    """The GPUs both processes see, in words ('' when none)."""
    if server is None or trainer is None:
        return "every GPU" if server is None and trainer is None else f"GPUs {server or trainer}"
    common = [g for g in _ids(trainer) if g in set(_ids(server))]
    return f"GPU{'s' if len(common) > 1 else ''} {','.join(common)}" if common else ""


def _ids(devices: str) -> list[str]:
    return [d.strip() for d in devices.split(",") if d.strip()]


def _utilization(line: str) -> tuple[float, bool]:
    m = UTILIZATION.search(line)
    if m is None:
        return VLLM_DEFAULT_UTILIZATION, False
    try:
        value = float(m.group(1))
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise FitplanError(f"vLLM --gpu-memory-utilization {m.group(1)!r} in the script: a server sharing the "
                           "trainer's GPUs must leave it some (accepted: a number in (0, 1))")
    return value, True
