"""The size rules of PyTorch's CUDA caching allocator.

Constants and rules as in c10/core/AllocatorConfig.h and c10/cuda/CUDACachingAllocator.cpp of
torch 2.11-2.13 (`round_size`, `get_allocation_size`, `get_pool`).
"""

from __future__ import annotations

from fitplan.units import MIB

MIN_BLOCK = 512  # every request is rounded up to a multiple of this (kMinBlockSize)
SMALL_SIZE = MIB  # the largest request served from the small pool (kSmallSize)
SMALL_BUFFER = 2 * MIB  # small-pool segments and small-pool expandable pages (kSmallBuffer)
MIN_LARGE_ALLOC = 10 * MIB  # large requests below this share a large_segment_size segment (kMinLargeAlloc)
LARGE_BUFFER = 20 * MIB  # default large_segment_size: shared segments and large expandable pages
ROUND_LARGE = 2 * MIB  # requests of 10 MiB and more get a segment of their size rounded to this


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def round_size(size: int, divisions: int = 0) -> int:
    """The block size a request of `size` bytes asks the pools for.

    `divisions` is roundup_power2_divisions (0, the default, means off).
    """
    if size < MIN_BLOCK:
        return MIN_BLOCK
    if divisions > 1 and size > MIN_BLOCK * divisions:
        return _round_power2_division(size, divisions)
    return -(-size // MIN_BLOCK) * MIN_BLOCK  # round_up(size, MIN_BLOCK), inline: every request comes here


def _round_power2_division(size: int, divisions: int) -> int:
    """Round up to the next of `divisions` equal steps between two powers of two."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)  # torch divides by the power of two <= divisions
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def is_small(rounded: int) -> bool:
    """Whether a rounded request goes to the small pool."""
    return rounded <= SMALL_SIZE


def segment_bytes(rounded: int, large_segment: int = LARGE_BUFFER) -> int:
    """The cudaMalloc size when a rounded request finds no cached block (get_allocation_size)."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return large_segment
    return round_up(rounded, ROUND_LARGE)
