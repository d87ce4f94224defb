"""A model of PyTorch's CUDA caching allocator, to replay a step's allocations (docs/allocator.md).

Pure Python, no torch: the estimate path may use it.
"""

from fitplan.allocator.allocator import Allocator, AllocatorOOM
from fitplan.allocator.replay import Event, ReplaySummary, replay
from fitplan.allocator.settings import AllocatorSettings, parse_alloc_conf

__all__ = ["Allocator", "AllocatorOOM", "AllocatorSettings", "Event", "ReplaySummary", "parse_alloc_conf", "replay"]
