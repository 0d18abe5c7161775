"""Where checkpoints sit in the DRAM arena: a first-fit free list of byte ranges, coalesced.

Every extent is a multiple of `ALIGN` (4 KiB) long and starts at a multiple of it, so extents
can be mapped on their own and read into with `O_DIRECT`. One extent per partition: a partition
must be contiguous (the loader binds its tensors as views of one buffer). The allocator is pure
bookkeeping (no I/O, no locking: its tier's lock guards it); the tier decides what to evict
when nothing fits (`Tier.reserve`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from loader.arena import ALIGN  # the loader refuses placements off this alignment


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to a whole number of `ALIGN` blocks (at least one block, so every
    extent has a distinct offset, even an empty partition's)."""
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


class ExtentAllocator:
    """Free byte ranges of an arena of `size` bytes, sorted by offset, never adjacent (freeing
    merges neighbours). `allocate` takes the first range that fits."""

    def __init__(self, size: int) -> None:
        self.size = size // ALIGN * ALIGN
        self._free: list[tuple[int, int]] = [(0, self.size)] if self.size else []  # (start, end)

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._free)

    @property
    def largest_free(self) -> int:
        return max((end - start for start, end in self._free), default=0)

    @property
    def free_ranges(self) -> list[tuple[int, int]]:
        """The free ranges `(start, end)`, by offset (a copy)."""
        return list(self._free)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a fresh extent of `aligned(nbytes)` bytes (first fit), or None if no free
        range is that long."""
        want = aligned(nbytes)
        for i, (start, end) in enumerate(self._free):
            if end - start >= want:
                if end - start == want:
                    del self._free[i]
                else:
                    self._free[i] = (start + want, end)
                return start
        return None

    def allocate_all(self, sizes: Sequence[int]) -> list[int] | None:
        """One extent per entry of `sizes`, largest first (the hardest to place), or None with
        nothing taken if they do not all fit."""
        offsets: dict[int, int] = {}
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            got = self.allocate(sizes[i])
            if got is None:
                for j, offset in offsets.items():
                    self.free(offset, sizes[j])
                return None
            offsets[i] = got
        return [offsets[i] for i in range(len(sizes))]

    def copy(self) -> ExtentAllocator:
        """An independent allocator in the same state (to try a plan on)."""
        twin = ExtentAllocator(0)
        twin.size, twin._free = self.size, list(self._free)
        return twin

    def fits(self, sizes: Sequence[int]) -> bool:
        """True if `allocate_all(sizes)` would succeed now (nothing is taken)."""
        return self.copy().allocate_all(sizes) is not None

    def free(self, offset: int, nbytes: int) -> None:
        """Give back the extent at `offset` that was allocated for `nbytes`."""
        start, end = offset, offset + aligned(nbytes)
        assert start % ALIGN == 0 and end <= self.size, f"extent {start}..{end} outside the arena"
        i = bisect.bisect_left(self._free, (start, start))
        assert i == len(self._free) or self._free[i][0] >= end, "double free (overlaps next)"
        assert i == 0 or self._free[i - 1][1] <= start, "double free (overlaps previous)"
        if i < len(self._free) and self._free[i][0] == end:  # merge with the next
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:  # merge with the previous
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end))

    def claim(self, offset: int, nbytes: int) -> bool:
        """Take the specific extent at `offset` (rebuilding the allocator from committed
        entries when a tier reopens). False, with nothing taken, unless it is wholly free."""
        start, end = offset, offset + aligned(nbytes)
        if start % ALIGN or end > self.size:
            return False
        i = bisect.bisect_right(self._free, (start, float("inf"))) - 1
        if i < 0 or self._free[i][1] < end:
            return False
        lo, hi = self._free.pop(i)
        pieces = [(s, e) for s, e in ((lo, start), (end, hi)) if e > s]
        self._free[i:i] = pieces
        return True
