"""expandable_segments:True in the allocator model.

Each stream and pool gets one large virtual range (1 1/8 of the device's memory, as torch reserves)
that is backed by physical pages only as far as needed: 2 MiB pages in the small pool,
large_segment_size (20 MiB) pages in the large pool. Growing maps the fewest pages that make a
free run long enough, at the lowest such address; freeing the cache unmaps the whole pages inside
free blocks and drops a range that is left with nothing mapped. Reserved memory is the mapped pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fitplan.allocator.blocks import Block, BlockPool, splice, try_merge
from fitplan.allocator.sizes import SMALL_BUFFER, round_up

if TYPE_CHECKING:
    from fitplan.allocator.allocator import Allocator


@dataclass(eq=False)
class ExpandableSegment:
    base: int
    size: int  # the whole virtual range
    page: int


def prefer_bounded(pool: BlockPool, index: int, stream: int) -> int:
    """Best fit counting a block at the mapped end as long as it could grow (get_free_block):
    the pool index of the block to take, from the best fit's `index` on.

    The last mapped block borders the unmapped rest of the range, so torch ranks it as that big
    and takes the next larger block that cannot grow, if there is one.
    """
    block = pool.at(index)
    nxt = pool.at(index + 1)
    while block.expandable is not None and nxt is not None and nxt.stream == stream \
            and _growable_size(nxt) < _growable_size(block):
        index += 1
        block, nxt = nxt, pool.at(index + 1)
    return index


def _growable_size(block: Block) -> int:
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)


def grow(alloc: Allocator, pool: BlockPool, stream: int, rounded: int) -> Block | None:
    """try_allocate_expandable_block: map pages until a free run holds `rounded` bytes."""
    candidate = _find_room(alloc, pool, stream, rounded)
    if not candidate.mapped and not _map(alloc, pool, candidate, min(candidate.size, rounded)):
        return None
    while candidate.size < rounded:
        following = candidate.next
        if following is None:  # larger than the whole virtual range (more than the device): no pages can back it
            return None
        if not _map(alloc, pool, following, min(rounded - candidate.size, following.size)):
            return None  # pages mapped so far stay mapped, as on the device
        candidate = following
    pool.remove(candidate)
    return candidate


def _find_room(alloc: Allocator, pool: BlockPool, stream: int, rounded: int) -> Block:
    """The lowest free-or-unmapped run of the stream long enough; a new range if none."""
    for unmapped in pool.unmapped_of(stream):
        start = unmapped.prev if unmapped.prev is not None and not unmapped.prev.allocated else unmapped
        if _run_bytes(start, rounded) >= rounded:
            return start
    page = SMALL_BUFFER if pool.small else alloc.settings.large_segment_bytes
    size = round_up(alloc.device_total + alloc.device_total // 8, page)
    segment = ExpandableSegment(alloc.addresses.take_range(size), size, page)
    block = Block(segment.base, size, stream, pool.small, segment, mapped=False)
    pool.add_unmapped(block)
    return block


def _run_bytes(block: Block | None, wanted: int) -> int:
    total = 0
    while total < wanted and block is not None and not block.allocated:
        total += block.size
        block = block.next
    return total


def _map(alloc: Allocator, pool: BlockPool, block: Block, size: int) -> bool:
    """map_block: back the start of an unmapped range with whole pages and merge it with free neighbours."""
    mapped = round_up(size, block.expandable.page)
    if alloc.reserved + mapped > alloc.capacity:
        return False  # the driver has no pages left (cuMemCreate fails, nothing of this call stays)
    pool.remove_unmapped(block)
    block.mapped = True
    if mapped < block.size:
        rest = Block(block.addr + mapped, block.size - mapped, block.stream, block.small, block.expandable,
                     mapped=False)
        splice(rest, block, block.next)
        pool.add_unmapped(rest)
        block.size = mapped
    try_merge(block, block.prev, pool)
    try_merge(block, block.next, pool)
    pool.add(block)
    alloc.note_reserve(mapped, "segment_map")
    return True


def unmap_free(alloc: Allocator, pool: BlockPool, block: Block) -> None:
    """unmap_block: give back the whole pages inside a free block; drop the range if nothing is left."""
    segment = block.expandable
    first = segment.base + round_up(block.addr - segment.base, segment.page)
    last = segment.base + (block.addr + block.size - segment.base) // segment.page * segment.page
    if first >= last:
        return
    pool.remove(block)
    _keep_free(pool, block, block.addr, first - block.addr, before=True)
    _keep_free(pool, block, last, block.addr + block.size - last, before=False)
    block.addr, block.size, block.mapped = first, last - first, False
    try_merge(block, block.prev, pool)
    try_merge(block, block.next, pool)
    pool.add_unmapped(block)
    alloc.note_release(last - first, "segment_unmap")
    if not block.is_split():
        pool.remove_unmapped(block)  # release_expandable_segment: the whole range is unmapped


def _keep_free(pool: BlockPool, block: Block, addr: int, size: int, before: bool) -> None:
    """The mapped part of a free block left beside the pages that are unmapped."""
    if size <= 0:
        return
    part = Block(addr, size, block.stream, block.small, block.expandable)
    if before:
        splice(part, block.prev, block)
    else:
        splice(part, block, block.next)
    pool.add(part)
