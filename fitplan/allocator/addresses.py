"""Where the model's segments start.

cudaMalloc's addresses are the driver's choice. They matter to the allocator only as the last
tie-break of best fit (two free blocks of one stream and one size: the lower address wins), and
that choice decides which segments stay split. A replay of a recorded trace therefore passes the
recorded cudaMalloc addresses in order; otherwise segments get increasing, non-overlapping
addresses.
"""

from __future__ import annotations

from collections.abc import Iterable

from fitplan.allocator.sizes import SMALL_BUFFER, round_up

_FIRST = 1 << 40  # below the addresses CUDA hands out, so recorded ones never meet these


class AddressSpace:
    def __init__(self, recorded: Iterable[int] | None = None):
        self._recorded = iter(recorded or ())
        self._next = _FIRST
        self._live: dict[int, int] = {}  # start -> size of segments that use a recorded address

    def take_segment(self, size: int) -> int:
        """Start of a new cudaMalloc segment: the next recorded address if it is free, else a new one."""
        addr = next(self._recorded, None)
        if addr is None or self._overlaps(addr, size):
            return self.take_range(size)
        self._live[addr] = size
        return addr

    def take_range(self, size: int) -> int:
        """A fresh range, never handed out before (expandable segments reserve theirs this way)."""
        addr = self._next
        self._next += round_up(size, SMALL_BUFFER) + SMALL_BUFFER
        return addr

    def give_back(self, addr: int) -> None:
        self._live.pop(addr, None)

    def _overlaps(self, addr: int, size: int) -> bool:
        return any(start < addr + size and addr < start + length for start, length in self._live.items())
