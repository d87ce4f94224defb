"""The caching allocator's settings: PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF) as the model needs them.

Keys and bounds as c10/core/AllocatorConfig.cpp and c10/cuda/CUDAAllocatorConfig.h parse them
(torch 2.11-2.13). Settings that change which blocks the allocator picks but are not modelled
(garbage_collection_threshold, per-interval roundup_power2_divisions, the cudaMallocAsync
backend) are refused rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fitplan.allocator.sizes import LARGE_BUFFER
from fitplan.errors import FitplanError
from fitplan.units import MIB

# Keys that change nothing the model tracks (host pinned memory, locking, IPC, graph capture).
_NO_EFFECT = {
    "release_lock_on_cudamalloc", "pinned_use_cuda_host_register", "pinned_num_register_threads",
    "pinned_use_background_threads", "pinned_reserve_segment_size_mb", "pinned_free_catch_all",
    "pinned_max_round_threshold", "pinned_max_cached_size", "graph_capture_record_stream_reuse",
    "throw_on_cudamalloc_oom",
}
_ACCEPTED = ("expandable_segments, max_split_size_mb, max_non_split_rounding_mb, large_segment_size_mb, "
             "roundup_power2_divisions (one number), per_process_memory_fraction, backend:native")


@dataclass(frozen=True)
class AllocatorSettings:
    expandable: bool = False
    max_split_bytes: int | None = None  # None: every block may be split (torch's default)
    max_non_split_rounding_bytes: int = LARGE_BUFFER
    large_segment_bytes: int = LARGE_BUFFER
    roundup_power2_divisions: int = 0  # 0: off (torch's default)
    memory_fraction: float | None = None  # per_process_memory_fraction; None: the whole device

    def may_split(self, rounded: int) -> bool:
        """Blocks are only split for requests under max_split_size."""
        return self.max_split_bytes is None or rounded < self.max_split_bytes

    def oversize(self, block_bytes: int) -> bool:
        return self.max_split_bytes is not None and block_bytes >= self.max_split_bytes


def parse_alloc_conf(text: str) -> AllocatorSettings:
    """Read a PYTORCH_CUDA_ALLOC_CONF string such as "expandable_segments:True,max_split_size_mb:256"."""
    settings = AllocatorSettings()
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = (s.strip() for s in item.partition(":"))
        if not sep or not value:
            raise FitplanError(f"allocator setting {item!r} has no value; write key:value ({_ACCEPTED})")
        settings = _apply(settings, key, value)
    return settings


def _apply(settings: AllocatorSettings, key: str, value: str) -> AllocatorSettings:
    if key in _NO_EFFECT:
        return settings
    if key == "expandable_segments":
        return replace(settings, expandable=_flag(key, value))
    if key in ("max_split_size_mb", "max_non_split_rounding_mb", "large_segment_size_mb"):
        return _apply_mb(settings, key, _mb(key, value))
    if key == "roundup_power2_divisions":
        return replace(settings, roundup_power2_divisions=_divisions(value))
    if key == "per_process_memory_fraction":
        return replace(settings, memory_fraction=_fraction(value))
    if key == "backend" and value == "native":
        return settings
    raise FitplanError(f"allocator setting {key}:{value} is not modelled; accepted: {_ACCEPTED}")


def _apply_mb(settings: AllocatorSettings, key: str, mb: int) -> AllocatorSettings:
    if key == "large_segment_size_mb":
        return replace(settings, large_segment_bytes=mb * MIB)
    # torch refuses both below the default large segment (20 MiB)
    if mb < LARGE_BUFFER // MIB:
        raise FitplanError(f"allocator setting {key}:{mb} is too small; torch accepts {LARGE_BUFFER // MIB} or more")
    if key == "max_split_size_mb":
        return replace(settings, max_split_bytes=mb * MIB)
    return replace(settings, max_non_split_rounding_bytes=mb * MIB)


def _flag(key: str, value: str) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise FitplanError(f"allocator setting {key}:{value} must be True or False")


def _mb(key: str, value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise FitplanError(f"allocator setting {key}:{value} must be a whole number of MiB")
    return int(value)


def _divisions(value: str) -> int:
    if not value.isdigit() or int(value) & (int(value) - 1):
        raise FitplanError(f"roundup_power2_divisions:{value} is not modelled; a single power of two is accepted")
    return int(value)


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise FitplanError(f"per_process_memory_fraction:{value} must be a number in (0, 1]")
    return fraction


def from_snapshot_settings(recorded: dict) -> AllocatorSettings:
    """The settings a memory snapshot was taken under (its "allocator_settings" dict)."""
    settings = parse_alloc_conf(recorded.get("PYTORCH_CUDA_ALLOC_CONF") or "")
    if recorded.get("garbage_collection_threshold"):
        raise FitplanError("the snapshot was taken with garbage_collection_threshold set; it is not modelled")
    settings = replace(settings, expandable=bool(recorded.get("expandable_segments", settings.expandable)))
    split = recorded.get("max_split_size")
    if isinstance(split, int) and 0 < split < 1 << 62:  # SIZE_MAX arrives as -1 or 2**64-1: unlimited
        settings = replace(settings, max_split_bytes=split)
    return replace(settings, roundup_power2_divisions=_recorded_divisions(recorded.get("roundup_power2_divisions")))


def _recorded_divisions(recorded) -> int:
    values = list(recorded.values()) if isinstance(recorded, dict) else list(recorded or [0])
    if len(set(values)) > 1:
        raise FitplanError("the snapshot's roundup_power2_divisions differ by size interval; that is not modelled")
    return int(values[0]) if values else 0
