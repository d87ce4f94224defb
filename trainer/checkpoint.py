"""Checkpoints in the layout SGLang and vLLM load for Eagle3 drafts, plus the training state.

    OUTPUT/step-000050/config.json          architectures ["LlamaForCausalLMEagle3"], draft_vocab_size,
                                            the aux layers in vLLM's and SGLang's numbering (trainer/export.py)
    OUTPUT/step-000050/model.safetensors    draft weights (bf16), embed_tokens, d2t, t2d
    OUTPUT/step-000050/fitplan_run.json     the command line and the job that produced it (run_record)
    OUTPUT/step-000050/training_state.pt    optimizer, scheduler, data position, RNG, fingerprint

Every file of a step folder is mode 0644 and the folder 0755 whatever the umask: a checkpoint is
served by whoever runs the engine, often not the user who trained it.

A checkpoint is written into a temporary folder (`.tmp-step-NNNNNN`, every file fsynced) and
renamed into place, so a crash never leaves a half-written step folder; a step folder that is
rewritten is first moved aside (`.old-step-NNNNNN`) and dropped only once the new one is in
place. `--resume` takes the newest intact one: a step folder whose config.json, model.safetensors
or training state is missing, truncated or unreadable is named in one line and skipped.

The output folder (`claim_output`): created and write-tested before anything is loaded, and
locked for the run by `.fitplan.lock` (the owner's PID and host, held with flock); a lock whose
PID is not running is taken over, a live one refuses the second run. The lock holder removes
what interrupted checkpoint writes left (`.tmp-step-*`).

A write that fails (disk full, read-only) raises OSError naming the file; the loop turns it
into one line naming the last checkpoint kept (OutputError).

Several ranks (FSDP2-sharded draft): the exported weights are gathered whole onto rank 0's
host, and each rank writes its own shards of the params and optimizer state
(training_state-rankN.pt besides rank 0's training_state.pt) into the same folder, so the
output folder must be shared by all ranks (one node, or a shared file system). A resume needs
the same number of ranks, which the fingerprint (the plan's GPUs) enforces.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.distributed.tensor import DTensor

from fitplan import __version__
from fitplan.config import FIELD_NAMES
from fitplan.errors import FitplanError
from fitplan.records import PREDATING_KEYS, old_defaults_auto

STATE = "training_state.pt"
RUN_RECORD = "fitplan_run.json"
RUN_RECORD_VERSION = 1
FILE_MODE = 0o644  # readable by the serving engine's user; safetensors' own save_file writes 0600
FOLDER_MODE = 0o755
LOCK = ".fitplan.lock"
LOCK_ENV = "FITPLAN_OUTPUT_LOCK"  # "LOCKPATH:PID" of a launcher that holds the lock for its torchrun workers
STEP_NAME = re.compile(r"step-(\d{6,})")
STATE_KEYS = ("step", "fingerprint", "params", "optimizer", "scheduler", "data_position", "rng")


class OutputError(FitplanError):
    """The run's storage failed under it (disk full, read-only): one line, the last checkpoint kept."""


def step_dir(output: Path, step: int) -> Path:
    return output / f"step-{step:06d}"


def export_tensors(draft: torch.nn.Module, distributed: bool = False) -> dict[str, torch.Tensor]:
    """The draft's weights for the export; with several ranks a collective, whole on rank 0 only."""
    out = {}
    for name, t in _full_state_dict(draft, distributed).items():
        t = t.detach().cpu()  # cast on the host: no bf16 copy of fp32 weights on the GPU
        out[name] = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
    return out


def _full_state_dict(draft: torch.nn.Module, distributed: bool) -> dict[str, torch.Tensor]:
    if not distributed:
        return draft.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # gathered one tensor at a time straight to the host: no whole copy of the draft on any GPU
    return get_model_state_dict(draft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@dataclass
class LocalShard:
    """A DTensor as saved: this rank's piece and how to rebuild the DTensor from it."""

    local: torch.Tensor
    placements: tuple
    shape: torch.Size
    stride: tuple


def to_host(value):
    """Nested state with every tensor on the host; DTensors become LocalShards."""
    if isinstance(value, DTensor):
        return LocalShard(value.to_local().detach().cpu(), tuple(value.placements), value.shape, value.stride())
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def from_host(value, ctx):
    """Undo `to_host`: LocalShards become DTensors on ctx's draft mesh again."""
    if isinstance(value, LocalShard):
        return DTensor.from_local(value.local.to(ctx.device), ctx.draft_mesh, value.placements, run_check=False,
                                  shape=value.shape, stride=value.stride)
    if isinstance(value, dict):
        return {k: from_host(v, ctx) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_host(v, ctx) for v in value)
    return value


def state_file(ctx) -> str:
    rank = ctx.rank if ctx is not None else 0
    return STATE if rank == 0 else f"training_state-rank{rank}.pt"


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ writing


class _Sink:
    """A file for torch.save that keeps the OSError torch turns into a RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def write_file(path: Path, fill: bytes | Callable) -> None:
    """Write `fill` (bytes, or a function writing into the file) to `path` and fsync it; any
    failure is an OSError naming `path` (torch.save's wrapped errors included)."""
    try:
        with open(path, "wb") as f:
            sink = _Sink(f)
            try:
                if isinstance(fill, (bytes, bytearray)):
                    sink.write(fill)
                else:
                    fill(sink)
            except OSError:
                raise
            except Exception:
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def write_shared(path: Path, fill: bytes | Callable) -> None:
    """`write_file`, then mode 0644 whatever the umask (a step folder's files are served by others)."""
    write_file(path, fill)
    os.chmod(path, FILE_MODE)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _any_rank(flag: bool, ctx) -> bool:
    if ctx is None or not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _agree(error: OSError | None, ctx, where: Path) -> None:
    """Every rank raises if any rank failed to write its part (the others must not wait for it)."""
    if _any_rank(error is not None, ctx):
        raise error or OSError(errno.EIO, "another rank could not write its part", str(where))


def save(output: Path, step: int, draft, optimizer, scheduler, data_position: int, fingerprint: dict,
         ctx=None, schedule_steps: int | None = None) -> Path:
    """Write step `step`; with several ranks every rank must call it (collectives inside).

    On a failed write every rank raises OSError (naming the file where known), the temporary
    folder is removed, and every step folder written before is left as it was."""
    distributed = ctx is not None and ctx.distributed
    lead = not distributed or ctx.rank == 0
    final = step_dir(output, step)
    tmp = output / f".tmp-{final.name}"
    weights = export_tensors(draft, distributed)
    try:
        error = None
        if lead:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                os.chmod(tmp, FOLDER_MODE)
                write_shared(tmp / "config.json", json.dumps(draft.cfg.to_hf(), indent=2).encode())
                write_shared(tmp / "model.safetensors", safetensors_bytes(weights))
                record = run_record(fingerprint, schedule_steps, ctx.world if distributed else 1)
                write_shared(tmp / RUN_RECORD, json.dumps(record, indent=2).encode())
            except OSError as exc:
                error = exc
        del weights
        _agree(error, ctx, tmp)  # the folder exists before the other ranks write into it
        state = to_host({
            "step": step,
            "fingerprint": fingerprint,
            "params": {n: p for n, p in draft.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data_position": data_position,
            "rng": rng_state(),
            "schedule_steps": schedule_steps,
        })
        try:
            write_shared(tmp / state_file(ctx), partial(torch.save, state))
        except OSError as exc:
            error = exc
        del state
        _agree(error, ctx, tmp)  # every rank's state is written before the folder counts as complete
        if lead:
            try:
                _sync_dir(tmp)
                _put_in_place(tmp, final)
            except OSError as exc:
                error = exc
        _agree(error, ctx, final)
    except OSError:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def run_record(fingerprint: dict, steps: int | None, world: int, argv: list[str] | None = None) -> dict:
    """fitplan_run.json: the command line that produced the checkpoint, the job as fitplan read
    it (RunSpec keys: a job config `fitplan train CONFIG` takes back) and the training options.

    The job and options are the resume fingerprint split in two: a checkpoint records exactly
    what a resume from it must match. `steps` is the run's --steps (the schedule's length)."""
    job = {k: v for k, v in fingerprint.items() if k in FIELD_NAMES}
    training = {k: v for k, v in fingerprint.items() if k not in FIELD_NAMES}
    return {
        "fitplan_run": RUN_RECORD_VERSION,
        "fitplan_version": __version__,
        "command": list(sys.argv if argv is None else argv),
        "world": world,
        "job": job,
        "training": {**training, "steps": steps},
    }


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and removed only after."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _sync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def clear_leftovers(output: Path, notice: Callable[[str], None] = print) -> None:
    """Remove `.tmp-step-*` folders (checkpoints whose write was interrupted); put back an
    `.old-step-*` folder whose replacement never arrived. Only the lock holder calls this."""
    for tmp in sorted(output.glob(".tmp-step-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        notice(f"removed {tmp}: an unfinished checkpoint write (the run stopped while writing it)")
    for old in sorted(output.glob(".old-step-*")):
        final = output / old.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


# ------------------------------------------------------------------ resuming


def step_dirs(output: Path) -> list[Path]:
    """The step-NNNNNN folders under `output`, newest first."""
    found = [(int(m.group(1)), p) for p in output.glob("step-*")
             if (m := STEP_NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest(output: Path) -> Path | None:
    done = [p for p in step_dirs(output) if (p / STATE).is_file()]
    return done[0] if done else None


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (header read, sizes compared; no tensor loaded)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                return f"{path.name} is truncated"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is not a safetensors file"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return f"{path.name} is not a safetensors file"
    if 8 + n + end > size:
        return f"{path.name} is truncated"
    if 8 + n + end < size:
        return f"{path.name} has bytes past its tensors"
    return None


def _state_problem(path: Path, own: Path) -> tuple[str | None, dict | None]:
    """(why the checkpoint at `path` is not usable by this rank, or None; its state)."""
    try:
        json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return "config.json is missing", None
    except (OSError, ValueError):
        return "config.json is unreadable", None
    problem = _safetensors_problem(path / "model.safetensors")
    if problem:
        return problem, None
    if not own.is_file():
        return f"{own.name} is missing" + ("" if own.name == STATE else " (written by fewer ranks?)"), None
    if own.stat().st_size == 0:
        return f"{own.name} is empty", None
    try:
        state = torch.load(own, weights_only=False, map_location="cpu")
    except Exception as exc:  # a truncated zip, garbage, a pickle of something else
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        return f"{own.name} is truncated or unreadable ({first})", None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        return f"{own.name} is not a training state", None
    return None, state


@dataclass
class Found:
    """The checkpoint a resume continues from, with this rank's state loaded on the host."""

    path: Path
    state: dict = field(repr=False)
    skipped: list[str] = field(default_factory=list)  # "step-000006: training_state.pt is empty"

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def schedule_steps(self) -> int | None:
        return self.state.get("schedule_steps")


# Knobs that change where memory goes, not what is trained (the same weights, gradients and
# optimizer state): a run resumes with them changed, so a run that ran out of memory continues
# with a leaner layout, and checkpoints written before one of them existed resume.
MEMORY_ONLY_KEYS = frozenset({"ac", "expandable_segments", "recompute_mlp", "optimizer_per_param", "sum_step_grads",
                              "head_grad_in_forward", "project_embedding_once"})


# Keys that change the optimizer's state, with what a checkpoint written before each existed ran
# (records.PREDATING_KEYS): its state resumes only into the same layout.
OPTIMIZER_KEYS_PREDATED = {key: PREDATING_KEYS[key] for key in ("split_master",)}


def config_changes(saved: dict, fingerprint: dict) -> list[str]:
    """The keys of this run's fingerprint a checkpoint's differs in, memory-only knobs aside (a
    knob's old default and auto alike: records.old_defaults_auto)."""
    saved, fingerprint = old_defaults_auto({**OPTIMIZER_KEYS_PREDATED, **saved}), old_defaults_auto(fingerprint)
    return sorted(k for k in fingerprint if k not in MEMORY_ONLY_KEYS and saved.get(k) != fingerprint[k])


def _refuse_another_config(path: Path, saved: dict, fingerprint: dict) -> None:
    changed = config_changes(saved, fingerprint)
    if changed:
        raise FitplanError(f"--resume: {path} was trained with a different config ({', '.join(changed)} differ)")


def find(output: Path, fingerprint: dict, ctx=None, notice: Callable[[str], None] = print) -> Found:
    """The newest checkpoint under `output` that every rank can read, the broken newer ones named
    (one line each) and skipped. A checkpoint of another config is an error, not skipped."""
    skipped = []
    for path in step_dirs(output):
        problem, state = _state_problem(path, path / state_file(ctx))
        if _any_rank(problem is not None, ctx):
            problem = problem or "another rank's training state is missing or unreadable"
            skipped.append((path, problem))
            continue
        _refuse_another_config(path, state["fingerprint"], fingerprint)
        for broken, problem in skipped:  # named once a good one is found (else the error names them)
            notice(f"--resume: skipping {broken}: {problem}; it is not used")
        return Found(path, state, [f"{p.name}: {why}" for p, why in skipped])
    if skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise FitplanError(f"--resume: no intact checkpoint under {output} ({reasons})")
    raise FitplanError(f"--resume: no checkpoint under {output}")


def check_before_launch(output: Path, fingerprint: dict, world: int) -> None:
    """What `find` decides in every worker, decided once by the launcher before torchrun starts,
    so a resume that cannot work is one line here instead of one traceback per rank: some
    checkpoint holds every rank's state file, and rank 0's is intact and of this config."""
    skipped = []
    for path in step_dirs(output):
        missing = [f"training_state-rank{r}.pt" for r in range(1, world) if not (path / f"training_state-rank{r}.pt").is_file()]
        problem, state = _state_problem(path, path / STATE)
        problem = problem or (f"{', '.join(missing)} missing (written by fewer ranks?)" if missing else None)
        if problem is not None:
            skipped.append(f"{path.name}: {problem}")
            continue
        _refuse_another_config(path, state["fingerprint"], fingerprint)
        return
    if skipped:
        raise FitplanError(f"--resume: no intact checkpoint under {output} ({'; '.join(skipped)})")
    raise FitplanError(f"--resume: no checkpoint under {output}")


def schedule_change(found: Found, steps: int) -> str | None:
    """The one-line notice when the resumed run's --steps changes the LR schedule's length."""
    before = found.schedule_steps
    if before is None or before == steps:
        return None
    return f"schedule {'extended' if steps > before else 'shortened'} from {before} to {steps} steps"


def restore(found: Found, draft, optimizer, scheduler, ctx=None) -> tuple[int, int]:
    """Put `found`'s state into the draft, optimizer, scheduler and RNGs; returns (step done, data
    position). The learning rate comes from the scheduler as built now (its length is this run's
    --steps), not from the saved optimizer: a longer run continues on the longer schedule."""
    state = found.state
    if ctx is not None and ctx.distributed:
        state = from_host(state, ctx)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if p.requires_grad:
                p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _reschedule(optimizer, scheduler)
    set_rng_state(state["rng"])
    found.state = {}  # the host copy is no longer needed
    return int(state["step"]), state["data_position"]


def _reschedule(optimizer, scheduler) -> None:
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    values = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, lambdas)]
    for group, value in zip(optimizer.param_groups, values):
        group["lr"] = value
    scheduler._last_lr = values


def resume(output: Path, draft, optimizer, scheduler, fingerprint: dict, ctx=None) -> tuple[int, int]:
    """Restore the newest intact checkpoint under `output` (this rank's shards); returns (step done, data position)."""
    return restore(find(output, fingerprint, ctx), draft, optimizer, scheduler, ctx)


# ------------------------------------------------------------------ the output folder


@dataclass
class Owner:
    pid: int | None
    host: str

    @classmethod
    def parse(cls, text: str) -> "Owner":
        parts = text.split()
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        return cls(pid, parts[1] if len(parts) > 1 else socket.gethostname())

    def alive(self) -> bool:
        if self.pid is None or self.pid <= 0:
            return False
        if self.host != socket.gethostname():
            return True  # cannot tell from here: another machine's run counts as running
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __str__(self) -> str:
        return f"PID {self.pid} on {self.host}" if self.pid is not None else "an unnamed process"


_HELD: dict[str, "Claim"] = {}  # lock path -> this process's claim


@dataclass
class Claim:
    """This process's hold on an output folder; `release` (or leaving the `with`) gives it back."""

    output: Path
    lock: Path | None = None  # None: the lock is another's (this process's own claim, or the launcher's)
    fd: int | None = None
    created: bool = False  # the folder was made by this claim: removed again if left empty

    def release(self) -> None:
        if self.lock is None:
            return
        _HELD.pop(str(self.lock), None)
        try:
            if self.lock.read_text().split()[:1] == [str(os.getpid())]:
                self.lock.unlink()
        except OSError:
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.lock = None
        if self.created:
            try:
                self.output.rmdir()  # only if nothing was written
            except OSError:
                pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable_folder(output: Path) -> bool:
    """Create `output` if missing and write-test it; FitplanError (one line) if it cannot take a run.
    Returns whether the folder was created here."""
    if output.exists() and not output.is_dir():
        raise FitplanError(f"--output {output} is a file; give a folder (it is created if missing)")
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FitplanError(f"--output {output}: cannot create the folder ({exc.strerror})") from None
    probe = output / f".write-test-{os.getpid()}"
    try:
        write_file(probe, b"fitplan write test\n")
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise FitplanError(f"--output {output}: cannot write there ({exc.strerror})") from None
    return created


def claim_output(output: Path, notice: Callable[[str], None] = print) -> Claim:
    """Make `output` ready for a run: created, write-tested, locked (FitplanError if another
    fitplan train holds it), with leftovers of interrupted checkpoint writes removed."""
    output = Path(output)
    created = check_writable_folder(output)
    lock = output / LOCK
    key = str(lock.resolve())
    if key in _HELD:
        return Claim(output)  # this process holds it already (the command, then the loop)
    try:
        claim = _lock(output, lock, key, notice)
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
    claim.created = created
    if claim.lock is not None:
        clear_leftovers(output, notice)
    return claim


def _inherited(key: str, owner: Owner) -> bool:
    """This process is a torchrun worker of the launcher holding the lock."""
    path, _, pid = os.environ.get(LOCK_ENV, "").rpartition(":")
    return path == key and pid.isdigit() and owner.pid == int(pid)


def _busy(output: Path, lock: Path, owner: Owner) -> FitplanError:
    return FitplanError(f"--output {output} is in use by another fitplan train ({owner}); wait for it or give "
                        f"another --output (if no run is going, delete {lock})")


def _lock(output: Path, lock: Path, key: str, notice) -> Claim:
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)  # read-only: flock needs no write access,
            # and a file held open for writing would keep the file system from being remounted read-only
        except OSError as exc:
            raise FitplanError(f"--output {output}: cannot create the lock file {lock} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live process holds it
            owner = Owner.parse(_read(lock))
            os.close(fd)
            if owner.pid == os.getpid() or _inherited(key, owner):
                return Claim(output)
            raise _busy(output, lock, owner) from None
        except OSError:
            pass  # no flock on this file system (some network ones): the PID alone decides
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and removed between our open and our flock: try the new file
            os.close(fd)
            continue
        owner = Owner.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if owner.pid is not None and owner.pid != os.getpid():
            if _inherited(key, owner):
                os.close(fd)
                return Claim(output)
            if owner.alive():  # a run that does not hold flock (another host, another file system)
                os.close(fd)
                raise _busy(output, lock, owner)
            notice(f"took over the stale lock {lock} ({owner} is not running)")
        try:
            write_file(lock, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise FitplanError(f"--output {output}: cannot write the lock file {lock} ({exc.strerror})") from None
        claim = Claim(output, lock, fd)
        _HELD[key] = claim
        return claim
    raise FitplanError(f"--output {output}: the lock {lock} keeps changing; is another run starting there?")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def lock_env(claim: Claim) -> dict[str, str]:
    """The environment that lets torchrun workers recognise their launcher's lock."""
    if claim.lock is None:
        return {}
    return {LOCK_ENV: f"{claim.lock.resolve()}:{os.getpid()}"}


def load_export(path: Path, draft: torch.nn.Module) -> None:
    """Load an exported model.safetensors into a draft of the same config (for checks and reuse)."""
    draft.load_state_dict(load_file(path / "model.safetensors"))
