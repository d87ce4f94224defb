"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, torch 2.11-2.13).

The model keeps the allocator's state, not the memory: segments, the blocks they are split into,
the free-block pools per stream, and the statistics torch.cuda.memory_stats() reports (allocated,
reserved, their peaks, num_alloc_retries, num_ooms). A request follows torch's path: round the
size, best fit in its pool and stream, else a new segment; if that fails, free cached oversize
blocks (with max_split_size set), then free every unsplit cached segment and retry once (a
"retry"); if that fails too the request is an OOM.

Two limits can refuse a new segment, as on the device: `allowed_bytes` is the cap
set_per_process_memory_fraction puts on reserved memory (checked against the segment size before
any driver call), `capacity_bytes` is the memory the driver can still give the process (the
device's memory less the CUDA context and other processes).
"""

from __future__ import annotations

from collections.abc import Iterable

from fitplan.allocator import expandable
from fitplan.allocator.addresses import AddressSpace
from fitplan.allocator.blocks import Block, BlockPool, chain, splice, try_merge
from fitplan.allocator.settings import AllocatorSettings
from fitplan.allocator.sizes import (
    MIN_BLOCK,
    SMALL_SIZE,
    is_small,
    round_size,
    segment_bytes,
)


class AllocatorOOM(Exception):
    """A request that found no block even after the cache was freed."""

    def __init__(self, requested: int, segment: int, reserved: int, allocated: int):
        self.requested, self.segment, self.reserved, self.allocated = requested, segment, reserved, allocated
        super().__init__(f"out of memory: tried to allocate {segment} bytes ({requested} requested) "
                         f"with {allocated} allocated and {reserved} reserved")


class Allocator:
    def __init__(self, capacity_bytes: int, expandable: bool = False, max_split_bytes: int | None = None, *,
                 settings: AllocatorSettings | None = None, allowed_bytes: int | None = None,
                 device_total_bytes: int | None = None, segment_addresses: Iterable[int] | None = None,
                 track_largest_free: bool = True):
        self.settings = settings or AllocatorSettings(expandable=expandable, max_split_bytes=max_split_bytes)
        # read at every request (the settings are frozen)
        self._divisions = self.settings.roundup_power2_divisions
        self._expandable = self.settings.expandable
        self._max_split = self.settings.max_split_bytes
        # neither expandable segments nor max_split_size: no rule of _cached_block passes over the
        # best fit, so a request takes it straight from the pool
        self._plain_best_fit = not self._expandable and self._max_split is None
        self.capacity = capacity_bytes
        self.device_total = device_total_bytes or capacity_bytes
        self.allowed = allowed_bytes if allowed_bytes is not None else self._fraction_cap()
        self.addresses = AddressSpace(segment_addresses)
        self._pools = {True: BlockPool(small=True), False: BlockPool(small=False)}
        self._live: dict[int, Block] = {}
        self._next_handle = 0
        self.allocated = self.reserved = self.requested = 0
        self.peak_allocated = self.peak_reserved = 0
        self.num_alloc_retries = self.num_ooms = 0
        self.calls = -1  # index of the current malloc / free / empty_cache call
        self.segment_log: list[tuple[int, str, int, int]] = []  # (call, action, bytes, reserved after)
        self.last_largest_free = 0  # largest free block in the last request's pool and stream
        # off, requests skip looking it up (a search per request): the estimate's replay needs
        # only the peaks and the failures
        self.track_largest_free = track_largest_free

    def _fraction_cap(self) -> int | None:
        fraction = self.settings.memory_fraction
        return int(fraction * self.device_total) if fraction is not None and fraction < 1.0 else None

    # --- the caller's side ---------------------------------------------------------------------

    def malloc(self, size: int, stream: int = 0) -> int:
        """Allocate `size` bytes on `stream`; a handle for free(). Raises AllocatorOOM."""
        if size <= 0:
            raise ValueError(f"malloc needs a positive size, got {size}")
        self.calls += 1
        rounded = round_size(size, self._divisions)
        pool = self._pools[is_small(rounded)]
        if self.track_largest_free:
            self.last_largest_free = pool.largest(stream)
        if self._plain_best_fit:
            block = pool.take_best_fit(stream, rounded)
        else:
            block = self._cached_block(pool, stream, rounded)
        if block is None:
            block = self._new_block(pool, stream, rounded)
        if block is None:
            self.num_ooms += 1
            raise AllocatorOOM(size, self._segment_bytes(rounded), self.reserved, self.allocated)
        return self._hand_out(block, pool, rounded, size)

    def free(self, handle: int) -> None:
        block = self._live.pop(handle, None)
        if block is None:
            raise ValueError(f"free of a handle that is not allocated: {handle}")
        self.calls += 1
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        pool = self._pools[block.small]
        before, after = block.prev, block.next
        if before is not None and not before.allocated:  # most neighbours are in use: no call for them
            try_merge(block, before, pool)
        if after is not None and not after.allocated:
            try_merge(block, after, pool)
        pool.add(block)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): return every unsplit cached segment to the driver."""
        self.calls += 1
        self._release_cached()

    def largest_free_block(self) -> int:
        return max(pool.largest() for pool in self._pools.values())

    def address(self, handle: int) -> int:
        return self._live[handle].addr

    def segments(self) -> list[list[Block]]:
        """Every segment (for expandable segments, every range) as its blocks in address order."""
        blocks = list(self._live.values())
        for pool in self._pools.values():
            blocks += pool.ordered() + pool.unmapped()
        heads = sorted((b for b in blocks if b.prev is None), key=lambda b: b.addr)
        return [chain(head) for head in heads]

    # --- finding a block ------------------------------------------------------------------------

    def _cached_block(self, pool: BlockPool, stream: int, rounded: int) -> Block | None:
        """Best fit among the cached blocks (get_free_block)."""
        index = pool.best_fit(stream, rounded)
        if index < 0:
            return None
        if self._expandable:
            index = expandable.prefer_bounded(pool, index, stream)
        if not self._oversize_allows(pool.at(index).size, rounded):
            return None
        return pool.pop(index)

    def _oversize_allows(self, block_bytes: int, rounded: int) -> bool:
        """Blocks of max_split_size or more serve only requests of that size, within a slack."""
        if not self.settings.oversize(block_bytes):
            return True
        if not self.settings.oversize(rounded):
            return False
        return block_bytes < rounded + self.settings.max_non_split_rounding_bytes

    def _new_block(self, pool: BlockPool, stream: int, rounded: int) -> Block | None:
        """A new segment; on failure free cache and retry, as torch's malloc does."""
        block = self._new_segment(pool, stream, rounded)
        if block is None and self._release_oversize(pool, stream, rounded):
            block = self._new_segment(pool, stream, rounded)
        if block is None:
            self._release_cached()
            self.num_alloc_retries += 1
            block = self._new_segment(pool, stream, rounded)
        return block

    def _segment_bytes(self, rounded: int) -> int:
        return segment_bytes(rounded, self.settings.large_segment_bytes)

    def _new_segment(self, pool: BlockPool, stream: int, rounded: int) -> Block | None:
        """alloc_block: cudaMalloc a segment, or grow the stream's expandable segment."""
        size = self._segment_bytes(rounded)
        if self.allowed is not None and self.reserved + size > self.allowed:
            return None
        if self._expandable:
            return expandable.grow(self, pool, stream, rounded)
        if self.reserved + size > self.capacity:
            return None
        self.note_reserve(size, "segment_alloc")
        return Block(self.addresses.take_segment(size), size, stream, pool.small)

    def _hand_out(self, block: Block, pool: BlockPool, rounded: int, requested: int) -> int:
        """Split off the rest when torch would (alloc_found_block) and mark the block allocated."""
        if self._should_split(block, pool, rounded):
            rest = Block(block.addr + rounded, block.size - rounded, block.stream, block.small, block.expandable)
            splice(rest, block, block.next)
            block.size = rounded
            pool.add(rest)
        block.allocated = True
        block.requested = requested
        self.allocated += block.size
        self.requested += requested
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        handle = self._next_handle
        self._next_handle += 1
        self._live[handle] = block
        return handle

    def _should_split(self, block: Block, pool: BlockPool, rounded: int) -> bool:
        remaining = block.size - rounded
        if pool.small or self._expandable:
            return remaining >= MIN_BLOCK
        return self.settings.may_split(rounded) and remaining > SMALL_SIZE

    # --- giving memory back ---------------------------------------------------------------------

    def _release_oversize(self, pool: BlockPool, stream: int, rounded: int) -> bool:
        """release_available_cached_blocks: free cached oversize segments, largest first."""
        limit = self.settings.max_split_bytes
        if limit is None:
            return False
        want = max(rounded, limit)
        index = pool.lower_bound(stream, want)
        found = pool.at(index)
        if found is not None and found.stream == stream and found.expandable is None:
            self._release_segment(found, pool)
            return True
        victims, total = [], 0
        for i in range(index - 1, -1, -1):
            block = pool.at(i)
            if total >= want or block.size < limit or block.stream != stream:
                break
            if block.expandable is None:
                victims.append(block)
                total += block.size
        for block in victims:  # torch frees them as it goes, even when they are not enough
            self._release_segment(block, pool)
        return total >= want

    def _release_cached(self) -> None:
        """release_cached_blocks: every unsplit cached segment, large pool first, then small."""
        for small in (False, True):
            pool = self._pools[small]
            to_unmap = []
            for block in pool.ordered():
                if block.expandable is not None:
                    to_unmap.append(block)
                elif not block.is_split():
                    self._release_segment(block, pool)
            for block in to_unmap:
                expandable.unmap_free(self, pool, block)

    def _release_segment(self, block: Block, pool: BlockPool) -> None:
        pool.remove(block)
        self.addresses.give_back(block.addr)
        self.note_release(block.size, "segment_free")

    # --- bookkeeping shared with expandable.py ------------------------------------------------

    def note_reserve(self, size: int, action: str) -> None:
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.segment_log.append((self.calls, action, size, self.reserved))

    def note_release(self, size: int, action: str) -> None:
        self.reserved -= size
        self.segment_log.append((self.calls, action, size, self.reserved))
