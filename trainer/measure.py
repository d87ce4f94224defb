"""Per-phase memory peaks: the CUDA allocator's counters, or a live-storage tracker on CPU.

Both meters record, per phase of a step, the peak `allocated` bytes (live tensors), the peak
`reserved` bytes (allocator-held) and `device_used` (total - free at the phase end: CUDA
context and NCCL included). On CPU there is no caching allocator: reserved = allocated and
device_used is not measured. Phases repeated within a step (gradient accumulation) keep their max.

On CUDA each phase also labels the allocator's recorded history (the snapshot entries' "user_metadata",
torch.cuda.memory._set_memory_metadata): "load", then "step<k>.<phase>" with k counted from the
meter's first step, so fitplan.validation.trace_compare can split a recorded snapshot by phase.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of every tensor storage created under it while that storage is alive.

    Each op's outputs are inspected; a storage seen for the first time is added and a weakref
    finalizer subtracts it when it is freed. Views share their base's storage and add nothing.
    Storages created before the tracker started are invisible to it.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # outputs aliasing an input (views, in-place ops) allocate nothing, even when the
        # input's storage predates the tracker
        inputs = {s.data_ptr() for s in _storages(tree_flatten((args, kwargs))[0])}
        for storage in _storages(tree_flatten(out)[0]):
            if storage.data_ptr() not in inputs:
                self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current


def _storages(values: list) -> list[torch.UntypedStorage]:
    """The storages behind tensors; a wrapper subclass (DTensor: the mode sees it before it
    dispatches to its local shard) has none of its own, its inner tensors hold the memory."""
    found = []
    for t in values:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        if is_traceable_wrapper_subclass(t):
            found.extend(_storages([getattr(t, name) for name in t.__tensor_flatten__()[0]]))
        else:
            found.append(t.untyped_storage())
    return found


class Meter:
    """Records phase peaks into `self.step` (phase -> {allocated, reserved, device_used})."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step: dict[str, dict[str, int]] = {}
        self.current: str | None = None  # the phase running now (named in an OOM report)
        self.steps_done = 0  # new_step() calls: the load's, then one per optimizer step
        self.tracker = LiveStorageTracker() if device.type == "cpu" else None

    def __enter__(self):
        if self.tracker is not None:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.tracker is not None:
            self.tracker.__exit__(*exc)
        else:
            _label_history(self.device, "")

    def new_step(self) -> dict[str, dict[str, int]]:
        done, self.step = self.step, {}
        self.steps_done += 1
        return done

    @contextlib.contextmanager
    def phase(self, name: str):
        self.current = name
        self._start()
        yield
        record = self._read()
        previous = self.step.get(name)
        self.step[name] = record if previous is None else {k: max(v, previous[k]) for k, v in record.items()}

    def allocator_events(self) -> dict[str, int]:
        """Since the process started: requests the caching allocator only served after freeing
        its cache and retrying (a sign of fragmentation near the limit), and OOMs it raised.
        CPU has no caching allocator: both 0."""
        if self.tracker is not None:
            return {"alloc_retries": 0, "ooms": 0}
        stats = torch.cuda.memory_stats(self.device)
        return {"alloc_retries": int(stats.get("num_alloc_retries", 0)), "ooms": int(stats.get("num_ooms", 0))}

    def _start(self) -> None:
        if self.tracker is not None:
            self.tracker.reset_peak()
            return
        _label_history(self.device, f"step{self.steps_done}.{self.current}" if self.steps_done else self.current)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def _read(self) -> dict[str, int]:
        if self.tracker is not None:
            return {"allocated": self.tracker.peak, "reserved": self.tracker.peak, "device_used": 0}
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            "allocated": torch.cuda.max_memory_allocated(self.device),
            "reserved": torch.cuda.max_memory_reserved(self.device),
            "device_used": total - free,
        }


def _label_history(device: torch.device, label: str) -> None:
    """Label every allocator history entry from here on (a string kept by the device's allocator,
    so the autograd thread's allocations in backward carry it too); costs nothing without
    _record_memory_history. Torch versions without the call record no phases."""
    setter = getattr(torch.cuda.memory, "_set_memory_metadata", None)
    if setter is not None:
        with torch.cuda.device(device):
            setter(label)
