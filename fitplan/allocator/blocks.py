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
        self._keys: list[tuple[int, int, int]] = []  # (stream, size, addr), sorted
        self._blocks: dict[int, Block] = {}  # addr -> free mapped block
        self._unmapped: list[tuple[int, int]] = []  # (stream, addr), sorted
        self._unmapped_blocks: dict[int, Block] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, block: Block) -> None:
        insort(self._keys, (block.stream, block.size, block.addr))
        self._blocks[block.addr] = block

    def remove(self, block: Block) -> None:
        """Take a block out; call before changing its size or address."""
        i = bisect_left(self._keys, (block.stream, block.size, block.addr))
        del self._keys[i]
        del self._blocks[block.addr]

    def lower_bound(self, stream: int, size: int) -> int:
        """Index of the first free block at or after (stream, size): torch's lower_bound."""
        return bisect_left(self._keys, (stream, size, -1))

    def at(self, index: int) -> Block | None:
        if 0 <= index < len(self._keys):
            return self._blocks[self._keys[index][2]]
        return None

    def largest(self, stream: int | None = None) -> int:
        """Size of the largest free block, on one stream or on any."""
        if stream is None:
            streams = {key[0] for key in self._keys}
            return max((self.largest(s) for s in streams), default=0)
        i = bisect_left(self._keys, (stream + 1, -1, -1)) - 1
        return self._keys[i][1] if i >= 0 and self._keys[i][0] == stream else 0

    def ordered(self) -> list[Block]:
        """The free blocks in pool order (a copy, safe to change the pool while walking it)."""
        return [self._blocks[key[2]] for key in self._keys]

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
