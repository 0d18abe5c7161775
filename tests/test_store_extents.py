"""The DRAM arena's allocator: first fit, coalescing, fragmentation, claims at reopen."""

from __future__ import annotations

import pytest

from node_agent.store.extents import ALIGN, ExtentAllocator, aligned

PAGE = ALIGN


def take(arena: ExtentAllocator, nbytes: int) -> int:
    offset = arena.allocate(nbytes)
    assert offset is not None, f"no room for {nbytes}"
    return offset


def test_extents_are_page_aligned_and_first_fit() -> None:
    arena = ExtentAllocator(10 * PAGE)
    a = take(arena, 1)  # one byte takes a whole page
    b = take(arena, PAGE + 1)  # two pages
    assert (a, b) == (0, PAGE)
    assert arena.free_bytes == 7 * PAGE
    arena.free(a, 1)
    assert arena.allocate(PAGE) == 0  # the first range that fits, not the largest


def test_freeing_neighbours_coalesces_them() -> None:
    arena = ExtentAllocator(4 * PAGE)
    offsets = [take(arena, PAGE) for _ in range(4)]
    assert arena.allocate(PAGE) is None  # full
    for offset in (offsets[0], offsets[2], offsets[1], offsets[3]):
        arena.free(offset, PAGE)
    assert arena.free_ranges == [(0, 4 * PAGE)]
    assert arena.allocate(4 * PAGE) == 0


def test_fragmented_free_space_cannot_hold_a_large_extent() -> None:
    arena = ExtentAllocator(6 * PAGE)
    offsets = [take(arena, 2 * PAGE) for _ in range(3)]
    arena.free(offsets[0], 2 * PAGE)
    arena.free(offsets[2], 2 * PAGE)
    assert arena.free_bytes == 4 * PAGE and arena.largest_free == 2 * PAGE
    assert not arena.fits([3 * PAGE])
    assert arena.allocate_all([3 * PAGE]) is None
    assert arena.fits([2 * PAGE, 2 * PAGE])


def test_allocate_all_takes_nothing_when_one_does_not_fit() -> None:
    arena = ExtentAllocator(5 * PAGE)
    before = arena.free_ranges
    assert arena.allocate_all([2 * PAGE, 2 * PAGE, 2 * PAGE]) is None
    assert arena.free_ranges == before
    got = arena.allocate_all([PAGE, 3 * PAGE])  # the largest is placed first
    assert got == [3 * PAGE, 0]


def test_claim_takes_exactly_a_free_range_and_refuses_overlaps() -> None:
    arena = ExtentAllocator(8 * PAGE)
    assert arena.claim(2 * PAGE, 2 * PAGE)
    assert arena.free_ranges == [(0, 2 * PAGE), (4 * PAGE, 8 * PAGE)]
    assert not arena.claim(3 * PAGE, 2 * PAGE)  # overlaps the claimed one
    assert not arena.claim(7 * PAGE, 2 * PAGE)  # runs past the end
    assert not arena.claim(100, PAGE)  # not aligned
    assert arena.free_ranges == [(0, 2 * PAGE), (4 * PAGE, 8 * PAGE)]


def test_a_double_free_is_caught() -> None:
    arena = ExtentAllocator(4 * PAGE)
    offset = arena.allocate(PAGE)
    assert offset is not None
    arena.free(offset, PAGE)
    with pytest.raises(AssertionError, match="double free"):
        arena.free(offset, PAGE)


def test_aligned_rounds_up_to_whole_pages() -> None:
    assert [aligned(n) for n in (0, 1, PAGE, PAGE + 1)] == [PAGE, PAGE, PAGE, 2 * PAGE]
