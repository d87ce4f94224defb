"""Blocks and the free-block pools of the caching allocator model.

A segment (one cudaMalloc, or one expandable mapping) is a chain of blocks linked by prev/next in
address order. Free blocks sit in a pool ordered as torch's BlockComparatorSize: (stream, size,
address), so best fit is the first entry at or after (stream, size). Unmapped address space of
expandable segments sits in a second, address-ordered set (BlockComparatorAddress).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class Block:
    addr: int
    size: int
    stream: int
    small: bool  # which pool it belongs to
    expandable: object | None = None  # the ExpandableSegment it lies in, if any
    allocated: bool = False
    mapped: bool = True
    prev: Block | None = None
    next: Block | None = None
    requested: int = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


def splice(block: Block, before: Block | None, after: Block | None) -> None:
    """Link `block` between two neighbours (either may be None)."""
    block.prev, block.next = before, after
    if before is not None:
        before.next = block
    if after is not None:
        after.prev = block


class BlockPool:
    """The free blocks of one pool (small or large), for every stream."""

    def __init__(self, small: bool):
        self.small = small
        # (stream, size, addr, block), sorted: (stream, size, addr) is unique among free blocks, so
        # the block itself is never compared; keeping it in the entry saves a lookup per request
        self._entries: list[tuple[int, int, int, Block]] = []
        self._unmapped: list[tuple[int, int]] = []  # (stream, addr), sorted
        self._unmapped_blocks: dict[int, Block] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, block: Block) -> None:
        insort(self._entries, (block.stream, block.size, block.addr, block))

    def remove(self, block: Block) -> None:
        """Take a block out; call before changing its size or address."""
        entries = self._entries
        i = bisect_left(entries, (block.stream, block.size, block.addr))
        if i == len(entries) or entries[i][3] is not block:
            raise ValueError(f"block at {block.addr} of {block.size} bytes is not in the pool")
        del entries[i]

    def pop(self, index: int) -> Block:
        """Take out the block at `index` (one best_fit found)."""
        return self._entries.pop(index)[3]

    def best_fit(self, stream: int, size: int) -> int:
        """Index of the smallest free block of `stream` holding `size` bytes, the lowest address
        among equals (lower_bound, then the stream's check, as get_free_block); -1 if none."""
        entries = self._entries
        i = bisect_left(entries, (stream, size, -1))
        return i if i < len(entries) and entries[i][0] == stream else -1

    def take_best_fit(self, stream: int, size: int) -> Block | None:
        """best_fit's block, taken out of the pool; None if there is none."""
        entries = self._entries
        i = bisect_left(entries, (stream, size, -1))
        return entries.pop(i)[3] if i < len(entries) and entries[i][0] == stream else None

    def lower_bound(self, stream: int, size: int) -> int:
        """Index of the first free block at or after (stream, size): torch's lower_bound."""
        return bisect_left(self._entries, (stream, size, -1))

    def at(self, index: int) -> Block | None:
        if 0 <= index < len(self._entries):
            return self._entries[index][3]
        return None

    def largest(self, stream: int | None = None) -> int:
        """Size of the largest free block, on one stream or on any."""
        if stream is None:
            streams = {entry[0] for entry in self._entries}
            return max((self.largest(s) for s in streams), default=0)
        i = bisect_left(self._entries, (stream + 1, -1, -1)) - 1
        return self._entries[i][1] if i >= 0 and self._entries[i][0] == stream else 0

    def ordered(self) -> list[Block]:
        """The free blocks in pool order (a copy, safe to change the pool while walking it)."""
        return [entry[3] for entry in self._entries]

    def add_unmapped(self, block: Block) -> None:
        insort(self._unmapped, (block.stream, block.addr))
        self._unmapped_blocks[block.addr] = block

    def remove_unmapped(self, block: Block) -> None:
        i = bisect_left(self._unmapped, (block.stream, block.addr))
        del self._unmapped[i]
        del self._unmapped_blocks[block.addr]

    def unmapped(self) -> list[Block]:
        return list(self._unmapped_blocks.values())

    def unmapped_of(self, stream: int) -> list[Block]:
        """Unmapped ranges of one stream in address order (a copy)."""
        lo = bisect_left(self._unmapped, (stream, -1))
        hi = bisect_left(self._unmapped, (stream + 1, -1))
        return [self._unmapped_blocks[key[1]] for key in self._unmapped[lo:hi]]


def chain(head: Block) -> list[Block]:
    """A segment's blocks from its first one, in address order."""
    blocks = []
    while head is not None:
        blocks.append(head)
        head = head.next
    return blocks


def try_merge(dst: Block, src: Block | None, pool: BlockPool) -> int:
    """Absorb the free neighbour `src` into `dst` (try_merge_blocks); the bytes absorbed, 0 if none.

    `dst` must be out of the pool (its address and size change); a mapped block only merges with
    a mapped one, an unmapped range only with an unmapped one.
    """
    if src is None or src.allocated or src.mapped != dst.mapped:
        return 0
    if src.mapped:
        pool.remove(src)
    else:
        pool.remove_unmapped(src)
    if src is dst.prev:
        dst.addr = src.addr
        splice(dst, src.prev, dst.next)
    else:
        splice(dst, dst.prev, src.next)
    dst.size += src.size
    return src.size
